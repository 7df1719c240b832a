"""Running the RAG eval: per question the shared work once (store warmed, the target's trace),
then per point `runtime.rag.rag_prefill` and greedy decoding to a settled answer; one resumable
line per (question, point) in <out>/rag.jsonl. What is timed and why: docs/evals.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm

from core.provenance import provenance
from ...model import Transformer
from ..data import TextTokenizer
from ..run import ResultLog, check_meta
from .answers import answer_settled, exact_match, extract_answer, token_f1
from .data import RagSample

TASK = "rag"


@dataclass
class Shared:
    """A question's shared work, done once for all its points (`shared_work`), untimed per row:
    the target's full trace (hidden-state norms, K/V deviation from the reused chunk K/V and the
    question's attention mass at every layer: every D's draft is its first D layers), the
    chunk-alone norms (in the store), and oracle_dev's top-B set per budget B."""
    traced: object
    oracle_scores: object
    seconds: float
    oracles: dict

    def oracle(self, budget: int) -> list[int]:
        from ...rag.selectors import top_with_sinks

        if budget not in self.oracles:
            n = self.oracle_scores.numel()
            self.oracles[budget] = [] if budget <= 0 else (list(range(n)) if budget >= n else
                                                           top_with_sinks(self.oracle_scores, budget, []))
        return self.oracles[budget]


def shared_work(model: Transformer, s: RagSample, store, pts: list[dict]) -> Shared:
    from ...engine import sync
    from ...rag import placed_kv, selector_scores, trace

    sync(model.device)
    t0 = time.perf_counter()
    N = sum(len(c) for c in s.chunks)
    L = model.args.n_layers
    reused = placed_kv(model, store, s.chunks)
    tr = trace(model, s.prompt, L, N, reused=reused, attn=any(p["selector"] == "draft_attn" for p in pts))
    if any(p["selector"] == "draft_rel" for p in pts):
        for c in s.chunks:
            store.features(c)
    scores = selector_scores("oracle_dev", tr, 1, L)
    sync(model.device)
    return Shared(traced=tr, oracle_scores=scores, seconds=time.perf_counter() - t0, oracles={})


class _Settled(Exception):
    pass


def decode_answer(model: Transformer, tok: TextTokenizer, prompt: list[int], prefilled, kv_dtype: str,
                  max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding from the rag prefill (`engine.generate`, a plain full cache), stopped as
    soon as the answer is settled (`answer_settled`: the same EM / F1 as all max_new_tokens, a
    third of the decode steps on a typical " 1815." answer). (tokens, seconds to the first)."""
    from ...engine import SamplingParams, generate

    toks: list[int] = []
    t0 = time.perf_counter()
    first: list[float] = []

    def on_token(ids, active):
        if not first:
            first.append(time.perf_counter() - t0)
        toks.append(ids[0])
        if active[0] and answer_settled(tok.decode(toks)):
            raise _Settled

    try:
        gen = generate(model, [prompt], SamplingParams(max_new_tokens=max_new_tokens),
                       SimpleNamespace(name="full", kv_dtype=kv_dtype), prefilled=prefilled, on_token=on_token)
        toks = list(gen.requests[0].tokens)
    except _Settled:
        pass
    return toks, first[0] if first else math.nan


def score_point(model: Transformer, tok: TextTokenizer, s: RagSample, pt: dict, store, kv_dtype: str,
                max_new_tokens: int, seed: int = 0, shared: Shared | None = None) -> dict:
    """One row. With `shared`, the selection reads the question's precomputed trace (so the
    timing fields hold placement + selection from precomputed scores + selective recompute + the
    first token, not the selector's own feature cost: benchmarks/rag_ttft.py measures that) and
    recall_vs_oracle is recorded."""
    from ...engine import sync
    from ...rag import rag_prefill, recall

    prefix = pt.get("epic_prefix")
    r = 0.0 if prefix is not None else pt["r"]            # a fixed prefix ignores r (and r may be NaN)
    policy = SimpleNamespace(name="rag", selector=pt["selector"], recompute_ratio=r, epic_prefix=prefix,
                             draft_layers=pt["D"] or 1, chunk_len=s.chunk_len, kv_dtype=kv_dtype, seed=seed,
                             draft_model=pt.get("draft_model"), sink_tokens=pt.get("sink_tokens", 0))
    traced = shared.traced if shared is not None and not pt.get("draft_model") else None
    sync(model.device)
    t0 = time.perf_counter()
    res = rag_prefill(model, s.chunks, s.question, policy, store, tokenizer=tok, traced=traced)
    sync(model.device)
    prefill_s = time.perf_counter() - t0
    toks, first = decode_answer(model, tok, s.prompt, res.prefilled, kv_dtype, max_new_tokens)
    seconds = time.perf_counter() - t0
    out = tok.decode(toks)
    pred = extract_answer(out)
    budget = res.info.get("budget")
    a0 = s.answer_chunk * s.chunk_len
    rec = {"output": out, "pred": pred, "em": exact_match(pred, s.answer), "f1": token_f1(pred, s.answer),
           "chosen": len(res.chosen), "budget": budget, "n_ctx": res.info.get("n_ctx"),
           "sink_tokens": pt.get("sink_tokens", 0),
           "chosen_answer_chunk": sum(1 for p in res.chosen if a0 <= p < a0 + s.chunk_len),
           "new_tokens": len(toks), "rag_prefill_s": prefill_s, "ttft_s": prefill_s + first,
           **{k: v for k, v in res.info.get("time", {}).items()}, "seconds": seconds}
    if shared is not None:
        rec["recall_vs_oracle"] = recall(res.chosen, shared.oracle(int(budget or 0)))
        rec["shared_s"] = shared.seconds
    return rec


def run_rag(model: Transformer, tok: TextTokenizer, samples: list[RagSample], pts: list[dict], out: Path, *,
            model_name: str, kv_dtype: str = "auto", max_new_tokens: int = 10, progress: bool = True,
            meta: dict | None = None, seed: int = 0, shard: tuple[int, int] = (0, 1)) -> Path:
    """Evaluate every (sample, point) not yet in <out>/rag.jsonl; returns that file's path.
    shard (K, N): only the samples whose index % N == K (several processes on one --out: the
    log's appends are locked whole lines, and the report reads them all)."""
    from ...rag import ChunkStore

    out = Path(out)
    k, n = shard
    samples = [s for s in samples if s.index % n == k]
    check_meta(out, TASK, {"task": TASK, "model": model_name, "kv_dtype": kv_dtype,
                           "points": [p["name"] for p in pts], **(meta or {}),
                           "provenance": provenance(model.device)})
    log = ResultLog(out / f"{TASK}.jsonl")
    store = ChunkStore(model, kv_dtype=kv_dtype, disk=False)     # in memory; warmed per sample below
    bar = tqdm(total=len(samples) * len(pts), desc=TASK if n == 1 else f"{TASK} {k}/{n}", unit="pt",
               disable=not progress)
    for s in samples:
        log.refresh()
        todo = [p for p in pts if (s.id, p["name"]) not in log.done]
        bar.update(len(pts) - len(todo))
        if not todo:
            continue
        store.mem.clear()                                          # bound memory: one sample's chunks
        store.feat.clear()
        t0 = time.perf_counter()
        rel = any(p["selector"] == "draft_rel" for p in pts)
        for c in s.chunks:                                         # warm store: TTFT excludes chunk prefill
            if rel:
                store.features(c)                                  # one pass: the chunk-alone norms and K/V
            store.get(c)
        store_s = time.perf_counter() - t0
        shared = shared_work(model, s, store, pts)                 # untimed per row: once per question
        for p in todo:
            bar.set_postfix_str(p["name"], refresh=False)
            base = {"task": TASK, "sample_id": s.id, "policy": p["name"], "selector": p["selector"], "r": p["r"],
                    "draft_layers": p["D"], "epic_prefix": p.get("epic_prefix"), "model": model_name, "index": s.index, "hops": s.hops,
                    "kind": s.kind, "n_chunks": s.n_chunks, "chunk_len": s.chunk_len, "answer": s.answer,
                    "answer_chunk": s.answer_chunk, "bridge_chunk": s.bridge_chunk, "prompt_len": len(s.prompt),
                    "store_fill_s": store_s}
            try:
                rec = score_point(model, tok, s, p, store, kv_dtype, max_new_tokens, seed, shared)
            except Exception as e:  # noqa: BLE001 - recorded per point, like run._score_or_error
                rec = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            log.append({**base, **rec})
            bar.update(1)
    bar.close()
    return log.path
