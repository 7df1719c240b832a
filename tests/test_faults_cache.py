"""Faults of the profile cache and of results: a damaged cached profile of this machine, a
re-measure of one model, two first-use profilings at once, a slowed machine under the
profiler, RAG at recompute_ratio=0 with a draft selector, a NaN or zero in a result.
Each case and what it did before: tests/fault_cases_cache.md; the rules: docs/profiles.md.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from core.profile import lookup
from core.profile.schema import SCHEMA_VERSION, validate
from runtime.profile import first_use
import runtime.profile.measure as P
from tests.test_machine import this_machine_profile

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "profiles" / "cpu-intel-r-xeon-r-processor-2c.json"
CPU = torch.device("cpu")


def fake_measurement(monkeypatch, index: float = 100.0, delay: float = 0.0, speed: float | None = None) -> list:
    """measured_profile replaced by a copy of this_machine_profile holding only the models asked
    for (as a measurement returns them; the merge of the others is write_profile's), after
    `delay` seconds; the speed bracket's `before` reads `speed` (default: `index`). Returns the
    list of calls."""
    calls = []

    def fake(models, quick, device, repeats, existing, cover=None, bits=(2,), rag=True, progress=True):
        calls.append(list(models))
        time.sleep(delay)
        prof = this_machine_profile(index)
        prof["models"] = {m: prof["models"][m] for m in models}
        return prof
    monkeypatch.setattr(P, "measured_profile", fake)
    monkeypatch.setattr(first_use, "speed_now", lambda device, shape: index if speed is None else speed)
    return calls


def _set_first_p50(prof: dict, model: str, table: str, value) -> None:
    t = prof["models"][model]["kernels"][table]
    row = t["p50"]
    while isinstance(row[0], list):
        row = row[0]
    row[0] = value


def damaged(kind: str) -> bytes:
    """One damaged form of this machine's cached profile."""
    good = this_machine_profile()
    if kind == "truncated":
        return json.dumps(good).encode()[:3000]
    if kind == "empty":
        return b""
    if kind == "schema3_missing_fields":
        return json.dumps({"schema_version": SCHEMA_VERSION, "device": good["device"]}).encode()
    if kind == "list_shaped":
        return json.dumps([good]).encode()
    if kind == "models_empty":
        return json.dumps({**good, "models": {}}).encode()
    if kind == "negative":
        _set_first_p50(good, "smollm2", "prefill_layer", -1e-3)
        return json.dumps(good).encode()
    if kind == "binary":
        return bytes((i * 37 + 11) % 256 for i in range(4096))
    if kind == "null_device":
        return json.dumps({**good, "device": None}).encode()
    if kind == "nan":
        _set_first_p50(good, "smollm2", "mlp", math.nan)
        return json.dumps(good).encode()          # NaN: what json writes for a float nan
    raise AssertionError(kind)


KINDS = ("truncated", "empty", "schema3_missing_fields", "list_shaped", "models_empty", "negative", "binary",
         "null_device", "nan")


def sim_cfg(results: Path, *extra: str):
    from analysis.compose import compose_config

    return compose_config("simulate", ["model=smollm2", "hardware=cpu", "workload.batch=1", "workload.prompt_len=64",
                                       "workload.gen_len=4", f"results_dir={results}", "progress=false", *extra])


# ----------------------------------------------------------------------------- damaged cache

@pytest.mark.parametrize("kind", KINDS)
def test_simulator_refuses_a_damaged_cached_profile_in_one_line(kind, cache, tmp_path):
    from simulator.run import simulate

    path = first_use.cached_path(CPU)
    path.write_bytes(damaged(kind))
    with pytest.raises(ConfigError) as e:
        simulate(sim_cfg(tmp_path / "results"))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "python -m runtime.profile --quick --model smollm2 --out" in msg
    assert not (tmp_path / "results" / "simulated").exists() or not list((tmp_path / "results" / "simulated").glob("*.json"))


@pytest.mark.parametrize("kind", ["binary"])
def test_simulator_cli_on_a_damaged_cache_is_one_line_exit_2(kind, tmp_path):
    import os

    from core.machine import device_facts

    root = tmp_path / "cache"
    (root / "profiles").mkdir(parents=True)
    f = device_facts(CPU)
    path = root / "profiles" / f"{f['slug']}-{f['fingerprint']}.json"
    path.write_bytes(damaged(kind))
    env = {**os.environ, "KVTESTBED_CACHE": str(root)}
    r = subprocess.run([sys.executable, "-m", "simulator.run", "model=smollm2", "workload.batch=1",
                        "workload.prompt_len=64", "workload.gen_len=4", f"results_dir={tmp_path / 'results'}",
                        "progress=false"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and str(path) in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("kind", KINDS)
def test_first_use_re_measures_a_damaged_cached_profile_saying_why(kind, cache, monkeypatch, capsys):
    calls = fake_measurement(monkeypatch)
    path = first_use.cached_path(CPU)
    path.write_bytes(damaged(kind))
    got = first_use.ensure(CPU, "smollm2", lookup.Need(), progress=False)
    assert got == path and calls == [["smollm2"]]
    err = capsys.readouterr().err
    why = [ln for ln in err.splitlines() if "re-measuring" in ln]
    assert len(why) == 1 and str(path) in why[0]
    assert "Traceback" not in err
    after = validate(json.loads(path.read_text()), path)
    if kind in ("negative", "nan"):           # the damage is in smollm2's tables: tiny's are kept
        assert set(after["models"]) == {"smollm2", "tiny"}


def test_re_measuring_one_model_keeps_the_other_models_tables(cache, monkeypatch, capsys):
    """One NaN in smollm2's tables: smollm2 is re-measured, tiny's tables stay as they were."""
    calls = fake_measurement(monkeypatch)
    path = first_use.cached_path(CPU)
    path.write_bytes(damaged("nan"))
    tiny_before = this_machine_profile()["models"]["tiny"]
    first_use.ensure(CPU, "smollm2", lookup.Need(), progress=False)
    assert calls == [["smollm2"]]
    after = validate(json.loads(path.read_text()), path)
    assert set(after["models"]) == {"smollm2", "tiny"}
    assert after["models"]["tiny"] == tiny_before
    # and a model written by another writer since this one read the file is merged, not replaced
    other = copy.deepcopy(after)
    other["models"] = {"tiny": after["models"]["tiny"]}
    prof = this_machine_profile()
    prof["models"] = {"smollm2": prof["models"]["smollm2"]}
    P.write_profile(path, prof, "cannot write ({why})")
    assert set(json.loads(path.read_text())["models"]) == {"smollm2", "tiny"}


def test_runtime_profile_out_re_measures_a_damaged_file_it_names(cache, monkeypatch, capsys):
    """The command simulator.run's refusal names works on the damaged file (and keeps the
    models that are sound); a file that is not a profile of this machine is still refused."""
    from runtime.profile import __main__ as cli

    path = first_use.cached_path(CPU)
    path.write_bytes(damaged("nan"))

    def fake(models, quick, device, repeats, existing, **k):
        prof = this_machine_profile()
        prof["models"] = {**(existing or {}).get("models", {}), **{m: prof["models"][m] for m in models}}
        return prof
    monkeypatch.setattr(cli, "measured_profile", fake)
    cli.main(["--quick", "--model", "smollm2", "--out", str(path)])
    assert set(validate(json.loads(path.read_text()), path)["models"]) == {"smollm2", "tiny"}
    for kind in ("binary", "null_device"):
        path.write_bytes(damaged(kind))
        cli.main(["--quick", "--model", "smollm2", "--out", str(path)])
        assert "damaged" in capsys.readouterr().err
        validate(json.loads(path.read_text()), path)
    foreign = cache.parent / "notes.json"
    foreign.write_text("not json")
    with pytest.raises(SystemExit) as e:
        cli.main(["--quick", "--model", "smollm2", "--out", str(foreign)])
    assert e.value.code == 2 and foreign.read_text() == "not json"


# ----------------------------------------------------------------------------- concurrency, speed

def test_two_first_use_profilings_at_once_measure_once(cache, monkeypatch, capsys):
    calls = fake_measurement(monkeypatch, delay=1.0)
    got, errors = [], []

    def run():
        try:
            got.append(first_use.ensure(CPU, "smollm2", lookup.Need(), progress=False))
        except BaseException as e:          # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert not errors and len(got) == 2 and got[0] == got[1] == first_use.cached_path(CPU)
    assert calls == [["smollm2"]]
    err = capsys.readouterr().err
    assert "waiting for it" in err and "profiled by another process meanwhile" in err


def test_a_profile_the_machine_slowed_under_is_not_cached(cache, monkeypatch, capsys):
    calls = fake_measurement(monkeypatch, index=50.0, speed=100.0)      # x0.5 both times
    got = first_use.ensure(CPU, "smollm2", lookup.Need(), progress=False)
    assert len(calls) == 2 and got != first_use.cached_path(CPU)
    assert not first_use.cached_path(CPU).exists()
    assert "not cached" in capsys.readouterr().err


# ----------------------------------------------------------------------------- RAG at r = 0

def test_rag_ratio_0_draft_twin_skips_the_draft_as_the_runtime_does(tmp_path):
    from simulator.run import simulate

    def ttft(selector, r, store="warm"):
        cfg = sim_cfg(tmp_path / "r", "policy=rag", "workload=rag", "workload.batch=1",
                      f"policy.selector={selector}", f"policy.recompute_ratio={r}", f"policy.store={store}")
        return simulate(cfg)["ttft_s"]

    for store in ("warm", "disk"):
        reuse = ttft("reuse", 0, store)
        for sel in ("draft", "draft_dev", "draft_rel", "draft_attn", "cacheblend"):
            assert ttft(sel, 0, store) == pytest.approx(reuse, rel=1e-12), (sel, store)
    assert ttft("draft", 0.15) > ttft("reuse", 0.15)          # a positive budget still pays for the draft

    from runtime.rag.prefill import select

    class NoModel:                                            # the runtime must not run any layer at r = 0
        args = SimpleNamespace(n_layers=4)

        def __getattr__(self, name):
            raise AssertionError(f"the selector ran the model ({name})")
    for sel in ("draft", "draft_dev", "draft_rel", "draft_attn", "cacheblend"):
        chosen, info = select(sel, r=0.0, chunks=[[1] * 8, [2] * 8], model=NoModel(), prompt=[1] * 20, reused=[])
        assert chosen == [] and info["budget"] == 0


# ----------------------------------------------------------------------------- results

def _record(**over) -> dict:
    r = {"throughput_tok_s": 10.0, "ttft_s": 0.1, "ttft_s_p50": 0.1, "ttft_s_p99": 0.2, "tpot_s": 0.05,
         "tpot_s_p99": 0.06, "wall_s": 1.0, "output_tokens": 8, "requests": 2, "util_h2d": math.nan,
         "util_compute": 0.0, "kv_ratio_vs_fp16": math.nan, "goodput_req_s": 0.0,
         "phases": {"prefill": {"steps": 1, "step_s": 0.1}, "decode": {"steps": 0, "step_s": math.nan}}}
    r.update(over)
    return r


def test_check_result_by_hand():
    from core.checks import ResultError, check_result

    check_result(_record())                                        # idle util NaN / 0, goodput 0: fine
    check_result(_record(tpot_s=math.nan, tpot_s_p99=math.nan, output_tokens=2, requests=2))   # gen_len = 1
    for bad in (dict(ttft_s=math.nan), dict(ttft_s=0.0), dict(throughput_tok_s=math.inf), dict(ttft_s_p99=-1.0),
                dict(tpot_s=math.nan), dict(tpot_s=0.0), dict(wall_s=0), dict(decode_tok_s=math.nan),
                dict(phases={"decode": {"steps": 3, "step_s": 0.0}})):
        with pytest.raises(ResultError) as e:
            check_result(_record(**bad))
        assert "\n" not in str(e.value) and next(iter(bad)) in str(e.value)


def test_a_zero_time_profile_is_not_a_result(cache, tmp_path):
    """A profile whose tables are all zero (valid: times are >= 0) predicts TTFT 0 and a NaN
    throughput: one line, nothing written."""
    from core.checks import ResultError
    from simulator.run import simulate

    prof = json.loads(COMMITTED.read_text())
    for group in [prof["transfers"], *(m["kernels"] for m in prof["models"].values())]:
        for t in group.values():
            if isinstance(t, dict) and "axes" in t:
                for k in ("p10", "p50", "p90"):
                    t[k] = json.loads(json.dumps(t[k]), parse_float=lambda s: 0.0, parse_int=lambda s: 0)
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps(prof))
    out = tmp_path / "results"
    with pytest.raises(ResultError) as e:
        simulate(sim_cfg(out, f"hardware.profile={zero}"))
    assert "\n" not in str(e.value)
    assert not list((out / "simulated").glob("*.json"))
    rec = simulate(sim_cfg(out, "workload.gen_len=1"))        # the documented NaN (TPOT at gen_len=1) stays
    assert math.isnan(rec["tpot_s"]) and rec["ttft_s"] > 0
