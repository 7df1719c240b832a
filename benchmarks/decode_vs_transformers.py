"""Decode tokens/s of runtime/ next to transformers' `generate` (DynamicCache), same weights, one run.

    python benchmarks/decode_vs_transformers.py [--batch 1 4 16] [--context 512 2048 4096]
        [--mixed 4:2048:256 ...] [--new 12] [--repeats 5] [--seed 0]

Grid: every --batch x --context point with equal prompt lengths, plus each --mixed
BATCH:MAX_LEN:MIN_LEN point (per-request lengths uniform in [MIN_LEN, MAX_LEN], left-padded, the
`workload.prompt_len_min` case; transformers gets the matching attention_mask). Both sides load
the shipped SmolLM2 GGUF in float32 on this machine's CPU, start from the same synthetic
prefilled cache (see benchmarks/_grid.py: decode cost does not depend on cache values, and a
real 16 x 4K prefill costs minutes) and decode greedily with EOS ignored.

Decode rate, both sides: tokens after the first over the time from the first token to the last
(ours: runtime.engine's decode_tok_s; transformers: per-token timestamps taken inside one
`generate` call by a StoppingCriteria). The old method, generate(n + 1) - generate(1), subtracts
two long prefills and its noise swamped the decode time at batch 4.

Interleaved: repeat r runs every point as ours then transformers (odd r: transformers first);
each repeat gives one paired ratio. Printed: medians with [min, max] over repeats (with 5
repeats [min, max] covers the median with probability 0.94) and the goal check (ratio >= 1.2x
with the interval above 1.0). Full default grid: ~6-8 min on a quiet 2-core box; while
iterating use e.g. --batch 4 16 --context 2048 --new 6 --repeats 3.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys
import platform
import time
import warnings

import torch

# measure the checkout this script lives in, not whichever one an editable install points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _grid import (die, fmt, hf_fill, hf_generate_times, hf_inputs, lengths, machine_lines, med_ci,
                   ours_prefilled, parse_mixed, synthetic)
from runtime.engine import SamplingParams, generate
from runtime.kv import policy_spec
from runtime.loaders import load_gguf, shipped_gguf_path
from core.provenance import cpu_name

FULL = policy_spec("full")
SCRIPT = "decode_vs_transformers.py"
GOAL = 1.2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="batch sizes of the grid")
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 4096], help="context lengths of the grid")
    ap.add_argument("--mixed", nargs="*", default=["4:2048:256"],
                    help="extra mixed-length points BATCH:MAX_LEN:MIN_LEN (none: --mixed with no value)")
    ap.add_argument("--new", type=int, default=12, help="decode tokens timed per repeat (after the first)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per point")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if any(b < 1 for b in a.batch):
        die(SCRIPT, "--batch values must be >= 1")
    if any(t < 1 for t in a.context):
        die(SCRIPT, "--context values must be >= 1")
    if a.new < 2:
        die(SCRIPT, f"--new={a.new} must be >= 2 (a decode rate needs two timed tokens)")
    if a.repeats < 1:
        die(SCRIPT, f"--repeats={a.repeats} must be >= 1")
    points = [(B, T, None) for T in a.context for B in a.batch] + parse_mixed(SCRIPT, a.mixed)
    warnings.filterwarnings("ignore")
    import transformers
    import transformers.utils.logging as hf_logging
    from transformers import AutoModelForCausalLM, DynamicCache

    hf_logging.set_verbosity_error()
    path = shipped_gguf_path()
    ours = load_gguf(path)
    if max(T for _, T, _ in points) + a.new + 2 > ours.args.max_seq_len:
        die(SCRIPT, f"--context + --new exceeds the model's context of {ours.args.max_seq_len}; lower --context")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cpu = torch.device("cpu")
    head = [f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}"] + machine_lines(cpu)
    print("\n".join(head), flush=True)

    L = ours.args.n_layers
    params = SamplingParams(max_new_tokens=a.new + 1, ignore_eos=True)
    # warm-up, untimed: both sides' first calls pay one-off costs
    pr, pad, k, v, lg = synthetic(ours, [64, 64], a.seed)
    generate(ours, pr, SamplingParams(max_new_tokens=3, ignore_eos=True), FULL, prefilled=ours_prefilled(ours, pr, pad, k, v, lg))
    ids, am = hf_inputs(pr, pad, lg.argmax(-1))
    hf_generate_times(hf, ids, am, hf_fill(DynamicCache(config=hf.config), L, k, v), 3)

    res = {p: ([], [], []) for p in points}     # ours tok/s, transformers tok/s, paired ratio
    t0 = time.perf_counter()
    for r in range(a.repeats):
        for i, (B, T, lo) in enumerate(points):
            lens = lengths(B, T, lo, a.seed + i)
            pr, pad, k, v, lg = synthetic(ours, lens, a.seed + i)
            n_real_new = len(lens) * a.new

            def run_ours():
                out = generate(ours, pr, params, FULL, prefilled=ours_prefilled(ours, pr, pad, k, v, lg))
                return out.decode_tok_s

            def run_hf():
                ids, am = hf_inputs(pr, pad, lg.argmax(-1))
                st = hf_generate_times(hf, ids, am, hf_fill(DynamicCache(config=hf.config), L, k, v), a.new + 1)
                return n_real_new / (st[-1] - st[0])

            if r % 2 == 0:
                o, t = run_ours(), run_hf()
            else:
                t, o = run_hf(), run_ours()
            res[(B, T, lo)][0].append(o)
            res[(B, T, lo)][1].append(t)
            res[(B, T, lo)][2].append(o / t)
        print(f"  repeat {r + 1}/{a.repeats} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\nfull decode vs transformers DynamicCache generate; {a.new} decode tokens x {a.repeats} interleaved "
          f"repeats per point; median [min, max]")
    print("| batch | context | ours tok/s | transformers tok/s | ratio | goal >= 1.2x, interval > 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (B, T, lo), (o, t, q) in res.items():
        mq = med_ci(q)
        ok = "ok" if mq[0] >= GOAL and mq[1] > 1.0 else "MISS"
        ctx = f"{T}" if lo is None else f"{lo}-{T} mixed"
        print(f"| {B} | {ctx} | {fmt(med_ci(o))} | {fmt(med_ci(t))} | {fmt(mq, 2, 'x')} | {ok} |")
    print("\n".join(machine_lines(cpu)[1:]))   # the speed index again: brackets the run


if __name__ == "__main__":
    main()
