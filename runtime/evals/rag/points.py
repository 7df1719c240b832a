"""The RAG eval's grid: its points (selector, r, draft layers D, sink tokens) from the command
line's lists, and `--shard K/N`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from core.errors import ConfigError

EPIC_FIXED = re.compile(r"epic(\d+)$")      # epic8 / epic16 / epic32: EPIC's fixed prefix per chunk


def points(selectors: list[str], rs: list[float], draft_layers: list[int], chunk_len: int | None = None,
           draft_model: str | None = None, sink_tokens: list[int] | tuple[int, ...] = (0,)) -> list[dict]:
    """The grid's points; `full` is always first (every statistic is paired with it).
    `epic<n>` is EPIC with the paper's fixed n first tokens per chunk: one point, r ignored
    (recorded as n / chunk_len, its effective ratio, when chunk_len is given). draft_model: the
    `draft` points use that separate draft (policy.draft_model) instead of the target's layers.
    The draft variants (draft, draft_dev, draft_rel, draft_attn) run at every D; sink_tokens: each
    n > 0 adds points `<name>-s<n>` for the selectors that take it (random, cacheblend, draft*,
    oracle_*)."""
    from core.policies.rag import DRAFT_SELECTORS, SINK_SELECTORS

    from ...rag import SELECTORS

    for s in selectors:
        m = EPIC_FIXED.match(s)
        if s not in SELECTORS and not (m and int(m.group(1)) >= 1):
            raise ConfigError(f"--selectors {s!r} is not known; choose from {', '.join(SELECTORS)} "
                              "or epic<n> (EPIC's fixed n first tokens per chunk, e.g. epic8 epic16 epic32)")
    for r in rs:
        if not 0.0 <= r <= 1.0:
            raise ConfigError(f"--r {r} must be in [0, 1]")
    if any(int(n) < 0 for n in sink_tokens):
        raise ConfigError(f"--sink-tokens {list(sink_tokens)} must be >= 0")
    if draft_model and any(s in DRAFT_SELECTORS and s != "draft" for s in selectors):
        raise ConfigError("--draft-model is for the draft selector only (draft_dev, draft_rel and draft_attn run the "
                          "target's own first layers); run them without --draft-model")
    out = [dict(name="full", selector="full", r=1.0, D=None)]
    for s in selectors:
        if s == "full":
            continue
        if s == "reuse":
            out.append(dict(name="reuse", selector="reuse", r=0.0, D=None))
            continue
        m = EPIC_FIXED.match(s)
        if m:
            n = int(m.group(1))
            out.append(dict(name=s, selector="epic", r=min(1.0, n / chunk_len) if chunk_len else math.nan, D=None,
                            epic_prefix=n))
            continue
        sinks = sorted({int(n) for n in sink_tokens}) if s in SINK_SELECTORS else [0]
        for r in sorted(set(rs)):
            if not 0.0 < r < 1.0:
                continue
            for D in (draft_layers if s in DRAFT_SELECTORS else [None]):
                for n_sink in sinks:
                    name = f"{s}-D{D}-r{r:g}" if D is not None else f"{s}-r{r:g}"
                    if s == "draft" and draft_model:          # its own points: never mixed with the target's layers
                        name = f"draft[{Path(draft_model).name}]-D{D}-r{r:g}"
                    if n_sink:
                        name += f"-s{n_sink}"
                    out.append(dict(name=name, selector=s, r=float(r), D=D,
                                    **({"sink_tokens": n_sink} if n_sink else {}),
                                    **({"draft_model": draft_model} if s == "draft" and draft_model else {})))
    seen, uniq = set(), []
    for p in out:
        if p["name"] not in seen:
            seen.add(p["name"])
            uniq.append(p)
    return uniq


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N): this process takes the questions whose index % N == K."""
    if text is None:
        return 0, 1
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} must be K/N, e.g. 0/2 and 1/2 for two processes") from None
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"--shard {text!r} needs N >= 1 and 0 <= K < N")
    return k, n
