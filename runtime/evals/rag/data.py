"""The RAG eval's samples, generated in code and seeded: fictional companies, founders, cities
and years spread as facts over `n_chunks` chunks of filler, and a one- or two-hop question whose
answer text sits in exactly one chunk. The design: docs/evals.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import ConfigError
from ..data import TextTokenizer

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
