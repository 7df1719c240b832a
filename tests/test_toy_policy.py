"""A newcomer's path (README "Add a KV policy"): the toy policy ships exactly four files under
tests/toy_policy/ (runtime file, twin, declaration, yaml found through hydra.searchpath) and runs
through runtime.bench, simulator.run and analysis.validate without any other file naming it."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pandas as pd
import pytest
import torch

from core.errors import ConfigError
from core.policies import ModelShape

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "toy_policy"
SEARCH = f"hydra.searchpath=[file://{TOY}]"
PROFILE = "hardware.profile=profiles/cpu-intel-r-xeon-r-processor-2c.json"
SMALL = ["model=tiny", "workload.batch=2", "workload.prompt_len=48", "workload.gen_len=4"]


def _run(module, *args, tmp):
    r = subprocess.run([sys.executable, "-m", module, *args, f"results_dir={tmp}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_the_toy_is_four_files_and_nothing_else_names_it():
    files = sorted(str(p.relative_to(TOY)) for p in TOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert files == ["declaration.py", "kv.py", "policy/toy.yaml", "twin.py"]
    out = subprocess.run(["git", "grep", "-ilw", "toy", "--", "core/*.py", "runtime/*.py", "simulator/*.py",
                          "analysis/*.py", "conf/*.yaml", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_runtime_bench_and_simulator_run(tmp_path):
    _run("runtime.bench", *SMALL, "policy=toy", SEARCH, "warmup=false", "progress=false", tmp=tmp_path)
    _run("simulator.run", *SMALL, "policy=toy", SEARCH, PROFILE, tmp=tmp_path)
    (measured,) = [json.loads(p.read_text()) for p in (tmp_path / "measured").glob("*.json")]
    (simulated,) = [json.loads(p.read_text()) for p in (tmp_path / "simulated").glob("*.json")]
    for r in (measured, simulated):
        assert r["policy"] == "toy" and r["config"]["policy"]["mirror"] is True
        assert r["kv_bytes_host"] == r["kv_bytes_device"] > 0           # the mirror
    assert measured["config"]["policy"] == simulated["config"]["policy"]


def test_runtime_cache_bytes_equal_the_twins(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from runtime.kv import Step, make_cache
    from simulator.policies import make_policy

    for mirror in (True, False):
        cfg = dict(name="toy", plugin="tests.toy_policy", kv_dtype="float32", mirror=mirror)
        twin = make_policy(cfg)
        for tokens in ([5], [9, 3]):
            cache = make_cache(NS(**cfg), n_layers=2, batch=len(tokens), n_kv_heads=2, head_dim=8,
                               capacity=max(tokens) + 4, device=torch.device("cpu"))
            N = max(tokens)
            step = Step(0, N, torch.tensor([N - t for t in tokens]), torch.zeros(len(tokens), N, dtype=torch.long))
            x = torch.randn(len(tokens), 2, N, 8)
            for layer in cache.layers:
                layer.load(x, x, step)
            cache.advance(step)
            assert cache.nbytes() == twin.kv_bytes(tokens, ModelShape(2, 2, 8, "float32"))
    with pytest.raises(ConfigError, match="policy.mirror"):
        make_policy({"name": "toy", "plugin": "tests.toy_policy", "mirror": "yes"})


def test_analysis_validate(tmp_path):
    quoted = lambda items: ",".join(f"'{o}'" for o in items)  # noqa: E731  (overrides inside an override)
    point = "{id:toy_b2_p48,split:calibration,overrides:['policy=toy']}"
    _run("analysis.validate", f"validation.points=[{point}]", f"validation.base=[{quoted([*SMALL, 'hardware=cpu'])}]",
         f"overrides=[{quoted([SEARCH, PROFILE])}]", "validation.repeats=1", "progress=false", "figure=false",
         tmp=tmp_path)
    df = pd.read_csv(tmp_path / "validation" / "validate.csv")
    (row,) = df.itertuples()
    assert row.id == "toy_b2_p48" and row.predicted_throughput_tok_s > 0 and row.measured_throughput_tok_s > 0
