"""Selective recompute: the chosen context tokens and the whole question recomputed by the target
layer by layer with causal attention over every position, the other rows keeping their reused
(re-rotated) K/V. `rag_prefill` runs the pipeline store -> placement -> selector -> recompute."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from core.errors import ConfigError
from core.policies.rag import DRAFT_SELECTORS, ORACLES, SELECTORS, budget_of, knob

from .. import phases
from ..engine import Prefilled, sync
from ..kv.base import sdpa_gqa
from ..model import Transformer
from .checks import check_policy
from .draft import Draft, load_draft, separate_draft_select
from .placement import _qkv, placed_kv
from .selectors import (Trace, _cacheblend_deviation, recall, selector_scores, sink_positions, span_complete,
                        top_with_sinks, trace)
from .store import ChunkKV, ChunkStore


def select(selector: str, *, r: float, chunks: list[list[int]], model: Transformer, prompt: list[int],
           reused: ChunkKV, policy=None, draft: Draft | None = None, store: ChunkStore | None = None,
           traced: Trace | None = None) -> tuple[list[int], dict]:
    """Context positions (sorted, < N) to recompute, within ceil(r*N); and what was chosen (log).
    epic with a fixed `epic_prefix` ignores r: its budget is the prefixes' total.

    policy.sink_tokens (random, cacheblend, draft*, oracle_*): the first n tokens of every chunk
    are taken first, inside the budget. store: where draft_rel finds the chunk-alone norms.
    traced: a precomputed `trace` of this prompt with this `reused` (>= the layers the selector
    reads; dev / attn recorded where it reads them), used instead of running one (the evals
    trace each question once for every selector; the selection is the same)."""
    lens = [len(c) for c in chunks]
    N = sum(lens)
    B = budget_of(r, N)
    L = model.args.n_layers
    info: dict = {"selector": selector, "n_ctx": N, "budget": B}
    if selector == "full":
        info["budget"] = N
        return list(range(N)), info
    prefix = knob(policy, "epic_prefix")
    if selector == "epic" and prefix is not None:         # EPIC's fixed first 8 / 16 / 32 tokens per chunk
        chosen, off = [], 0
        for n in lens:
            chosen += range(off, off + min(int(prefix), n))
            off += n
        info.update(budget=len(chosen), epic_prefix=int(prefix))
        return chosen, info
    if selector == "reuse" or B == 0:
        info["budget"] = 0 if selector == "reuse" else B
        return [], info
    n_sink = int(knob(policy, "sink_tokens") or 0)
    sinks = sink_positions(lens, n_sink, B) if n_sink and selector not in ("epic",) else []
    if sinks:
        info.update(sink_tokens=n_sink, sinks=len(sinks))
    if selector == "random":
        g = torch.Generator().manual_seed(int(knob(policy, "seed")))
        if not sinks:
            return sorted(torch.randperm(N, generator=g)[:B].tolist()), info
        sink_set = set(sinks)
        rest = [p for p in torch.randperm(N, generator=g).tolist() if p not in sink_set][:B - len(sinks)]
        return sorted(sinks + rest), info
    if selector == "epic":
        cands = []
        off = 0
        for c, n in enumerate(lens):
            take = math.ceil(r * n - 1e-9)
            cands += [(j, c, off + j) for j in range(min(take, n))]
            off += n
        cands.sort()
        return sorted(p for _, _, p in cands[:B]), info
    D = int(knob(policy, "draft_layers"))
    if selector == "draft" and draft is not None:
        chosen, more = separate_draft_select(draft, prompt, N, B, D, policy, pre=sinks)
        info.update(more)
        return chosen, info
    if selector not in SELECTORS or selector in ("full", "reuse", "random", "epic"):
        raise ConfigError(f"policy.selector={selector!r} is not known; choose one of: {', '.join(SELECTORS)}")
    if selector == "cacheblend" and traced is None:
        scores = _cacheblend_deviation(model, prompt, reused, N)
    else:
        need = L if selector in ORACLES or selector == "cacheblend" else D
        tr = traced
        want_dev, want_attn = selector in ("draft_dev", "oracle_dev", "cacheblend"), selector == "draft_attn"
        if tr is None or tr.n_layers < need or (want_dev and tr.dev is None) or (want_attn and tr.attn is None):
            tr = trace(model, prompt, need, N, reused=reused if want_dev else None, attn=want_attn)
        if selector == "draft_rel" and store is None:
            raise ValueError("selector=draft_rel reads the chunk-alone norms from the chunk store: pass store=")
        alone = [store.features(c) for c in chunks] if selector == "draft_rel" else None
        scores = selector_scores(selector, tr, D, L, alone)
    top = torch.topk(scores, min(8, N)).indices
    info["top_scores"] = [(int(i), float(scores[i])) for i in top]    # attention sinks show up here
    if selector in DRAFT_SELECTORS:
        chosen, spans = span_complete(scores, B, float(knob(policy, "tau_smooth")), float(knob(policy, "tau_cover")),
                                      int(knob(policy, "span_max")), pre=sinks)
        info.update(draft_layers=D, n_spans=len(spans), chosen=chosen)
        return chosen, info
    chosen = top_with_sinks(scores, B, sinks)
    if selector == "cacheblend":
        info["deviation_top"] = info.pop("top_scores")
    return chosen, info


def oracle_set(model: Transformer, prompt: list[int], reused: ChunkKV, n_ctx: int, budget: int,
               traced: Trace | None = None) -> list[int]:
    """oracle_dev's top-`budget` context positions (no sinks): the reference every selector's
    `recall_vs_oracle` is measured against. A full prefill unless `traced` (L layers, dev) is given."""
    L = model.args.n_layers
    if budget <= 0 or n_ctx == 0:
        return []
    if budget >= n_ctx:                  # every context token: no prefill needed to rank them
        return list(range(n_ctx))
    tr = traced if traced is not None and traced.n_layers >= L and traced.dev is not None else \
        trace(model, prompt, L, n_ctx, reused=reused)
    return top_with_sinks(selector_scores("oracle_dev", tr, 1, L), budget, [])


def selective_prefill(model: Transformer, prompt: list[int], reused: ChunkKV, recompute: list[int],
                      kv_dtype: torch.dtype) -> tuple[ChunkKV, torch.Tensor]:
    """Recompute the tokens at `recompute` (sorted positions, must include the last one) layer by
    layer with causal attention over all T positions; the other rows keep `reused` (covering
    positions 0..N-1, N <= T). Returns per-layer K/V (1, H_kv, T, D) and the last logits (1, V)."""
    T = len(prompt)
    dev = model.device
    R = torch.tensor(recompute, dtype=torch.long, device=dev)
    assert int(R[-1]) == T - 1, "the last prompt token must be recomputed"
    N = reused[0][0].shape[2] if reused else 0
    m = R.numel()
    cos, sin = model.rope_cos[R][None, None], model.rope_sin[R][None, None]
    mask = (torch.arange(T, device=dev)[None, :] <= R[:, None])[None, None]     # (1, 1, m, T)
    out: ChunkKV = []
    with torch.inference_mode():
        x = model.tok_embeddings(torch.tensor([prompt], dtype=torch.long, device=dev)[:, R])   # (1, m, dim)
        phases.lap("overhead")
        # laps as the model's Block (runtime/model.py): the recompute is the prefill's `layer`
        for li, block in enumerate(model.layers):
            since = phases.mark()
            att = block.attention
            q, k, v = _qkv(block, x, cos, sin)
            phases.lap("projections")
            Hkv, D = att.n_kv_heads, att.head_dim
            K = torch.zeros(1, Hkv, T, D, dtype=kv_dtype, device=dev)
            V = torch.zeros(1, Hkv, T, D, dtype=kv_dtype, device=dev)
            if N:
                K[:, :, :N] = reused[li][0]
                V[:, :, :N] = reused[li][1]
            K[:, :, R] = k.to(kv_dtype)
            V[:, :, R] = v.to(kv_dtype)
            o = sdpa_gqa(q.to(kv_dtype), K, V, mask).to(x.dtype)                  # (1, H, m, D)
            phases.lap("attention")
            a = att.wo(o.transpose(1, 2).reshape(1, m, att.n_heads * D))
            phases.lap("projections")
            x = block.mlp_residual(x + a)
            phases.group(f"block{li}", since)
            out.append((K, V))
        logits = model.output(model.norm(x[:, -1:])).float()[:, -1]
        phases.lap("lm_head")
    return out, logits


@dataclass
class RagResult:
    prefilled: Prefilled
    chosen: list[int]             # context positions recomputed (within the budget)
    recomputed: list[int]         # chosen + every question position
    info: dict = field(default_factory=dict)


def rag_prefill(model: Transformer, chunks: list[list[int]], question: list[int], policy,
                store: ChunkStore | None = None, *, draft: Draft | None = None, tokenizer=None,
                traced: Trace | None = None, oracle: list[int] | None = None) -> RagResult:
    """`policy=rag` prefill of prompt = chunks + question; see the module docstring.

    draft / tokenizer: with `policy.draft_model` set, a loaded `Draft`, or the target's
    tokenizer to load one with (`load_draft`, cached per process). info["time"] holds the
    phases' seconds (placing the reused K/V, the selector, the selective recompute).

    traced: a precomputed trace of the prompt (see `select`; the evals' shared per-question
    work, so the selector's own cost is then not in info["time"]). oracle: oracle_dev's set
    for this budget (`oracle_set`), to record info["recall_vs_oracle"] (untimed)."""
    check_policy(policy, model, separate_draft=draft is not None)
    if not question:
        raise ConfigError("the question is empty; a rag prompt needs at least one token after the chunks")
    for i, c in enumerate(chunks):
        if not c:
            raise ConfigError(f"chunk {i} is empty; every chunk needs at least one token")
        if len(c) > model.args.max_seq_len:
            raise ConfigError(f"chunk {i} has {len(c)} tokens > the model's context of {model.args.max_seq_len}; "
                              "lower policy.chunk_len")
    prompt = [t for c in chunks for t in c] + list(question)
    if len(prompt) > model.args.max_seq_len:
        raise ConfigError(f"the rag prompt has {len(prompt)} tokens > the model's context of "
                          f"{model.args.max_seq_len}; use fewer or shorter chunks")
    kv_dtype = knob(policy, "kv_dtype")
    if store is None:
        store = ChunkStore(model, kv_dtype=kv_dtype)
    selector = knob(policy, "selector")
    dm = knob(policy, "draft_model")
    if selector == "draft" and dm is not None and draft is None:
        draft = load_draft(dm, model, tokenizer)
    dtype = store.dtype
    N = len(prompt) - len(question)
    dev = model.device
    times = {}
    # under a phase timer (runtime/phases.py; runtime.bench times this as its prefill step) the
    # laps split it as the simulator's twin does: load + rerotate (placement), select, the
    # recompute's layers and lm_head
    sync(dev)
    phases.lap("overhead")
    t = time.perf_counter()
    reused = placed_kv(model, store, chunks) if chunks else []
    sync(dev)
    phases.lap("load")
    times["place_s"], t = time.perf_counter() - t, time.perf_counter()
    r = float(knob(policy, "recompute_ratio"))
    with phases.suspended():       # a selector's own model passes (draft, trace) are `select`, not `layer`
        chosen, info = select(selector, r=r, chunks=chunks, model=model, prompt=prompt, reused=reused,
                              policy=policy, draft=draft if selector == "draft" else None, store=store, traced=traced)
    sync(dev)
    phases.lap("select")
    times["select_s"], t = time.perf_counter() - t, time.perf_counter()
    recompute = sorted(chosen) + list(range(N, len(prompt)))
    kv, logits = selective_prefill(model, prompt, reused, recompute, dtype)
    sync(dev)
    times["recompute_s"] = time.perf_counter() - t
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    info["store"] = dict(store.stats)
    info["time"] = times
    if oracle is not None:
        info["recall_vs_oracle"] = recall(chosen, oracle)
    return RagResult(Prefilled(prompts=[prompt], pad=pad, kv=kv, logits=logits), chosen, recompute, info)
