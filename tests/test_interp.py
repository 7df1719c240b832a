"""The interpolation rule (core/profile/interp.py), as the simulator reads tables with it
(simulator/tables.py Table) and the profiler reads its whole/alone ratio (runtime/profile/whole_model.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.profile.interp import Grid, curve
from core.profile.schema import table
from simulator.costs import EXTRAPOLATION_MARGIN, Costs, ModelShape, Table

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
GRID = [16, 64, 256, 1024]                       # a 4x grid, as the quick profile's tokens
GEOMETRIC = [32, 128, 512]
ARITHMETIC = [40, 160, 640]
FORMS = [   # (a, b, c): cost a + b x + c x^2, seconds
    (0.0, 1e-5, 0.0), (1e-3, 1e-5, 0.0), (1.0, 1e-5, 0.0),            # a = 0, small a, big a
    (0.0, 0.0, 1e-8), (0.0, 1e-5, 1e-8), (2e-4, 3e-5, 5e-8), (0.5, 1e-6, 1e-9),
]


def one_axis(f, grid=GRID) -> Table:
    t = table({"tokens": list(grid)}, [f(x) for x in grid])
    return Table(t, "test.tokens")


@pytest.mark.parametrize("a,b,c", FORMS)
def test_linear_and_quadratic_costs_read_within_3_percent_at_midpoints(a, b, c):
    f = lambda x: a + b * x + c * x * x  # noqa: E731
    t = one_axis(f)
    for x in GEOMETRIC + ARITHMETIC:
        assert t(x) == pytest.approx(f(x), rel=0.03), x
    for x in GRID:                               # the grid points themselves, exactly
        assert t(x) == pytest.approx(f(x), rel=1e-12)


def test_max_error_at_midpoints_and_the_old_rule_for_comparison():
    """The numbers of the report: this rule vs linear over log(x) (the rule before)."""
    worst_new, worst_old = 0.0, 0.0
    for a, b, c in FORMS:
        f = lambda x: a + b * x + c * x * x  # noqa: E731
        t = one_axis(f)
        for x in GEOMETRIC + ARITHMETIC:
            worst_new = max(worst_new, abs(t(x) / f(x) - 1))
            old = np.interp(np.log(x), np.log(GRID), [f(g) for g in GRID])
            worst_old = max(worst_old, abs(old / f(x) - 1))
    assert worst_new < 1e-9            # exact for both forms (up to rounding)
    assert worst_old > 1.1             # c x^2 read at a geometric midpoint: 112% high


def test_two_axis_cost_batch_by_context():
    """a + b batch + c context + d batch x context (a decode attention's form) and a product of
    one-axis quadratics, read off-grid on a 2x batch and a mixed context grid."""
    B, C = [1, 2, 4, 8, 16], [256, 1024, 2048, 4096, 8192]
    forms = [lambda b, c: 1e-4 + 2e-5 * b + 1e-8 * c + 3e-8 * b * c,
             lambda b, c: 3e-8 * b * c,
             lambda b, c: (1 + 0.1 * b + 0.01 * b * b) * (1e-4 + 1e-8 * c + 1e-12 * c * c)]
    for f in forms:
        t = Table(table({"batch": B, "context": C}, [[f(b, c) for c in C] for b in B]), "test.2d")
        for b in (1.5, 3, 6, 12, 5.5):
            for c in (300, 640, 1500, 3000, 6000, 8000):
                assert t(b, c) == pytest.approx(f(b, c), rel=1e-9), (b, c)     # exact: these forms are
                # A + B p(b) + C q(c) + D p(b) q(c) (core/profile/interp.py)


def test_monotone_tables_stay_monotone_on_a_dense_sweep():
    """A noisy table (made non-decreasing by the running max) never reads lower at a larger
    coordinate, along either axis; every committed CPU table too."""
    rng = np.random.default_rng(0)
    B, C = [1, 2, 4, 8, 16], [256, 512, 1024, 2048, 4096, 8192]
    vals = [[1e-4 * b + 1e-8 * b * c for c in C] for b in B]
    noisy = (np.asarray(vals) * rng.uniform(0.7, 1.3, (len(B), len(C)))).tolist()
    tables = [Table(table({"batch": B, "context": C}, noisy), "noisy"),
              one_axis(lambda x: 1e-3 + (x > 200) * 1e-2, GRID),            # a step: no overshoot
              one_axis(lambda x: 1e-6 * x, [16, 64, 128, 256, 512, 4096])]  # uneven grid
    prof = json.loads(CPU.read_text())
    for model in prof["models"].values():
        tables += [Table(t, n) for n, t in model["kernels"].items() if isinstance(t, dict) and "axes" in t]
    tables += [Table(t, n) for n, t in prof["transfers"].items() if isinstance(t, dict) and "axes" in t]
    for t in tables:
        axes = t.axes
        if len(axes) == 1:
            ys = [t(x) for x in np.geomspace(axes[0][0], axes[0][-1], 600)]
            assert np.all(np.diff(ys) >= -1e-12 * max(ys)), t.where      # up to float rounding
            continue
        for ax in range(2):
            for o in np.geomspace(axes[1 - ax][0], axes[1 - ax][-1], 9):
                xs = np.geomspace(axes[ax][0], axes[ax][-1], 150)
                ys = [t(x, o) if ax == 0 else t(o, x) for x in xs]
                assert np.all(np.diff(ys) >= -1e-12 * max(ys)), (t.where, ax, o)


def test_values_stay_within_the_cell_and_grid_points_are_exact():
    ys = [1.0, 1.2, 5.0, 5.1, 30.0]                 # noisy, steep: a quadratic would overshoot
    xs = [16, 64, 256, 1024, 4096]
    t = one_axis(dict(zip(xs, ys)).__getitem__, xs)
    for lo, hi, ylo, yhi in zip(xs, xs[1:], ys, ys[1:]):
        for x in np.linspace(lo, hi, 50):
            assert ylo <= t(x) <= yhi
    assert [t(x) for x in xs] == pytest.approx(ys, rel=1e-12)


def test_below_nearest_above_last_segment_and_refusal():
    f = lambda x: 2e-3 + 1e-5 * x  # noqa: E731
    seen = []
    t = Table(table({"tokens": GRID}, [f(x) for x in GRID]), "test.t", beyond=lambda *a: seen.append(a))
    assert t(1) == t(16) == pytest.approx(f(16))           # below: nearest
    assert t(2048) == pytest.approx(f(2048))                # above: the last segment's slope, raw axis
    assert seen == [("test.t", "tokens", 2048.0, 1024.0)]
    # one point: constant
    assert Table(table({"tokens": [64]}, [3.0]), "c")(1e6) == 3.0
    # a measured table beyond EXTRAPOLATION_MARGIN x its last point is refused in one line
    c = Costs.load(CPU, "smollm2")
    last = c.table("prefill_layer").axes[0][-1]
    c.table("prefill_layer")(last * EXTRAPOLATION_MARGIN)
    with pytest.raises(ConfigError) as e:
        c.table("prefill_layer")(last * EXTRAPOLATION_MARGIN * 1.01)
    assert "\n" not in str(e.value) and "python -m runtime.profile --model smollm2" in str(e.value)


def test_replace_table_anchored_at_zero():
    """Costs._replace_table prepends k0 = K[0] / 16 with zeros: 0 at and below k0, monotone in
    k, within the first measured value up to K[0]."""
    c = Costs.load(CPU, "smollm2")
    s = ModelShape(30, 3, 64, "float32")
    K = c.table("gather_replace").axes[1]
    for B in (1, 3, 4):
        ks = np.geomspace(K[0] / 64, K[-1], 300)
        ys = [c.replace(B, k, s) for k in ks]
        assert c.replace(B, 0, s) == 0.0 and c.replace(B, K[0] / 16, s) == 0.0
        assert np.all(np.diff(ys) >= -1e-12 * max(ys))
        first = c.replace(B, K[0], s)
        assert all(0.0 <= y <= first for k, y in zip(ks, ys) if k <= K[0])


def test_profiler_ratio_curve_is_the_same_rule_flat_past_the_ends():
    xs, ys = [256, 512, 1024], [0.93, 0.95, 1.0]
    got = curve(xs, ys, [16, 256, 384, 512, 768, 1024, 8192])
    g = Grid([xs], ys)
    assert got[0] == 0.93 and got[-1] == 1.0                       # flat past the ends
    assert got[1:6] == [g.inside([x]) for x in (256, 384, 512, 768, 1024)]
    assert curve([256], [0.9], [16, 4096]) == [0.9, 0.9]          # one length: that ratio everywhere
