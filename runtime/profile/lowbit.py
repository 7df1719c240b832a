"""The low-bit (KIVI / SpeCache) tables: KIVI's decode attention, SpeCache's low-bit score +
top-k and gather-and-replace, and quantize/pack, once per bit-width (`measure_low_bit`); and
SpeCache's decode terms as the engine runs them inside the whole model (`in_model_lowbit`),
which rescale the lone 2-bit tables. Why the in-model correction: docs/profiles.md.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import torch

from core.profile.interp import Grid
from core.profile.schema import bits_table

from ..engine import SamplingParams, generate
from ..kv import Step, resolve_kv_dtype
from ..kv.kivi import fold, pack, quant_params, quantize
from ..model import ModelArgs, Transformer
from .cache_fill import layer_with_context
from .grids import KIVI_KNOBS
from .timing import Timer, grid


def measure_low_bit(args, timer, device, dtype, kv_dtype, axes, bits, attention, ctx_gr, progress) -> dict:
    """KIVI's decode attention, SpeCache's low-bit score + top-k and gather-and-replace, and
    quantize/pack, at one bit-width (the other knobs: KIVI_KNOBS)."""
    D, H, Hkv = args.head_dim, args.n_heads, args.n_kv_heads
    knobs = {**KIVI_KNOBS, "bits": bits}
    kivi = NS(name="kivi", kv_dtype=kv_dtype, **knobs)
    spec = NS(name="specache", kv_dtype=kv_dtype, k=64, prefetch=False, **knobs)
    name = lambda n: bits_table(n, bits)  # noqa: E731
    out = {name("decode_attention_kivi"): grid(timer, axes[name("decode_attention_kivi")], attention(kivi), progress)}

    def score_topk(B, ctx):
        layer = layer_with_context(spec, args, B, ctx, dtype, device)
        qf = fold(torch.randn(B, H, 1, D, device=device, dtype=layer.dtype), Hkv)
        G = H // Hkv
        return lambda: layer.select(layer.lowbit_scores(qf), slice(0, 1), G, 1)
    out[name("score_topk")] = grid(timer, axes[name("score_topk")], score_topk, progress)

    def gather_replace(B, k):
        pol = NS(**{**vars(spec), "k": k})
        layer = layer_with_context(pol, args, B, ctx_gr, dtype, device)
        q = torch.randn(B, H, 1, D, device=device, dtype=layer.dtype)
        qf = fold(q, Hkv)
        s_low = layer.lowbit_scores(qf)
        idx, valid = layer.select(s_low, slice(0, 1), H // Hkv, 1)
        step = Step(ctx_gr, 1, torch.zeros(B, dtype=torch.long, device=device),
                    torch.zeros(B, 1, dtype=torch.long, device=device))
        kv_new = torch.zeros(B, Hkv, 1, D, device=device, dtype=layer.dtype)
        return lambda: layer._mixed_attention(q, qf, s_low, kv_new, kv_new, step, layer.fetch(idx, valid).wait())
    out[name("gather_replace")] = grid(timer, axes[name("gather_replace")], gather_replace, progress)
    out[name("gather_replace")]["context"] = ctx_gr

    def quant(T):
        x = torch.randn(1, Hkv, T, D, device=device)
        return lambda: pack(quantize(x, *quant_params(x, -1, bits), bits), bits)
    out[name("quantize")] = grid(timer, axes[name("quantize")], quant, progress)
    for t in out.values():
        t["bits"] = bits
    return out



def in_model_lowbit(out: dict, m: Transformer, args: ModelArgs, device, kv_dtype: str, timer: Timer,
                    contexts_at=None, progress=None) -> None:
    """SpeCache's decode terms as the engine runs them, inside the whole model: `kivi` and
    `specache` (k = 64, prefetch, the 2-bit KIVI_KNOBS) generate a few tokens on the whole model
    (engine.generate, phases on), alternated in rounds, at the largest static context of the
    points (else 1K). Two facts go into the 2-bit tables:

    - `score_topk`: the `score` phase per layer over the table's value at the same (query rows,
      context); the whole table is scaled by that ratio (`in_model`): the lone-layer table sits
      in the CPU cache, and the engine's pass also picks the exact top-k for the recall count;
    - `gather_replace.in_model`: the replace part per layer, (specache layer phase - kivi layer
      phase) / layers minus the extra query row's GEMMs (decode_layer at 40 tokens, rows 2 vs 1),
      and the `fetch` and `back` phases per layer with the bytes they moved: simulator/kernels.py
      shifts its replace table to the first and adds to the gather / host write what the lone
      transfer tables miss (Python and bookkeeping around each copy)."""
    depth = m.args.n_layers
    ctx = max([int(c) for c in contexts_at or ()] or [1056])
    ctx = min(ctx, args.max_seq_len - 32)
    ids = torch.randint(3, args.vocab_size, (ctx - 16,), generator=torch.Generator().manual_seed(ctx)).tolist()
    knobs = dict(KIVI_KNOBS)
    pols = {"kivi": NS(name="kivi", kv_dtype=kv_dtype, **knobs),
            "specache": NS(name="specache", kv_dtype=kv_dtype, k=64, prefetch=True, gather="host", **knobs)}
    params = SamplingParams(max_new_tokens=17, ignore_eos=True)
    got: dict[str, list[dict]] = {n: [] for n in pols}
    for _ in range(max(min(timer.repeats, 3), 2)):           # rounds: kivi, specache, kivi, ...
        for name, pol in pols.items():
            d = generate(m, [ids], params, pol, phases=True).phases.get("decode") or {}
            if d.get("steps"):
                got[name].append({p: v / d["steps"] for p, v in d["phases"].items()})
            if progress is not None:
                progress.set_description("profile low-bit steps in the whole model")
    if not all(got.values()):
        return
    med = {n: {p: float(np.median([r.get(p, 0.0) for r in rs])) for p in ("layer", "score", "fetch", "back")}
           for n, rs in got.items()}
    grid_of = lambda t: Grid([t["axes"][a] for a in t["axes"]], t["p50"])  # noqa: E731
    rows = 2                                                  # the real token and the guess
    sc = out[bits_table("score_topk", 2)]
    lone = grid_of(sc).read([rows, ctx])
    score = med["specache"]["score"] / depth
    if lone > 0 and score > 0:
        r = score / lone
        for q in ("p10", "p50", "p90"):
            if q in sc:
                sc[q] = (np.asarray(sc[q], dtype=float) * r).tolist()
        sc["in_model"] = {"rows": rows, "context": ctx, "score_s": score, "ratio_to_alone": r}
    dl = out["decode_layer"]
    c0 = [row[0] for row in dl["p50"]]
    extra_row = Grid([dl["axes"]["batch"]], c0).read([rows]) - Grid([dl["axes"]["batch"]], c0).read([1])
    replace = (med["specache"]["layer"] - med["kivi"]["layer"]) / depth - extra_row
    elem = torch.finfo(resolve_kv_dtype(kv_dtype, device)).bits // 8
    kv_row = args.n_kv_heads * args.head_dim * elem
    out[bits_table("gather_replace", 2)]["in_model"] = {
        "rows": rows, "k": 64, "context": ctx, "replace_s": max(replace, 0.0),
        # the fetch (top-k rows gathered + copied, here without an emulated link) and the new
        # token's rows written to the host store, per layer, with the bytes they moved
        "fetch_s": med["specache"]["fetch"] / depth, "fetch_bytes": 2 * 64 * kv_row,
        "back_s": med["specache"]["back"] / depth, "back_bytes": 2 * kv_row,
        "kivi_layer_s": med["kivi"]["layer"] / depth, "specache_layer_s": med["specache"]["layer"] / depth}
