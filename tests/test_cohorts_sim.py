"""Batching in cohorts (scheduler.batching=cohorts, simulator/scheduler.py), as runtime.serve runs
it: the requests one prefill admits are a cohort; a decode step computes every row of every live
cohort at the cohort's padded context and pays one attention call per cohort per layer. Checked
against hand-built schedules and the profile's own grid values (read from the JSON, not through
the simulator's table reader), and the drift correction's per-table scale."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.admission import BATCHINGS, check_scheduler
from core.errors import ConfigError
from core.workload import Request
from simulator.costs import KV_ELEMENT_BYTES, Costs, ModelShape
from simulator.hardware import solve
from simulator.policies import Full
from simulator.policies.base import per_cohort
from simulator.scheduler import Sim

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
GRID = json.loads(CPU.read_text())["models"]["smollm2"]["kernels"]


def costs(**kw):
    c = Costs.load(CPU, "smollm2", allow_extrapolation=True, **kw)
    s = c.shape
    return c.bind(s, s["n_layers"], KV_ELEMENT_BYTES[c.kv_dtype_auto])


def shape(c):
    s = c.shape
    return ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)


def p50(table: str, **at) -> float:
    """The profile's p50 at a grid point, read from the JSON by index (an independent reference)."""
    t = GRID[table]
    v = t["p50"]
    for axis, values in t["axes"].items():
        v = v[values.index(at[axis])]
    return float(v)


def served(requests, batching, **kw):
    c = costs()
    sim = Sim(c, shape(c), Full(), 10 ** 12, batching=batching, timeline=True, ctx_bucket=1, **kw)
    sim.env.process(sim.feed(requests))
    sim.env.process(sim.serve())
    sim.env.run()
    return sim


def test_a_finished_row_is_computed_until_its_cohort_is_done():
    # two requests admitted together (one cohort), one of 2 tokens and one of 6: 5 decode steps;
    # in cohorts the short one's row stays (batch 2 throughout), ragged drops it after one step
    reqs = lambda: [Request(0, 0.0, 256, 2), Request(1, 0.0, 256, 6)]  # noqa: E731
    batches = {b: [s[3] for s in served(reqs(), b).steps if s[0] == "decode"] for b in BATCHINGS}
    assert batches["cohorts"] == [2, 2, 2, 2, 2]
    assert batches["ragged"] == [2, 1, 1, 1, 1]


def test_two_cohorts_pay_two_attention_calls_per_layer():
    # request 1 arrives while request 0 decodes: its own prefill makes a second cohort. The
    # decode step of both is the plain graph of 2 rows plus, per layer, the second call:
    # attn(1, c_a) + attn(1, c_b) - attn(2, mean); at grid contexts, from the JSON
    c = costs()
    s = shape(c)
    ctx_a, ctx_b = 1024, 256                      # two cohorts' contexts, both on the attention grid
    parts = ((1, ctx_a), (1, ctx_b))
    mean = (ctx_a + ctx_b) / 2
    extra = Full().cohort_attention(c, 2, mean, parts)
    attn = c.table("decode_attention_full")
    hand = p50("decode_attention_full", batch=1, context=ctx_a) + p50("decode_attention_full", batch=1, context=ctx_b) \
        - float(attn(2, mean))
    assert extra == pytest.approx(max(hand, 0.0), rel=1e-12)
    assert extra > 0                              # the lone table's fixed cost per call
    plain = solve(Full().decode_graph(c, s, 2, mean)).seconds
    split = solve(per_cohort(Full().decode_graph(c, s, 2, mean), extra)).seconds
    assert split - plain == pytest.approx(s.n_layers * extra, rel=1e-9)
    # and the step's parts still sum to the layer op, the extra counted as attention
    layer = [op for op in per_cohort(Full().decode_graph(c, s, 2, mean), extra) if op.phase == "layer"][0]
    assert sum(v for _, v in layer.parts) == pytest.approx(layer.seconds, rel=1e-9)


def test_the_serving_loop_forms_the_cohorts_the_runtime_forms():
    # request 1 arrives after request 0's prefill: two cohorts, decode steps at batch 2 each
    # costed with the second call; ragged costs the same steps without it
    reqs = lambda: [Request(0, 0.0, 256, 40), Request(1, 0.4, 256, 40)]  # noqa: E731
    co, ra = served(reqs(), "cohorts"), served(reqs(), "ragged")
    both_co = [s for s in co.steps if s[0] == "decode" and s[3] == 2]
    both_ra = [s for s in ra.steps if s[0] == "decode" and s[3] == 2]
    assert both_co and len(both_co) == len(both_ra)
    assert all(a[2] > b[2] for a, b in zip(both_co, both_ra))
    # one request alone: one cohort, the same steps both ways
    alone = [Request(0, 0.0, 256, 8)]
    assert [s[2] for s in served(alone, "cohorts").steps] == [s[2] for s in served([Request(0, 0.0, 256, 8)],
                                                                                  "ragged").steps]


def test_an_unknown_batching_is_one_line():
    with pytest.raises(ConfigError, match=r"scheduler.batching='paged'.*cohorts, ragged"):
        check_scheduler(4, "prefill_first", "paged")


def test_compute_scale_by_table():
    # drift correction per table: prefill_layer by its own factor, every other kernel table by "*"
    base, scaled = costs(), costs(compute_scale={"prefill_layer": 1.1, "*": 1.3})
    assert scaled.table("prefill_layer")(256) == pytest.approx(1.1 * p50("prefill_layer", tokens=256), rel=1e-12)
    assert scaled.table("decode_layer")(1, 40) == pytest.approx(1.3 * p50("decode_layer", batch=1, context=40), rel=1e-12)
    assert scaled.table("step_overhead")(1) == pytest.approx(1.3 * base.table("step_overhead")(1), rel=1e-12)
    assert scaled.table("h2d_pinned")(2 ** 20) == base.table("h2d_pinned")(2 ** 20)     # transfers are not kernels


def test_drift_scale_from_the_model_probe_and_its_fallback():
    from omegaconf import OmegaConf

    from analysis.halves import drift_scale
    from runtime.profile.speed import PROBE_PREFILL_TOKENS

    cfg = OmegaConf.create({"model": {"name": "smollm2"}})
    d0, p0 = p50("decode_layer", batch=1, context=40), p50("prefill_layer", tokens=PROBE_PREFILL_TOKENS)
    row = {"probe_decode_layer_s": 1.5 * d0, "probe_prefill_layer_s": 1.2 * p0, "speed_index": 1000.0}
    scale, source = drift_scale(row, cfg, str(CPU), 2000.0)
    assert source == "model_probe"
    assert scale == pytest.approx({"prefill_layer": 1.2, "*": 1.5}, rel=1e-12)
    scale, source = drift_scale({**row, "probe_decode_layer_s": math.nan}, cfg, str(CPU), 2000.0)
    assert (scale, source) == (2.0, "speed_index")
    scale, source = drift_scale({}, cfg, str(CPU), 2000.0)
    assert math.isnan(scale) and source == "speed_index"


def test_model_probe_times_both_points_and_keeps_to_its_model():
    """The probe on a 2-layer random model: both per-layer times positive, and a 256-token
    prefill's layer costs more than one decode step's (256 rows of the same GEMMs against one);
    Speed hands the probes only to points of the probe's model."""
    import torch
    from omegaconf import OmegaConf

    from analysis.halves import Job, Speed, probe_model
    from analysis.compose import Point
    from runtime.profile.speed import model_probe

    name, build = probe_model(OmegaConf.create({"model": {"name": "tiny"}}), str(CPU), torch.device("cpu"))
    m = build()
    assert name == "tiny" and m.args.n_layers == json.loads(CPU.read_text())["models"]["tiny"]["kernels"][
        "decode_layer"]["whole_model_layers"]
    r = model_probe(m, reps=1)
    assert 0 < r["decode_layer_s"] < r["prefill_layer_s"]
    speed = Speed("cpu", None, (name, build))
    speed.probe = lambda: {"decode_layer_s": 1.0, "prefill_layer_s": 2.0}
    speed.next()
    job = lambda model: Job(Point("p", "heldout", [], [], []), {}, sim_cfg=OmegaConf.create(  # noqa: E731
        {"model": {"name": model}}))
    assert len(speed.probes_for(job("tiny"))) == 2 and speed.probes_for(job("smollm2")) == []
    assert probe_model(OmegaConf.create({"model": {"name": "tiny"}}), str(ROOT / "profiles/roofline-h100-sxm.json"),
                       torch.device("cpu")) is None


def test_a_prefill_of_several_prompts_batches_its_gemms():
    """Two 256-token prompts: 2 x prefill_layer(256) plus (projections + mlp)(512) - 2 x (...)(256),
    every value a grid point read from the JSON; one prompt: prefill_layer alone."""
    from simulator.policies.base import batched_gemms

    c = costs()
    s = shape(c)
    gemm = lambda t: p50("projections", tokens=t) + p50("mlp", tokens=t)  # noqa: E731
    gain = gemm(512) - 2 * gemm(256)
    assert batched_gemms(c, 2, 256) == pytest.approx(gain, rel=1e-12) and gain < 0
    assert batched_gemms(c, 1, 256) == 0.0
    step = solve(Full().prefill_graph(c, s, [256, 200])).seconds      # padded to 256
    # (the head as Costs reads it: the committed profile scales its lone table to the in-model head)
    hand = p50("step_overhead", batch=2) + s.n_layers * (2 * p50("prefill_layer", tokens=256) + gain) \
        + float(c.table("lm_head_sample")(2))
    assert step == pytest.approx(hand, rel=1e-9)


def test_specache_pays_the_cohort_calls_once_per_layer():
    """SpeCache's graph has two ops of phase layer per layer (layer<i>, replace<i>): the extra
    attention calls go on the layer op alone."""
    from simulator.policies import Specache

    c = costs()
    s = shape(c)
    p = Specache(k=16)
    ops = p.decode_graph(c, s, 2, 512)
    plain = solve(ops).seconds
    split = solve(per_cohort(ops, 1e-4)).seconds
    assert split - plain == pytest.approx(s.n_layers * 1e-4, rel=1e-6)


def test_kv_peak_counts_a_finished_row_until_its_cohort_is_done():
    """One cohort of a 2-token and a 6-token request (prompts 256): the runtime's cache keeps
    writing the short one's row, so the peak holds 2 x (256 + 5) tokens in cohorts; in ragged the
    short one leaves after its last token, and the peak is both rows after the first step, 2 x 257."""
    reqs = lambda: [Request(0, 0.0, 256, 2), Request(1, 0.0, 256, 6)]  # noqa: E731
    assert served(reqs(), "cohorts").kv_peak[2] == 2 * (256 + 5)
    assert served(reqs(), "ragged").kv_peak[2] == 2 * (256 + 1)
