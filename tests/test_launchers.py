"""Launchers predict the machine they were asked for; the multirun CSV and summaries.

- The thread count is part of a machine's fingerprint, and launchers start workers with one torch
  thread (joblib's loky, Ray): a simulation looks its profile up at the thread count the point
  describes (hardware.threads, else torch's default for this machine's cores), and a multirun's
  parent resolves every point's profile once and hands it to the workers.
- A run that falls back to another machine's profile says so in one line.
- The multirun CSV: every override its own column, the full latency statistics, `extrapolated`.
- What a prediction read beyond a profile's grid is one line, with how far (simulator.run,
  analysis.sweep, the multirun summary).
- Ray: a missing plugin or a missing cluster is one line naming the fix; the extras' pins agree.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from core.cli import check_launcher, compose_or_explain
from core.errors import ConfigError
from core.profile import lookup
from core.sweeps import (METRIC_COLUMNS, parse_reads, ray_cluster_problem, reads_text, stretched_line,
                         summary_lines, sweep_row)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "profiles" / "cpu-intel-r-xeon-r-processor-2c.json"
CPU = torch.device("cpu")
POINT = ["model=smollm2", "workload.prompt_len=64", "workload.gen_len=4", "progress=false"]


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def this_machine_profile(threads: int) -> dict:
    """The committed profile's tables relabelled as a profile of this machine measured with
    `threads` torch threads (this schema, every kernel table on the code path the runtime takes)."""
    from core.machine import device_facts
    from core.profile.schema import SCHEMA_VERSION, current_code_path

    prof = json.loads(COMMITTED.read_text())
    prof["schema_version"] = SCHEMA_VERSION
    dev = device_facts(CPU)
    dev["facts"]["torch_threads"] = dev["torch_threads"] = threads
    dev["fingerprint"] = lookup.fingerprint_at(CPU, threads)
    prof["device"] = dev
    prof["speed_index"] = {"index": 1.0, "gemm_s": 0.01, "memcpy_s": 0.01, "attention_s": 0.01}
    for m in prof["models"].values():
        for name, t in m["kernels"].items():
            if isinstance(t, dict) and "axes" in t:
                t["code_path"] = current_code_path("cpu", name)
    return prof


@pytest.fixture
def here(tmp_path):
    """A cache holding a profile of this machine (at its default thread count): (env, its path)."""
    from core.results import write_json_atomic

    cache = tmp_path / "cache"
    path = cache / "profiles" / f"cpu-here-{lookup.fingerprint_at(CPU, lookup.default_threads())}.json"
    write_json_atomic(path, this_machine_profile(lookup.default_threads()))
    env = {k: v for k, v in os.environ.items() if k != lookup.HANDOFF_ENV}
    env.update({"KVTESTBED_CACHE": str(cache), "PYTHONWARNINGS": "ignore"})
    return env, path


def _sim(args, env, tmp_path, **kw):
    return subprocess.run([sys.executable, "-m", "simulator.run", *args, f"results_dir={tmp_path / 'results'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def _results(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "simulated").glob("*.json"))]


def _sweep(tmp_path) -> list[dict]:
    (path,) = (tmp_path / "results" / "simulated" / "sweeps").glob("*.csv")
    return list(csv.DictReader(path.open(newline="")))


# ----------------------------------------------------------------------------- the point's threads

def test_default_threads_is_torchs_default_whatever_this_process_was_given():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = ("import torch; from core.profile import lookup; import json; "
            "print(json.dumps([torch.get_num_threads(), lookup.default_threads()]))")
    plain = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    assert plain[0] == plain[1] == lookup.default_threads()        # torch's own default, in a fresh process
    # (a 1-thread process still looks up the default: test_omp_1_direct_run_predicts_this_machine)
    from core.machine import this_fingerprint
    if torch.get_num_threads() == lookup.default_threads():
        assert lookup.fingerprint_at(CPU, lookup.default_threads()) == this_fingerprint(CPU)
    assert lookup.fingerprint_at(CPU, 1) != lookup.fingerprint_at(CPU, 2)


def test_omp_1_direct_run_predicts_this_machine(here, tmp_path):
    env, path = here
    p = _sim([*POINT, "workload.batch=1"], {**env, "OMP_NUM_THREADS": "1"}, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    (r,) = _results(tmp_path)
    prov = r["provenance"]
    assert Path(prov["profile"]) == path and prov["predicts"] == "this machine", prov
    assert prov["worker_threads"] == 1 and prov["threads"] == lookup.default_threads()
    assert prov["profile_from"] == "lookup"
    assert "warning" not in p.stderr


def test_fallback_to_another_machine_is_one_warning_line(here, tmp_path, monkeypatch, capsys):
    from analysis.compose import compose_config
    from simulator.run import simulate

    env, path = here
    monkeypatch.setenv("KVTESTBED_CACHE", env["KVTESTBED_CACHE"])
    monkeypatch.delenv(lookup.HANDOFF_ENV, raising=False)
    if lookup.default_threads() == 1:
        pytest.skip("one core: hardware.threads=1 is this machine's default")
    r = simulate(compose_config("simulate", [*POINT, "workload.batch=1", f"results_dir={tmp_path}"]))
    assert Path(r["provenance"]["profile"]) == path and "warning" not in capsys.readouterr().err
    # hardware.threads=1 describes another machine state than the profile's (default threads)
    r = simulate(compose_config("simulate", [*POINT, "workload.batch=1", "hardware.threads=1",
                                             f"results_dir={tmp_path}"]))
    assert (ROOT / r["provenance"]["profile"]).resolve() == COMMITTED and r["provenance"]["predicts"] != "this machine"
    assert r["provenance"]["profile_from"] == "committed"
    (warn,) = capsys.readouterr().err.strip().splitlines()
    assert "no profile of this machine" in warn and "1 torch threads" in warn and COMMITTED.name in warn
    assert "python -m runtime.profile --model smollm2" in warn and "predicts Intel(R) Xeon(R) Processor" in warn


def test_a_sweeps_parent_hands_its_answer_down(here, monkeypatch):
    env, path = here
    monkeypatch.setenv("KVTESTBED_CACHE", env["KVTESTBED_CACHE"])
    monkeypatch.delenv(lookup.HANDOFF_ENV, raising=False)
    got = lookup.hand_off([("cpu", "smollm2", None), ("cpu", "smollm2", None), ("cpu", "llama7b_shape", None)])
    assert sorted(got.values(), key=str) == sorted([str(path.resolve()), None], key=str)
    assert lookup.point_profile("cpu", "smollm2") == (path.resolve(), lookup.default_threads(), "sweep")
    assert lookup.point_profile("cpu", "llama7b_shape")[::2] == (None, "sweep")
    # the worker's own lookup where the parent said nothing of this point (another thread count)
    assert lookup.point_profile("cpu", "smollm2", 1)[::2] == (None, "lookup")
    lookup.hand_off([])
    assert lookup.HANDOFF_ENV not in os.environ


def _multirun_predicts_here(launcher: str, here, tmp_path):
    """A 3-point multirun under `launcher`: every point predicts this machine from the profile the
    parent handed down; (the process, the 3 records)."""
    env, path = here
    p = _sim(["-m", f"hydra/launcher={launcher}", *POINT, "workload.batch=1,2,3"], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _sweep(tmp_path)
    assert sorted(r["workload.batch"] for r in rows) == ["1", "2", "3"]       # the swept key, a column
    assert all(r["error"] == "" for r in rows), rows
    assert {r["predicts"] for r in rows} == {"this machine"} and {Path(r["profile"]) for r in rows} == {path}
    recs = _results(tmp_path)
    assert len(recs) == 3 and {r["provenance"]["profile_from"] for r in recs} == {"sweep"}   # the parent's answer
    print(f"{launcher} workers' torch threads:", sorted(r["provenance"]["worker_threads"] for r in recs))
    return p, recs


@pytest.mark.skipif(not _has("hydra_plugins.hydra_joblib_launcher"), reason='pip install -e ".[sweep]"')
def test_joblib_multirun_points_predict_this_machine(here, tmp_path):
    p, recs = _multirun_predicts_here("joblib", here, tmp_path)
    assert all(r["provenance"]["threads"] == lookup.default_threads() for r in recs)
    assert not [ln for ln in p.stderr.splitlines() if "warning" in ln]


@pytest.mark.slow
@pytest.mark.skipif(not _has("hydra_plugins.hydra_submitit_launcher"), reason='pip install -e ".[cluster]"')
def test_submitit_local_multirun_points_predict_this_machine(here, tmp_path):
    _multirun_predicts_here("submitit_local", here, tmp_path)


# ----------------------------------------------------------------------------- the CSV

def test_sweep_row_columns_every_override_and_the_metric_set(tmp_path):
    path = tmp_path / "s.csv"
    ov = ["policy=specache", "policy.k=64", "workload.rate=2.5", "+model.args.dim=64", "~timeline"]
    rec = {"throughput_tok_s": 10.0, "ttft_p50_s": 0.5, "queue_std_s": 0.1, "ttft_p99_9_s": 0.9,
           "extrapolated": ["t:batch"], "extrapolated_reads": {"t:batch": {"read": 191.0, "limit": 4.0}},
           "provenance": {"predicts": "this machine"}}
    keys = ("throughput_tok_s", "extrapolated", "extrapolated_reads", "provenance.predicts")
    sweep_row(path, 0, ov, None, "ConfigError: bad", keys)        # a failed point first: same header
    sweep_row(path, 1, ov, rec, None, keys)
    rows = list(csv.DictReader(path.open(newline="")))
    head = list(rows[0])
    assert head[:6] == ["job", "overrides", "policy", "policy.k", "workload.rate", "model.args.dim"]
    assert set(METRIC_COLUMNS) <= set(head) and len(METRIC_COLUMNS) == 25 and "timeline" not in head
    assert "ttft_p99_9_s" not in head and None not in rows[1]      # every row keeps to the first row's header
    ok = rows[1]
    assert (ok["policy.k"], ok["workload.rate"], ok["throughput_tok_s"]) == ("64", "2.5", "10.0")
    assert (ok["ttft_p50_s"], ok["queue_std_s"], ok["ttft_mean_s"]) == ("0.5", "0.1", "")
    assert ok["extrapolated"] == "t:batch" and ok["predicts"] == "this machine"
    assert parse_reads(ok["extrapolated_reads"]) == rec["extrapolated_reads"]
    assert rows[0]["error"] == "ConfigError: bad" and rows[0]["throughput_tok_s"] == ""
    # an extra percentile (metrics.percentiles) is a column when the first row has it
    sweep_row(tmp_path / "t.csv", 0, ov, rec, None, keys)
    sweep_row(tmp_path / "t.csv", 1, ov, None, "x", keys)
    rows = list(csv.DictReader((tmp_path / "t.csv").open(newline="")))
    assert [r["ttft_p99_9_s"] for r in rows] == ["0.9", ""] and all(None not in r for r in rows)


def test_summary_says_which_machine_and_what_was_stretched(tmp_path):
    rows = [{"job": "0", "error": "", "predicts": "this machine", "extrapolated": "",
             "extrapolated_reads": reads_text({"a:batch": {"read": 6.0, "limit": 4.0}})},
            {"job": "1", "error": "", "predicts": "Xeon (measured, fingerprint none)", "extrapolated": "a:batch",
             "extrapolated_reads": reads_text({"a:batch": {"read": 191.0, "limit": 4.0}})},
            {"job": "2", "error": "x", "predicts": "", "extrapolated": "", "extrapolated_reads": ""}]
    lines = summary_lines(tmp_path / "s.csv", rows)
    assert lines[2].endswith("(3 points, 1 failed)")           # the CSV's path last
    assert "1 of 3 points (job 1) predicted Xeon" in lines[0]
    assert lines[1].startswith("extrapolated in 2 of 3 points") and "a:batch read at 191 (its grid ends at 4, 47.8x)" \
        in lines[1] and "allow_extrapolation=true" in lines[1]
    assert stretched_line({}, ()) == ""
    near = stretched_line({"a:batch": {"read": 6.0, "limit": 4.0}})
    assert "allow_extrapolation" not in near and "read at 6 (its grid ends at 4, 1.5x)" in near
    assert "n_kv_heads = 8 where the profile measured 3" in stretched_line(
        {"shape:n_kv_heads": {"read": 8.0, "limit": 3.0}}, ["shape:n_kv_heads"])


# ----------------------------------------------------------------------------- what was stretched

def test_batch_191_on_a_grid_to_4_says_so(tmp_path):
    from analysis.compose import compose_config
    from simulator.run import simulate

    base = [*POINT, "workload.batch=191", f"hardware.profile={COMMITTED}", f"results_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="allow_extrapolation"):
        simulate(compose_config("simulate", base))
    r = simulate(compose_config("simulate", [*base, "allow_extrapolation=true"]))
    reads = r["extrapolated_reads"]
    assert reads["models.smollm2.kernels.decode_layer:batch"] == {"read": 191.0, "limit": 4.0}
    assert reads["models.smollm2.kernels.lm_head_sample:batch"] == {"read": 191.0, "limit": 16.0}
    assert set(r["extrapolated"]) <= set(reads)
    # a read past the grid within the 2x margin: not in `extrapolated`, but said
    r6 = simulate(compose_config("simulate", [*POINT, "workload.batch=6", f"hardware.profile={COMMITTED}",
                                              f"results_dir={tmp_path}"]))
    assert r6["extrapolated"] == [] and r6["extrapolated_reads"]["models.smollm2.kernels.decode_layer:batch"] == \
        {"read": 6.0, "limit": 4.0}
    r1 = simulate(compose_config("simulate", [*POINT, "workload.batch=1", f"hardware.profile={COMMITTED}",
                                              f"results_dir={tmp_path}"]))
    assert r1["extrapolated"] == [] and "extrapolated_reads" not in r1


def test_closing_output_names_table_axis_and_how_far(tmp_path, capsys):
    from analysis.compose import compose_config
    from core.cli import run_point
    from simulator.run import CSV_KEYS, format_table, simulate

    cfg = compose_config("simulate", [*POINT, "workload.batch=191", "allow_extrapolation=true",
                                      f"hardware.profile={COMMITTED}", f"results_dir={tmp_path}"])
    run_point("simulator.run", cfg, simulate, format_table, kind="simulated", keys=CSV_KEYS)
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("extrapolated")]
    assert "models.smollm2.kernels.decode_layer:batch read at 191 (its grid ends at 4, 47.8x)" in line


def test_analysis_sweep_rows_and_summary_say_how_far(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from analysis import sweep as S

    row = S.run_point("g", [*POINT, "workload.batch=191", "allow_extrapolation=true",
                            f"hardware.profile={COMMITTED}"], str(tmp_path))
    assert row["status"] == "ok" and "models.smollm2.kernels.decode_layer:batch" in row["extrapolated"]
    assert "models.smollm2.kernels.decode_layer:batch@191/4" in row["extrapolated_reads"].split()
    plain = S.run_point("g", [*POINT, "workload.batch=1", f"hardware.profile={COMMITTED}"], str(tmp_path))
    monkeypatch.setattr(S, "sweep", lambda cfg: pd.DataFrame([{**row, "label": "a"}, {**plain, "label": "b"}]))
    S.main(["experiment=sweep_k_bits_r", f"results_dir={tmp_path}", "progress=false"])
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("extrapolated")]
    assert line.startswith("extrapolated in 1 of 2 points") and "decode_layer:batch read at 191" in line


# ----------------------------------------------------------------------------- Ray and the extras

RAY = {"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
       "ray": {"init": {"address": "auto", "object_store_memory": None}, "remote": {}}}


@pytest.mark.skipif(_has("hydra_plugins.hydra_ray_launcher"), reason="hydra-ray-launcher is installed")
def test_ray_without_the_extra_names_the_install():
    with pytest.raises(ConfigError) as e:
        compose_or_explain("simulate", ["hydra/launcher=ray_local"], hydra_config=True)
    assert str(e.value).startswith("hydra/launcher=ray_local:") and 'pip install -e ".[ray]"' in str(e.value)
    from omegaconf import OmegaConf
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        check_launcher(OmegaConf.create(RAY))


def test_no_ray_cluster_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    with socket.socket() as s:             # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    msg = ray_cluster_problem("auto")
    assert "\n" not in msg and "ray start --head" in msg and "RAY_ADDRESS" in msg and str(port) in msg
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))          # no cluster started here
    msg = ray_cluster_problem("auto")
    assert "no running Ray cluster" in msg and "ray start --head" in msg and "RAY_ADDRESS" in msg
    with socket.socket() as s:             # a cluster's address that answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert ray_cluster_problem(f"127.0.0.1:{s.getsockname()[1]}") == ""
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{s.getsockname()[1]}\n")
        assert ray_cluster_problem("auto") == ""


def test_extras_pin_one_cloudpickle_for_joblib_and_ray():
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    reqs = {x: {Requirement(r).name: Requirement(r).specifier for r in extras[x]} for x in ("sweep", "ray")}
    # joblib >= 1.6 requires cloudpickle >= 3; hydra-ray-launcher 1.2 requires cloudpickle < 3
    assert "1.6.0" not in reqs["sweep"]["joblib"] and "1.6.0" not in reqs["ray"]["joblib"]
    assert "3.0.0" not in reqs["ray"]["cloudpickle"] and "2.2.1" in reqs["ray"]["cloudpickle"]
    assert "1.5.3" in reqs["sweep"]["joblib"]
