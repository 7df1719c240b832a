"""Faults on the write path: a full disk (injected ENOSPC, and a real small tmpfs where root can
mount one), a results_dir that is a dangling symlink or a symlink loop, the fallback file in the
cache when a result cannot be written (and the result in the error line when that fails too), a
multirun that stops in one line, and SIGINT / SIGTERM mid-run. Each checks that nothing measured
is lost and that the error is one line without a traceback. The cases, and what the code before
them did: tests/fault_cases_writes.md.

Subprocess tests run `python -m <module>` with PYTHONPATH at this checkout, so the file also runs
against another checkout of the project (its tests/ folder), as fault_cases_writes.md records.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# runs a module with ENOSPC injected into fsync and os.write for files under FAULT_UNDER (the
# results folder): FAULT_AFTER fsyncs there succeed first; once one fails, the disk stays full
FAULT = textwrap.dedent('''
    import errno, os, runpy, sys
    UNDER, AFTER = os.path.realpath(os.environ["FAULT_UNDER"]), int(os.environ.get("FAULT_AFTER", "0"))
    state = {"fsyncs": 0, "full": AFTER == 0}
    real_fsync, real_write = os.fsync, os.write

    def under(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(UNDER)
        except OSError:
            return False

    def fsync(fd):
        if under(fd):
            state["fsyncs"] += 1
            if state["full"] or state["fsyncs"] > AFTER:
                state["full"] = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def write(fd, data):
        if state["full"] and under(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    os.fsync, os.write = fsync, write
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
''')

SIM = ["workload=poisson", "workload.n_requests=8", "progress=false"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "KVTESTBED_CACHE": str(tmp_path / "cache"),
            "HYDRA_FULL_ERROR": "0"}


def _run(tmp_path: Path, module: str, *args: str, fault: dict | None = None, timeout: int = 240):
    """python -m module args (through the fault wrapper when `fault` is given), cwd tmp_path."""
    env = _env(tmp_path)
    if fault is None:
        cmd = [sys.executable, "-m", module, *args]
    else:
        (tmp_path / "fault.py").write_text(FAULT)
        env.update({k: str(v) for k, v in fault.items()})
        cmd = [sys.executable, str(tmp_path / "fault.py"), module, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(stderr: str, prog: str) -> str:
    """The last stderr line is `prog: ...` and there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith(f"{prog}:")]
    assert lines, stderr[-3000:]
    return lines[-1]


def _kept(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "unsaved").glob("*.json") if ".timeline" not in p.name)


# ----------------------------------------------------------------------------- paths that do not resolve

def test_dangling_symlink_and_loop_results_dir_refused_before_the_run(tmp_path):
    """runtime.bench / simulator.run with results_dir a dangling symlink or a symlink loop: one line,
    exit 2, before anything is measured (not a traceback after the run, the result gone)."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    env = _env(tmp_path)
    procs = {
        "dangling": subprocess.Popen([sys.executable, "-m", "runtime.bench", "experiment=smoke", "progress=false",
                                      f"results_dir={tmp_path / 'dangling'}", f"hydra.run.dir={tmp_path / 'h1'}"],
                                     cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "loop": subprocess.Popen([sys.executable, "-m", "simulator.run", *SIM, f"results_dir={tmp_path / 'loop_a'}",
                                  f"hydra.run.dir={tmp_path / 'h2'}"],
                                 cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=240)
        line = _one_line_error(err, "runtime.bench" if name == "dangling" else "simulator.run")
        assert p.returncode == 2, (name, err[-2000:])
        assert ("dangling symlink" if name == "dangling" else "symlink loop") in line and "results_dir" in line
        assert "result" not in out          # nothing ran, so nothing was measured and lost


def test_check_writable_names_a_dangling_link_in_a_parent(tmp_path):
    from core.errors import ConfigError
    from core.results import check_writable

    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="dangling symlink"):
        check_writable(tmp_path / "link" / "sub" / "measured")
    (tmp_path / "self").symlink_to(tmp_path / "self")
    with pytest.raises(ConfigError, match="symlink loop"):
        check_writable(tmp_path / "self" / "measured")


# ----------------------------------------------------------------------------- room before a run

def test_room_is_checked_against_what_the_run_writes(tmp_path, monkeypatch):
    """Free space below the estimate of what the run writes: one line naming both, before the run."""
    import shutil
    from omegaconf import OmegaConf

    from core import files
    from core.errors import ConfigError

    cfg = OmegaConf.create({"results_dir": str(tmp_path), "timeline": True, "repeats": 2,
                            "model": {"args": {"n_layers": 4}},
                            "workload": {"arrival": "static", "batch": 4, "gen_len": 64}})
    need = files.run_bytes(cfg)
    # by hand: the record and 4 request rows twice, then (64 + 1) steps x 2 repeats x (6 x 4 + 16)
    # events and 4 x 4 request events, 256 bytes each
    assert need == 32 * 1024 + 4 * 512 * 2 + ((64 + 1) * 2 * (6 * 4 + 16) + 16) * 256
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=need))
    # one run: checked after its config checks, before its work; a multirun: all points before Hydra
    for check in (lambda: files.check_room_for(cfg), lambda: files.check_results([cfg], multirun=True)):
        with pytest.raises(ConfigError) as e:
            check()
        msg = str(e.value)
        assert "\n" not in msg and "results_dir" in msg and files.size(need) in msg
    files.check_results([cfg])               # one run before Hydra: only the record's floor
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=need + files.MIN_ROOM))
    files.check_room_for(cfg)                # exactly the estimate and the margin: it runs
    files.check_results([cfg], multirun=True)


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _fill(path: Path, leave: int = 0) -> None:
    """Fill the file system of `path` until `leave` bytes are free (about)."""
    with open(path / "filler", "wb") as f:
        try:
            while True:
                free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * max(min(free - leave, 1 << 16), 1))
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_real_full_tmpfs_refused_before_the_run(tmp_path):
    """A real full tmpfs (an empty probe file still fits, a result does not): a run and a multirun
    are each refused in one line before anything runs; no 0-byte sweep CSV is left."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "2m"):
        pytest.skip("needs root and mount -t tmpfs")
    try:
        _fill(disk)
        env = _env(tmp_path)
        runs = {
            "run": [*SIM, f"hydra.run.dir={tmp_path / 'h1'}"],
            "multirun": ["-m", "workload.n_requests=4,5", "workload=poisson", "progress=false",
                         f"hydra.sweep.dir={tmp_path / 'h2'}"],
        }
        procs = {k: subprocess.Popen([sys.executable, "-m", "simulator.run", *a, f"results_dir={disk}"], cwd=tmp_path,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, a in runs.items()}
        for k, p in procs.items():
            out, err = p.communicate(timeout=240)
            line = _one_line_error(err, "simulator.run")
            assert p.returncode == 2, (k, err[-2000:])
            assert "free on its disk" in line and "this run writes about" in line, line
        assert not list(disk.rglob("*.csv")) and not list(disk.rglob("*.json"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------- a write that fails after the run

def _record(tmp_path: Path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"results_dir": str(tmp_path / "res"), "workload": {"batch": 1}})
    record = {"throughput_tok_s": 12.5, "ttft_s": 0.25, "tpot_s": 0.0625, "requests": 3,
              "config": {"results_dir": str(tmp_path / "res"), "policy": {"name": "full"}}}
    return cfg, record


def _enospc_under(monkeypatch, *folders: Path):
    """fsync of a file under any of `folders` fails with ENOSPC (the disk is full there)."""
    real = os.fsync
    roots = [os.path.realpath(f) for f in folders]

    def fsync(fd):
        where = os.readlink(f"/proc/self/fd/{fd}")
        if any(where.startswith(r) for r in roots):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_keeps_the_result_in_the_cache(tmp_path, monkeypatch):
    """write_run_record on a full disk: a one-line error naming the kept file, which holds the record."""
    from core.results import write_run_record

    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "cache"))
    cfg, record = _record(tmp_path)
    (tmp_path / "res").mkdir()
    _enospc_under(monkeypatch, tmp_path / "res")
    with pytest.raises(Exception) as e:
        write_run_record(cfg, record, "measured", "bench_x", trace={"traceEvents": [{"ph": "X"}]})
    assert type(e.value).__name__ == "WriteError"
    msg = str(e.value)
    kept = _kept(tmp_path)
    assert len(kept) == 1 and "\n" not in msg and str(kept[0]) in msg and "No space left" in msg
    saved = json.loads(kept[0].read_text())
    assert saved["throughput_tok_s"] == 12.5 and saved["tpot_s"] == 0.0625
    assert json.loads(Path(saved["timeline_path"]).read_text()) == {"traceEvents": [{"ph": "X"}]}
    assert not list((tmp_path / "res").rglob("*.tmp"))        # no temp file left behind


def test_fallback_failing_too_puts_the_result_in_the_line(tmp_path, monkeypatch):
    from core.results import write_run_record

    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "cache"))
    cfg, record = _record(tmp_path)
    (tmp_path / "res").mkdir()
    (tmp_path / "cache").mkdir()
    _enospc_under(monkeypatch, tmp_path / "res", tmp_path / "cache")
    with pytest.raises(Exception) as e:
        write_run_record(cfg, dict(record), "measured", "bench_x")
    msg = str(e.value)
    assert type(e.value).__name__ == "WriteError" and "\n" not in msg
    carried = json.loads(msg.split("the result: ", 1)[1])
    assert carried == record


def test_full_disk_in_a_real_run_is_one_line_and_kept(tmp_path):
    """simulator.run whose result write hits ENOSPC: exit 1, one line naming the kept file, which
    holds the measurement; the requests CSV is kept beside it."""
    res = tmp_path / "res"
    res.mkdir()
    p = _run(tmp_path, "simulator.run", *SIM, f"results_dir={res}", f"hydra.run.dir={tmp_path / 'h'}",
             fault={"FAULT_UNDER": res, "FAULT_AFTER": 0})
    line = _one_line_error(p.stderr, "simulator.run")
    assert p.returncode == 1, p.stderr[-2000:]
    kept = _kept(tmp_path)
    assert len(kept) == 1 and str(kept[0]) in line, line
    saved = json.loads(kept[0].read_text())
    assert saved["requests"] == 8 and saved["throughput_tok_s"] > 0
    if saved.get("requests_path"):
        assert Path(saved["requests_path"]).is_file()


def test_validation_table_on_a_full_disk_is_kept(tmp_path, monkeypatch):
    """analysis.validate / analysis.sweep write their CSVs through write_csv_atomic: a full disk keeps
    the table in the cache and is one line."""
    import pandas as pd

    from analysis.table import write_csv_atomic

    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "cache"))
    (tmp_path / "validation").mkdir()
    _enospc_under(monkeypatch, tmp_path / "validation")
    df = pd.DataFrame({"id": ["a", "b"], "status": ["ok", "ok"], "throughput_tok_s": [1.5, 2.25]})
    with pytest.raises(Exception) as e:
        write_csv_atomic(df, tmp_path / "validation" / "v.csv")
    kept = tmp_path / "cache" / "unsaved" / "v.csv"
    assert type(e.value).__name__ == "WriteError" and str(kept) in str(e.value) and "\n" not in str(e.value)
    pd.testing.assert_frame_equal(pd.read_csv(kept), df)


# ----------------------------------------------------------------------------- a multirun that cannot write

def test_multirun_stops_in_one_line_when_the_disk_fills(tmp_path):
    """Point 0 is written; then the disk is full: point 1's result is kept in the cache, the sweep
    stops in one line naming point 1, where point 0's row is and where point 1's result went;
    point 2 does not run."""
    res = tmp_path / "res"
    res.mkdir()
    p = _run(tmp_path, "simulator.run", "-m", "workload.n_requests=4,5,6", "workload=poisson", "progress=false",
             f"results_dir={res}", f"hydra.sweep.dir={tmp_path / 'h'}",
             fault={"FAULT_UNDER": res, "FAULT_AFTER": 2})     # point 0: its JSON and its requests CSV
    line = _one_line_error(p.stderr, "simulator.run")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "multirun stopped at point 1" in line and "1 finished point is a row of" in line
    kept = _kept(tmp_path)
    assert len(kept) == 1 and str(kept[0]) in line and json.loads(kept[0].read_text())["requests"] == 5
    (csv,) = (res / "simulated" / "sweeps").glob("*.csv")
    rows = csv.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("0,")               # header + point 0, no half row
    assert "n_requests=6" not in p.stdout + p.stderr                   # point 2 never ran


@pytest.mark.slow
def test_multirun_on_a_real_tmpfs_that_fills(tmp_path):
    """A real tmpfs filled after point 0: the sweep stops at point 1 in one line (no room), point
    0's row is in the CSV (not a 0-byte CSV), point 2 does not run."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "4m"):
        pytest.skip("needs root and mount -t tmpfs")
    hook = tmp_path / "fill.py"
    hook.write_text(textwrap.dedent(f'''
        import os, runpy, sys
        import core.cli as cli
        real = cli.sweep_row
        def sweep_row(*a, **k):
            real(*a, **k)
            with open({str(disk / "filler")!r}, "wb") as f:
                try:
                    while True:
                        f.write(b"\\0" * 65536); f.flush()
                except OSError:
                    pass
        cli.sweep_row = sweep_row
        sys.argv = ["simulator.run", *sys.argv[1:]]
        runpy.run_module("simulator.run", run_name="__main__", alter_sys=True)
    '''))
    try:
        p = subprocess.run([sys.executable, str(hook), "-m", "workload.n_requests=4,5,6", "workload=poisson",
                            "progress=false", f"results_dir={disk}", f"hydra.sweep.dir={tmp_path / 'h'}"],
                           cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=240)
        line = _one_line_error(p.stderr, "simulator.run")
        assert p.returncode != 0 and "multirun stopped at point 1" in line, p.stderr[-2000:]
        (csv,) = (disk / "simulated" / "sweeps").glob("*.csv")
        assert len(csv.read_text().splitlines()) == 2
        assert "n_requests=6" not in p.stdout + p.stderr
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------- interrupts

def _interrupt(tmp_path: Path, name: str, cmd: list[str], sig: int) -> subprocess.Popen:
    """Start `cmd`; once Hydra has written its run folder (the command is past its imports and
    checks, inside the run) send `sig`."""
    hdir = tmp_path / f"h_{name}"
    p = subprocess.Popen([sys.executable, "-m", *cmd, f"hydra.run.dir={hdir}"], cwd=tmp_path, env=_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (hdir / ".hydra" / "config.yaml").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)
    p.send_signal(sig)
    return p


def test_sigint_and_sigterm_mid_run_end_in_one_line(tmp_path):
    """Ctrl-C in a long runtime.bench, SIGTERM in a long simulator.run: exit 130 / 143, one line
    saying what was written and how to resume, no traceback."""
    res = tmp_path / "res"
    procs = {
        signal.SIGINT: _interrupt(tmp_path, "bench", ["runtime.bench", "model=tiny", "workload.batch=1",
                                                      "workload.prompt_len=16", "workload.gen_len=1000", "repeats=50",
                                                      "warmup=false", "progress=false", f"results_dir={res}"],
                                  signal.SIGINT),
        signal.SIGTERM: _interrupt(tmp_path, "sim", ["simulator.run", "workload=poisson", "workload.rate=0.2",
                                                     "workload.n_requests=100000", "progress=false",
                                                     f"results_dir={res}"], signal.SIGTERM),
    }
    for sig, p in procs.items():
        try:
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
        prog = "runtime.bench" if sig == signal.SIGINT else "simulator.run"
        assert p.returncode == 128 + sig, (sig, p.returncode, err[-3000:])
        line = _one_line_error(err, prog)
        assert f"interrupted ({signal.Signals(sig).name})" in line and "run the same command again" in line
        assert "nothing was written" in line
        assert not list(res.rglob("*.tmp"))
