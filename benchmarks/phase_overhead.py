"""What the runtime's phase timers cost: a decode step with `phases` on vs off.

    python benchmarks/phase_overhead.py                          # SmolLM2, batch 1 x 512 + 32, 7 rounds
    python benchmarks/phase_overhead.py --rounds 9 --policy specache --link-gbps 4

The same generate() (runtime/engine.py) runs with phases=True (the lap timer of runtime/phases.py:
every layer's parts, the policy's phases, lm_head, overhead) and phases=False (no timer: every
`lap` is one global read), interleaved A B A B ... so that drift of a shared machine hits both
alike (a round's order alternates, A B then B A, so a steady drift cancels), after one untimed
warm-up of each. Per run: the median of its decode steps (the engine's `steps`, the window the
phases are measured over). Per mode: the median of the runs' medians with a bootstrap 95%
interval; the cost: the median of the per-round ratios on/off (paired: a round's two runs are back
to back) with its bootstrap interval.

On a shared 2-core box a whole run (~1 s) is often hit by another process, so a second, finer
estimate alternates the timer *step by step inside one run* (even decode steps timed, odd ones
not: same cache, context one token apart); per run the ratio of the two medians, over the rounds
its median and interval. Also the laps a decode step takes (one timeline run), the cost per lap
measured alone (a tight loop of laps), and what the two imply. The budget is 3% of a decode step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import runtime.engine as engine  # noqa: E402
from core.machine import this_fingerprint  # noqa: E402
from runtime.engine import SamplingParams, generate  # noqa: E402
from runtime.phases import NullTimer, PhaseTimer, lap  # noqa: E402
from runtime.kv import policy_spec  # noqa: E402
from runtime.loaders import load_gguf  # noqa: E402
from runtime.transfer import make_link  # noqa: E402

BUDGET = 0.03


def bootstrap_median(xs: list[float], n: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of xs."""
    a = np.asarray(xs, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(a, size=(n, len(a)), replace=True), axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


class Alternating:
    """A timer whose steps are timed and untimed in turn: the prefill timed, then decode steps
    0, 2, 4 ... untimed and 1, 3, 5 ... timed."""

    enabled = True

    def __init__(self, device):
        self.on, self.off, self.n = PhaseTimer(device), NullTimer(), 0

    def step(self):
        self.n += 1
        return (self.on if self.n % 2 else self.off).step()


def lap_cost_us(n: int = 200_000) -> float:
    """One lap inside an open step, alone (perf_counter + a dict update)."""
    t = PhaseTimer("cpu")
    with t.step():
        t0 = time.perf_counter()
        for _ in range(n):
            lap("attention")
        return (time.perf_counter() - t0) / n * 1e6


def policy_of(name: str, k: int):
    """The policy with its declared defaults (core/policies/), k for specache."""
    return policy_spec(name, k=k) if name == "specache" else policy_spec(name)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python benchmarks/phase_overhead.py", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="A B pairs (>= 5)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--policy", default="full", choices=["full", "kivi", "offload", "specache"])
    ap.add_argument("--k", type=int, default=64, help="specache: rows fetched per KV head")
    ap.add_argument("--link-gbps", type=float, default=None, help="an emulated link (offload / specache)")
    ap.add_argument("--link-latency-us", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.rounds < 5:
        ap.error("--rounds must be >= 5")
    if a.threads:
        torch.set_num_threads(a.threads)

    model = load_gguf()
    args = model.args
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    params = SamplingParams(max_new_tokens=a.gen_len, ignore_eos=True)
    pol = policy_of(a.policy, a.k)
    link = make_link(SimpleNamespace(gbps=a.link_gbps, latency_us=a.link_latency_us), model.device)

    def run(on: bool, timeline: bool = False):
        return generate(model, prompts, params, pol, link=link, phases=on, timeline=timeline)

    print(f"fingerprint {this_fingerprint('cpu')}  torch threads {torch.get_num_threads()}")
    print(f"SmolLM2 {a.policy}, batch {a.batch} x {a.prompt_len} + {a.gen_len}, {a.rounds} rounds A(on) B(off)")
    run(True), run(False)                                             # warm-up, untimed
    probe = run(True, timeline=True)
    laps = statistics.median(len(s["times"].laps) for s in probe.timeline if s["stage"] == "decode")

    on, off, ratios, alt = [], [], [], []
    make_timer = engine.make_timer
    t_start = time.perf_counter()
    for i in range(a.rounds):
        first = i % 2 == 0                                            # A B, then B A
        m = {}
        for mode in ((True, False) if first else (False, True)):
            m[mode] = statistics.median(run(mode).steps)
        on.append(m[True])
        off.append(m[False])
        ratios.append(m[True] / m[False])
        engine.make_timer = lambda device, *_a, **_k: Alternating(device)
        try:
            steps = run(True).steps                                   # odd decode steps timed
        finally:
            engine.make_timer = make_timer
        s_on, s_off = statistics.median(steps[1::2]), statistics.median(steps[0::2])
        alt.append(s_on / s_off)
        print(f"  round {i + 1} ({'AB' if first else 'BA'}): on {m[True] * 1e3:7.2f} ms  off {m[False] * 1e3:7.2f} ms  "
              f"ratio {m[True] / m[False]:.4f}   step-alternating: {s_on * 1e3:7.2f} / {s_off * 1e3:7.2f} ms "
              f"ratio {s_on / s_off:.4f}")
    wall = time.perf_counter() - t_start
    link.close()

    med_on, med_off, med_r = statistics.median(on), statistics.median(off), statistics.median(ratios)
    ci_on, ci_off, ci_r = bootstrap_median(on), bootstrap_median(off), bootstrap_median(ratios)
    med_alt, ci_alt = statistics.median(alt), bootstrap_median(alt)
    per_lap = lap_cost_us()
    print(f"decode step, phases on : median {med_on * 1e3:.2f} ms  (95% CI {ci_on[0] * 1e3:.2f} .. {ci_on[1] * 1e3:.2f})")
    print(f"decode step, phases off: median {med_off * 1e3:.2f} ms  (95% CI {ci_off[0] * 1e3:.2f} .. {ci_off[1] * 1e3:.2f})")
    print(f"on / off, whole runs paired per round : {med_r:.4f}  (95% CI {ci_r[0]:.4f} .. {ci_r[1]:.4f})  "
          f"-> {100 * (med_r - 1):+.2f}%")
    print(f"on / off, steps alternating in a run  : {med_alt:.4f}  (95% CI {ci_alt[0]:.4f} .. {ci_alt[1]:.4f})  "
          f"-> {100 * (med_alt - 1):+.2f}%")
    print(f"laps per decode step {laps:.0f} x {per_lap:.2f} us a lap alone = {laps * per_lap:.0f} us "
          f"= {100 * laps * per_lap * 1e-6 / med_off:.2f}% of the step;  {wall:.0f} s")
    print(f"budget {100 * BUDGET:.0f}% of a decode step: "
          f"{'within' if med_alt - 1 <= BUDGET else 'OVER'} (step-alternating), "
          f"{'within' if med_r - 1 <= BUDGET else 'OVER'} (whole runs)")
    return {"on_s": on, "off_s": off, "ratio": med_r, "ratio_ci": ci_r, "alternating": alt,
            "alternating_ratio": med_alt, "alternating_ci": ci_alt, "laps": laps, "lap_us": per_lap,
            "fingerprint": this_fingerprint("cpu")}


if __name__ == "__main__":
    main()
