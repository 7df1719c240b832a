"""The scores behind the `policy=rag` selectors (the dispatch is prefill.select).

One pass, `trace`, runs the target's first n layers over the whole prompt (the model's own
blocks and cache, i.e. a full prefill when n = L) and records per layer what every signal reads:
each token's hidden-state L2 norm after the block, each context token's K/V deviation from the
reused (re-rotated, chunk-alone) K/V (||dK||_2 + ||dV||_2 over the KV heads, CacheBlend's
measure), and the attention mass the question rows give each context token (softmax of the
block's own q.k / sqrt(d), causal, averaged over heads and question rows). A D-layer trace is
the first D layers of an L-layer one, op for op, so the evals trace once per question and slice.

Scores (`selector_scores`), over a layer range `deep_layers(n)` = the last ceil(n/3) of n:
  draft        mean norm, draft's deep third (SpecCache; raw norms favour a few loud tokens)
  draft_dev    mean K/V deviation, draft's deep third (the reused K/V of layers < D are the
               draft's own chunk-alone K/V: nothing extra stored)
  draft_rel    mean |log(norm / chunk-alone norm)|, draft's deep third (the chunk-alone norms
               are stored with the chunk: ChunkStore.features)
  draft_attn   mean question attention mass, draft's deep third
  oracle_dev   mean K/V deviation, the target's deep third (a full prefill: a measuring stick)
  oracle_norm  mean norm, the target's deep third
  cacheblend   K/V deviation at layer 1 (layer 0 recomputed with full attention)
Then span completion (draft*) or plain top-k (cacheblend, oracle_*), after the sink tokens.
"""
from __future__ import annotations

import math

import torch

from core.policies.rag import RagPolicyConfig, deep_layers

from ..kv import make_cache, policy_spec
from ..kv.base import Step
from ..model import Transformer
from .placement import _qkv
from .store import ChunkKV
from .tracing import Trace, trace  # noqa: F401  (re-exported: the selectors read traces)


def span_complete(scores: torch.Tensor, budget: int, tau_smooth: float = RagPolicyConfig.tau_smooth,
                  tau_cover: float = RagPolicyConfig.tau_cover,
                  span_max: int = RagPolicyConfig.span_max, cover: list[list[int]] | None = None,
                  pre: list[int] | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """SpecCache's selection from per-token scores (N,).

    Scores are normalised to [0, 1]; the sequence is cut into spans where neighbours differ by
    more than `tau_smooth`, and spans longer than `span_max` are cut every `span_max` tokens.
    Tokens are taken greedily by descending score (ties: lower position first) while the
    budget lasts; whenever a taken token brings its span's chosen share to >= `tau_cover`, the
    rest of that span is added too if it fits in the remaining budget.
    Returns (chosen positions sorted, spans [start, end) as cut).

    cover (a separate draft with its own tokenizer): cover[i] = the target positions score i's
    draft token overlaps. The budget then counts target positions, a draft token is taken
    with all of them or not at all (one that does not fit is skipped), and the positions
    returned are target positions. cover=None is cover[i] = [i].

    pre (sink tokens): positions taken before anything else, counted in the budget and in
    their spans' chosen share.
    """
    chosen, taken, spans = _greedy_spans(scores, budget, tau_smooth, tau_cover, span_max, cover, pre)
    return (sorted(taken) if cover is not None else sorted(chosen)), spans


def _greedy_spans(scores, budget, tau_smooth, tau_cover, span_max, cover, pre=None):
    """span_complete's work: (chosen score indices, taken target positions, spans)."""
    N = scores.numel()
    pre = set(pre or ())
    if budget <= 0 or N == 0:
        return (set(pre), set(pre), []) if cover is None else (set(), set(pre), [])
    s = scores.double().cpu()
    lo, hi = float(s.min()), float(s.max())
    s = ((s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)).tolist()
    spans: list[tuple[int, int]] = []
    span_of = [0] * N
    start = 0
    for i in range(1, N + 1):
        if i == N or abs(s[i] - s[i - 1]) > tau_smooth or i - start >= span_max:
            spans.append((start, i))
            for j in range(start, i):
                span_of[j] = len(spans) - 1
            start = i
    covers = cover if cover is not None else [[i] for i in range(N)]
    order = sorted(range(N), key=lambda i: (-s[i], i))
    chosen: set[int] = set(pre) if cover is None else set()
    taken: set[int] = set(pre)
    for i in order:
        if len(taken) >= budget:
            break
        if i in chosen:
            continue
        new = set(covers[i]) - taken
        if len(taken) + len(new) > budget:     # only with cover: a draft token wider than what is left
            continue
        chosen.add(i)
        taken |= new
        a, b = spans[span_of[i]]
        missing = [j for j in range(a, b) if j not in chosen]
        have = (b - a) - len(missing)
        if missing and have / (b - a) >= tau_cover - 1e-12:
            extra = set().union(*(covers[j] for j in missing)) - taken
            if len(extra) <= budget - len(taken):
                chosen.update(missing)
                taken |= extra
    return chosen, taken, spans


def deep_mean(rows: torch.Tensor, n_layers: int) -> torch.Tensor:
    """The mean over the last ceil(n/3) of the first n rows (layers), accumulated in layer order."""
    layers = deep_layers(n_layers)
    acc = torch.zeros_like(rows[0])
    for li in layers:
        acc += rows[li]
    return acc / len(layers)


def draft_scores(model: Transformer, prompt: list[int], draft_layers: int) -> torch.Tensor:
    """SpecCache's draft: the first D blocks of the model prefill the whole prompt; a token's
    score is the mean over the last third of those blocks (ceil(D/3)) of its hidden state's L2
    norm. Returns (T,) float32."""
    return deep_mean(trace(model, prompt, draft_layers, 0).norms, draft_layers)


def rel_scores(tr: Trace, alone: list[torch.Tensor], D: int) -> torch.Tensor:
    """draft_rel: mean over the draft's deep third of |log(norm in context / norm of the chunk
    alone)|; alone: each chunk's (>= D, n) chunk-alone norms (ChunkStore.features). (N,)"""
    ctx = tr.norms[:D, :tr.n_ctx]
    solo = torch.cat([a[:D] for a in alone], dim=1).to(ctx)
    eps = torch.finfo(torch.float32).tiny
    return deep_mean((ctx.clamp_min(eps) / solo.clamp_min(eps)).log().abs(), D)


def selector_scores(selector: str, tr: Trace, D: int, L: int, alone: list[torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """The per-context-token score (N,) of a scoring selector from a trace of >= the layers it reads."""
    N = tr.n_ctx
    if selector == "draft":
        return deep_mean(tr.norms, D)[:N]
    if selector == "draft_dev":
        return deep_mean(tr.dev, D)
    if selector == "draft_rel":
        return rel_scores(tr, alone, D)
    if selector == "draft_attn":
        return deep_mean(tr.attn, D)
    if selector == "oracle_dev":
        return deep_mean(tr.dev, L)
    if selector == "oracle_norm":
        return deep_mean(tr.norms, L)[:N]
    if selector == "cacheblend":
        return tr.dev[1 if L > 1 else 0]
    raise ValueError(f"selector {selector!r} has no trace score")


def sink_positions(lens: list[int], sink_tokens: int, budget: int) -> list[int]:
    """The first `sink_tokens` tokens of every chunk, taken position-major (every chunk's token 0,
    then every chunk's token 1, ...) while the budget lasts. Sorted."""
    cands, off = [], 0
    for c, n in enumerate(lens):
        cands += [(j, c, off + j) for j in range(min(sink_tokens, n))]
        off += n
    cands.sort()
    return sorted(p for _, _, p in cands[:max(budget, 0)])


def top_with_sinks(scores: torch.Tensor, budget: int, sinks: list[int]) -> list[int]:
    """The sinks plus the top (budget - len(sinks)) other positions by score (ties: lower
    position first, as torch.topk on CPU keeps them). Sorted."""
    rest = budget - len(sinks)
    if rest <= 0:
        return sorted(sinks)
    if not sinks:
        return sorted(torch.topk(scores, min(rest, scores.numel())).indices.tolist())
    s = scores.clone()
    if sinks:
        s[torch.tensor(sinks, dtype=torch.long, device=s.device)] = -math.inf
    return sorted(set(sinks) | set(torch.topk(s, min(rest, s.numel() - len(sinks))).indices.tolist()))


def recall(chosen, oracle) -> float:
    """Share of the oracle's chosen positions also chosen; NaN for an empty oracle set."""
    oracle = set(oracle)
    return len(oracle & set(chosen)) / len(oracle) if oracle else math.nan


def _cacheblend_deviation(model: Transformer, prompt: list[int], reused: ChunkKV, n_ctx: int) -> torch.Tensor:
    """Layer 0 recomputed for all tokens (full attention), then layer 1's fresh K/V of every
    context token against its reused K/V: ||dK||_2 + ||dV||_2 over all KV heads. (N,)"""
    li = 1 if model.args.n_layers > 1 else 0
    T = len(prompt)
    dev = model.device
    tokens = torch.tensor([prompt], dtype=torch.long, device=dev)
    pos = torch.arange(T, device=dev)
    cos, sin = model.rope_cos[pos][None, None], model.rope_sin[pos][None, None]
    with torch.inference_mode():
        x = model.tok_embeddings(tokens)
        if li == 1:
            cache = make_cache(policy_spec("full"), n_layers=1, batch=1, n_kv_heads=model.args.n_kv_heads,
                               head_dim=model.args.head_dim, capacity=T, device=dev)
            step = Step(start=0, n_new=T, pad=torch.zeros(1, dtype=torch.long, device=dev), positions=pos[None])
            x = model.layers[0](x, cos.transpose(1, 2), sin.transpose(1, 2), cache.layers[0], step)  # token-major
        _, k, v = _qkv(model.layers[li], x, cos, sin)
        k0, v0 = reused[li]
        dk = (k[:, :, :n_ctx].float() - k0.float()).square().sum(dim=(1, 3)).sqrt()[0]
        dv = (v[:, :, :n_ctx].float() - v0.float()).square().sum(dim=(1, 3)).sqrt()[0]
    return dk + dv


# ----------------------------------------------------------------------------- a separate draft
