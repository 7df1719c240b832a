"""A profile table as a function: one interpolator per table, one rule for every table.

A profile table (core/profile/schema.py) is a function measured on a grid; `Table` reads it at
any point (docs/profiles.md says why this rule):

- measured noise: every table is first made non-decreasing along each axis (a running max);
- inside the grid: core/profile/interp.py's rule, the one the profiler uses too (per axis a
  quadratic in the raw axis value through neighbouring grid points, clamped to the cell's
  values; over two axes a multilinear blend of the cell's corners). It reads a + b x and
  a + b x + c x^2 exactly between the points of a geometric grid, and a non-decreasing table
  stays non-decreasing along every axis;
- below the grid: the first grid value (nearest; a fixed cost does not vanish for tiny sizes);
- above the grid: linear extrapolation in the raw axis value, with the slope of the last grid
  segment (transfers and kernels grow linearly once past their fixed costs), clamped at zero.
  `beyond` is told of every such reading: simulator/costs.py refuses one past
  EXTRAPOLATION_MARGIN x the last grid point unless allow_extrapolation=true, and records how far
  every one went (`Extrapolated`: the result's `extrapolated` and `extrapolated_reads`).

`Formula` is the same callable shape for a roofline cost (core/profile/analytic.py), read at any
point with nothing to interpolate.
"""
from __future__ import annotations

import numpy as np

from core.profile.interp import Grid

# a measured grid is read (linearly extrapolated) up to this factor above its last point; beyond
# it a run is refused unless allow_extrapolation=true (then the axis is recorded)
EXTRAPOLATION_MARGIN = 2.0


class Extrapolated(set):
    """What a run read beyond what was measured: the tags `<table>:<axis>` / `shape:<key>` read past
    EXTRAPOLATION_MARGIN (a set, as `Costs.extrapolated` always was: the result's `extrapolated`)
    and, per tag, how far (`far`: the largest value read and the measured limit, a grid's last
    point or the shape's measured value), including reads past a grid within the margin (`near`,
    which do not enter the set)."""

    def __init__(self, *tags):
        super().__init__(*tags)
        self.far: dict[str, tuple[float, float]] = {}

    def near(self, tag: str, value: float, limit: float) -> None:
        if tag not in self.far or float(value) > self.far[tag][0]:
            self.far[tag] = (float(value), float(limit))

    def note(self, tag: str, value: float, limit: float) -> None:
        self.add(tag)
        self.near(tag, value, limit)

    def record(self) -> dict:
        """{tag: {"read": farthest value, "limit": measured limit}}, the result's `extrapolated_reads`."""
        return {t: {"read": v, "limit": lim} for t, (v, lim) in sorted(self.far.items())}


class Table:
    """One profile table as a function of its axes (in axis order), p50 values."""

    def __init__(self, t: dict, where: str, beyond=None):
        self.where = where
        self.beyond = beyond           # called (where, axis, value, last grid point) above the grid
        self.names = list(t["axes"])
        self.axes = [np.asarray(v, dtype=float) for v in t["axes"].values()]
        self.values = np.asarray(t["p50"], dtype=float)
        self.extra = {k: v for k, v in t.items() if k not in ("axes", "unit", "p50", "p10", "p90")}
        self._build()

    def _build(self) -> None:
        # an axis with one point is constant along it: drop it from the interpolator
        self._live = [i for i, a in enumerate(self.axes) if len(a) > 1]
        # measured p50s carry noise (a gather of 64 rows timed below one of 16): a larger size
        # never costs less, so each table is made non-decreasing along every axis (running max)
        vals = self.values.reshape([len(a) for a in self.axes])
        for ax in range(vals.ndim):
            vals = np.maximum.accumulate(vals, axis=ax)
        self.values = vals
        vals = vals[tuple(slice(None) if i in self._live else 0 for i in range(len(self.axes)))]
        if not self._live:
            self._const = float(vals)
            return
        self._grid = Grid([self.axes[i] for i in self._live], vals)     # core/profile/interp.py's rule
        self._lo = [float(self.axes[i][0]) for i in self._live]
        self._hi = [float(self.axes[i][-1]) for i in self._live]
        self._prev = [float(self.axes[i][-2]) for i in self._live]

    def __call__(self, *x: float) -> float:
        if len(x) != len(self.axes):
            raise TypeError(f"{self.where} takes {self.names}, got {len(x)} values")
        if not self._live:
            return self._const
        x = [float(x[i]) for i in self._live]
        clip = [min(max(v, lo), hi) for v, lo, hi in zip(x, self._lo, self._hi)]
        f = self._grid.inside(clip)
        for j, (v, hi, prev) in enumerate(zip(x, self._hi, self._prev)):
            if v > hi:                                   # last segment's slope, raw axis
                if self.beyond is not None:
                    self.beyond(self.where, self.names[self._live[j]], v, hi)
                at_prev = list(clip)
                at_prev[j] = prev
                slope = (self._grid.inside(clip) - self._grid.inside(at_prev)) / (hi - prev)
                f += (v - hi) * slope
        return max(f, 0.0)


class Formula:
    """A roofline cost as a table-like callable: the analytic formula, for any point."""

    def __init__(self, f, where: str):
        self.f, self.where = f, where

    def __call__(self, *x: float, **kw) -> float:
        return float(self.f(*x, **kw))
