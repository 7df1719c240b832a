"""Eval data generated in code, seeded, nothing downloaded.

Passkey retrieval: the classic filler ("The grass is green. ...") repeated, with one needle line
"The pass key is 12345. Remember it. 12345 is the pass key." at a chosen depth, then the
question. Sample i is a pure function of (seed, length, depth, i, format): the passkey comes from
a generator seeded with exactly those numbers, so any sample can be rebuilt on its own (which is
what makes a resumed grid evaluate the same prompts).

Perplexity: CPython's own documentation, `pydoc_data.topics.topics` (the ~80 long English help
texts behind `help("if")`, `help("with")`, ... that ship with every Python install), joined in a
seeded order, tokenized once and cut into consecutive windows of `context` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.errors import ConfigError

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important info there.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is "   # ends in a space: the digits then follow as one token each
FORMATS = ("plain", "chat")


class TextTokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def apply_chat_template(self, messages: list[dict]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258, for the random tiny models of tests and smoke runs (whose
    vocab is far smaller than SmolLM2's). Digits are single tokens here too, like SmolLM2's."""

    OFFSET = 3
    eos_id = 2
    vocab_size = 256 + OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET).decode("utf-8", "replace")

    def token_bytes(self, i: int) -> bytes:
        """One token's bytes (runtime.rag aligns a separate draft's tokens by character offsets)."""
        return bytes([i - self.OFFSET]) if self.OFFSET <= i < 256 + self.OFFSET else b""

    def apply_chat_template(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages) + "<assistant>\n"


def needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


@dataclass(frozen=True)
class PasskeySample:
    id: str
    length: int          # target prompt length in tokens
    depth: float         # requested needle depth, fraction of the filler before the needle
    index: int
    fmt: str
    passkey: str         # 5 digits
    text: str
    prompt: list[int]    # token ids, len(prompt) <= length
    needle_pos: int      # token index where the needle line starts

    @property
    def needle_depth(self) -> float:
        """Where the needle actually sits, as a fraction of the prompt's tokens."""
        return self.needle_pos / len(self.prompt)


def passkey_rng(seed: int, length: int, depth: float, index: int) -> np.random.Generator:
    # SeedSequence of the sample's coordinates: independent streams, no hash() (salted per process)
    return np.random.default_rng([seed, length, int(round(depth * 1000)), index])


def _passkey_text(fmt: str, before: str, key: str, after: str, tok: TextTokenizer) -> tuple[str, str]:
    """(text up to the needle, full text) of one prompt."""
    body_head = f"{HEAD}\n\n{before} "
    body = f"{body_head}{needle(key)} {after}\n\n"
    if fmt == "plain":
        return body_head, f"{body}{QUESTION} {ANSWER_PREFIX}"
    # chat: the question is the user's; the answer's first words are put in the assistant's mouth
    full = tok.apply_chat_template([{"role": "user", "content": f"{body}{QUESTION}"}]) + ANSWER_PREFIX
    upto = tok.apply_chat_template([{"role": "user", "content": body_head}])
    return upto[: upto.index(body_head) + len(body_head)], full


def make_passkey(tok: TextTokenizer, length: int, depth: float, index: int, seed: int = 0,
                 fmt: str = "plain") -> PasskeySample:
    """One passkey prompt of at most `length` tokens (within one filler sentence of it)."""
    if fmt not in FORMATS:
        raise ConfigError(f"passkey format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth={depth} must be a fraction in [0, 1]")
    rng = passkey_rng(seed, length, depth, index)
    key = str(int(rng.integers(10000, 100000)))
    start = int(rng.integers(len(FILLER)))   # where in the filler cycle this sample starts

    def build(n: int) -> tuple[str, str]:
        sents = [FILLER[(start + j) % len(FILLER)] for j in range(n)]
        cut = int(round(depth * n))
        return _passkey_text(fmt, " ".join(sents[:cut]), key, " ".join(sents[cut:]), tok)

    def n_tokens(n: int) -> int:
        return len(tok.encode(build(n)[1]))

    fixed = n_tokens(0)
    if fixed > length:
        raise ConfigError(f"passkey length {length} is shorter than the prompt without filler ({fixed} tokens)")
    per = (n_tokens(20) - fixed) / 20
    n = max(0, int((length - fixed) / per))
    while n > 0 and n_tokens(n) > length:
        n -= 1
    while n_tokens(n + 1) <= length:
        n += 1
    upto, text = build(n)
    sid = f"passkey/{fmt}/L{length}/d{depth:g}/s{seed}/i{index}"
    return PasskeySample(id=sid, length=length, depth=depth, index=index, fmt=fmt, passkey=key, text=text,
                         prompt=tok.encode(text), needle_pos=len(tok.encode(upto)))


def passkey_samples(tok: TextTokenizer, lengths: list[int], depths: list[float], n: int, seed: int = 0,
                    fmt: str = "plain") -> list[PasskeySample]:
    """n samples per (length, depth), index-major so a run with a larger n only appends samples."""
    return [make_passkey(tok, L, d, i, seed, fmt) for i in range(n) for L in lengths for d in depths]


# ----------------------------------------------------------------------------- perplexity

@dataclass(frozen=True)
class TextSample:
    id: str
    context: int
    index: int
    tokens: list[int]    # exactly `context` tokens


def doc_corpus(seed: int = 0) -> str:
    """CPython's pydoc topics, in an order drawn from `seed` (the dict's own order is the stdlib's)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    order = np.random.default_rng(seed).permutation(len(keys))
    return "\n\n".join(topics[keys[i]].strip() for i in order)


def text_samples(tok: TextTokenizer, context: int, n: int, seed: int = 0) -> list[TextSample]:
    """n consecutive, non-overlapping windows of `context` tokens of the seeded corpus."""
    ids = tok.encode(doc_corpus(seed))
    if n * context > len(ids):
        raise ConfigError(f"the pydoc corpus has {len(ids)} tokens: n={n} windows of {context} need "
                          f"{n * context}; lower --n or --context")
    return [TextSample(id=f"ppl/C{context}/s{seed}/i{i}", context=context, index=i,
                       tokens=ids[i * context:(i + 1) * context]) for i in range(n)]
