"""python -m runtime.gpu_suite on a box without CUDA: it refuses in one line (exit 2) and writes
nothing; --help lists every step with its command, output and time; the output folder is $OUT
when set and non-empty, else the git-ignored results/gpu/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import gpu_suite

ROOT = Path(__file__).resolve().parents[1]


def test_out_dir_is_out_when_set_else_ignored_results_gpu():
    assert gpu_suite.out_dir({"OUT": "/tmp/lent-gpu-out"}) == Path("/tmp/lent-gpu-out")
    for env in ({}, {"OUT": ""}, {"OUT": "   "}):
        assert gpu_suite.out_dir(env) == ROOT / "results" / "gpu", env
    # the fallback is git-ignored (git check-ignore exits 0 for an ignored path)
    p = subprocess.run(["git", "check-ignore", "-q", "results/gpu/suite.json"], cwd=ROOT)
    assert p.returncode == 0


def test_refuses_without_cuda_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "runtime.gpu_suite"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("python -m runtime.gpu_suite: error: no CUDA device"), p.stderr
    assert "--dry-run" in lines[0] and p.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refusal_runs_no_step(monkeypatch, tmp_path, capsys):
    ran = []
    monkeypatch.setattr(gpu_suite, "has_cuda", lambda: False)
    monkeypatch.setattr(gpu_suite, "OUT", tmp_path / "out")
    monkeypatch.setattr(gpu_suite, "STEPS", [lambda rows: ran.append(1)])
    with pytest.raises(SystemExit) as e:
        gpu_suite.main([])
    assert e.value.code == 2 and ran == [] and not (tmp_path / "out").exists()


def test_help_lists_each_step_with_command_output_and_time(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_suite.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert set(gpu_suite.STEP_INFO) == {s.__name__ for s in gpu_suite.STEPS}
    for i, step in enumerate(gpu_suite.STEPS):
        cmd, out, secs = gpu_suite.STEP_INFO[step.__name__]
        assert f"{i + 1}. {step.__name__}  [{secs}]" in text
        assert f"runs:   {cmd}" in text
        assert f"writes: {out}" in text
        assert any(u in secs for u in ("s", "min")), secs
    assert "$OUT" in text and "results/gpu" in text and "CUDA" in text


def test_dry_run_prints_the_folder_and_runs_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_suite, "OUT", tmp_path / "out")
    ran = []
    monkeypatch.setattr(gpu_suite, "STEPS", [lambda rows: ran.append(1)])
    gpu_suite.main(["--dry-run"])
    out = capsys.readouterr().out
    assert ran == [] and f"OUT={tmp_path / 'out'}" in out and not (tmp_path / "out").exists()


def test_with_cuda_every_step_runs_and_the_report_lands_under_out(monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(gpu_suite, "has_cuda", lambda: True)
    monkeypatch.setattr(gpu_suite, "OUT", out)

    def ok(rows):
        rows.append(("ok-step", "ok", 0.1, "fine"))

    def broken(rows):
        raise RuntimeError("cannot start")
    monkeypatch.setattr(gpu_suite, "STEPS", [ok, broken])
    gpu_suite.main([])
    suite = json.loads((out / "suite.json").read_text())
    assert [r[0] for r in suite["steps"]] == ["ok-step", "broken"]
    assert suite["steps"][1][1] == "error: RuntimeError"
    assert str(out) in capsys.readouterr().out
