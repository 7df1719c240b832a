"""The model side of runtime.serve: requests admitted together are one cohort (a left-padded batch
with its own KV cache); one decode iteration is one model forward over every live cohort.

`Server.prefill` makes a cohort, `Server.decode` steps them all through `CohortCache`, which
presents the cohorts' caches to the model as one KVCache (rows in cohort order). Why cohorts and
their limits: docs/runtime.md ("Continuous batching").
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .arrivals import ServedRequest
from .engine import left_pad, policy_stats_of, prefill, sample, speculate
from .kv import KVCache, Step, make_cache
from .model import Transformer
from .phases import lap


class Cohort:
    """Requests admitted together: one left-padded batch with its own KV cache."""

    def __init__(self, cid: int, reqs: list[ServedRequest], cache: KVCache, pad: torch.Tensor):
        self.id, self.reqs, self.cache, self.pad = cid, reqs, cache, pad
        self.nxt: torch.Tensor | None = None     # (B_c,) the token each row feeds next
        self.guess: torch.Tensor | None = None   # (B_c,) speculative guess of the one after

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.reqs)


@dataclass
class CohortStep:
    """The composite forward's step: what the model reads itself (RoPE positions), plus each
    cohort's own Step for its attention and its `advance`."""
    positions: torch.Tensor          # (B_total, n_new)
    n_new: int
    spec: bool
    parts: list[Step]


class _CohortLayer:
    """One layer of the composite cache: q/k/v rows split by cohort, each cohort's own attend."""

    def __init__(self, layers, bounds):
        self.layers, self.bounds = layers, bounds

    def attend(self, q, k, v, step: CohortStep):
        if len(self.layers) == 1:
            return self.layers[0].attend(q, k, v, step.parts[0])
        outs = [layer.attend(q[lo:hi], k[lo:hi], v[lo:hi], part)
                for layer, (lo, hi), part in zip(self.layers, self.bounds, step.parts)]
        return torch.cat(outs, dim=0)


class CohortCache:
    """The KVCache interface over several cohorts' caches, rows in cohort order."""

    def __init__(self, cohorts: list[Cohort]):
        self.caches = [c.cache for c in cohorts]
        bounds, lo = [], 0
        for c in cohorts:
            bounds.append((lo, lo + len(c.reqs)))
            lo += len(c.reqs)
        self.layers = [_CohortLayer([cache.layers[i] for cache in self.caches], bounds)
                       for i in range(len(self.caches[0].layers))]

    def advance(self, step: CohortStep) -> None:
        for cache, part in zip(self.caches, step.parts):
            cache.advance(part)


class Server:
    """The model side of the loop: prefill a cohort, decode every cohort in one forward."""

    def __init__(self, model: Transformer, policy, *, link=None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0):
        self.model, self.policy, self.link = model, policy, link
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator(device=model.device).manual_seed(seed) if temperature > 0 else None
        self.n_cohorts = 0
        self.guesses = self.hits = 0
        self.counters: dict[str, float] = {}     # policy counters of the cohorts dropped so far

    def prefill(self, reqs: list[ServedRequest]) -> Cohort:
        """Prefill the requests admitted together as one new cohort; sets its first tokens."""
        args, device = self.model.args, self.model.device
        tokens, pad = left_pad([r.prompt for r in reqs], args.pad_id, device)
        capacity = tokens.shape[1] + max(r.gen_len for r in reqs)
        cache = make_cache(self.policy, n_layers=args.n_layers, batch=len(reqs), n_kv_heads=args.n_kv_heads,
                           head_dim=args.head_dim, capacity=capacity + 1, device=device, link=self.link)
        c = Cohort(self.n_cohorts, reqs, cache, pad)
        self.n_cohorts += 1
        for r in reqs:
            r.cohort = c.id
        c.nxt = sample(prefill(self.model, cache, tokens, pad), self.temperature, self.top_p, self.gen)
        lap("lm_head")
        return c

    def speculate(self, c: Cohort) -> None:
        """SpeCache's first pre-decoding pass (as engine.generate), for a cohort that will decode."""
        if c.cache.speculative and not c.done:
            c.guess = speculate(self.model, c.cache, c.nxt, c.pad).argmax(-1)

    def decode(self, cohorts: list[Cohort]) -> None:
        """One decode step of every row of every cohort, in one model forward."""
        device, max_pos = self.model.device, self.model.args.max_seq_len - 1
        spec = cohorts[0].guess is not None
        if any((c.guess is not None) != spec for c in cohorts):
            raise RuntimeError("cohorts disagree on speculative decoding (serve bug)")
        n = 2 if spec else 1
        parts = []
        for c in cohorts:
            start = c.cache.len
            # rows of requests already done keep computing until their cohort ends; clamp their
            # positions into the RoPE table (their outputs are never used)
            pos = ((start - c.pad)[:, None] + torch.arange(n, device=device)).clamp(max=max_pos)
            parts.append(Step(start=start, n_new=n, pad=c.pad, positions=pos, spec=spec))
        nxt = torch.cat([c.nxt for c in cohorts])
        tokens = torch.stack([nxt, torch.cat([c.guess for c in cohorts])], dim=1) if spec else nxt[:, None]
        step = CohortStep(torch.cat([p.positions for p in parts]), n, spec, parts)
        out = self.model(tokens, CohortCache(cohorts), step)            # (B_total, n, V)
        new = sample(out[:, 0] if spec else out[:, -1], self.temperature, self.top_p, self.gen)
        guess = out[:, 1].argmax(-1) if spec else None
        lap("lm_head")
        if spec:
            live = torch.tensor([not r.finished for c in cohorts for r in c.reqs], device=device)
            old_guess = tokens[:, 1]
            self.guesses += int(live.sum())
            self.hits += int(((old_guess == new) & live).sum())
        lo = 0
        for c in cohorts:
            hi = lo + len(c.reqs)
            c.nxt = new[lo:hi]
            if spec:
                c.guess = guess[lo:hi]
            lo = hi

    def drop(self, c: Cohort) -> None:
        for key, val in c.cache.stats().items():
            self.counters[key] = self.counters.get(key, 0) + val

    def policy_stats(self, live: list[Cohort]) -> dict[str, float]:
        counters = dict(self.counters)
        for c in live:
            for key, val in c.cache.stats().items():
                counters[key] = counters.get(key, 0) + val
        return policy_stats_of(SimpleNamespace(stats=lambda: counters), self.guesses, self.hits)
