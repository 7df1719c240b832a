"""How fast the simulator runs (events per second and requests per second at
serving scale: whether 10^4-request sweeps fit in minutes), printed.

    python benchmarks/simulator_speed.py                 # 10K fast + 300 detailed + 1K/10K/100K fit
    python benchmarks/simulator_speed.py --scale 1000 10000 50000 --detailed-requests 200

The workload: Poisson arrivals of `--requests` requests, output 256 tokens each (mean 256),
prompts uniform in [64, 1024], of llama7b_shape (all 32 layers) on the roofline H100 SXM profile,
policy specache k=64 (bits 2, prefetch on). The arrival rate keeps the H100 busy but stable
(--rate, requests/s). Each point is one single-threaded Python process's wall clock for
`Sim.run` alone (config composition and result writing excluded); the goal is <= 60 s for 10K
requests in fast mode. The detailed fidelity (a SimPy process per op) runs fewer requests and
its rate is extrapolated linearly to 10K (stated in the output).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.run import build_sim, summarize  # noqa: E402  (registers the configs)


def config(n: int, fidelity: str, rate: float, k: int):
    overrides = [
        "model=llama7b_shape", "model.full_n_layers=32", "hardware=h100-sxm",
        "policy=specache", f"policy.k={k}", "workload=poisson", f"workload.n_requests={n}",
        f"workload.rate={rate}", "workload.gen_len=256", "workload.prompt_len=1024",
        "workload.prompt_len_min=64", f"fidelity={fidelity}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="simulate", overrides=overrides)


def run_once(n: int, fidelity: str, rate: float, k: int) -> dict:
    """Build the Sim as simulator.run.simulate does, time sim.run only."""
    cfg = config(n, fidelity, rate, k)
    sim, _ = build_sim(cfg)
    shape = sim.shape
    t0 = time.perf_counter()
    reqs = sim.run(cfg.workload)
    wall = time.perf_counter() - t0
    rec = summarize(sim, reqs, cfg)
    simulated = max(r.done_s for r in reqs)
    return {"n": n, "fidelity": fidelity, "wall": wall, "simulated": simulated, "iters": sim.iterations,
            "layers": shape.n_layers, "max_batch": rec["max_batch_reached"], "tpot": rec["tpot_s"],
            "ttft": rec["ttft_s"], "tok_s": rec["throughput_tok_s"]}


def show(r: dict, note: str = "") -> None:
    print(f"  {r['fidelity']:8s} {r['n']:>7d} req  {r['wall']:8.2f} s wall  {r['n'] / r['wall']:9.1f} req/s  "
          f"{r['simulated'] / r['wall']:8.2f} sim-s/wall-s  ({r['simulated']:.1f} s simulated, "
          f"{r['iters']} iterations, max batch {r['max_batch']}, TPOT {r['tpot'] * 1e3:.2f} ms){note}")


def fit(ns, walls):
    ns, walls = np.asarray(ns, float), np.asarray(walls, float)
    slope, icpt = np.polyfit(ns, walls, 1)
    pred = slope * ns + icpt
    r2 = 1 - ((walls - pred) ** 2).sum() / ((walls - walls.mean()) ** 2).sum()
    return slope, icpt, r2


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=0.8,
                    help="Poisson arrivals, requests/s (0.8: near the H100 twin's ~0.9 req/s capacity at k=64)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--detailed-requests", type=int, default=300)
    ap.add_argument("--scale", type=int, nargs="*", default=[1_000, 10_000, 100_000],
                    help="request counts for the linear fit (fast mode); empty to skip")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="if the largest --scale point is predicted to exceed this, halve it (100K -> 50K)")
    a = ap.parse_args(argv)

    print(f"simulator speed: llama7b_shape (32 layers), roofline H100 SXM, specache k={a.k}, "
          f"Poisson {a.rate:g} req/s, prompts U[64, 1024], 256 output tokens; one process, pid {os.getpid()}")
    fast = run_once(a.requests, "fast", a.rate, a.k)
    show(fast, "  <= 60 s goal: " + ("met" if fast["wall"] <= 60 else "MISSED"))
    det = run_once(a.detailed_requests, "detailed", a.rate, a.k)
    show(det)
    per_req = det["wall"] / det["n"]
    fast_small = run_once(a.detailed_requests, "fast", a.rate, a.k)
    show(fast_small, "  (fast, same requests as detailed)")
    print(f"  detailed extrapolated to {a.requests} requests: ~{per_req * a.requests:.0f} s wall "
          f"(linear in requests from {det['n']}; {det['wall'] / fast_small['wall']:.0f}x the fast mode "
          f"on the same {det['n']} requests)")

    if a.scale:
        print("scale (fast mode):")
        ns, walls = [], []
        done = {a.requests: fast}
        for n in sorted(a.scale):
            if ns and n > max(ns):
                s, i, _ = fit(ns, walls) if len(ns) > 1 else (walls[-1] / ns[-1], 0.0, 1.0)
                while s * n + i > a.budget_s and n > max(ns) * 2:
                    print(f"  {n} requests predicted at {s * n + i:.0f} s > {a.budget_s:.0f} s budget: "
                          f"using {n // 2} instead")
                    n //= 2
            r = done.get(n) or run_once(n, "fast", a.rate, a.k)
            show(r)
            ns.append(n)
            walls.append(r["wall"])
        if len(ns) >= 2:
            s, i, r2 = fit(ns, walls)
            print(f"  linear fit: wall = {s * 1e3:.3f} ms/request x n + {i:.2f} s,  R^2 = {r2:.5f}  "
                  f"(points: {', '.join(f'{n}: {w:.2f} s' for n, w in zip(ns, walls))})")


if __name__ == "__main__":
    main()
