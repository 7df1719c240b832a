"""How much faster than real time the simulator runs with its per-request records on, printed.

    python benchmarks/sim_speed.py                        # 10K requests, 3 interleaved rounds
    python benchmarks/sim_speed.py --requests 2000 --rounds 5 --preset speed

Each round runs the same workload twice, interleaved: `plain` (Sim.run alone, the serving loop
with its cheap token bookkeeping: one float per decode iteration) and `records` (Sim.run plus
what simulator.run adds for the records: the token times, the per-request rows with each
request's ITL, the serving metrics and the `.requests.csv` written). Config composition and the
result JSON are left out of both. Printed per mode: simulated seconds / wall seconds (the goal:
>= 1000x real time at 10K requests), the median of the rounds, and the same over CPU seconds of
this process (steadier on a shared box); the records' own share of the wall time.

Presets: `serve` (default): llama7b_shape on the roofline H100 SXM, `full` KV, Poisson 1 req/s,
prompts 512, 64 output tokens; `speed`: benchmarks/simulator_speed.py's workload (SpeCache k=64,
Poisson 0.8 req/s, prompts U[64, 1024], 256 output tokens). docs/simulator.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.per_request import request_rows, write_requests_csv  # noqa: E402
from simulator.run import build_sim, summarize  # noqa: E402  (registers the configs)

PRESETS = {
    "serve": ["model=llama7b_shape", "hardware=h100-sxm", "policy=full", "workload=poisson", "workload.rate=1",
              "workload.prompt_len=512", "workload.gen_len=64"],
    "speed": ["model=llama7b_shape", "model.full_n_layers=32", "hardware=h100-sxm", "policy=specache", "policy.k=64",
              "workload=poisson", "workload.rate=0.8", "workload.gen_len=256", "workload.prompt_len=1024",
              "workload.prompt_len_min=64"],
}


def config(preset: str, n: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="simulate", overrides=[*PRESETS[preset], f"workload.n_requests={n}",
                                                          "progress=false"])


def once(cfg, records: bool, out: Path) -> dict:
    """One run: (simulated s, wall s, cpu s, records' wall s)."""
    sim, _ = build_sim(cfg)
    w0, c0 = time.perf_counter(), time.process_time()
    reqs = sim.run(cfg.workload)
    w1 = time.perf_counter()
    if records:
        times = sim.token_times(reqs)
        rows = request_rows(reqs, times)
        summarize(sim, reqs, cfg, times, rows)
        write_requests_csv(out / "bench.requests.csv", rows)
    w2, c2 = time.perf_counter(), time.process_time()
    return {"simulated": max(r.done_s for r in reqs), "wall": w2 - w0, "cpu": c2 - c0, "records": w2 - w1,
            "iterations": sim.iterations}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="serve")
    a = ap.parse_args(argv)
    cfg = config(a.preset, a.requests)
    print(f"simulator speed with per-request records: preset {a.preset} ({' '.join(PRESETS[a.preset])}), "
          f"{a.requests} requests, {a.rounds} interleaved rounds")
    res: dict[str, list[dict]] = {"plain": [], "records": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.rounds):
            for mode in ("plain", "records"):
                r = once(cfg, mode == "records", Path(tmp))
                res[mode].append(r)
                print(f"  round {i + 1} {mode:8s} {r['wall']:7.2f} s wall {r['cpu']:7.2f} s cpu  "
                      f"{r['simulated'] / r['wall']:8.0f}x real time  (records {r['records']:.2f} s; "
                      f"{r['simulated']:.0f} s simulated, {r['iterations']} iterations)")
    for mode, rs in res.items():
        sw = statistics.median(r["simulated"] / r["wall"] for r in rs)
        sc = statistics.median(r["simulated"] / r["cpu"] for r in rs)
        rec = statistics.median(r["records"] for r in rs)
        goal = "met" if sw >= 1000 else "MISSED"
        print(f"{mode:8s} median: {sw:8.0f}x real time by wall clock ({goal} >= 1000x), {sc:8.0f}x by CPU time; "
              f"records {rec:.2f} s")


if __name__ == "__main__":
    main()
