"""KV policies side by side in one run: device KV size, and CPU decode step times against
transformers' QuantizedCache (quanto) and DynamicCache on the same weights.

    python benchmarks/kv_policies.py [--batch 1 4 16] [--context 512 2048 4096] [--mixed B:T:MIN ...]
        [--steps 8] [--repeats 3] [--policies full "kivi 2-bit" ...] [--hf "transformers QuantizedCache 2-bit" ...]
        [--skip-hf] [--skip-sizes]

Part 1 builds real caches from random K/V at 4K tokens with 16-bit storage (SmolLM2's layer
shape) and prints `kv_ratio_vs_fp16` next to the estimate (bits + 32/group)/16 + (residual + k)/N.
Part 2: a grid of batch x context (and mixed-length points); at each point every side (our
policies, then the transformers caches) starts from the same synthetic prefilled cache
(benchmarks/_grid.py: decode cost does not depend on cache values; a 16 x 4K prefill costs
minutes on 2 cores) and runs `--steps` greedy decode steps, timed per step (ours: the engine's
step times; transformers: timestamps inside one `generate`). Sides run interleaved (A B C, then
C B A, ...) over `--repeats`; printed: median step with [min, max] over repeats, ratios to our
first policy paired per repeat, and the goals for `kivi 2-bit` (<= 1.3x our `full`; faster than
transformers' 2-bit QuantizedCache: interval of the paired ratio below 1). `--policies full "kivi 2-bit"
"kivi 2-bit (torch path)"` adds the same kivi with the fused CPU kernels off (runtime/kv/lowbit_cpu.py),
the before/after of those kernels in one run. The default grid
takes ~8 min on a quiet 2-core box; while iterating: --batch 4 16 --context 2048 --repeats 2.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys
import statistics
import time
import warnings
from unittest import mock
from types import SimpleNamespace as NS

import torch

# measure the checkout this script lives in, not whichever one an editable install points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _grid import (die, fmt, hf_fill, hf_generate_times, hf_inputs, lengths, machine_lines, med_ci,
                   ours_prefilled, parse_mixed, synthetic)
from runtime.engine import SamplingParams, generate
from runtime.kv import CacheShape, Step, lowbit_cpu, make_cache
from runtime.loaders import load_gguf, shipped_gguf_path
from core.provenance import cpu_name

KIVI = dict(kv_dtype="auto", group_size=64, residual=64, one_bit_rule="specache")
POLICIES = {
    "full": NS(name="full", kv_dtype="auto"),
    "offload": NS(name="offload", kv_dtype="auto"),
    "kivi 2-bit": NS(name="kivi", bits=2, **KIVI),
    "kivi 4-bit": NS(name="kivi", bits=4, **KIVI),
    # the same policy with the fused CPU kernels off (runtime/kv/lowbit_cpu.py): the before/after
    "kivi 2-bit (torch path)": NS(name="kivi", bits=2, **KIVI),
    "specache k=64 2-bit": NS(name="specache", bits=2, k=64, prefetch=True, **KIVI),
    "specache k=64 2-bit no prefetch": NS(name="specache", bits=2, k=64, prefetch=False, **KIVI),
}
SCRIPT = "kv_policies.py"


def kv_ratio_table(n: int = 4096) -> None:
    print(f"\nDevice KV at N={n} tokens, 16-bit storage (residual, scales, zero points), group 64, residual 64")
    print(f"{'policy':<24} {'kv_ratio_vs_fp16':>16} {'(bits+32/g)/16+(r+k)/N':>24} {'goal':>6}")
    H, D = 3, 64
    for label, bits, k, goal in (("specache 2-bit k=64", 2, 64, 0.19), ("specache 1-bit k=64", 1, 64, 0.13),
                                 ("kivi 2-bit", 2, 0, None), ("full", None, 0, None)):
        if bits is None:
            pol = NS(name="full", kv_dtype="float16")
        elif k:
            pol = NS(name="specache", kv_dtype="float16", bits=bits, k=k, prefetch=True, group_size=64,
                     residual=64, one_bit_rule="specache")
        else:
            pol = NS(name="kivi", kv_dtype="float16", bits=bits, group_size=64, residual=64, one_bit_rule="specache")
        cache = make_cache(pol, n_layers=1, batch=1, n_kv_heads=H, head_dim=D, capacity=n, device=torch.device("cpu"))
        x = torch.randn(1, H, n, D, dtype=torch.float16)
        step = Step(0, n, torch.zeros(1, dtype=torch.long), torch.zeros(1, n, dtype=torch.long))
        cache[0].load(x, x, step)
        cache.advance(step)
        ratio = cache.nbytes()[0] / cache.fp16_bytes(H, D)
        est = (bits + 32 / 64) / 16 + (64 + k) / n if bits else 1.0
        ok = "" if goal is None else ("ok" if ratio <= goal else "MISS")
        print(f"{label:<24} {ratio:>16.4f} {est:>24.4f} {('<= ' + str(goal)) if goal else '':>6} {ok}")


def our_step_s(model, pr, pad, k, v, lg, policy, steps: int, torch_path: bool = False) -> tuple[float, dict]:
    """Median decode step (s) of our engine from the synthetic prefilled cache, and policy stats.
    torch_path: with the fused low-bit CPU kernels switched off for this run."""
    with mock.patch.dict(os.environ, {lowbit_cpu.ENV: "0"} if torch_path else {}):
        r = generate(model, pr, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True), policy,
                     prefilled=ours_prefilled(model, pr, pad, k, v, lg))
    return statistics.median(r.steps), r.policy_stats


def hf_step_s(hf, pr, pad, k, v, lg, cache, steps: int) -> float:
    """Median decode step (s) of transformers' generate over `cache` filled with the same K/V."""
    ids, am = hf_inputs(pr, pad, lg.argmax(-1))
    st = hf_generate_times(hf, ids, am, hf_fill(cache, hf.config.num_hidden_layers, k, v), steps + 1)
    return statistics.median(b - a for a, b in zip(st, st[1:]))


def hf_caches(hf, names):
    from transformers import DynamicCache, QuantizedCache

    makers = {"transformers DynamicCache": lambda: DynamicCache(config=hf.config)}
    for bits in (2, 4):
        makers[f"transformers QuantizedCache {bits}-bit"] = (
            lambda bits=bits: QuantizedCache("quanto", hf.config, nbits=bits, q_group_size=64, residual_length=64))
    unknown = [n for n in names if n not in makers]
    if unknown:
        die(SCRIPT, f"--hf {unknown[0]!r} is not known; choose from {sorted(makers)}")
    return {n: makers[n] for n in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="batch sizes of the grid")
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 4096], help="context lengths of the grid")
    ap.add_argument("--mixed", nargs="*", default=[], help="extra mixed-length points BATCH:MAX_LEN:MIN_LEN")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per repeat (median step taken)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per point")
    ap.add_argument("--policies", nargs="+", default=["full", "kivi 2-bit"],
                    help=f"our policies (first = the 'x full' baseline); known: {', '.join(POLICIES)}")
    ap.add_argument("--hf", nargs="*", default=["transformers QuantizedCache 2-bit"],
                    help="transformers caches to run next to ours (also: 'transformers DynamicCache', "
                         "'transformers QuantizedCache 4-bit'); none: --hf with no value")
    ap.add_argument("--skip-hf", action="store_true", help="only this project's policies")
    ap.add_argument("--skip-sizes", action="store_true", help="skip the device-KV size table")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for f in ("batch", "context"):
        if any(x < 1 for x in getattr(a, f)):
            die(SCRIPT, f"--{f} values must be >= 1")
    if a.steps < 1 or a.repeats < 1:
        die(SCRIPT, "--steps and --repeats must be >= 1")
    bad = [p for p in a.policies if p not in POLICIES]
    if bad:
        die(SCRIPT, f"--policies {bad[0]!r} is not known; choose from {', '.join(POLICIES)}")
    points = [(B, T, None) for T in a.context for B in a.batch] + parse_mixed(SCRIPT, a.mixed)
    warnings.filterwarnings("ignore")
    if not a.skip_sizes:
        kv_ratio_table()

    model = load_gguf()
    hf, makers = None, {}
    if not a.skip_hf and a.hf:
        import transformers
        import transformers.utils.logging as hf_logging
        from transformers import AutoModelForCausalLM

        hf_logging.set_verbosity_error()
        p = shipped_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
        makers = hf_caches(hf, a.hf)
    cpu = torch.device("cpu")
    print(f"\nDecode steps on {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + ("" if hf is None else f", transformers {transformers.__version__}")
          + f"; shipped SmolLM2 fp32, same synthetic prefilled cache for every side (benchmarks/_grid.py)")
    print("\n".join(machine_lines(cpu)), flush=True)

    sides = [(lab, "ours") for lab in a.policies] + [(lab, "hf") for lab in makers]
    # warm-up, untimed
    pr, pad, k, v, lg = synthetic(model, [128, 128], a.seed)
    for lab, kind in sides:
        if kind == "ours":
            our_step_s(model, pr, pad, k, v, lg, POLICIES[lab], 2, "torch path" in lab)
        else:
            try:
                hf_step_s(hf, pr, pad, k, v, lg, makers[lab](), 2)
            except Exception as e:  # a missing backend (optimum-quanto) is reported, not fatal
                print(f"{lab}: failed ({type(e).__name__}: {e}); pip install -e \".[bench]\" for quanto"[:200])
                sides.remove((lab, kind))
    res = {(p, lab): [] for p in points for lab, _ in sides}
    notes = {}
    t0 = time.perf_counter()
    for r in range(a.repeats):
        for i, (B, T, lo) in enumerate(points):
            lens = lengths(B, T, lo, a.seed + i)
            pr, pad, k, v, lg = synthetic(model, lens, a.seed + i)
            order = sides if r % 2 == 0 else sides[::-1]       # interleaved: A B C, C B A, ...
            for lab, kind in order:
                if kind == "ours":
                    med, st = our_step_s(model, pr, pad, k, v, lg, POLICIES[lab], a.steps, "torch path" in lab)
                    notes[lab] = ", ".join(f"{key} {val:.2f}" for key, val in st.items()
                                           if key in ("topk_recall", "guess_accuracy"))
                else:
                    med = hf_step_s(hf, pr, pad, k, v, lg, makers[lab](), a.steps)
                res[((B, T, lo), lab)].append(med)
        print(f"  repeat {r + 1}/{a.repeats} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    base = a.policies[0]
    kivi = "kivi 2-bit" if "kivi 2-bit" in a.policies else None
    q2 = "transformers QuantizedCache 2-bit" if any(lab == "transformers QuantizedCache 2-bit" for lab, _ in sides) else None
    print(f"\nmedian decode step over {a.steps} steps, then median [min, max] over {a.repeats} interleaved repeats; "
          f"ratios paired per repeat")
    print(f"| batch | context | side | step ms | tok/s | x our {base} | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p in points:
        B, T, lo = p
        ctx = f"{T}" if lo is None else f"{lo}-{T} mixed"
        for lab, _ in sides:
            xs = res[(p, lab)]
            ms = med_ci([x * 1e3 for x in xs])
            rel = med_ci([x / y for x, y in zip(xs, res[(p, base)])])
            goal = ""
            if lab == kivi:
                goal = "<= 1.3x full: " + ("ok" if rel[0] <= 1.3 else "MISS")
                if q2:
                    vs = med_ci([x / y for x, y in zip(xs, res[(p, q2)])])
                    goal += f"; x quanto 2-bit {fmt(vs, 2, 'x')}: " + ("ok" if vs[2] < 1.0 else ("MISS" if vs[0] >= 1 else "overlap"))
            n = notes.get(lab, "")
            print(f"| {B} | {ctx} | {lab}{' (' + n + ')' if n else ''} | {fmt(ms)} | {B / ms[0] * 1e3:.1f} | "
                  f"{fmt(rel, 2, 'x')} | {goal} |")
    print("\n".join(machine_lines(cpu)[1:]))


if __name__ == "__main__":
    main()
