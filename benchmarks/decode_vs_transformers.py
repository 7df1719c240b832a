"""Decode tokens/s of runtime/ next to transformers' `generate` (DynamicCache), same weights, one run.

    python benchmarks/decode_vs_transformers.py [--context 2048] [--batch 1 4] [--new 32]

Both sides load the shipped SmolLM2 GGUF in float32 on this machine's CPU and decode greedily
from the same random prompts with EOS ignored. Decode rate = generated tokens after the first
over the time after the first token: for transformers, timed as generate(n + 1) - generate(1),
since `generate` does not report its own TTFT. Prints the figures and our/transformers ratio.
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

from runtime.engine import SamplingParams, generate
from runtime.kv import policy_spec
from runtime.model import load_gguf, shipped_gguf_path
from runtime.provenance import cpu_name


FULL = policy_spec("full")


def hf_decode_tok_s(hf, ids: torch.Tensor, new: int) -> float:
    def timed(n):
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=2)
        return time.perf_counter() - t

    timed(2)  # warm-up
    t1, tn = timed(1), timed(new + 1)
    return ids.shape[0] * new / (tn - t1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new", type=int, default=32, help="decode tokens after the first")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    import transformers

    path = shipped_gguf_path()
    ours = load_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, python {platform.python_version()}")
    rows = []
    g = torch.Generator().manual_seed(0)
    for B in a.batch:
        ids = torch.randint(20, ours.args.vocab_size, (B, a.context), generator=g)
        generate(ours, ids[:, :16].tolist(), SamplingParams(max_new_tokens=2), FULL)  # warm-up
        r = generate(ours, ids.tolist(), SamplingParams(max_new_tokens=a.new + 1, ignore_eos=True), FULL)
        ref = hf_decode_tok_s(hf, ids, a.new)
        rows.append((B, r.decode_tok_s, ref))
    print(f"\n{'batch':>5} {'context':>7} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    for B, o, t in rows:
        print(f"{B:>5} {a.context:>7} {o:>11.1f} {t:>19.1f} {o / t:>5.2f}x")


if __name__ == "__main__":
    main()
