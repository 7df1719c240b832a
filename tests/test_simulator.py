"""The simulator: costs from profiles, policy twins, both fidelities, serving, the CLI's errors."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from core.profile.schema import BITS_KERNELS
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from core.config import SchedulerConfig, WorkloadConfig, register
from core.errors import ConfigError
from runtime.kv import Step, make_cache
from simulator.costs import KV_ELEMENT_BYTES, Costs, ModelShape
from simulator.hardware import detailed, solve
from simulator.policies import Full, Kivi, Offload, Op, Specache, make_policy
from simulator.scheduler import Sim

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
H100 = ROOT / "profiles/roofline-h100-sxm.json"
A6000 = ROOT / "profiles/roofline-a6000.json"


def costs(path=CPU, model="tiny", allow_extrapolation=True):
    """A profile's costs bound to the shape it holds for `model` (roofline: the formulas for it).
    The logic tests read the CPU tables past their batch-4 grid (allow_extrapolation); the refusal
    itself is tested in tests/test_shape_true.py."""
    c = Costs.load(path, model, allow_extrapolation=allow_extrapolation)
    s = c.shape
    return c.bind(s, s["n_layers"], KV_ELEMENT_BYTES[c.kv_dtype_auto])


def shape_of(c: Costs, kv_dtype=None, n_layers=None):
    s = c.shape
    return ModelShape(n_layers or s["n_layers"], s["n_kv_heads"], s["head_dim"], kv_dtype or c.kv_dtype_auto)


def workload(**kw):
    return OmegaConf.structured(WorkloadConfig(**kw))


def sim(c, policy=None, cap=None, **kw):
    return Sim(c, shape_of(c), policy or Full(), cap or int(c.memory["kv_available_bytes"]), **kw)


POLICIES = [Full(), Offload(), Kivi(), Kivi(bits=1, group_size=32, residual=64),
            Specache(k=0, prefetch=False), Specache(k=64), Specache(k=64, prefetch=False), Specache(k=512)]


# ----------------------------------------------------------------------------- costs

def test_interpolation_hits_grid_points_and_extrapolates_linearly():
    c = costs()
    t = c.table("prefill_layer")
    xs, ys = t.axes[0], np.maximum.accumulate(np.asarray(c.profile["models"]["tiny"]["kernels"]["prefill_layer"]["p50"]))
    for x, y in zip(xs, ys):
        assert t(x) == pytest.approx(y, rel=1e-9)
    assert t(1) == pytest.approx(ys[0])                       # below the grid: nearest
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    assert t(2 * xs[-1]) == pytest.approx(ys[-1] + slope * xs[-1])   # above: linear in the raw axis


def test_missing_table_is_one_line_naming_table_and_file(tmp_path):
    prof = json.loads(CPU.read_text())
    del prof["models"]["tiny"]["kernels"]["score_topk"]
    p = tmp_path / "p.json"
    p.write_text(json.dumps(prof))
    with pytest.raises(ConfigError, match="score_topk") as e:
        Costs.load(p, "tiny")
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    c = costs()
    del c.profile["models"]["tiny"]["kernels"]["chunk_load"]
    with pytest.raises(ConfigError, match=r"cpu-intel.*missing table 'models.tiny.kernels.chunk_load'"):
        c.need("chunk_load")


# ----------------------------------------------------------------------------- policy twins

@pytest.mark.parametrize("path,model", [(CPU, "smollm2"), (H100, "llama7b_shape"), (A6000, "llama7b_shape")])
def test_specache_k0_is_kivi_and_more_k_never_cheaper(path, model):
    c = costs(path, model)      # k up to 4096: beyond the CPU's measured k grid (allowed, as everywhere here)
    s = shape_of(c)
    for B in (1, 4, 16):
        for ctx in (300, 2048, 6000):
            kivi = solve(Kivi().decode_graph(c, s, B, ctx)).seconds
            assert solve(Specache(k=0, prefetch=False).decode_graph(c, s, B, ctx)).seconds == kivi
            for prefetch in (False, True):
                times = [solve(Specache(k=k, prefetch=prefetch).decode_graph(c, s, B, ctx)).seconds
                         for k in (0, 1, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)]
                assert all(b >= a for a, b in zip(times, times[1:])), (B, ctx, prefetch, times)


def runtime_bytes(policy_cfg, tokens, layers, H, D):
    cache = make_cache(policy_cfg, n_layers=layers, batch=len(tokens), n_kv_heads=H, head_dim=D,
                       capacity=max(tokens) + 8, device=torch.device("cpu"))
    N = max(tokens)
    pad = torch.tensor([N - t for t in tokens])
    x = torch.randn(len(tokens), H, N, D)
    step = Step(0, N, pad, torch.zeros(len(tokens), N, dtype=torch.long))
    for layer in cache.layers:
        layer.load(x, x, step)
    cache.advance(step)
    return cache.nbytes()


@pytest.mark.parametrize("kv_dtype,bits", [("float32", 2), ("float16", 1), ("float32", 4), ("float16", 8)])
def test_kv_bytes_equal_the_runtime(kv_dtype, bits):
    H, D, L = 1, 16, 3
    s = ModelShape(L, H, D, kv_dtype)
    cfgs = [dict(name="full"), dict(name="offload"), dict(name="rag"), dict(name="rag", selector="reuse")]
    for G, R in ((8, 8), (8, 24), (16, 16)):
        cfgs.append(dict(name="kivi", bits=bits, group_size=G, residual=R, one_bit_rule="specache"))
        for k in (0, 5, 40):
            cfgs.append(dict(name="specache", bits=bits, group_size=G, residual=R, one_bit_rule="specache",
                             k=k, prefetch=True))
    for cfg in cfgs:
        twin = make_policy({**cfg, "kv_dtype": kv_dtype})
        for tokens in ([1], [8], [9], [25], [70], [70, 70]):
            want = runtime_bytes(NS(**{**cfg, "kv_dtype": kv_dtype}), tokens, L, H, D)
            assert twin.kv_bytes(tokens, s) == want, (cfg, tokens)


def test_reserve_covers_every_length_on_the_way():
    s = ModelShape(2, 2, 32, "float16")
    for p in (Kivi(bits=2, group_size=32, residual=64), Specache(k=16), Full()):
        for n in range(1, 300, 7):
            assert p.reserve_bytes(n, s) == max(p.kv_bytes([m], s)[0] for m in range(1, n + 1))


# ----------------------------------------------------------------------------- hardware

def test_copy_and_kernel_overlap_two_copies_on_one_engine_do_not():
    both = [Op("k", "compute", 1.0), Op("c", "h2d", 1.0)]
    serial = [Op("c1", "h2d", 1.0), Op("c2", "h2d", 1.0)]
    dep = [Op("c", "h2d", 1.0), Op("k", "compute", 1.0, ("c",))]
    for run in (solve, detailed):
        assert run(both).seconds == pytest.approx(1.0)
        assert run(serial).seconds == pytest.approx(2.0)
        assert run(dep).seconds == pytest.approx(2.0)


def test_in_order_streams_agree():
    # c2 is ready before c1 but was issued after it: it waits (an in-order stream)
    ops = [Op("k", "compute", 3.0), Op("c1", "h2d", 1.0, ("k",)), Op("c2", "h2d", 1.0)]
    assert solve(ops).seconds == detailed(ops).seconds == 5.0


@pytest.mark.parametrize("path,model", [(CPU, "smollm2"), (H100, "llama7b_shape")])
def test_detailed_equals_fast(path, model):
    c = costs(path, model)
    s = shape_of(c)
    kernels = c.profile["models"][model]["kernels"]
    for name in BITS_KERNELS:        # the committed CPU profile has 2-bit tables only: stand-ins for 1-bit
        kernels.setdefault(f"{name}_1bit", kernels[name])
    for p in POLICIES:
        for B in (1, 3, 16):
            for ctx in (100, 2048, 7000):
                g = p.decode_graph(c, s, B, ctx)
                assert detailed(g).seconds == pytest.approx(solve(g).seconds, rel=0.01)
        g = p.prefill_graph(c, s, [100, 700])
        assert detailed(g).seconds == pytest.approx(solve(g).seconds, rel=0.01)


def test_detailed_equals_fast_serving():
    c = costs()
    w = workload(arrival="poisson", rate=200.0, n_requests=60, prompt_len=256, prompt_len_min=16, gen_len=12)
    runs = {}
    for fid in ("fast", "detailed"):
        reqs = sim(c, Specache(k=16), fidelity=fid, max_batch=8).run(w)
        runs[fid] = [(r.ttft_s, r.done_s) for r in reqs]
    for (a, b), (x, y) in zip(runs["fast"], runs["detailed"]):
        assert x == pytest.approx(a, rel=0.01) and y == pytest.approx(b, rel=0.01)


# ----------------------------------------------------------------------------- serving

def test_single_request_equals_hand_summed_costs():
    c = costs(CPU, "smollm2")
    s = shape_of(c)
    P, G = 700, 6
    reqs = sim(c, ctx_bucket=1).run(workload(batch=1, prompt_len=P, gen_len=G))
    t = c.table
    ttft = t("step_overhead")(1) + s.n_layers * t("prefill_layer")(P) + t("lm_head_sample")(1)
    dl = t("decode_layer")
    if len(dl.axes) == 2:            # whole-model layer by (batch, context), full attention in it
        layer = [dl(1, P + i) for i in range(1, G)]
    else:                            # at a small context; the attention table adds its growth
        attn = t("decode_attention_full")
        ctx0 = max(dl.extra["context"], attn.axes[1][0])
        layer = [dl(1) + attn(1, P + i) - attn(1, ctx0) for i in range(1, G)]
    steps = [t("step_overhead")(1) + t("lm_head_sample")(1) + s.n_layers * x for x in layer]
    assert reqs[0].ttft_s == pytest.approx(ttft, rel=1e-9)
    assert reqs[0].tpot_s == pytest.approx(sum(steps) / (G - 1), rel=1e-9)


def test_md1_mean_wait_matches_the_closed_form():
    c = costs()
    S = solve(Full().prefill_graph(c, shape_of(c), [128])).seconds   # fixed service: one prefill
    rho = 0.6
    w = workload(arrival="poisson", rate=rho / S, n_requests=40000, prompt_len=128, gen_len=1, seed=3)
    reqs = sim(c, max_batch=1).run(w)
    wait = sum(r.ttft_s - S for r in reqs) / len(reqs)
    assert wait == pytest.approx(rho * S / (2 * (1 - rho)), rel=0.05)


def test_admission_never_exceeds_device_memory():
    c = costs()
    p = Kivi()
    s = shape_of(c)
    cap = 5 * p.reserve_bytes(512 + 32, s)
    sm = sim(c, p, cap=cap, max_batch=64)
    reqs = sm.run(workload(arrival="poisson", rate=500.0, n_requests=200, prompt_len=512, prompt_len_min=64, gen_len=32))
    events = sorted([(r.admitted_s, r.reserved) for r in reqs] + [(r.done_s, -r.reserved) for r in reqs],
                    key=lambda e: (e[0], e[1]))      # releases first at equal times
    held = 0
    for _, d in events:
        held += d
        assert held <= cap
    assert sm.kv_peak[0] <= cap and sm.max_batch_reached < 64     # memory, not max_batch, bounded it
    assert len(reqs) == 200


def test_seeds_reproduce():
    c = costs()
    w = lambda seed: workload(arrival="poisson", rate=50.0, n_requests=80, prompt_len=300, prompt_len_min=10,
                              gen_len=8, seed=seed)
    a = [(r.arrival_s, r.prompt_len, r.ttft_s, r.done_s) for r in sim(c, Kivi()).run(w(1))]
    b = [(r.arrival_s, r.prompt_len, r.ttft_s, r.done_s) for r in sim(c, Kivi()).run(w(1))]
    d = [(r.arrival_s, r.prompt_len, r.ttft_s, r.done_s) for r in sim(c, Kivi()).run(w(2))]
    assert a == b and a != d


def test_closed_and_trace_workloads(tmp_path):
    c = costs()
    reqs = sim(c).run(workload(arrival="closed", users=3, think_s=0.01, n_requests=10, prompt_len=64, gen_len=4))
    assert len(reqs) == 10
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_len,gen_len\n0.0,100,5\n0.001,50,3\n0.5,10,2\n")
    reqs = sim(c).run(workload(arrival="trace", trace=str(trace)))
    assert [r.gen_len for r in reqs] == [5, 3, 2] and reqs[2].first_token_s >= 0.5


def test_prefill_first_vs_decode_first():
    c = costs()
    w = workload(arrival="poisson", rate=300.0, n_requests=40, prompt_len=256, gen_len=16)
    pf = sim(c, order="prefill_first").run(w)
    df = sim(c, order="decode_first").run(w)
    mean = lambda xs: sum(xs) / len(xs)
    assert mean([r.ttft_s for r in pf]) < mean([r.ttft_s for r in df])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_one_line_errors():
    c = costs()
    with pytest.raises(ConfigError, match="policy='foo' is not known; choose one of: full, kivi, offload, rag, specache"):
        make_policy({"name": "foo"})
    with pytest.raises(ConfigError, match="policy.k=-1"):
        make_policy({"name": "specache", "k": -1})
    from core.workload import check
    with pytest.raises(ConfigError, match="workload.rate=-1.0 must be > 0"):
        check(workload(arrival="poisson", rate=-1.0))
    with pytest.raises(ConfigError, match="workload.prompt_len=-5 must be >= 1"):
        check(workload(prompt_len=-5))
    with pytest.raises(ConfigError, match="workload.arrival='x' is not known"):
        check(workload(arrival="x"))
    with pytest.raises(ConfigError, match=r"request 0 needs \d+ bytes of KV .* the device holds 1000 for KV"):
        sim(c, cap=1000).run(workload(batch=1, prompt_len=512, gen_len=8))
    with pytest.raises(ConfigError, match="scheduler.order='lifo' is not known"):
        sim(c, order="lifo")


def test_cli_compose_and_unknown_hardware(tmp_path):
    from hydra.errors import MissingConfigException

    from simulator.run import simulate
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("simulate", overrides=["model=tiny", "policy=specache", "policy.k=16",
                                             f"results_dir={tmp_path}", "workload.batch=2", "workload.prompt_len=64",
                                             "workload.gen_len=4"])
        r = simulate(cfg)
        assert r["requests"] == 2 and r["provenance"]["profile_kind"] == "measured"
        assert len(r["provenance"]["profile_sha256"]) == 64 and Path(r["path"]).is_file()
        for key in ("throughput_tok_s", "ttft_s_p99", "tpot_s_p50", "kv_bytes_host", "kv_ratio_vs_fp16",
                    "util_h2d", "completion_rate", "max_batch_reached"):
            assert key in r and not (isinstance(r[key], float) and math.isnan(r[key])), key
        cfg = compose("simulate", overrides=["hardware=h100-sxm", "model=llama7b_shape", f"results_dir={tmp_path}"])
        assert simulate(cfg)["provenance"]["profile_kind"] == "roofline"
        with pytest.raises(MissingConfigException, match="hardware/nope"):
            compose("simulate", overrides=["hardware=nope"])
