"""The project's KV policies inside transformers (runtime/hf.py) against transformers' own caches:
decode step times on the shipped SmolLM2, one run.

    python benchmarks/hf_integration.py [--context 2048 4096] [--steps 16]

One transformers model (the shipped GGUF loaded by transformers, float32, batch 1) runs every
row; only the cache and `attn_implementation` change between rows:

  DynamicCache                       transformers' default (sdpa)
  QuantizedCache quanto 2-bit        transformers' KIVI-like cache, group 64, residual 64 (sdpa):
                                     dequantizes the whole cache every step
  kvtestbed full / kivi / specache   kvtestbed_cache(...) with attn_implementation="kvtestbed":
                                     our LayerKV.attend on the packed cache (no dequantized copy)
  kvtestbed kivi 2-bit, fallback     the same cache through plain Cache.update + sdpa (dequantizes
                                     the whole cache every step: the documented slow path)

Every row prefills the same random prompt (untimed, logits of the last position only); then the
rows take turns, one greedy decode step `model(next_token, cache=...)` each, `--steps` times
(on a shared machine, load from others then hits every row alike). Prints the median step,
tok/s, the ratio to DynamicCache and, for the 2-bit rows, to QuantizedCache at equal bits.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from runtime.loaders import shipped_gguf_path
from core.provenance import cpu_name

KIVI = dict(bits=2, group_size=64, residual=64)


def rows():
    """(label, attn_implementation, cache factory)."""
    from transformers import DynamicCache, QuantizedCache

    from runtime.hf import kvtestbed_cache

    return [
        ("transformers DynamicCache", "sdpa", lambda cfg: DynamicCache(config=cfg)),
        ("transformers QuantizedCache 2-bit", "sdpa",
         lambda cfg: QuantizedCache("quanto", cfg, nbits=2, q_group_size=64, residual_length=64)),
        ("kvtestbed full", "kvtestbed", lambda cfg: kvtestbed_cache("full", cfg)),
        ("kvtestbed kivi 2-bit", "kvtestbed", lambda cfg: kvtestbed_cache("kivi", cfg, **KIVI)),
        ("kvtestbed specache k=64 2-bit", "kvtestbed", lambda cfg: kvtestbed_cache("specache", cfg, k=64, **KIVI)),
        ("kvtestbed kivi 2-bit, fallback", "sdpa", lambda cfg: kvtestbed_cache("kivi", cfg, **KIVI)),
    ]


def prefill(hf, ids: torch.Tensor, cache) -> torch.Tensor:
    """Fill `cache` with the prompt (logits of the last position only); returns the next token."""
    with torch.inference_mode():
        out = hf(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def step(hf, nxt: torch.Tensor, cache) -> tuple[float, torch.Tensor]:
    """One timed greedy decode step: (seconds, next token)."""
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t, nxt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 keeps a busy shared box from stalling OpenMP")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    import transformers
    import transformers.utils.logging as hf_logging
    from transformers import AutoModelForCausalLM

    import runtime.hf  # noqa: F401 - registers attn_implementation="kvtestbed"

    hf_logging.set_verbosity_error()
    p = shipped_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    print(f"Decode steps on {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; shipped SmolLM2 fp32 loaded by transformers, batch 1, "
          f"median of {a.steps} steps")
    print(f"{'context':>7} {'cache':<34} {'step ms':>8} {'tok/s':>7} {'x Dynamic':>9} {'x Quantized':>11}")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():   # warm-up: kernels, allocator
        hf.set_attn_implementation("sdpa")
        hf(torch.randint(20, 1000, (1, 16), generator=g), use_cache=False)
    for ctx in a.context:
        ids = torch.randint(20, hf.config.vocab_size, (1, ctx), generator=g)
        live = []      # [label, attn, cache, next token, step times]
        for label, attn, make in rows():
            hf.set_attn_implementation(attn)
            try:
                cache = make(hf.config)
                live.append([label, attn, cache, prefill(hf, ids, cache), []])
            except Exception as e:   # a missing backend (optimum-quanto) is reported, not fatal
                print(f"{ctx:>7} {label:<34} failed: {type(e).__name__}: {e}"[:160])
        # rows take turns step by step: on a shared box, load from others hits every row alike
        for _ in range(a.steps):
            for row in live:
                hf.set_attn_implementation(row[1])
                dt, row[3] = step(hf, row[3], row[2])
                row[4].append(dt)
        med = {label: statistics.median(times) for label, _, _, _, times in live}
        base = med.get("transformers DynamicCache")
        quant = med.get("transformers QuantizedCache 2-bit")
        for label, m in med.items():
            xd = f"{m / base:.2f}x" if base else ""
            xq = f"{m / quant:.2f}x" if quant and "2-bit" in label and "transformers" not in label else ""
            print(f"{ctx:>7} {label:<34} {m * 1e3:>8.1f} {1 / m:>7.1f} {xd:>9} {xq:>11}")
        del live


if __name__ == "__main__":
    main()
