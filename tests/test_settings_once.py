"""A setting is checked once and carried as an object: one `runtime.bench` run on the tiny
model builds its policy's declaration (core/policies/<name>.py) and runs its `check` exactly
once (core/checks.py check_config), then hands that object to check_shape, the engine and every
layer of every KV cache, which do not check it again. Before, a run checked it 2 + n_layers
times per generate() (kivi / specache: 8 with warmup and two repeats; rag 6; full 2)."""
import functools
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from core.policies import SPECS
from runtime import bench

CONF = str(Path(__file__).resolve().parent.parent / "conf")
SMALL = ["model=tiny", "workload.prompt_len=40", "workload.gen_len=4", "repeats=2", "warmup=true", "progress=false"]
RAG = ["workload.batch=1", "policy.chunk_len=16", "policy.question_len=8", "policy.draft_layers=1"]


@pytest.fixture
def checks(monkeypatch):
    """Counter of `check` calls per declaration name (a subclass's super().check counts once)."""
    counts: Counter = Counter()
    for cls in {c for spec in SPECS.values() for c in spec.__mro__ if "check" in c.__dict__}:
        def counted(self, *a, _check=cls.__dict__["check"], **k):
            depth = self.__dict__.get("_depth", 0)
            if depth == 0:
                counts[self.name] += 1
            self.__dict__["_depth"] = depth + 1
            try:
                return _check(self, *a, **k)
            finally:
                self.__dict__["_depth"] = depth
        monkeypatch.setattr(cls, "check", functools.wraps(cls.__dict__["check"])(counted))
    return counts


@pytest.mark.parametrize("policy", sorted(p.stem for p in (Path(CONF) / "policy").glob("*.yaml")))
def test_one_bench_run_checks_its_policy_once(policy, checks, tmp_path):
    overrides = [*SMALL, f"policy={policy}", f"results_dir={tmp_path}", *(RAG if policy == "rag" else [])]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=overrides)
    bench.run(cfg)
    # rag's pipeline also builds plain `full` caches of its own (placement, tracing, decode): those
    # are other declarations; the run's own policy is checked once
    assert checks[policy] == 1, dict(checks)


@pytest.mark.parametrize("policy", ["full", "kivi"])
def test_one_serve_run_checks_its_policy_once(policy, checks, tmp_path):
    """runtime.serve checks once too: its warm-up and its replay take the checked declaration."""
    from runtime import serve

    overrides = ["model=tiny", "workload=poisson", "workload.n_requests=3", "workload.prompt_len=16",
                 "workload.gen_len=3", "warmup=true", "progress=false", f"policy={policy}", f"results_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="serve", overrides=overrides)
    serve.run(cfg)
    assert checks[policy] == 1, dict(checks)
