"""KV policies side by side in one run: device KV size, and CPU decode step times against
transformers' DynamicCache and QuantizedCache (quanto) on the same weights.

    python benchmarks/kv_policies.py [--context 2048] [--batch 1 4] [--steps 16] [--skip-hf]

Part 1 builds real caches from random K/V at 4K tokens with 16-bit storage (SmolLM2's layer
shape) and prints `kv_ratio_vs_fp16` next to the estimate (bits + 32/group)/16 + (residual + k)/N.
Part 2 prefills the shipped model once per batch size (shared by our policies, exact: every
policy's prefill is full precision), then times each decode step; prints the median step, tok/s
and the ratio to our `full` step. transformers runs its own prefill per cache, then the same
greedy decode loop, timed per step.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from types import SimpleNamespace as NS

import torch

from runtime.engine import SamplingParams, generate, prefill_once
from runtime.kv import CacheShape, Step, make_cache
from runtime.model import load_gguf, shipped_gguf_path
from runtime.provenance import cpu_name

KIVI = dict(kv_dtype="auto", group_size=64, residual=64, one_bit_rule="specache")
POLICIES = {
    "full": NS(name="full", kv_dtype="auto"),
    "offload": NS(name="offload", kv_dtype="auto"),
    "kivi 2-bit": NS(name="kivi", bits=2, **KIVI),
    "kivi 4-bit": NS(name="kivi", bits=4, **KIVI),
    "specache k=64 2-bit": NS(name="specache", bits=2, k=64, prefetch=True, **KIVI),
    "specache k=64 2-bit no prefetch": NS(name="specache", bits=2, k=64, prefetch=False, **KIVI),
}


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


def our_steps(model, prompts, policy, steps: int, pre) -> tuple[float, dict]:
    r = generate(model, prompts, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True), policy, prefilled=pre)
    return statistics.median(r.steps), r.policy_stats


def hf_steps(hf, ids: torch.Tensor, cache, steps: int) -> float:
    times = []
    with torch.inference_mode():   # the cache object is updated in place by each call
        out = hf(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t = time.perf_counter()
            out = hf(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true", help="only this project's policies")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers.utils.logging as hf_logging

    hf_logging.set_verbosity_error()
    kv_ratio_table()

    model = load_gguf()
    hf = None
    if not a.skip_hf:
        import transformers
        from transformers import AutoModelForCausalLM

        p = shipped_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    print(f"\nDecode steps on {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + ("" if hf is None else f", transformers {transformers.__version__}")
          + f"; shipped SmolLM2 fp32, context {a.context}, median of {a.steps} steps")
    print(f"{'batch':>5} {'policy':<34} {'step ms':>8} {'tok/s':>7} {'x full':>7}  notes")
    g = torch.Generator().manual_seed(0)
    for B in a.batch:
        ids = torch.randint(20, model.args.vocab_size, (B, a.context), generator=g)
        prompts = ids.tolist()
        pre = prefill_once(model, prompts)
        generate(model, [p[:16] for p in prompts], SamplingParams(max_new_tokens=3), POLICIES["full"])  # warm-up
        rows = []
        for label, pol in POLICIES.items():
            med, st = our_steps(model, prompts, pol, a.steps, pre)
            note = ", ".join(f"{k} {v:.2f}" for k, v in st.items() if k in ("topk_recall", "guess_accuracy"))
            rows.append((label, med, note))
        if hf is not None:
            from transformers import DynamicCache, QuantizedCache

            rows.append(("transformers DynamicCache", hf_steps(hf, ids, DynamicCache(config=hf.config), a.steps), ""))
            for bits in (4, 2):
                try:
                    cache = QuantizedCache("quanto", hf.config, nbits=bits, q_group_size=64, residual_length=64)
                    rows.append((f"transformers QuantizedCache {bits}-bit", hf_steps(hf, ids, cache, a.steps), "quanto"))
                except Exception as e:  # a missing backend is reported, not fatal
                    rows.append((f"transformers QuantizedCache {bits}-bit", float("nan"), f"failed: {e}"[:60]))
        full = rows[0][1]
        for label, med, note in rows:
            print(f"{B:>5} {label:<34} {med * 1e3:>8.1f} {B / med:>7.1f} {med / full:>6.2f}x  {note}")


if __name__ == "__main__":
    main()
