"""Hydra's errors are ours (one line, choices, nearest name, exit 2), a
bad multirun point is recorded and the rest run, nothing measured is lost (writable check, names
that cannot collide, orphaned temp files, the persistent chunk store with its cap), and the
conventions (progress bar, where the sweep CSV is). The cases are tallied in hostile_cases_b.md."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runtime.bench  # noqa: F401  (registers the structured configs)
import runtime.serve  # noqa: F401
import simulator.run  # noqa: F401
from core.cli import check_command_line, compose_or_explain, nearest
from core.errors import ConfigError
from core.results import check_writable, clean_orphans, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {"runtime.bench": "bench", "runtime.serve": "serve", "simulator.run": "simulate"}
pytestmark = pytest.mark.timeout(300)


def _line(capsys, prog, argv):
    with pytest.raises(SystemExit) as e:
        check_command_line(prog, ENTRIES[prog], argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err


# ----------------------------------------------------------------------------- part 4: one line

BAD = [
    (["policy=nope"], "choose one of full, kivi, offload, rag, specache"),
    (["policy=kivy"], "did you mean kivi?"),
    (["polcy.k=4"], "did you mean policy?"),
    (["workload.batch=abc"], "give an integer"),
    (["workload.rate=fast"], "give a number"),
    (["progress=maybe"], "give true or false"),
    (["policy.k=4"], "policies with k: specache"),
    (["policy=kivi", "policy.bitz=2"], "did you mean bits?"),
    (["+polcy.k=4"], "'+' adds a key that nothing reads"),
    (["+policy.foo=1"], "policy=full has no knob 'foo'"),
    (["workload.batch=1,2"], "add -m (--multirun)"),
    (["x=[1,"], "cannot parse override"),
    (["~workload.batch"], "cannot be deleted"),
    (["model=tyni"], "did you mean tiny?"),
    (["workload=poison"], "did you mean poisson?"),
    (["hardware=h100"], "choose one of"),
    (["experiment=smok"], "did you mean smoke?"),
    (["hardware.link.gbs=2"], "did you mean gbps?"),
    (["workload.batch="], "give an integer"),
    (["-m", "workload.batch=1,abc,2"], "workload.batch=abc"),
    (["-m", "policy=full,nope"], "policy=nope"),
    (["-m", "hydra/launcher=nope", "workload.batch=1,2"], "hydra/launcher=nope: no such option"),
    (["-m", "hydra/launcher=ray", "hydra.launcher.ray.init.address=auto", "workload.batch=1,2"], "ray_local"),
    (["modle=tiny"], "did you mean model?"),
    (["model=tiny", "model.args.n_layers=two"], "model.args.n_layers='two': give a number"),
]


@pytest.mark.parametrize("prog", list(ENTRIES))
@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_hydra_errors_are_one_line(prog, argv, needle, capsys):
    if "hydra.launcher.ray.init.address=auto" in argv:
        pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    err = _line(capsys, prog, argv)
    assert needle in err, err


@pytest.mark.parametrize("argv", [
    ["model=tiny", "policy=specache", "policy.k=4"],
    ["model=tiny", "+model.args.rope_base=10000.0"],        # model.args is a free-form dict
    ["-m", "model=tiny", "workload.batch=1,2,4"],
    ["hydra.run.dir=/tmp/x", "model=tiny"],
    ["--help"], ["--cfg", "job", "model=tiny"],
])
def test_good_command_lines_pass(argv):
    for prog in ENTRIES:
        check_command_line(prog, ENTRIES[prog], argv)


def test_scheduler_key_typo_in_serve_and_simulator(capsys):
    for prog in ("runtime.serve", "simulator.run"):
        assert "did you mean max_batch?" in _line(capsys, prog, ["scheduler.max_bach=4"])
    assert "did you mean ttft_s?" in _line(capsys, "simulator.run", ["slo.ttft=1"])


def test_analysis_commands_say_the_same():
    import analysis.sweep  # noqa: F401  (registers base_sweep)
    from analysis.validate import compose_config

    with pytest.raises(ConfigError, match="did you mean validate_gpu"):
        compose_config("validate", ["experiment=validate_gpuu"])
    with pytest.raises(ConfigError, match="must be quoted"):       # the README's old GPU command
        compose_config("validate", ["experiment=validate_gpu", "overrides=[hardware.profile=profiles/GPU.json]"])
    cfg = compose_config("validate", ["experiment=validate_gpu", "overrides=['hardware.profile=profiles/GPU.json']"])
    assert list(cfg.overrides) == ["hardware.profile=profiles/GPU.json"]
    with pytest.raises(ConfigError, match="did you mean grids"):
        compose_config("sweep", ["sweep.gridz=1"])


def test_nearest():
    assert nearest("kivy", ["full", "kivi"]) == "; did you mean kivi?"
    assert nearest("zzzz", ["full", "kivi"]) == ""


def _cli(module, *args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300, **kw)


@pytest.mark.parametrize("module,args", [("runtime.bench", ["policy=nope"]), ("runtime.serve", ["polcy.k=4"]),
                                         ("simulator.run", ["workload.batch=abc"])])
def test_cli_exit_2_one_line(module, args, tmp_path):
    p = _cli(module, "model=tiny", f"results_dir={tmp_path}", *args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "measured").exists() and not (tmp_path / "simulated").exists()


# ----------------------------------------------------------------------------- part 4: multirun points

def _sweep_rows(folder: Path) -> list[dict]:
    (path,) = folder.glob("*.csv")
    return sorted(csv.DictReader(path.open()), key=lambda r: int(r["job"]))


@pytest.mark.parametrize("module,kind,extra", [
    ("runtime.bench", "measured", ["workload.prompt_len=16", "workload.gen_len=4", "warmup=false"]),
    ("runtime.serve", "measured", ["workload.prompt_len=16", "workload.gen_len=4", "warmup=false"]),
    ("simulator.run", "simulated", []),
])
def test_bad_multirun_point_is_recorded_and_the_rest_run(module, kind, extra, tmp_path):
    p = _cli(module, "-m", "model=tiny", "workload.batch=1,0,2", "progress=false", f"results_dir={tmp_path}", *extra)
    assert p.returncode == 0, p.stderr[-1500:]
    rows = _sweep_rows(tmp_path / kind / "sweeps")
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert rows[0]["error"] == "" and rows[2]["error"] == "" and float(rows[2]["throughput_tok_s"]) > 0
    assert "workload.batch=0" in rows[1]["error"] and rows[1]["throughput_tok_s"] == ""
    assert p.stdout.count("sweep CSV: ") == 4                  # where the CSV is: after every point, and at the end
    assert p.stdout.strip().splitlines()[-1].endswith("(3 points, 1 failed)")
    assert len(list((tmp_path / kind).glob("*.json"))) == 2


def test_two_sweeps_at_once_do_not_share_a_csv(tmp_path):
    args = ["-m", "model=tiny", "workload.batch=1,2", f"results_dir={tmp_path}", "progress=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "simulator.run", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    csvs = list((tmp_path / "simulated" / "sweeps").glob("*.csv"))
    assert len(csvs) == 2
    assert all(len(list(csv.DictReader(c.open()))) == 2 for c in csvs)


# ----------------------------------------------------------------------------- part 5: nothing lost

def _bench_cfg(*overrides):
    return compose_or_explain("bench", ["experiment=smoke", "progress=false", "warmup=false", *overrides])


def test_unwritable_results_refused_before_the_run(tmp_path, monkeypatch):
    (tmp_path / "measured").write_text("a file in the way")
    ran = []
    monkeypatch.setattr(runtime.bench.loaders, "from_config", lambda *a, **k: ran.append(1))
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        runtime.bench.run(_bench_cfg(f"results_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="results_dir"):
        runtime.serve.run(compose_or_explain("serve", ["model=tiny", f"results_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="on the way to"):
        simulator.run.simulate(compose_or_explain("simulate", ["model=tiny", f"results_dir={tmp_path}/measured/x"]))
    assert ran == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_refused(tmp_path):
    (tmp_path / "measured").mkdir()
    (tmp_path / "measured").chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            check_writable(tmp_path / "measured")
    finally:
        (tmp_path / "measured").chmod(0o700)


def test_cli_unwritable_one_line(tmp_path):
    (tmp_path / "measured").write_text("")
    p = _cli("runtime.bench", "experiment=smoke", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "results_dir" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_same_config_same_second_two_files(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    cfg = _bench_cfg(f"results_dir={tmp_path}")
    a, b = runtime.bench.run(cfg), runtime.bench.run(cfg)
    assert a["path"] != b["path"] and Path(b["path"]).name.endswith("-2.json")
    assert len(list((tmp_path / "measured").glob("*.json"))) == 2
    sa = simulator.run.simulate(compose_or_explain("simulate", ["model=tiny", f"results_dir={tmp_path}"]))
    sb = simulator.run.simulate(compose_or_explain("simulate", ["model=tiny", f"results_dir={tmp_path}"]))
    assert sa["path"] != sb["path"]


def test_exclusive_write_never_clobbers(tmp_path):
    paths = [write_json_atomic(tmp_path / "r.json", {"i": i}, exclusive=True) for i in range(3)]
    assert [p.name for p in paths] == ["r.json", "r-2.json", "r-3.json"]
    assert [json.loads(p.read_text())["i"] for p in paths] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-2.json", "r-3.json", "r.json"]   # no temp left


def test_orphaned_temp_files_cleaned_and_ignored(tmp_path):
    old, fresh = tmp_path / ".r.json.abc123.tmp", tmp_path / ".r.json.def456.tmp"
    old.write_text('{"half'), fresh.write_text('{"half')
    past = time.time() - 2 * 3600
    os.utime(old, (past, past))
    assert list(tmp_path.glob("*.json")) == []                        # readers never see them
    check_writable(tmp_path)                                          # a run starting here
    assert not old.exists() and fresh.exists()                        # a write in flight is left alone
    assert clean_orphans(tmp_path, max_age_s=0) == [fresh]
    old.write_text('{"half'), os.utime(old, (past, past))
    write_json_atomic(tmp_path / "r.json", {"a": 1})                 # any later write there cleans up too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_killed_atomic_write_leaves_no_result(tmp_path):
    class Boom:
        def __repr__(self):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(tmp_path / "x.json", {"a": Boom()})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- part 5: chunk store

def test_chunk_store_lru_cap(tiny_model, tmp_path):
    from runtime.rag.store import ChunkStore, evict, usage

    store = ChunkStore(tiny_model, root=tmp_path, max_bytes=None)
    chunks = [[3 + i, 4 + i, 5 + i, 6 + i] for i in range(4)]
    for i, c in enumerate(chunks):
        store.get(c)
        t = time.time() - 100 + i
        os.utime(store.path(c), (t, t))
    size = store.path(chunks[0]).stat().st_size
    ChunkStore(tiny_model, root=tmp_path, max_bytes=None)._read(store.key(chunks[0]), 4)   # a read: chunk 0 is recent
    gone = evict(tmp_path, 2 * size)
    assert sorted(gone) == sorted([store.path(chunks[1]), store.path(chunks[2])])
    assert usage(tmp_path) == (2, 2 * size)
    capped = ChunkStore(tiny_model, root=tmp_path, max_bytes=size)      # a lowered cap applies on open
    assert capped.stats["evicted"] == 1 and usage(tmp_path)[0] == 1
    with pytest.raises(ConfigError, match="store_max_bytes"):
        ChunkStore(tiny_model, root=tmp_path, max_bytes=0)


def test_bench_store_disk_uses_the_cache_root(tmp_path, monkeypatch):
    from runtime import cache

    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "cache"))
    cfg = compose_or_explain("bench", ["model=tiny", "policy=rag", "workload=rag", "policy.store=disk",
                                       "policy.chunk_len=32", "workload.prompt_len=160", "workload.gen_len=2",
                                       "policy.selector=epic", "progress=false", "warmup=false", "repeats=1",
                                       f"results_dir={tmp_path}/r"])
    r = runtime.bench.run(cfg)
    files = list((tmp_path / "cache" / "chunks").glob("*.safetensors"))
    assert len(files) == 4 and r["policy_stats"]["store_disk_hits"] == 4
    for f in files:                                                    # corrupt every entry
        f.write_bytes(b"garbage")
    r = runtime.bench.run(cfg)
    assert r["policy_stats"]["store_corrupt"] == 4 and r["policy_stats"]["store_computed"] == 4
    cache.main(["--clear", "chunks"])
    assert list((tmp_path / "cache" / "chunks").glob("*")) == []


# ----------------------------------------------------------------------------- part 7: conventions

def test_simulator_progress_bar(monkeypatch, tmp_path):
    import tqdm.auto

    made = []

    class Bar:
        def __init__(self, **kw):
            made.append(kw)
            self.n = 0

        def update(self, n):
            self.n += n

        def close(self):
            made[-1]["done"] = self.n

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    for flag in ("true", "false"):
        simulator.run.simulate(compose_or_explain("simulate", ["model=tiny", "workload=poisson", "workload.n_requests=30",
                                                               f"progress={flag}", f"results_dir={tmp_path}"]))
    assert [m["disable"] for m in made] == [False, True]
    assert made[0]["total"] == 30 and made[0]["done"] == 30 and made[0]["delay"] >= 1.0


def test_ray_local_launcher_config_composes():
    cfg = compose_or_explain("simulate", ["hydra/launcher=ray_local"], hydra_config=True) \
        if _has("hydra_plugins.hydra_ray_launcher") else pytest.skip("hydra-ray-launcher not installed")
    assert cfg.hydra.launcher.ray.init.address == "auto"
    assert "object_store_memory" in cfg.hydra.launcher.ray.init
    assert cfg.hydra.launcher.ray.init.object_store_memory is None


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
