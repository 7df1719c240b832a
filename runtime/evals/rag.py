"""RAG quality of `policy=rag` selectors against full recompute: seeded synthetic multi-document QA.

    python -m runtime.evals rag [--n N] [--chunks 8] [--chunk-len 512] [--hops 1 2]
                                [--r 0 0.05 0.15 0.3 1] [--selectors full reuse random epic cacheblend draft
                                 draft_dev draft_rel draft_attn oracle_dev oracle_norm epic8 epic16 epic32]
                                [--draft-layers 3 5 10] [--sink-tokens 0 4] [--draft-model PATH]
                                [--shard K/N] [--model smollm2|tiny] [--out results/evals/rag]

Selectors (runtime/rag/selectors.py has the exact scores; "deep third" = the last ceil(n/3) of n
layers; D = --draft-layers, the draft being the target's first D layers):
  full         every context token recomputed (r = 1; every statistic is paired with it)
  reuse        none (r = 0)
  random       a seeded random ceil(r N)
  epic         the first ceil(r chunk) tokens of every chunk; epic<n>: EPIC's fixed first n
  cacheblend   the largest layer-1 K/V deviation, fresh vs reused
  draft        SpecCache: mean hidden-state norm over the draft's deep third, span completion
  draft_dev    the draft's deep-third K/V deviation (full-context vs each chunk alone), spans
  draft_rel    mean |log(deep-third norm / the token's chunk-alone norm)|, spans
  draft_attn   attention mass of the question tokens in the draft's deep third, spans
  oracle_dev   the target's own deep-third K/V deviation from a full prefill, top-k (a measuring stick)
  oracle_norm  the target's own deep-third hidden-state norms from a full prefill, top-k
--sink-tokens n > 0 adds `<point>-s<n>` points (policy.sink_tokens: the first n tokens of every
chunk always chosen, inside the budget) for random, cacheblend, draft* and oracle_*.

Data, generated in code (nothing downloaded). A sample holds `n_chunks` fictional "chains": a
company founded by a person, that person born in a city in a year. Each chain gives two facts,
"<Company> was founded by <Person>." and "<Person> was born in <City> in <Year>."; the 2k facts
are spread two per chunk among filler sentences, each chunk tokenized on its own and padded /
cut with filler to exactly `chunk_len` tokens. The question (the prompt's suffix) is either
single-hop ("Where was <Person> born?", the answer in the one chunk holding the birth fact) or
two-hop ("Where was the founder of <Company> born?", founder and birthplace in two different
chunks). Answers are a city or a year; every name, city and year is unique in the sample, so
the gold answer text occurs in exactly one chunk. Sample i is a pure function of (seed, i,
chunk_len, n_chunks, hops).

Per sample (question), the shared work is done once and is in no row's timing (`shared_work`,
its seconds in the rows' `shared_s`): the chunk store is warmed (K/V, and the chunk-alone norms
when a draft_rel point runs; `store_fill_s`), then one `trace` of the target over the whole
prompt records every layer's hidden-state norms, K/V deviation from the reused chunk K/V and the
question's attention mass (every D's draft is the first D layers of it; the oracles read its
deep third; cacheblend its layer 1), and oracle_dev's top-B set is derived once per budget B.
Per (sample, point), a point being (selector, r, D[, sinks]): `runtime.rag.rag_prefill` on the
warm store, selecting from that trace (the same tokens as a live selection: tested), then greedy
decoding from the returned prefill, stopped once the answer is settled (`answer_settled`; the
EM / F1 of --max-new-tokens tokens). Recorded: the output, exact match and token F1 (SQuAD
normalisation: lowercase, no punctuation / articles; the answer is the first line of the output
up to '.', ',' or ' in '), the context tokens chosen (`chosen`, `chosen_answer_chunk`),
`recall_vs_oracle` (the share of oracle_dev's top-B set this point chose, B its budget), and
TTFT = rag_prefill seconds + the first token's sampling. With the shared trace TTFT holds the
placement, the selection from precomputed scores and the selective recompute: not the
selector's own feature cost (the draft's layers, cacheblend's layer), which
benchmarks/rag_ttft.py measures. `full` and `reuse` ignore r (one point each, at r = 1 and r =
0); the other selectors run at every r strictly between 0 and 1 (at r = 0 or 1 they are `reuse`
or `full`), the draft variants at every D. `epic<n>` is one point, r ignored, recorded at its
effective ratio n / chunk_len. `--draft-model` makes the `draft` points use a separate draft
(policy.draft_model; points named `draft[<file>]-D..`, so they never mix with the target-layer
draft in one results folder; their selection runs live).

Results: `<out>/rag.jsonl`, one fsynced line per (sample, point), resumable like the other tasks
(`run.ResultLog`); `--shard K/N` takes the samples with index % N == K, and N processes can
append to one `<out>` at once (whole lines under flock, a row already there is never written
twice). The report (also registered with `report.TASKS`, so `python -m runtime.evals report
--out ...` includes it) writes `<out>/rag.csv` and `<out>/rag.png`: per (hops, point) EM and F1
with bootstrap intervals, exact McNemar on EM against `full` (paired), the bootstrap interval of
the paired F1 delta, recall_vs_oracle with its bootstrap interval, mean chosen tokens and TTFT,
and TTFT speed-up over full; the figure shows EM against r per selector and EM against recall.
"""
from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from core.errors import ConfigError
from ..model import Transformer
from core.provenance import provenance
from . import report as _report
from .data import TextTokenizer
from .run import ResultLog, check_meta
from .stats import bootstrap_mean, mcnemar_exact, paired_delta

TASK = "rag"
FILLER = (
    "The morning was quiet and the roads were empty.", "Rain fell softly on the old stone walls.",
    "Several travellers stopped to rest by the river.", "The market opened early, as it always did.",
    "Nobody remembered exactly when the bridge was painted.", "A cold wind came down from the hills.",
    "The library kept its doors open until late in the evening.", "Children played in the square after school.",
    "The harvest that season was neither good nor bad.", "Letters arrived twice a week by the mountain road.",
    "Most houses on the street had green shutters.", "The clock tower was repaired more than once.",
    "Fishermen mended their nets along the harbour.", "The museum displayed maps of forgotten coastlines.",
    "Visitors often commented on the narrow streets.", "A small orchestra played in the park on Sundays.",
)
HEADER = "\n\nAnswer the question with a short answer, using the documents above.\nQuestion: "
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_CODAS = ("", "", "n", "r", "l", "s", "x", "th", "m")
_COMPANY_SUFFIX = ("Works", "Industries", "Foundry", "Labs", "Trading Company", "Mills")


@dataclass(frozen=True)
class RagSample:
    id: str
    index: int
    hops: int
    n_chunks: int
    chunk_len: int
    chunks: list[list[int]]         # n_chunks lists of exactly chunk_len token ids
    chunk_texts: list[str]          # the decoded chunks (what the model sees)
    question_text: str
    question: list[int]             # the suffix ids
    answer: str
    answer_chunk: int               # the chunk holding the birth fact (the gold answer)
    bridge_chunk: int               # the chunk holding the founding fact (two-hop; else -1)
    kind: str                       # "place" or "year"

    @property
    def prompt(self) -> list[int]:
        return [t for c in self.chunks for t in c] + list(self.question)


def _word(rng: np.random.Generator, syll: int) -> str:
    w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syll))
    return (w + _CODAS[rng.integers(len(_CODAS))]).capitalize()


def _unique_names(n: int, make, taken: list[str]) -> list[str]:
    """n new names, none inside another nor inside / around one already `taken` (so "the gold
    answer appears in exactly one chunk" holds for text, not just for facts)."""
    out: list[str] = []
    while len(out) < n:
        w = make()
        if all(w.lower() not in o.lower() and o.lower() not in w.lower() for o in out + taken):
            out.append(w)
    return out


def make_rag(tok: TextTokenizer, index: int, seed: int = 0, chunk_len: int = 512, n_chunks: int = 8,
             hops: int = 1) -> RagSample:
    if hops not in (1, 2):
        raise ConfigError(f"hops={hops} must be 1 or 2")
    if n_chunks < 2:
        raise ConfigError(f"n_chunks={n_chunks} must be >= 2 (a two-hop question needs two chunks)")
    rng = np.random.default_rng([seed, index, chunk_len, n_chunks, hops, 7919])
    k = n_chunks
    taken = [f.lower() for f in FILLER] + [HEADER.lower()]
    people = _unique_names(k, lambda: f"{_word(rng, 2)} {_word(rng, 2)}", taken)
    cities = _unique_names(k, lambda: _word(rng, 3), taken + people)
    companies = _unique_names(
        k, lambda: f"{_word(rng, 2)} {_COMPANY_SUFFIX[rng.integers(len(_COMPANY_SUFFIX))]}", taken + people + cities)
    years = [int(y) for y in rng.choice(np.arange(1650, 1990), size=k, replace=False)]
    found = [f"{companies[j]} was founded by {people[j]}." for j in range(k)]
    born = [f"{people[j]} was born in {cities[j]} in {years[j]}." for j in range(k)]
    # 2k facts into k chunks, two each; the target chain (0)'s two facts in different chunks
    while True:
        slots = rng.permutation(2 * k) // 2        # fact f goes to chunk slots[f]
        if slots[0] != slots[k]:                   # found[0] is fact 0, born[0] is fact k
            break
    facts = found + born
    per_chunk = [[facts[f] for f in range(2 * k) if slots[f] == c] for c in range(k)]
    chunks, texts = [], []
    for c, fs in enumerate(per_chunk):
        ids, text = _fill_chunk(tok, fs, chunk_len, rng)
        chunks.append(ids)
        texts.append(text)
    # two-hop questions ask for the place: "born in the year" would not match the fact's wording
    kind = "place" if hops == 2 or rng.integers(2) == 0 else "year"
    what = "Where was" if kind == "place" else "In what year was"
    subject = people[0] if hops == 1 else f"the founder of {companies[0]}"
    q = f"{what} {subject} born?"
    # the answer is started in the facts' own wording, so a small model copies the next words
    # (as the passkey prompt ends with "The pass key is"); a bare "Answer:" got 0/8 with `full`
    if hops == 2:
        lead = f"The founder of {companies[0]} was born in"
    elif kind == "place":
        lead = f"{people[0]} was born in"
    else:
        lead = f"{people[0]} was born in {cities[0]} in"
    qtext = f"{HEADER}{q}\nAnswer: {lead}"
    return RagSample(id=f"rag/C{n_chunks}x{chunk_len}/h{hops}/s{seed}/i{index}", index=index, hops=hops,
                     n_chunks=k, chunk_len=chunk_len, chunks=chunks, chunk_texts=texts, question_text=qtext,
                     question=tok.encode(qtext), answer=cities[0] if kind == "place" else str(years[0]),
                     answer_chunk=int(slots[k]), bridge_chunk=int(slots[0]) if hops == 2 else -1, kind=kind)


def _fill_chunk(tok: TextTokenizer, facts: list[str], chunk_len: int, rng: np.random.Generator) -> tuple[list[int], str]:
    """Facts among filler sentences, tokenized, padded with more filler and cut to exactly
    chunk_len tokens, every fact whole inside. (ids, their decoded text)."""
    per = max(1.0, np.mean([len(tok.encode(s)) for s in FILLER]))
    n_fill = int(chunk_len / per) + 4
    filler = [FILLER[i % len(FILLER)] for i in rng.permutation(max(n_fill, len(FILLER)))][:n_fill]
    depth = len(filler)
    spots = sorted(rng.integers(0, depth + 1, size=len(facts)).tolist())
    while True:
        sents = list(filler)
        for f, p in sorted(zip(facts, [min(s, depth) for s in spots]), key=lambda x: -x[1]):
            sents.insert(p, f)
        ids = tok.encode(" ".join(sents))
        while len(ids) < chunk_len:                # pad with filler
            sents.append(FILLER[len(sents) % len(FILLER)])
            ids = tok.encode(" ".join(sents))
        ids = ids[:chunk_len]
        text = tok.decode(ids)
        if all(f in text for f in facts):
            return ids, text
        if depth == 0:
            raise ConfigError(f"chunk_len={chunk_len} tokens cannot hold {len(facts)} facts "
                              f"({sum(len(tok.encode(f)) for f in facts)} tokens); raise --chunk-len")
        depth //= 2                                  # move the facts earlier and retry


def rag_samples(tok: TextTokenizer, n: int, seed: int = 0, chunk_len: int = 512, n_chunks: int = 8,
                hops: tuple[int, ...] = (1, 2)) -> list[RagSample]:
    """n samples per hop count, index-major (a larger n only appends)."""
    return [make_rag(tok, i, seed, chunk_len, n_chunks, h) for i in range(n) for h in hops]


# ----------------------------------------------------------------------------- scoring

def normalize(s: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def extract_answer(output: str) -> str:
    """The continuation up to the end of the answered slot: its first non-empty line, cut at the
    first '.', ',' or ' in ' (after "X was born in", " Kelmar in 1873." answers "Kelmar")."""
    for line in output.split("\n"):
        if line.strip():
            return re.split(r"[.,]| in ", line.strip() + " ", maxsplit=1)[0].strip()
    return ""


def exact_match(pred: str, gold: str) -> bool:
    return normalize(pred) == normalize(gold)


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


# ----------------------------------------------------------------------------- points and the grid

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

    from ..rag import SELECTORS

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
        from ..rag.selectors import top_with_sinks

        if budget not in self.oracles:
            n = self.oracle_scores.numel()
            self.oracles[budget] = [] if budget <= 0 else (list(range(n)) if budget >= n else
                                                           top_with_sinks(self.oracle_scores, budget, []))
        return self.oracles[budget]


def shared_work(model: Transformer, s: RagSample, store, pts: list[dict]) -> Shared:
    from ..engine import sync
    from ..rag import placed_kv, selector_scores, trace

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


def answer_settled(text: str) -> bool:
    """True once no continuation of `text` can change `extract_answer`: the first non-empty line
    is complete (a newline follows it) or already holds its cut ('.', ',' or ' in ' whole)."""
    lines = text.split("\n")
    if any(line.strip() for line in lines[:-1]):
        return True
    return bool(re.search(r"[.,]| in ", lines[-1].lstrip()))


class _Settled(Exception):
    pass


def decode_answer(model: Transformer, tok: TextTokenizer, prompt: list[int], prefilled, kv_dtype: str,
                  max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding from the rag prefill (`engine.generate`, a plain full cache), stopped as
    soon as the answer is settled (`answer_settled`: the same EM / F1 as all max_new_tokens, a
    third of the decode steps on a typical " 1815." answer). (tokens, seconds to the first)."""
    from ..engine import SamplingParams, generate

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
    from ..engine import sync
    from ..rag import rag_prefill, recall

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


def run_rag(model: Transformer, tok: TextTokenizer, samples: list[RagSample], pts: list[dict], out: Path, *,
            model_name: str, kv_dtype: str = "auto", max_new_tokens: int = 10, progress: bool = True,
            meta: dict | None = None, seed: int = 0, shard: tuple[int, int] = (0, 1)) -> Path:
    """Evaluate every (sample, point) not yet in <out>/rag.jsonl; returns that file's path.
    shard (K, N): only the samples whose index % N == K (several processes on one --out: the
    log's appends are locked whole lines, and the report reads them all)."""
    from ..rag import ChunkStore

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


# ----------------------------------------------------------------------------- report

def _int0(x) -> int:
    return 0 if x is None or (isinstance(x, float) and math.isnan(x)) else int(x)


def rag_table(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("em", "f1", "ttft_s", "chosen", "recall_vs_oracle"):
        if col not in df:
            df[col] = math.nan
    if "sink_tokens" not in df:
        df["sink_tokens"] = 0
    rows = []
    groups = [("all", df)] + [(str(h), g) for h, g in df.groupby("hops")]
    for hops, dh in groups:
        base = dh[(dh.policy == "full") & dh.ok]
        full_ttft = base.ttft_s.mean() if len(base) else math.nan
        for pol in _report._policy_order(dh):
            g = dh[dh.policy == pol]
            ok = g[g.ok]
            pair = _report._paired(g, dh[dh.policy == "full"], ["em", "f1"])
            mc = mcnemar_exact(list(pair.em_full.astype(bool)), list(pair.em.astype(bool))) if len(pair) else None
            first = g.iloc[0]
            D = first.get("draft_layers")
            prefix = first.get("epic_prefix")
            rows.append({"task": TASK, "hops": hops, "policy": pol, "selector": first.selector, "r": first.r,
                         "epic_prefix": None if prefix is None or (isinstance(prefix, float) and math.isnan(prefix))
                         else int(prefix),
                         "draft_layers": None if D is None or (isinstance(D, float) and math.isnan(D)) else int(D),
                         "sink_tokens": _int0(first.get("sink_tokens")),
                         "n": len(ok), "errors": int((~g.ok).sum()),
                         **_report._ci("em", bootstrap_mean(ok.em.astype(float))),
                         **_report._ci("f1", bootstrap_mean(ok.f1.astype(float))),
                         "n_paired": len(pair), "only_full": mc.only_full if mc else None,
                         "only_policy": mc.only_policy if mc else None, "mcnemar_p": mc.p if mc else math.nan,
                         **_report._ci("f1_delta", paired_delta(pair.f1, pair.f1_full)),
                         **_report._ci("recall_vs_oracle", bootstrap_mean(ok.recall_vs_oracle.astype(float))),
                         "chosen": ok.chosen.mean() if len(ok) else math.nan,
                         "ttft_s": ok.ttft_s.mean() if len(ok) else math.nan,
                         "speedup_vs_full": full_ttft / ok.ttft_s.mean() if len(ok) else math.nan,
                         "error": g.error.dropna().iloc[-1] if (~g.ok).any() else None})
    return pd.DataFrame(rows)


def _curve(sel, d, e, sink) -> str:
    name = f"{sel} D={int(d)}" if sel.startswith("draft") and d == d and d else \
        (f"epic{int(e)} (fixed)" if e == e and e is not None else sel)
    return name + (f" s{int(sink)}" if sink == sink and sink else "")


def rag_figure(table: pd.DataFrame, path: Path) -> None:
    """Left: EM vs r per selector (each draft variant: one line per D; sink-token points their
    own lines); full (r=1) and reuse (r=0) as reference lines, since they ignore r; a grid with a
    single r gets EM per selector, sorted, instead. Right: EM vs
    recall of oracle_dev's set, one point per (selector, D, r), marker size by r."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    t = table[(table.n > 0) & (table.hops == "all")].copy()
    t["curve"] = [_curve(s, d, e, k) for s, d, e, k in zip(t.selector, t.draft_layers.fillna(0), t.epic_prefix,
                                                           t.get("sink_tokens", pd.Series(0, index=t.index)).fillna(0))]
    t["variant"] = [c.split(" D=")[0] for c in t.curve]
    curves = t[~t.selector.isin(["full", "reuse"])]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    ax = axes[0]
    single = bool(len(curves)) and curves.r.nunique() == 1
    if single:
        # one budget (e.g. the larger grid at r = 0.15 only): EM per selector, sorted, with its
        # interval; a line over a single x would stack every point on top of the others
        g = curves.sort_values("em")
        ax.errorbar(g.em, range(len(g)), xerr=[g.em - g.em_lo, g.em_hi - g.em], fmt="o", capsize=2, lw=1, ms=4)
        ax.set_yticks(range(len(g)), list(g.curve), fontsize=8)
        ax.set_xlabel(f"EM (95% CI) at r = {float(g.r.iloc[0]):g}")
        ax.set_xlim(-0.05, 1.05)
    elif len(curves):
        styles = {c: ("-" if " D=" not in c else {"3": "--", "5": "-", "10": ":"}.get(c.split(" D=")[1].split()[0], "-."))
                  for c in curves.curve.unique()}
        palette = dict(zip(sorted(curves.variant.unique()), sns.color_palette("tab20", curves.variant.nunique())))
        for c, g in curves.groupby("curve", sort=False):
            g = g.sort_values("r")
            ax.errorbar(g.r, g.em, yerr=[g.em - g.em_lo, g.em_hi - g.em], fmt="o", ls=styles[c], capsize=2, lw=1,
                        ms=3, color=palette[g.variant.iloc[0]], label=c)
    for sel, style in (("full", "-"), ("reuse", "--")):     # they ignore r: reference lines
        row = t[t.selector == sel]
        if len(row):
            (ax.axvline if single else ax.axhline)(float(row.em.iloc[0]), color="black", ls=style, lw=1,
                                                   label=f"{sel} ({row.em.iloc[0]:.2f})")
    if not single:
        ax.set_xlabel("recompute ratio r")
        ax.set_ylabel("EM (95% CI)")
        ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7 if single else 6, ncol=1 if single else 2)
    ax = axes[1]
    pts = curves[curves.recall_vs_oracle.notna()] if "recall_vs_oracle" in curves else curves.iloc[:0]
    if len(pts):
        sns.scatterplot(pts, x="recall_vs_oracle", y="em", hue="variant", size="r", sizes=(20, 120), ax=ax)
    for sel, style in (("full", "-"), ("reuse", "--")):
        row = t[t.selector == sel]
        if len(row):
            ax.axhline(float(row.em.iloc[0]), color="black", ls=style, lw=1)
    ax.set_xlabel("recall of oracle_dev's top-r set")
    ax.set_ylabel("EM")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6)
    n = int(t.n.max()) if len(t) else 0
    fig.suptitle(f"synthetic multi-document QA: EM vs r and vs recall of the oracle's choice (n={n} per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# `python -m runtime.evals report --out ...` picks the rag task up too
_report.TASKS.setdefault(TASK, (rag_table, rag_figure))
