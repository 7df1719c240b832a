"""The one rule by which a profile table is read between its grid points.

Both halves read tables with it: the simulator (simulator/tables.py `Table`, every cost) and the
profiler (runtime/profile/whole_model.py `whole_model_prefill`, the whole/alone ratio between the
lengths it timed inside the whole model). Nothing else interpolates a profile.

The costs a profile holds have the form a + b x (a fixed cost plus a per-byte / per-token /
per-row one: transfers, GEMMs, decode attention over a context) or a + b x + c x^2 (prefill
attention over T tokens). Grids are geometric (16, 64, 256, 1024), so a reading halfway between
two points must be right for those forms; linear interpolation over log(x) is not (on a 4x grid
a + b x read at the geometric midpoint comes out 25% high when a = 0, c x^2 112% high).

Per axis, on the cell [x_i, x_i+1] that holds x:
- a quadratic in the *raw* axis value through three neighbouring grid points: x_i-1, x_i,
  x_i+1 and x_i, x_i+1, x_i+2; where the cell has neighbours on both sides, the mean of the two
  (itself a quadratic through x_i and x_i+1); at an end of the axis the one that exists;
- an axis of two points: linear in the raw value; of one point: constant (not an axis at all);
- the result is clamped to the range of the cell's two grid values: a quadratic through noisy
  points cannot overshoot them, and a non-decreasing table stays non-decreasing (one quadratic
  on the cell through both ends, cut to their range, has no way back down).
Over several axes (batch x context, batch x k, m x context): on each axis that rule is read on
the axis' *profile* (the table summed over its other axes) and taken as a fraction s in [0, 1]
of the way across the cell (clamped value - profile at x_i, over the profile's rise in the
cell); the value is the multilinear blend of the cell's corner values at those fractions. In one
axis that is exactly the clamped quadratic; over several it is exact for every cost of the form
A + B p(x) + C q(y) + D p(x) q(y), p and q of degree <= 2 and monotone on the cell (a + b batch + c context + d batch x
context, any product or sum of one-axis quadratics), stays within the cell's corner values, and
a table non-decreasing along every axis stays so along every axis (each fraction grows with its
coordinate; the blend has no negative weights). A full tensor product of the quadratics, clamped
to the corners' range afterwards, is exact for more forms but not monotone: read on the committed
CPU profile and a first-use one it went down along an axis in 86 of 816 dense sweeps (by up to
0.9% of the table's top).

"""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import numpy as np


def _lagrange(x0: float, x1: float, x2: float, x: float) -> tuple[float, float, float]:
    """Weights of the quadratic through x0, x1, x2 read at x."""
    return ((x - x1) * (x - x2) / ((x0 - x1) * (x0 - x2)),
            (x - x0) * (x - x2) / ((x1 - x0) * (x1 - x2)),
            (x - x0) * (x - x1) / ((x2 - x0) * (x2 - x1)))


def axis_weights(axis: Sequence[float], x: float) -> tuple[int, list[float], int]:
    """(first grid index, weights of consecutive grid points from there, cell index i) of one
    axis at x, x_0 <= x <= x_n-1 (the rule in the module docstring)."""
    n = len(axis)
    if n == 1:
        return 0, [1.0], 0
    i = min(max(bisect_right(axis, x) - 1, 0), n - 2)
    if n == 2:
        t = (x - axis[0]) / (axis[1] - axis[0])
        return 0, [1.0 - t, t], 0
    starts = [s for s in (i - 1, i) if s >= 0 and s + 2 <= n - 1]
    lo = starts[0]
    w = [0.0] * (starts[-1] + 3 - lo)
    share = 1.0 / len(starts)
    for s in starts:
        for k, v in enumerate(_lagrange(axis[s], axis[s + 1], axis[s + 2], x)):
            w[s - lo + k] += share * v
    return lo, w, i


class Grid:
    """A table on its grid, read by the rule (values shaped as the axes, axes ascending)."""

    def __init__(self, axes: Sequence[Sequence[float]], values):
        self.axes = [[float(a) for a in ax] for ax in axes]
        self.values = np.asarray(values, dtype=float).reshape([len(a) for a in self.axes])
        # each axis' profile: the table summed over its other axes (the table itself in 1-D)
        n = self.values.ndim
        self.profiles = [self.values.sum(axis=tuple(b for b in range(n) if b != a)).tolist() for a in range(n)]
        self._row = self.values.tolist() if n == 1 else None

    def fraction(self, a: int, x: float) -> tuple[int, float]:
        """(cell index i, how far across [x_i, x_i+1] x lies, 0..1) on axis `a`: the rule's
        quadratic on the axis' profile, clamped to the cell, as a fraction of the cell's rise."""
        ax, prof = self.axes[a], self.profiles[a]
        lo, w, i = axis_weights(ax, x)
        if len(ax) == 1:
            return 0, 0.0
        rise = prof[i + 1] - prof[i]
        if rise == 0.0:                      # a flat cell: where x lies is all there is
            return i, (x - ax[i]) / (ax[i + 1] - ax[i])
        q = sum(wk * prof[lo + k] for k, wk in enumerate(w))
        return i, min(max((q - prof[i]) / rise, 0.0), 1.0)

    def inside(self, x: Sequence[float]) -> float:
        """The table read at x, every coordinate inside its axis."""
        if self._row is not None:            # the common case, without numpy's per-call costs
            i, s = self.fraction(0, float(x[0]))
            row = self._row
            return row[i] + s * (row[min(i + 1, len(row) - 1)] - row[i]) if s else row[i]
        block, blend = [], []
        for a, xv in enumerate(x):
            i, s = self.fraction(a, float(xv))
            block.append(slice(i, i + 2) if len(self.axes[a]) > 1 else slice(0, 1))
            blend.append(np.array([1.0 - s, s]) if len(self.axes[a]) > 1 else np.ones(1))
        f = self.values[tuple(block)]
        for b in blend:                      # multilinear in the fractions: contract the leading axis
            f = np.tensordot(b, f, axes=(0, 0))
        return float(f)

    def read(self, x: Sequence[float]) -> float:
        """`inside`, each coordinate first held to its axis' range (flat past both ends)."""
        return self.inside([min(max(float(xv), ax[0]), ax[-1]) for ax, xv in zip(self.axes, x)])


def curve(xs: Sequence[float], ys: Sequence[float], at: Sequence[float]) -> list[float]:
    """A 1-D table (xs, ys) read at each of `at`, flat past the ends (the profiler's ratio)."""
    g = Grid([xs], ys)
    return [g.read([a]) for a in at]
