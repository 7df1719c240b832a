"""A separate draft model (`policy.draft_model`: a GGUF file or a transformers folder) and the
alignment of its tokens to the target's: the target's tokens decoded byte-exactly to text, the
draft's tokens' character offsets mapped to every target token they overlap."""
from __future__ import annotations

import codecs
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from core.policies.rag import knob

from ..model import Transformer
from .selectors import _greedy_spans, draft_scores


@dataclass
class Draft:
    """A separate draft model (`policy.draft_model`), its tokenizer, and the target's tokenizer
    (to turn the target's token ids into the text the draft reads)."""
    model: Transformer
    tok: Any                  # the draft's: runtime.tokenizer.Tokenizer or a tokenizers.Tokenizer
    target_tok: Any           # the target's: the same kinds, or evals' ByteTokenizer (token_bytes)
    name: str = "draft"       # what policy.draft_model said, for error messages

    @functools.cached_property
    def same_tokenizer(self) -> bool:
        """Same vocabulary and rules (the serialised `tokenizers` pipeline): ids are shared and
        the alignment is the identity, with no text round trip."""
        a, b = _hf(self.tok), _hf(self.target_tok)
        if a is b:
            return True
        to_str = getattr(a, "to_str", None)
        return to_str is not None and hasattr(b, "to_str") and a.to_str() == b.to_str()


def _hf(tok):
    """The `tokenizers.Tokenizer` inside runtime.tokenizer.Tokenizer (or the object itself)."""
    return getattr(tok, "tok", tok)


@functools.lru_cache(maxsize=1)
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte (the inverse of its bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for byte in range(256):
        if byte not in bs:
            bs.append(byte)
            cs.append(256 + n)
            n += 1
    return {chr(c): byte for byte, c in zip(bs, cs)}


def token_bytes(tok, ids: list[int]) -> list[bytes]:
    """Each target token's bytes, so that their concatenation is the prompt's exact text (a token
    may hold half a UTF-8 character). Byte-level BPE (GPT-2 alphabet) maps token strings back
    to bytes; other tokenizers must decode token by token to the same text as all at once."""
    if hasattr(tok, "token_bytes"):                       # evals' ByteTokenizer
        return [tok.token_bytes(i) for i in ids]
    hf = _hf(tok)
    from tokenizers import decoders

    if isinstance(getattr(hf, "decoder", None), decoders.ByteLevel):
        dec = _gpt2_byte_decoder()
        out = []
        for i in ids:
            t = hf.id_to_token(i) or ""
            out.append(bytes(dec[c] for c in t) if all(c in dec for c in t) else t.encode())   # added tokens: as written
        return out
    pieces = [hf.decode([i], skip_special_tokens=False) for i in ids]
    if "".join(pieces) != hf.decode(ids, skip_special_tokens=False):
        raise ConfigError("policy.draft_model: the target's tokenizer does not decode token by token to its text "
                          "(not byte-level BPE), so its tokens have no character offsets to align a separate draft "
                          "with; use draft_model=null (the target's first draft_layers layers)")
    return [p.encode() for p in pieces]


def text_and_offsets(pieces: list[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """The text of per-token bytes and each token's character span [start, end). A token that
    only starts a multi-byte character owns that character too (span start..start+1), so it
    overlaps whatever covers the character; invalid bytes decode to U+FFFD (random-token
    benchmark prompts)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts, offs, n = [], [], 0
    for i, b in enumerate(pieces):
        out = dec.decode(b, final=i == len(pieces) - 1)
        parts.append(out)
        offs.append((n, n + max(len(out), 1)))
        n += len(out)
    text = "".join(parts)
    return text, [(a, min(e, max(len(text), a))) for a, e in offs]


def encode_with_offsets(tok, text: str, name: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The draft's token ids and character offsets of `text` (`tokenizers` encodings, or a
    transformers tokenizer's return_offsets_mapping). ConfigError naming the draft when its
    tokenizer gives none (a slow / SentencePiece-only tokenizer)."""
    hf = _hf(tok)
    ids = offs = None
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(hf, HFTokenizer):
        enc = hf.encode(text, add_special_tokens=False)
        ids, offs = list(enc.ids), [tuple(o) for o in enc.offsets]
    elif callable(hf):                                    # a transformers tokenizer
        try:
            enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, KeyError, TypeError, ValueError):
            ids = offs = None
    if offs is None or len(offs) != len(ids) or (text.strip() and offs and all(a == b for a, b in offs)):
        raise ConfigError(f"policy.draft_model={name}: its tokenizer gives no character offsets, so its tokens "
                          "cannot be aligned with the target's; use a draft with a fast tokenizer "
                          "(tokenizer.json) or the target's own tokenizer")
    return ids, offs


def align(draft_offsets: list[tuple[int, int]], target_offsets: list[tuple[int, int]],
          n_target: int | None = None) -> list[list[int]]:
    """For each draft token, the target tokens (positions < n_target) whose character spans
    overlap its span (a shared character; empty spans overlap nothing). Both offset lists are in
    text order, so one sweep does it."""
    n_target = len(target_offsets) if n_target is None else n_target
    out: list[list[int]] = []
    lo = 0
    for a, b in draft_offsets:
        while lo < n_target and target_offsets[lo][1] <= a:
            lo += 1
        hits = []
        j = lo
        while a < b and j < n_target and target_offsets[j][0] < b:
            c, d = target_offsets[j]
            if c < d and c < b and a < d:
                hits.append(j)
            j += 1
        out.append(hits)
    return out


@functools.lru_cache(maxsize=2)
def _load_draft_model(path: str, dtype: torch.dtype, device: str) -> tuple[Transformer, Any]:
    from ..loaders import load_gguf, load_hf
    from ..tokenizer import from_gguf, from_hf

    p = Path(path).expanduser()
    if p.is_file():
        return load_gguf(p, dtype, device), from_gguf(p)
    if not (p / "tokenizer.json").is_file():
        raise ConfigError(f"policy.draft_model={path}: no tokenizer.json, so its tokenizer gives no character "
                          "offsets to align with the target's; use a folder with a fast tokenizer (tokenizer.json)")
    return load_hf(p, dtype, device), from_hf(p)


def load_draft(path: str, target: Transformer, target_tok) -> Draft:
    """`policy.draft_model` loaded once per process (GGUF file or transformers folder), in the
    target's dtype and device."""
    if target_tok is None:
        raise ConfigError(f"policy.draft_model={path} needs the target's tokenizer to align tokens, and this "
                          "target has none (a random model); use draft_model=null or a GGUF / hf target")
    if not Path(str(path)).expanduser().exists():
        raise ConfigError(f"policy.draft_model={path}: no such file or folder")
    model, tok = _load_draft_model(str(path), target.dtype, str(target.device))
    return Draft(model=model, tok=tok, target_tok=target_tok, name=str(path))


def separate_draft_select(draft: Draft, prompt: list[int], n_ctx: int, budget: int, D: int, policy,
                          pre: list[int] | None = None) -> tuple[list[int], dict]:
    """SpecCache with a separate draft: score the draft's own tokens, select with span completion
    in the draft's sequence, and map to target positions (< n_ctx) by character overlap.
    pre: target positions taken first (the sink tokens), inside the budget."""
    if not 1 <= D <= draft.model.args.n_layers:
        raise ConfigError(f"policy.draft_layers={D} must be in [1, {draft.model.args.n_layers}] "
                          f"(the layers of policy.draft_model={draft.name})")
    knobs = (float(knob(policy, "tau_smooth")), float(knob(policy, "tau_cover")),
             int(knob(policy, "span_max")))
    if draft.same_tokenizer:                              # shared ids: the identity alignment
        ids, cover, n_d = prompt, None, n_ctx
    else:
        text, t_offs = text_and_offsets(token_bytes(draft.target_tok, prompt))
        ids, d_offs = encode_with_offsets(draft.tok, text, draft.name)
        cover = align(d_offs, t_offs, n_ctx)
        n_d = max((j + 1 for j, c in enumerate(cover) if c), default=0)   # draft tokens touching the chunks
        cover = cover[:n_d]
    if len(ids) > draft.model.args.max_seq_len or (ids and max(ids) >= draft.model.args.vocab_size):
        raise ConfigError(f"policy.draft_model={draft.name}: the prompt is {len(ids)} draft tokens (max id "
                          f"{max(ids, default=0)}), beyond its context {draft.model.args.max_seq_len} or vocab "
                          f"{draft.model.args.vocab_size}")
    scores = draft_scores(draft.model, ids, D)[:n_d]
    chosen_d, taken, spans = _greedy_spans(scores, budget, *knobs, cover, pre)
    chosen = sorted(taken) if cover is not None else sorted(chosen_d)
    top = torch.topk(scores, min(8, n_d)).indices if n_d else torch.zeros(0, dtype=torch.long)
    info = dict(draft_model=draft.name, draft_layers=D, n_spans=len(spans), chosen=chosen,
                draft_tokens=len(ids), aligned=cover is not None, draft_chosen=sorted(chosen_d),
                top_scores=[(int(i), float(scores[i])) for i in top])
    return chosen, info
