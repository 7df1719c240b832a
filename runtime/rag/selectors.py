"""The scores behind the `policy=rag` selectors: SpecCache's span completion over a draft's
hidden-state norms, and CacheBlend's K/V deviation at layer 1 (the dispatch is prefill.select)."""
from __future__ import annotations

import math

import torch

from core.policies.rag import RagPolicyConfig

from ..kv import make_cache, policy_spec
from ..kv.base import Step
from ..model import Transformer
from .placement import _qkv
from .store import ChunkKV


def span_complete(scores: torch.Tensor, budget: int, tau_smooth: float = RagPolicyConfig.tau_smooth,
                  tau_cover: float = RagPolicyConfig.tau_cover,
                  span_max: int = RagPolicyConfig.span_max, cover: list[list[int]] | None = None
                  ) -> tuple[list[int], list[tuple[int, int]]]:
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
    """
    chosen, taken, spans = _greedy_spans(scores, budget, tau_smooth, tau_cover, span_max, cover)
    return (sorted(taken) if cover is not None else sorted(chosen)), spans


def _greedy_spans(scores, budget, tau_smooth, tau_cover, span_max, cover):
    """span_complete's work: (chosen score indices, taken target positions, spans)."""
    N = scores.numel()
    if budget <= 0 or N == 0:
        return set(), set(), []
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
    chosen: set[int] = set()
    taken: set[int] = set()
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


def draft_scores(model: Transformer, prompt: list[int], draft_layers: int) -> torch.Tensor:
    """SpecCache's draft: the first D blocks of the model prefill the whole prompt; a token's
    score is the mean over the last third of those blocks (ceil(D/3)) of its hidden state's L2
    norm. Returns (T,) float32."""
    D = draft_layers
    T = len(prompt)
    dev = model.device
    tokens = torch.tensor([prompt], dtype=torch.long, device=dev)
    cache = make_cache(policy_spec("full"), n_layers=D, batch=1, n_kv_heads=model.args.n_kv_heads,
                       head_dim=model.args.head_dim, capacity=T, device=dev)
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.arange(T, device=dev)[None]
    step = Step(start=0, n_new=T, pad=pad, positions=pos)
    cos, sin = model.rope_cos[pos][:, :, None], model.rope_sin[pos][:, :, None]   # (1, T, 1, D/2): Block's layout
    first_scored = D - math.ceil(D / 3)
    acc = torch.zeros(T, dtype=torch.float32, device=dev)
    with torch.inference_mode():
        x = model.tok_embeddings(tokens)
        for li, (block, kv) in enumerate(zip(model.layers[:D], cache.layers)):
            x = block(x, cos, sin, kv, step)
            if li >= first_scored:
                acc += x[0].float().norm(dim=-1)
    return acc / (D - first_scored)


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
