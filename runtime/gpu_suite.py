"""python -m runtime.gpu_suite: everything a lent GPU should run, in one call, with a table last.

Steps (each recorded; a failing step does not stop the rest): the machine's identity and speed
index at the start and the end, an offline install from carried wheels, `pytest -m gpu`, the GPU's
profile (both gathers) compared with its roofline twin, the two gathers by rows, the runtime half
of `validate_gpu`, and `runtime.bench` for every KV policy on 7B-class layers at 8K. Without CUDA
it refuses in one line (exit 2) before anything runs. Everything goes under $OUT when it is set
and non-empty, else under the git-ignored results/gpu/. `--help` lists each step's command, what
it writes and its expected time (STEP_INFO). How to prepare the wheels: docs/gpu.md. A new
measurement that needs a GPU adds its step to STEPS and its line to STEP_INFO.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROG = "python -m runtime.gpu_suite"


def out_dir(env: dict | None = None) -> Path:
    """$OUT when it is set and not blank, else <repo>/results/gpu (git-ignored with results/*)."""
    value = (os.environ if env is None else env).get("OUT", "").strip()
    return Path(value) if value else REPO / "results" / "gpu"


OUT = out_dir()
ROOFLINE_TWINS = {"H100 PCIe": "h100-pcie", "H100": "h100-sxm", "H200": "h200", "A100": "a100",
                  "A6000": "a6000", "L40S": "l40s"}


def _write_text(path: Path, text: str) -> None:
    from core.results import write_atomic

    write_atomic(path, lambda f: f.write(text))


def sh(name: str, cmd: list[str], timeout: int, rows: list) -> subprocess.CompletedProcess | None:
    """Run one step, log it under $OUT/logs, record (name, status, seconds, last line)."""
    t = time.perf_counter()
    log = OUT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        log.write_text(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
        last = (p.stdout.strip().splitlines() or p.stderr.strip().splitlines() or [""])[-1]
        rows.append((name, "ok" if p.returncode == 0 else f"rc={p.returncode}", time.perf_counter() - t, last[:90]))
        return p
    except subprocess.TimeoutExpired:
        rows.append((name, "timeout", time.perf_counter() - t, f"> {timeout} s"))
        return None


def identity(rows, when: str = "start") -> dict:
    """Facts, fingerprint and speed index of the suite's device (CUDA when present, else the
    CPU), merged into $OUT/machine.json under `when`."""
    import torch

    from core.machine import fingerprint, machine_facts
    from core.results import write_json_atomic
    from runtime.profile.speed import speed_index

    t = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = OUT / "machine.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    if "facts" not in out:
        out["facts"] = machine_facts(device)
        out["fingerprint"] = fingerprint(out["facts"])
    out[f"speed_index_{when}"] = speed_index(device)
    if "speed_index_start" in out and "speed_index_end" in out:
        out["speed_drift"] = out["speed_index_end"]["index"] / out["speed_index_start"]["index"]
    write_json_atomic(path, json.loads(json.dumps(out, default=str)))
    rows.append((f"identity-{when}", "ok", time.perf_counter() - t,
                 f"{device.type} {out['fingerprint']} speed index {out[f'speed_index_{when}']['index']:.1f}"))
    return out


def identity_end(rows) -> dict:
    return identity(rows, "end")


def install(rows) -> None:
    wheels = REPO / "wheels"
    if wheels.is_dir():
        sh("install-wheels", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                              *map(str, sorted(wheels.glob("*.whl")))], 300, rows)
    sh("install-project", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
       300, rows)


def gpu_tests(rows) -> None:
    # only the GPU file: collecting every test module would need packages the image may lack (scipy)
    sh("pytest-gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], 600, rows)


def profile(rows) -> None:
    out = OUT / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    name = torch.cuda.get_device_name(0)
    from core.machine import slug

    path = out / f"{slug(name)}.json"
    sh("profile", [sys.executable, "-m", "runtime.profile", "--model", "smollm2", "llama7b_shape",
                   "--out", str(path)], 900, rows)
    twin = next((v for k, v in ROOFLINE_TWINS.items() if k in name), None)
    if twin and path.exists():
        roof = out / f"roofline-{twin}.json"
        sh("roofline-twin", [sys.executable, "-m", "runtime.profile", "--roofline", twin,
                             "--model", "smollm2", "llama7b_shape", "--out", str(roof)], 120, rows)
        p = sh("roofline-vs-measured", [sys.executable, "-m", "runtime.profile", "--compare", str(path), str(roof)],
               120, rows)
        if p is not None:
            _write_text(out / "roofline_vs_measured.txt", p.stdout)


def bench_commands() -> list[tuple[str, list[str]]]:
    common = ["model=llama7b_shape", "model.args.max_seq_len=8192", "hardware=cuda",
              "workload.prompt_len=8000", "workload.gen_len=64", f"results_dir={OUT / 'results'}", "progress=false"]
    out = []
    for batch in (1, 16):
        for pol in ("policy=full", "policy=kivi", "policy=specache", "policy=specache policy.prefetch=false",
                    "policy=specache policy.gather=device", "policy=specache policy.prefetch=false policy.gather=device",
                    "policy=offload"):
            name = (f"bench-b{batch}-" + pol.replace("policy=", "").replace(" policy.prefetch=false", "-noprefetch")
                    .replace(" policy.gather=device", "-devgather"))
            out.append((name, [*common, f"workload.batch={batch}", *pol.split()]))
    return out


def bench(rows) -> None:
    for name, overrides in bench_commands():
        sh(name, [sys.executable, "-m", "runtime.bench", *overrides], 300, rows)


def validate(rows) -> None:
    """The runtime half of conf/experiment/validate_gpu.yaml; the simulator half runs on the CPU
    box from the profile this suite measured (see that file)."""
    # noise: validate_gpu.yaml's validation.repeats, interleaved; rows carry machine_fingerprint
    sh("validate-gpu", [sys.executable, "-m", "analysis.validate", "experiment=validate_gpu", "halves=runtime",
                        f"results_dir={OUT / 'results'}", "progress=false", "figure=false"], 900, rows)


def gather_modes(rows) -> None:
    """policy.gather=host vs device, from the profile just measured: seconds and effective GB/s
    of k gathered rows each way, next to the contiguous pinned H2D peak (DESIGN: report the
    gather's GB/s against it). Written to $OUT/gather_modes.txt and printed with the steps."""
    import numpy as np

    prof = next(iter(sorted((OUT / "profiles").glob("[!r]*.json"))), None)   # the measured one, not roofline-*
    if prof is None:
        rows.append(("gather-modes", "skipped", 0.0, "no measured profile"))
        return
    t = json.loads(prof.read_text())["transfers"]
    peak = max(b / s for b, s in zip(t["h2d_pinned"]["axes"]["bytes"], t["h2d_pinned"]["p50"]))
    lines = [f"contiguous pinned H2D peak {peak / 1e9:.1f} GB/s",
             "rows   host gather ms  GB/s   device gather ms  GB/s   device/host speed-up"]
    for name in ("gather", "gather_device"):
        if name not in t:
            rows.append(("gather-modes", "error", 0.0, f"profile has no transfers.{name}"))
            return
    rb = t["gather"]["row_bytes"]
    for r, h, d in zip(t["gather"]["axes"]["rows"], t["gather"]["p50"], t["gather_device"]["p50"]):
        lines.append(f"{r:>6} {h * 1e3:14.3f} {r * rb / h / 1e9:6.2f} {d * 1e3:17.3f} {r * rb / d / 1e9:6.2f} "
                     f"{h / d:10.2f}x")
    _write_text(OUT / "gather_modes.txt", "\n".join(lines) + "\n")
    print("\n".join(lines))
    big = np.argmax(t["gather"]["axes"]["rows"])
    rows.append(("gather-modes", "ok", 0.0, f"largest: host {t['gather']['p50'][big] * 1e3:.2f} ms, "
                 f"device {t['gather_device']['p50'][big] * 1e3:.2f} ms"))


def phase_breakdown(rows) -> None:
    """Where each validate_gpu point's steps go on this GPU (the runtime half's phases, CUDA
    events): $OUT/phases.txt, one line per point and stage; the simulator half is compared on
    the CPU box (`analysis.validate experiment=validate_gpu halves=simulator`)."""
    import pandas as pd

    from core.phases import PHASES, STAGES, UNACCOUNTED, phases_csv

    path = phases_csv(OUT / "results" / "validation" / "validate_gpu.csv")
    if not path.exists():
        rows.append(("phase-breakdown", "skipped", 0.0, f"no {path.name} (validate-gpu failed?)"))
        return
    df = pd.read_csv(path)
    lines = []
    for r in df.to_dict("records"):
        for st in STAGES:
            step = r.get(f"measured_phase_{st}_step_s")
            if step is None or not step == step:
                continue
            parts = [f"{p} {100 * r[c] / step:.0f}%" for p in (*PHASES, UNACCOUNTED)
                     if (c := f"measured_phase_{st}_{p}_s") in r and r[c] == r[c] and abs(r[c]) >= 0.005 * step]
            lines.append(f"{r['id']:<32} {st:<8} {step * 1e3:9.2f} ms: " + ", ".join(parts))
    _write_text(OUT / "phases.txt", "\n".join(lines) + "\n")
    print("\n".join(lines))
    rows.append(("phase-breakdown", "ok", 0.0, f"{len(lines)} stage rows -> phases.txt"))


STEPS = [install, identity, gpu_tests, profile, gather_modes, validate, phase_breakdown, bench, identity_end]

# per step: (what it runs, what it writes under $OUT, expected time on one H100: estimates from the
# steps' sizes, not yet timed on one; suite.json records the real seconds); --help and --dry-run print them
STEP_INFO = {
    "install": ("pip install --no-index --no-deps wheels/*.whl; pip install --no-deps -e .",
                "logs/install-*.log", "~30 s"),
    "identity": ("core.machine facts + fingerprint, runtime.profile.speed speed_index",
                 "machine.json (facts, fingerprint, speed_index_start)", "~5 s"),
    "gpu_tests": ("python -m pytest -q -m gpu tests/test_gpu.py", "logs/pytest-gpu.log", "~1 min"),
    "profile": ("python -m runtime.profile --model smollm2 llama7b_shape --out profiles/<gpu>.json; "
                "--roofline <twin>; --compare", "profiles/<gpu>.json, profiles/roofline-<twin>.json, "
                "profiles/roofline_vs_measured.txt", "~3-5 min"),
    "gather_modes": ("reads the profile's transfers.gather / gather_device", "gather_modes.txt", "< 1 s"),
    "validate": ("python -m analysis.validate experiment=validate_gpu halves=runtime",
                 "results/validation/validate_gpu.csv (+ .phases.csv), results/measured/*.json", "~3-6 min"),
    "phase_breakdown": ("reads validate_gpu.phases.csv", "phases.txt", "< 1 s"),
    "bench": ("python -m runtime.bench model=llama7b_shape workload.prompt_len=8000 x 7 policies x batch 1, 16 "
              "(3 timed runs each)", "results/measured/*.json, logs/bench-*.log", "~4-8 min"),
    "identity_end": ("runtime.profile.speed speed_index", "machine.json (speed_index_end, speed_drift)", "~5 s"),
}


def step_lines() -> list[str]:
    """One line per step: its number and name, then what it runs, writes and how long it takes."""
    lines = []
    for i, s in enumerate(STEPS):
        cmd, out, secs = STEP_INFO.get(s.__name__, ("", "", ""))
        lines.append(f"{i + 1}. {s.__name__}" + (f"  [{secs}]\n     runs:   {cmd}\n     writes: {out}" if cmd else ""))
    return lines


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Everything a lent GPU should run, in one call (installs the project from wheels/, "
                    "profiles, validates, benches); refuses without CUDA. Writes under $OUT when set, "
                    f"else results/gpu/ (now: {OUT}). docs/gpu.md",
        epilog="steps, in order, [expected time on one H100, estimated] (a failing step does not stop the rest; "
               "each step's real seconds go to $OUT/suite.json and the closing table):\n"
               + "\n".join(step_lines()))
    ap.add_argument("--dry-run", action="store_true", help="list the steps and the output folder; run nothing")
    a = ap.parse_args(argv)
    if a.dry_run:
        print("\n".join(step_lines()) + f"\nOUT={OUT}")
        return
    if not has_cuda():
        print(f"{PROG}: error: no CUDA device here (torch.cuda.is_available() is False); run it on a lent GPU "
              "(docs/gpu.md), or --dry-run to list its steps", file=sys.stderr)
        raise SystemExit(2)
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list = []
    t0 = time.perf_counter()
    for step in STEPS:
        try:
            step(rows)
        except Exception as e:  # a step that cannot even start is recorded, the rest still run
            rows.append((step.__name__, f"error: {type(e).__name__}", 0.0, str(e)[:90]))
    report(rows, time.perf_counter() - t0)


def report(rows: list, wall_s: float) -> None:
    """$OUT/suite.json (steps, the bench rows, fingerprint, drift) and the closing tables."""
    from core.results import write_json_atomic

    measured = sorted(p for p in (OUT / "results" / "measured").glob("*.json")
                      if not p.name.endswith(".timeline.json")) if (OUT / "results").exists() else []
    bench_rows = []
    for f in measured:
        r = json.loads(f.read_text())
        ci = r.get("throughput_tok_s_ci") or [float("nan")] * 2
        bench_rows.append((r["policy"], r["batch"], r["tpot_s"], r["throughput_tok_s"], ci[0], ci[1],
                           r["kv_ratio_vs_fp16"]))
    machine = json.loads((OUT / "machine.json").read_text()) if (OUT / "machine.json").exists() else {}
    write_json_atomic(OUT / "suite.json", {"steps": rows, "bench": bench_rows, "fingerprint": machine.get("fingerprint"),
                                           "speed_drift": machine.get("speed_drift"), "wall_s": wall_s})
    print("\nstep                             status    seconds  last line")
    for name, status, sec, last in rows:
        print(f"{name:<32} {status:<9} {sec:7.1f}  {last}")
    if bench_rows:
        print("\npolicy      batch  TPOT ms  tok/s (median, CI)      kv/fp16")
        for pol, b, tpot, tput, lo, hi, ratio in bench_rows:
            print(f"{pol:<11} {b:>5} {tpot * 1e3:8.2f} {tput:7.1f} ({lo:7.1f}-{hi:7.1f}) {ratio:8.3f}")
    print(f"\n{OUT}")


if __name__ == "__main__":
    main()
