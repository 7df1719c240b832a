"""Shared pieces of the side-by-side decode benchmarks (decode_vs_transformers.py, kv_policies.py).

Decode cost does not depend on the values in the cache, and prefilling 16 x 4K tokens on a
2-core CPU takes minutes per side, so both sides start from the *same synthetic prefilled
cache*: one random (1, H_kv, T, D) K and V, expanded over the batch and shared by the layers
(views: no memory until a side copies them into its own cache). Our engine gets it as a
`Prefilled` (its first token is sampled from random logits, as after a prefill); transformers
gets a DynamicCache / QuantizedCache filled through `Cache.update`, and `generate` is given the
T cached columns plus the first token, so it runs decode forwards only.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time

import torch

from runtime.engine import Prefilled


def die(script: str, msg: str) -> None:
    print(f"{script}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_mixed(script: str, specs: list[str]) -> list[tuple[int, int, int]]:
    """'B:T:MIN' -> (B, T, MIN): a batch of B prompts with lengths uniform in [MIN, T]."""
    out = []
    for s in specs:
        try:
            b, t, lo = (int(x) for x in s.split(":"))
        except ValueError:
            die(script, f"--mixed {s!r} must be BATCH:MAX_LEN:MIN_LEN, e.g. 4:2048:256")
        if b < 1 or not 1 <= lo <= t:
            die(script, f"--mixed {s!r} needs BATCH >= 1 and 1 <= MIN_LEN <= MAX_LEN")
        out.append((b, t, lo))
    return out


def machine_lines(device: torch.device) -> list[str]:
    """The machine's fingerprint and speed index (core/machine.py, runtime/profile/speed.py),
    printed with every table."""
    from core.machine import this_fingerprint
    from runtime.profile.speed import speed_index

    lines = []
    for label, fn in (("fingerprint", lambda: this_fingerprint(device)), ("speed index", lambda: speed_index(device))):
        try:
            val = fn()
            lines.append(f"{label}: {json.dumps(val, default=str) if isinstance(val, (dict, list)) else val}")
        except Exception as e:  # a failing probe must not lose the table
            lines.append(f"{label}: n/a ({type(e).__name__}: {e})")
    return lines


def lengths(B: int, T: int, lo: int | None, seed: int) -> list[int]:
    if lo is None:
        return [T] * B
    g = torch.Generator().manual_seed(seed)
    ls = torch.randint(lo, T + 1, (B,), generator=g).tolist()
    ls[0] = T   # the batch spans T columns
    return ls


def synthetic(model, lens: list[int], seed: int):
    """prompts (left-padded lengths lens), pad (B,), K and V (B, H_kv, T, D) views, first-token logits."""
    a = model.args
    B, T = len(lens), max(lens)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(20, a.vocab_size, (n,), generator=g).tolist() for n in lens]
    k = torch.randn(1, a.n_kv_heads, T, a.head_dim, generator=g).expand(B, -1, -1, -1)
    v = torch.randn(1, a.n_kv_heads, T, a.head_dim, generator=g).expand(B, -1, -1, -1)
    logits = torch.randn(B, a.vocab_size, generator=g)
    pad = torch.tensor([T - n for n in lens], dtype=torch.long)
    return prompts, pad, k, v, logits


def ours_prefilled(model, prompts, pad, k, v, logits) -> Prefilled:
    return Prefilled(prompts=prompts, pad=pad, kv=[(k, v)] * model.args.n_layers, logits=logits)


def hf_fill(cache, n_layers: int, k, v):
    """Fill a transformers Cache with the same K/V (one update per layer, as a prefill does)."""
    for i in range(n_layers):
        cache.update(k, v, i)
    return cache


def hf_inputs(prompts, pad, first: torch.Tensor):
    """input_ids (B, T + 1): the left-padded prompts (already cached) + the first token; its mask."""
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T + 1), 2, dtype=torch.long)
    am = torch.ones(B, T + 1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):T] = torch.tensor(p)
        am[b, : T - len(p)] = 0
    ids[:, T] = first
    return ids, am


def hf_generate_times(hf, ids, am, cache, n: int) -> list[float]:
    """transformers `generate` over a filled cache, greedy, n tokens; perf_counter after each."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.inference_mode():
        hf.generate(ids, attention_mask=am, past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=2, stopping_criteria=StoppingCriteriaList([Stamp()]))
    return stamps


def med_ci(xs: list[float]) -> tuple[float, float, float]:
    """median and [min, max] over repeats: for n repeats, [min, max] covers the true median with
    probability 1 - 2 / 2^n (0.75 at 3, 0.94 at 5, 0.98 at 7)."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan, math.nan
    return statistics.median(xs), min(xs), max(xs)


def fmt(m: tuple[float, float, float], digits: int = 1, suffix: str = "") -> str:
    med, lo, hi = m
    return f"{med:.{digits}f}{suffix} [{lo:.{digits}f}, {hi:.{digits}f}]"
