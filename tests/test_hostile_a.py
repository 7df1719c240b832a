"""Hostile input through the real entry points, in-process. Each case either
runs or ends with one line `<prog>: error: ...` naming the field, and exit status 2, quickly.
The tally of cases tried (before / after) is tests/hostile_cases_a.md."""
from __future__ import annotations

import contextlib
import io
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from core.checks import check_config, check_shape
from core.errors import ConfigError
from core.feasibility import SIM_MAX_REQUESTS, check_runtime, check_simulation
from core.policies import SPECS, ModelShape, spec_of
from core.profile import schema
from core.values import number
from core.workload import read_trace

ROOT = Path(__file__).resolve().parent.parent
# the entry modules are already imported by the time runpy runs them as __main__, as intended here
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
MODULES = {"runtime.bench": "runtime.bench", "runtime.serve": "runtime.serve", "simulator.run": "simulator.run"}
PROFILE = ROOT / "profiles" / "cpu-intel-r-xeon-r-processor-2c.json"
ROOFLINE = ROOT / "profiles" / "roofline-h100-sxm.json"
FAST = ["model=tiny", "workload.batch=2", "workload.prompt_len=16", "workload.gen_len=2"]
RUNTIME = ["warmup=false", "progress=false"]


def cli(prog: str, *overrides: str, tmp: Path, monkeypatch) -> tuple[int, list[str], str]:
    """Run `python -m <prog> overrides...` in this process (the module's Hydra main, as the
    shell runs it); (exit status, the non-empty stderr lines, stdout)."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    extra = RUNTIME if prog != "simulator.run" else []
    monkeypatch.setattr(sys, "argv", [prog, *overrides, *extra, f"results_dir={tmp}", f"hydra.run.dir={tmp}/hydra"])
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(MODULES[prog], run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    torch.set_num_threads(threads)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    return rc, lines, out.getvalue()


def refused(prog, needle, *overrides, tmp, monkeypatch):
    rc, lines, _ = cli(prog, *overrides, tmp=tmp, monkeypatch=monkeypatch)
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- values

def test_number_rule():
    assert number(3, "x", ge=1, integer=True) == 3
    assert number(None, "x", null="unset") is None
    for bad, needle in ((math.nan, "not a finite number"), (math.inf, "not a finite number"), (-math.inf, "finite"),
                        ("3", "not a number"), (True, "not a number"), (0, "must be > 0"), (2.5, "whole number")):
        with pytest.raises(ConfigError, match=needle):
            number(bad, "hardware.link.gbps", gt=0, integer=isinstance(bad, float) and bad == 2.5)
    with pytest.raises(ConfigError, match="x is null"):
        number(None, "x")


# ----------------------------------------------------------------------------- part 3: configs

CONFIG_CASES = [
    ("hardware.link.gbps=0", "hardware.link.gbps=0.0 must be > 0 (or null: no emulated link)"),
    ("hardware.link.gbps=nan", "hardware.link.gbps=nan is not a finite number"),
    ("hardware.link.gbps=inf", "hardware.link.gbps=inf is not a finite number"),
    ("hardware.link.latency_us=nan", "hardware.link.latency_us=nan is not a finite number"),
    ("hardware.kv_budget_bytes=0", "hardware.kv_budget_bytes=0 must be >= 1 (or null"),
    ("hardware.host_memory_bytes=0", "hardware.host_memory_bytes=0 must be >= 1"),
    ("hardware.threads=0", "hardware.threads=0 must be >= 1"),
    ("workload.temperature=nan", "workload.temperature=nan is not a finite number"),
    ("workload.top_p=inf", "workload.top_p=inf is not a finite number"),
    ("workload.top_p=0", "workload.top_p=0.0 must be > 0"),
]


CONFIGS = {"runtime.bench": "bench", "runtime.serve": "serve", "simulator.run": "simulate"}


def composed(runner: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    from core.config import register

    register()                       # the schemas conf/*.yaml start from (the entry points do this on import)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=CONFIGS[runner], overrides=list(overrides))


@pytest.mark.parametrize("runner", list(MODULES))
@pytest.mark.parametrize("override,needle", CONFIG_CASES)
def test_config_values_refused_by_the_one_check(runner, override, needle):
    with pytest.raises(ConfigError) as e:
        check_config(composed(runner, *FAST, override), runner)
    assert needle in str(e.value)


@pytest.mark.parametrize("prog", list(MODULES))
@pytest.mark.parametrize("override,needle", [CONFIG_CASES[0], CONFIG_CASES[4], CONFIG_CASES[1]])
def test_zero_and_nan_refused_in_every_entry_point(prog, override, needle, tmp_path, monkeypatch):
    refused(prog, needle, *FAST, override, tmp=tmp_path, monkeypatch=monkeypatch)
    assert not (tmp_path / "measured").exists() and not (tmp_path / "simulated").exists()


@pytest.mark.parametrize("runner", ["runtime.serve", "simulator.run"])
@pytest.mark.parametrize("overrides,needle", [
    (["workload=poisson", "workload.rate=nan"], "workload.rate=nan is not a finite number"),
    (["workload=poisson", "workload.rate=-inf"], "workload.rate=-inf is not a finite number"),
    (["workload=closed", "workload.think_s=nan"], "workload.think_s=nan"),
    (["slo.ttft_s=nan"], "slo.ttft_s=nan"),
    (["slo.tpot_s=-1"], "slo.tpot_s=-1.0 must be > 0"),
    (["scheduler.ctx_bucket=0"], "scheduler.ctx_bucket=0 must be >= 1"),
])
def test_serving_values_refused(runner, overrides, needle):
    with pytest.raises(ConfigError) as e:
        check_config(composed(runner, *FAST, "workload.n_requests=2", *overrides), runner)
    assert needle in str(e.value)


def test_serving_value_one_line_from_serve(tmp_path, monkeypatch):
    refused("runtime.serve", "workload.rate=nan is not a finite number", *FAST, "workload=poisson",
            "workload.rate=nan", tmp=tmp_path, monkeypatch=monkeypatch)


def test_nan_in_a_policy_knob_is_named(tmp_path, monkeypatch):
    refused("simulator.run", "policy.tau_smooth=nan is not a finite number", *FAST, "policy=rag",
            "policy.tau_smooth=nan", tmp=tmp_path, monkeypatch=monkeypatch)


def test_null_link_runs_and_records_null(tmp_path, monkeypatch):
    rc, lines, _ = cli("simulator.run", *FAST, "hardware.link.gbps=null", tmp=tmp_path, monkeypatch=monkeypatch)
    assert rc == 0, lines
    rec = json.loads(next((tmp_path / "simulated").glob("*.json")).read_text())
    assert rec["config"]["hardware"]["link"]["gbps"] is None


# ----------------------------------------------------------------------------- part 1: one validation

def test_simulator_refuses_what_the_runtime_cannot_run(tmp_path, monkeypatch):
    over = ["model=tiny", "policy=kivi", "policy.group_size=5", "policy.residual=10"]
    sim = refused("simulator.run", "policy.group_size=5 must divide head_dim=16", *over, tmp=tmp_path,
                  monkeypatch=monkeypatch)
    run = refused("runtime.bench", "policy.group_size=5 must divide head_dim=16", *over, tmp=tmp_path,
                  monkeypatch=monkeypatch)
    assert sim.split("error: ")[1] == run.split("error: ")[1]          # the same rule, the same words


@pytest.mark.parametrize("overrides,needle", [
    (["policy=rag", "policy.chunk_len=100000"], "policy.chunk_len=100000 must be in [1, 2048]"),
    (["policy=rag", "policy.draft_layers=99"], "policy.draft_layers=99 must be in [1, 2]"),
    (["policy=specache", "policy.group_size=3", "policy.residual=6"], "policy.group_size=3 must divide head_dim=16"),
])
def test_model_checks_shared(overrides, needle, tmp_path, monkeypatch):
    for prog in ("simulator.run", "runtime.bench"):
        refused(prog, needle, *FAST, *overrides, tmp=tmp_path, monkeypatch=monkeypatch)


@pytest.mark.parametrize("overrides", [["workload=poisson", "workload.rate=0"],
                                       ["workload=poisson", "workload.rate=2"], ["workload=closed"]])
def test_bench_runs_static_batches_only(overrides, tmp_path, monkeypatch):
    refused("runtime.bench", "runtime.bench runs one static batch", "model=tiny", *overrides, tmp=tmp_path,
            monkeypatch=monkeypatch)


def test_check_config_is_one_code_path(tmp_path):
    """The same config composed for each entry point: each refuses it with the same line."""
    from hydra import compose, initialize_config_dir

    from core.config import register

    register()
    msgs = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, runner in (("bench", "runtime.bench"), ("serve", "runtime.serve"), ("simulate", "simulator.run")):
            cfg = compose(config_name=name, overrides=["model=tiny", "policy=specache", "policy.k=-1"])
            with pytest.raises(ConfigError) as e:
                check_config(cfg, runner)
            msgs.add(str(e.value))
    assert len(msgs) == 1 and "policy.k=-1 must be >= 0" in msgs.pop()


def test_simulator_only_knobs_are_declared_fields():
    """What the simulator deliberately does not check the runtime's way is written down in the
    declaration, and names real knobs."""
    from dataclasses import fields

    for name, cls in SPECS.items():
        known = {f.name for f in fields(cls)}
        assert set(cls.simulator_only) <= known, name
        assert all(isinstance(v, str) and v for v in cls.simulator_only.values())
    assert "draft_model" in SPECS["rag"].simulator_only


# ----------------------------------------------------------------------------- part 2: feasibility

@pytest.mark.parametrize("prog,needle", [
    ("runtime.bench", "workload.batch: the run needs ~"),
    ("runtime.serve", "workload.batch / scheduler.max_batch: the run needs ~"),
    ("simulator.run", f"beyond its limit of {SIM_MAX_REQUESTS}"),
])
@pytest.mark.timeout(60)
def test_huge_batch_refused_before_work(prog, needle, tmp_path, monkeypatch):
    line = refused(prog, needle, "model=tiny", "workload.batch=100000000", tmp=tmp_path, monkeypatch=monkeypatch)
    assert "GiB" in line or "requests" in line


@pytest.mark.parametrize("prog,overrides,needle", [
    ("simulator.run", ["workload=poisson", "workload.n_requests=100000000", "workload.rate=1000"],
     "workload.n_requests: the simulation"),
    ("simulator.run", ["workload=poisson", "workload.n_requests=1000000", "workload.gen_len=1000",
                       "workload.prompt_len=64"], "token-steps"),
    ("simulator.run", ["workload=poisson", "workload.n_requests=100000", "workload.gen_len=200",
                       "workload.prompt_len=64", "fidelity=detailed"], "fidelity=detailed"),
    ("runtime.serve", [*FAST[1:], "workload=poisson", "workload.rate=0.000001", "workload.n_requests=3"],
     "runtime.serve replays arrivals in real time"),
])
def test_work_limits(prog, overrides, needle, tmp_path, monkeypatch):
    refused(prog, needle, "model=tiny", *overrides, tmp=tmp_path, monkeypatch=monkeypatch)


def test_feasibility_estimate_by_hand():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"workload": {"arrival": "static", "batch": 3, "prompt_len": 10, "gen_len": 6},
                            "hardware": {}, "scheduler": {"max_batch": 8}})
    shape = ModelShape(2, 2, 16, "float32")
    est = check_runtime(cfg, "runtime.bench", spec_of({"name": "full"}), shape, weights_bytes=1000, dim=64,
                        ffn_dim=128, host_bytes=10 ** 9, device_bytes=None)
    assert est["kv_device"] == 3 * 16 * 2 * 2 * 2 * 16 * 4          # batch x tokens x (K,V) x layers x heads x hd x 4
    with pytest.raises(ConfigError, match=r"workload.batch: the run needs ~.* but this machine has"):
        check_runtime(cfg, "runtime.bench", spec_of({"name": "full"}), shape, weights_bytes=1000, dim=64,
                      ffn_dim=128, host_bytes=10_000, device_bytes=None)
    with pytest.raises(ConfigError, match="device memory"):
        check_runtime(cfg, "runtime.bench", spec_of({"name": "full"}), shape, weights_bytes=1000, dim=64,
                      ffn_dim=128, host_bytes=10 ** 9, device_bytes=10_000)
    sim = OmegaConf.create({"workload": {"arrival": "static", "batch": 3, "gen_len": 6}, "fidelity": "fast"})
    assert check_simulation(sim, 2) == {"requests": 3, "work": 18}


def test_specache_k_clamped_before_allocation():
    from runtime.kv import make_cache, policy_spec

    pol = policy_spec("specache", bits=2, group_size=16, residual=16, k=10 ** 9, prefetch=True, gather="host",
                      one_bit_rule="specache")
    cache = make_cache(pol, n_layers=1, batch=1, n_kv_heads=2, head_dim=16, capacity=64, device=torch.device("cpu"))
    layer = cache.layers[0]
    assert layer.k_top == 64 and layer.k_rows.shape[2] == 64 and layer.k_stage.shape[2] == 64


def test_specache_huge_k_runs(tmp_path, monkeypatch):
    rc, lines, _ = cli("runtime.bench", "model=tiny", "policy=specache", "policy.k=1000000000", "workload.batch=1",
                       "workload.prompt_len=64", "workload.gen_len=4", tmp=tmp_path, monkeypatch=monkeypatch)
    assert rc == 0, lines


# ----------------------------------------------------------------------------- part 3: traces

TRACES = {
    "nan": ("arrival_s,prompt_len,gen_len\n0,16,2\nnan,16,2\n", "row 3, column arrival_s is nan, not a finite number"),
    "inf": ("arrival_s,prompt_len,gen_len\n0,16,2\ninf,16,2\n", "row 3, column arrival_s is inf"),
    "negative": ("arrival_s,prompt_len,gen_len\n-1,16,2\n", "row 2, column arrival_s is -1"),
    "header_only": ("arrival_s,prompt_len,gen_len\n", "has a header but no requests"),
    "empty": ("", "is empty"),
    "word": ("arrival_s,prompt_len,gen_len\n0,sixteen,2\n", "row 2, column prompt_len is 'sixteen', not a number"),
    "blank": ("arrival_s,prompt_len,gen_len\n0,,2\n", "row 2, column prompt_len is '', not a number"),
    "missing_column": ("arrival_s,prompt_len\n0,16\n", "lacks column gen_len"),
    "fraction": ("arrival_s,prompt_len,gen_len\n0,16.5,2\n", "row 2, column prompt_len is 16.5; lengths are whole"),
    "zero_len": ("arrival_s,prompt_len,gen_len\n0,16,0\n", "row 2, column gen_len is 0"),
    "inf_len": ("arrival_s,prompt_len,gen_len\n0,16,inf\n", "row 2, column gen_len is inf"),
    "ragged": ("arrival_s,prompt_len,gen_len\n0,16,2,9\n", "more cells than its header"),
}


@pytest.mark.parametrize("case", list(TRACES))
def test_trace_cells_read_once(case, tmp_path):
    text, needle = TRACES[case]
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        read_trace(str(p))
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("prog", ["runtime.serve", "simulator.run"])
@pytest.mark.parametrize("case", ["nan", "header_only"])
@pytest.mark.timeout(60)
def test_trace_refused_by_both_halves(prog, case, tmp_path, monkeypatch):
    text, needle = TRACES[case]
    p = tmp_path / "t.csv"
    p.write_text(text)
    refused(prog, needle, "model=tiny", "workload=trace", f"workload.trace={p}", tmp=tmp_path, monkeypatch=monkeypatch)


def test_trace_directory_and_binary(tmp_path, monkeypatch):
    d = tmp_path / "d.csv"
    d.mkdir()
    refused("simulator.run", "is a directory", "model=tiny", "workload=trace", f"workload.trace={d}", tmp=tmp_path,
            monkeypatch=monkeypatch)
    b = tmp_path / "b.csv"
    b.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a readable CSV|not a number|lacks column"):
        read_trace(str(b))


def test_good_trace_runs_in_both_halves(tmp_path, monkeypatch):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s, prompt_len, gen_len\n0, 16, 2\n0.01, 12, 2\n")
    assert [(r.prompt_len, r.gen_len) for r in read_trace(str(p))] == [(16, 2), (12, 2)]
    for prog in ("simulator.run", "runtime.serve"):
        rc, lines, _ = cli(prog, "model=tiny", "workload=trace", f"workload.trace={p}", tmp=tmp_path,
                           monkeypatch=monkeypatch)
        assert rc == 0, (prog, lines)


# ----------------------------------------------------------------------------- part 3: profiles

def _tiny(p):
    return p["models"]["tiny"]


def _set_p50(v):
    def f(p):
        t = _tiny(p)["kernels"]["decode_layer"]
        t["p50"] = [[v for _ in row] for row in t["p50"]]
    return f


def _reverse(p):
    t = _tiny(p)["kernels"]["prefill_layer"]
    t["axes"]["tokens"] = t["axes"]["tokens"][::-1]


PROFILE_CASES = {
    "negative_p50": (_set_p50(-0.001), "decode_layer.p50 value=-0.001 must be >= 0"),
    "null_p50": (_set_p50(None), "decode_layer.p50 value=None is not a finite number"),
    "nan_p50": (_set_p50(math.nan), "value=nan is not a finite number"),
    "string_p50": (_set_p50("fast"), "value='fast' is not a finite number"),
    "no_kv_dtype": (lambda p: _tiny(p).pop("kv_dtype"), "missing 'models.tiny.kv_dtype'"),
    "bad_kv_dtype": (lambda p: _tiny(p).__setitem__("kv_dtype", "int3"), "kv_dtype='int3' is not one of"),
    "reversed_axis": (_reverse, "prefill_layer.axes.tokens must be strictly increasing"),
    "zero_axis": (lambda p: _tiny(p)["kernels"]["prefill_layer"]["axes"]["tokens"].__setitem__(0, 0), "must be > 0"),
    "string_table": (lambda p: _tiny(p)["kernels"].__setitem__("decode_layer", "fast"), "decode_layer is not a table"),
    "no_n_kv_heads": (lambda p: _tiny(p)["shape"].pop("n_kv_heads"), "missing 'models.tiny.shape.n_kv_heads'"),
    "fractional_layers": (lambda p: _tiny(p)["shape"].__setitem__("n_layers", 2.5), "n_layers=2.5 must be a whole"),
    "negative_kv_available": (lambda p: _tiny(p)["memory"].__setitem__("kv_available_bytes", -1), "kv_available_bytes=-1"),
    "nan_overlap": (lambda p: p["transfers"]["overlap"].__setitem__("gemm_slowdown_with_copy", math.nan),
                    "gemm_slowdown_with_copy=nan"),
    "zero_row_bytes": (lambda p: p["transfers"]["gather"].__setitem__("row_bytes", 0), "gather.row_bytes=0 must be > 0"),
    "device_type": (lambda p: p["device"].__setitem__("type", "tpu"), "device.type='tpu'"),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_profile_validated_on_load(case, tmp_path):
    mutate, needle = PROFILE_CASES[case]
    p = json.loads(PROFILE.read_text())
    mutate(p)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p))
    with pytest.raises(schema.ProfileError) as e:
        schema.load(path)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mutate,needle", [
    (lambda p: p["device"].__setitem__("peak_flops", 0), "device.peak_flops=0 must be > 0"),
    (lambda p: p["provenance"]["assumptions"].pop("launch_s"), "provenance.assumptions.launch_s"),
    (lambda p: p["provenance"]["assumptions"].__setitem__("memory_efficiency", -0.8), "memory_efficiency=-0.8"),
])
def test_roofline_numbers_validated(mutate, needle, tmp_path):
    p = json.loads(ROOFLINE.read_text())
    mutate(p)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(p))
    with pytest.raises(schema.ProfileError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        schema.load(path)


def test_committed_profiles_pass():
    for path in sorted((ROOT / "profiles").glob("*.json")):
        schema.load(path)


@pytest.mark.parametrize("case", ["negative_p50", "no_n_kv_heads"])
def test_bad_profile_one_line_from_the_simulator(case, tmp_path, monkeypatch):
    mutate, needle = PROFILE_CASES[case]
    p = json.loads(PROFILE.read_text())
    mutate(p)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p))
    refused("simulator.run", needle, "model=tiny", f"hardware.profile={path}", tmp=tmp_path, monkeypatch=monkeypatch)


def test_profile_directory_binary_and_truncated(tmp_path):
    d = tmp_path / "dir.json"
    d.mkdir()
    with pytest.raises(schema.ProfileError, match="is a directory"):
        schema.load(d)
    b = tmp_path / "b.json"
    b.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(schema.ProfileError, match="cannot be read as a profile"):
        schema.load(b)
    t = tmp_path / "t.json"
    t.write_text(PROFILE.read_text()[:4000])
    with pytest.raises(schema.ProfileError, match="not valid JSON"):
        schema.load(t)


# ----------------------------------------------------------------------------- part 3: validation CSV

@pytest.mark.parametrize("content,needle", [
    (b"\x00\x01\xff\xfe" * 40, "is not a readable validation CSV"),
    (b"", "is not a readable validation CSV"),
    (b"a,b\n1,2\n", "no column 'id'"),
    (b"id,status\nx,ok,1,2,3\n\"unterminated\n", "is not a readable validation CSV"),
    (b"id,status,split,ttft_s_rel_err\nq,ok,in,abc\n", "ttft_s_rel_err holds non-numbers"),
])
def test_corrupt_validation_csv_one_line(content, needle, tmp_path):
    from analysis import validate as V

    p = tmp_path / "v.csv"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=needle):
        V.load(p)


def test_validation_csv_directory_through_the_cli(tmp_path, capsys):
    from analysis import validate as V

    (tmp_path / "validation" / "validate_quick.csv").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        V.main(["experiment=validate_quick", "halves=simulator", "figure=false", f"results_dir={tmp_path}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and "is a directory where the validation CSV should be" in err[0]


def test_check_shape_context():
    cfg = composed("simulator.run", "model=tiny", "workload.prompt_len=4000")
    with pytest.raises(ConfigError, match="exceeds the model's context of 2048"):
        check_shape(cfg, "simulator.run", head_dim=16, max_seq_len=2048, n_layers=2)
