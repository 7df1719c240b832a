"""RAG KV reuse: a chunk KV store, RoPE re-positioning, and selective recompute (`policy=rag`).

Pipeline for one request (prompt = chunk_1 + ... + chunk_k + question):

1. `ChunkStore.get(ids)`: each chunk's per-layer K/V from a prefill of the chunk alone at
   positions 0..n-1 (keys already RoPE-rotated), held in host memory and on disk (safetensors
   under `$KVTESTBED_CACHE/chunks`, default `~/.cache/kvtestbed/chunks`). The file name is a
   content hash of (model identity, K/V dtype, token ids); the same key and a SHA-256 of the
   tensors are stored in the file's metadata, so a stale, renamed or corrupt file is detected
   and recomputed, never trusted. Files are written to a temp name and renamed (atomic).
2. `rerotate(k, offset)`: a chunk placed at offset o has its keys rotated by angle(o) with
   `runtime.model.apply_rope` (half-split pairing): R(o) R(p) = R(p + o), so the keys equal a
   direct prefill of the chunk alone at positions o..o+n-1 (to float rounding).
3. `rag_prefill`: a selector picks at most ceil(r * N) of the N context tokens; these plus
   every question token are recomputed by the target layer by layer with full causal attention
   over all N + Q positions (reused K/V rows for the others), overwriting the reused rows.
   The result is an `engine.Prefilled`, so decoding continues under any KV policy.

Selectors: full (all, whatever r), reuse (none, whatever r), random (seeded), epic (the first
tokens of every chunk: n = ceil(r * chunk), round-robin so the total stays within the budget;
or the paper's fixed `epic_prefix` = 8 / 16 / 32 tokens per chunk, r ignored), cacheblend
(largest K/V deviation at layer 1 = the second block, after a full recompute of layer 0:
deviation = ||dK||_2 + ||dV||_2 over all KV heads of a token; K and V both), draft (SpecCache:
hidden-state norms of the first D blocks, global top tokens plus span completion).

The draft is the target's first D blocks (it shares the tokenizer), or a separate model
(`draft_model`: a GGUF file or a transformers folder). A separate draft with another tokenizer
reads the prompt's text (the target's tokens decoded byte-exactly); its tokens' character
offsets (`tokenizers` encodings) map each draft token to every target token it overlaps, and
a draft token is chosen with all of those (the budget counts target tokens).

`bench_rag` is `python -m runtime.bench policy=rag`: the prompt cut into chunks of `chunk_len`
and a `question_len`-token question (the simulator twin cuts it the same way), a warm store,
TTFT = rag_prefill + the first token, then decoding under a plain full-precision cache.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .engine import BatchResult, PeakMemory, Prefilled, SamplingParams, generate, prefill_once, sync
from .errors import ConfigError
from .kv import make_cache, policy_spec, resolve_kv_dtype
from .kv.base import Step, sdpa_gqa
from .model import Transformer, apply_rope

SELECTORS = ("full", "reuse", "random", "epic", "cacheblend", "draft")
FORMAT = "kvtestbed-chunk-v1"


# ----------------------------------------------------------------------------- config checks

STORES = ("warm", "disk")         # policy.store: where a request finds its chunks' K/V


def _get(policy, name, default):
    return getattr(policy, name, default) if policy is not None else default


def check_policy(policy, model: Transformer, separate_draft: bool = False) -> None:
    """Raise ConfigError (one line naming the field) for a bad `policy=rag` config.
    separate_draft: a Draft is given, so draft_layers is checked against it, not the target."""
    sel = _get(policy, "selector", "draft")
    if sel not in SELECTORS:
        raise ConfigError(f"policy.selector={sel!r} is not known; choose one of: {', '.join(SELECTORS)}")
    store = _get(policy, "store", "warm")
    if store not in STORES:
        raise ConfigError(f"policy.store={store!r} is not known; choose one of: {', '.join(STORES)}")
    r = float(_get(policy, "recompute_ratio", 0.15))
    if not (0.0 <= r <= 1.0) or math.isnan(r):
        raise ConfigError(f"policy.recompute_ratio={r} must be in [0, 1]")
    cl = int(_get(policy, "chunk_len", 512))
    if cl <= 0 or cl > model.args.max_seq_len:
        raise ConfigError(f"policy.chunk_len={cl} must be in [1, {model.args.max_seq_len}] (the model's context)")
    D = int(_get(policy, "draft_layers", 5))
    separate = separate_draft or _get(policy, "draft_model", None) is not None
    if sel == "draft" and not separate and not 1 <= D <= model.args.n_layers:
        raise ConfigError(f"policy.draft_layers={D} must be in [1, {model.args.n_layers}] (the model's layers)")
    for f in ("tau_smooth", "tau_cover"):
        t = float(_get(policy, f, 0.5))
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"policy.{f}={t} must be in [0, 1]")
    sm = int(_get(policy, "span_max", 16))
    if sm < 1:
        raise ConfigError(f"policy.span_max={sm} must be >= 1")
    ep = _get(policy, "epic_prefix", None)
    if ep is not None and int(ep) < 1:
        raise ConfigError(f"policy.epic_prefix={ep} must be >= 1 (tokens per chunk) or null (= ceil(r * chunk))")
    ql = int(_get(policy, "question_len", 32))
    if ql < 1:
        raise ConfigError(f"policy.question_len={ql} must be >= 1 (a rag prompt ends with a question)")
    dm = _get(policy, "draft_model", None)
    if sel == "draft" and dm is not None and not Path(str(dm)).expanduser().exists():
        raise ConfigError(f"policy.draft_model={dm}: no such file or folder; give a GGUF file or a local "
                          "transformers folder, or null (= the target's first draft_layers layers)")


def split_chunks(ids: list[int], chunk_len: int) -> list[list[int]]:
    """A document's token ids cut into chunks of `chunk_len` (the last one may be shorter)."""
    if chunk_len <= 0:
        raise ConfigError(f"policy.chunk_len={chunk_len} must be >= 1")
    return [list(ids[i:i + chunk_len]) for i in range(0, len(ids), chunk_len)]


def split_prompt(prompt: list[int], chunk_len: int, question_len: int) -> tuple[list[list[int]], list[int]]:
    """A benchmark prompt as (chunks, question): the last `question_len` tokens are the question
    (all of them if the prompt is shorter), the rest chunks of `chunk_len`, the last one
    possibly shorter. simulator/rag.py cuts a prompt length the same way (Rag.split/chunks)."""
    q = min(question_len, len(prompt))
    n = len(prompt) - q
    return split_chunks(prompt[:n], chunk_len), list(prompt[n:])


# ----------------------------------------------------------------------------- chunk store

def default_cache_dir() -> Path:
    from .machine import cache_root

    return cache_root() / "chunks"


def model_identity(model: Transformer) -> str:
    """SHA-256 over the ModelArgs, the weights' dtype, and every weight tensor's name, shape,
    sum and sum of squares (float64): a changed weight changes the identity."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.args), sort_keys=True).encode())
    h.update(str(model.dtype).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name in ("rope_cos", "rope_sin"):
                continue
            t64 = t.detach().to(torch.float64)
            h.update(f"{name}:{tuple(t.shape)}:{float(t64.sum())!r}:{float(t64.square().sum())!r}".encode())
    return h.hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


ChunkKV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v (1, H_kv, n, D)


class ChunkStore:
    """Per-chunk K/V (positions 0..n-1) in host memory and on disk; see the module docstring.

    A store is bound to the model's weights as they are when it is built (the identity is
    hashed once); build a new store after changing weights in place.
    """

    def __init__(self, model: Transformer, root: str | os.PathLike | None = None, kv_dtype: str = "auto",
                 disk: bool = True):
        self.model = model
        self.root = Path(root) if root is not None else default_cache_dir()
        self.kv_dtype = kv_dtype
        self.dtype = resolve_kv_dtype(kv_dtype, model.device)
        self.disk = disk
        self.model_id = model_identity(model)
        self.mem: dict[str, ChunkKV] = {}
        self.stats = {"mem_hits": 0, "disk_hits": 0, "computed": 0, "stale": 0, "corrupt": 0}

    def key(self, ids: list[int]) -> str:
        h = hashlib.sha256()
        h.update(FORMAT.encode())
        h.update(self.model_id.encode())
        h.update(str(self.dtype).encode())
        h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
        return h.hexdigest()

    def path(self, ids: list[int]) -> Path:
        return self.root / f"{self.key(ids)}.safetensors"

    def get(self, ids: list[int]) -> ChunkKV:
        ids = list(ids)
        if not ids:
            raise ConfigError("a chunk is empty; every chunk needs at least one token")
        if len(ids) > self.model.args.max_seq_len:
            raise ConfigError(f"a chunk has {len(ids)} tokens > the model's context of "
                              f"{self.model.args.max_seq_len}; lower policy.chunk_len")
        key = self.key(ids)
        if key in self.mem:
            self.stats["mem_hits"] += 1
            return self.mem[key]
        kv = self._read(key, len(ids)) if self.disk else None
        if kv is not None:
            self.stats["disk_hits"] += 1
        else:
            kv = self._compute(ids)
            self.stats["computed"] += 1
            if self.disk:
                self._write(key, kv, len(ids))
        self.mem[key] = kv
        return kv

    def _compute(self, ids: list[int]) -> ChunkKV:
        pre = prefill_once(self.model, [ids], kv_dtype=self.kv_dtype)
        return [(k.to(self.dtype), v.to(self.dtype)) for k, v in pre.kv]

    def _read(self, key: str, n: int) -> ChunkKV | None:
        from safetensors import safe_open

        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key") != key:
                    self.stats["stale"] += 1
                    return None
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get("sha256") != _tensor_digest(tensors):
                self.stats["corrupt"] += 1
                return None
            L = self.model.args.n_layers
            kv = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(L)]
            want = (1, self.model.args.n_kv_heads, n, self.model.args.head_dim)
            if any(tuple(t.shape) != want or t.dtype != self.dtype for pair in kv for t in pair):
                self.stats["corrupt"] += 1
                return None
        except Exception:   # truncated / garbage file, missing tensor: recompute, never trust
            self.stats["corrupt"] += 1
            return None
        return [(k.to(self.model.device), v.to(self.model.device)) for k, v in kv]

    def _write(self, key: str, kv: ChunkKV, n: int) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for i, (k, v) in enumerate(kv):
            tensors[f"k.{i}"] = k.detach().contiguous().cpu()
            tensors[f"v.{i}"] = v.detach().contiguous().cpu()
        meta = {"format": FORMAT, "key": key, "model_id": self.model_id, "n_tokens": str(n),
                "sha256": _tensor_digest(tensors)}
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.root / f"{key}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ----------------------------------------------------------------------------- RoPE re-positioning

def rerotate(model: Transformer, k: torch.Tensor, offset: int) -> torch.Tensor:
    """Keys (B, H_kv, n, D) rotated at positions 0..n-1 -> the same keys at offset..offset+n-1."""
    if offset == 0:
        return k
    cos = model.rope_cos[offset].view(1, 1, 1, -1)
    sin = model.rope_sin[offset].view(1, 1, 1, -1)
    return apply_rope(k, cos, sin)


def prefill_at(model: Transformer, ids: list[int], offset: int, kv_dtype: str = "auto") -> ChunkKV:
    """A direct prefill of `ids` alone at positions offset..offset+n-1 (the re-rotation reference)."""
    n = len(ids)
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    cache = make_cache(policy_spec("full", kv_dtype), n_layers=model.args.n_layers, batch=1, n_kv_heads=model.args.n_kv_heads,
                       head_dim=model.args.head_dim, capacity=n, device=model.device)
    pad = torch.zeros(1, dtype=torch.long, device=model.device)
    pos = torch.arange(offset, offset + n, device=model.device)[None]
    model(tokens, cache, Step(start=0, n_new=n, pad=pad, positions=pos), last_only=True)
    return [(layer.k[:, :, :n].clone(), layer.v[:, :, :n].clone()) for layer in cache.layers]


def placed_kv(model: Transformer, store: ChunkStore, chunks: list[list[int]]) -> ChunkKV:
    """The chunks' stored K/V concatenated, each re-rotated to its offset in the prompt."""
    per_layer: list[tuple[list, list]] = [([], []) for _ in range(model.args.n_layers)]
    off = 0
    for ids in chunks:
        kv = store.get(ids)
        for i, (k, v) in enumerate(kv):
            per_layer[i][0].append(rerotate(model, k, off))
            per_layer[i][1].append(v)
        off += len(ids)
    return [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in per_layer]


# ----------------------------------------------------------------------------- selectors

def budget_of(r: float, n_ctx: int) -> int:
    return min(n_ctx, math.ceil(r * n_ctx - 1e-9))


def span_complete(scores: torch.Tensor, budget: int, tau_smooth: float = 0.4, tau_cover: float = 0.7,
                  span_max: int = 16, cover: list[list[int]] | None = None
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
    from .model import load_gguf, load_hf
    from .tokenizer import from_gguf, from_hf

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


def separate_draft_select(draft: Draft, prompt: list[int], n_ctx: int, budget: int, D: int, policy
                          ) -> tuple[list[int], dict]:
    """SpecCache with a separate draft: score the draft's own tokens, select with span completion
    in the draft's sequence, and map to target positions (< n_ctx) by character overlap."""
    if not 1 <= D <= draft.model.args.n_layers:
        raise ConfigError(f"policy.draft_layers={D} must be in [1, {draft.model.args.n_layers}] "
                          f"(the layers of policy.draft_model={draft.name})")
    knobs = (float(_get(policy, "tau_smooth", 0.4)), float(_get(policy, "tau_cover", 0.7)),
             int(_get(policy, "span_max", 16)))
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
    chosen_d, taken, spans = _greedy_spans(scores, budget, *knobs, cover)
    chosen = sorted(taken) if cover is not None else sorted(chosen_d)
    top = torch.topk(scores, min(8, n_d)).indices if n_d else torch.zeros(0, dtype=torch.long)
    info = dict(draft_model=draft.name, draft_layers=D, n_spans=len(spans), chosen=chosen,
                draft_tokens=len(ids), aligned=cover is not None, draft_chosen=sorted(chosen_d),
                top_scores=[(int(i), float(scores[i])) for i in top])
    return chosen, info


# ----------------------------------------------------------------------------- selectors (dispatch)

def select(selector: str, *, r: float, chunks: list[list[int]], model: Transformer, prompt: list[int],
           reused: ChunkKV, policy=None, draft: Draft | None = None) -> tuple[list[int], dict]:
    """Context positions (sorted, < N) to recompute, within ceil(r*N); and what was chosen (log).
    epic with a fixed `epic_prefix` ignores r: its budget is the prefixes' total."""
    lens = [len(c) for c in chunks]
    N = sum(lens)
    B = budget_of(r, N)
    info: dict = {"selector": selector, "n_ctx": N, "budget": B}
    if selector == "full":
        info["budget"] = N
        return list(range(N)), info
    prefix = _get(policy, "epic_prefix", None)
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
    if selector == "random":
        g = torch.Generator().manual_seed(int(_get(policy, "seed", 0)))
        return sorted(torch.randperm(N, generator=g)[:B].tolist()), info
    if selector == "epic":
        cands = []
        off = 0
        for c, n in enumerate(lens):
            take = math.ceil(r * n - 1e-9)
            cands += [(j, c, off + j) for j in range(min(take, n))]
            off += n
        cands.sort()
        return sorted(p for _, _, p in cands[:B]), info
    if selector == "cacheblend":
        dev = _cacheblend_deviation(model, prompt, reused, N)
        top = torch.topk(dev, B).indices
        info["deviation_top"] = [(int(i), float(dev[i])) for i in top[:8]]
        return sorted(top.tolist()), info
    if selector == "draft":
        D = int(_get(policy, "draft_layers", 5))
        if draft is not None:
            chosen, more = separate_draft_select(draft, prompt, N, B, D, policy)
            info.update(more)
            return chosen, info
        scores = draft_scores(model, prompt, D)[:N]
        chosen, spans = span_complete(scores, B, float(_get(policy, "tau_smooth", 0.4)),
                                      float(_get(policy, "tau_cover", 0.7)), int(_get(policy, "span_max", 16)))
        top = torch.topk(scores, min(8, N)).indices
        info.update(draft_layers=D, n_spans=len(spans), chosen=chosen,
                    top_scores=[(int(i), float(scores[i])) for i in top])   # attention sinks show up here
        return chosen, info
    raise ConfigError(f"policy.selector={selector!r} is not known; choose one of: {', '.join(SELECTORS)}")


# ----------------------------------------------------------------------------- selective recompute

def _qkv(block, x, cos, sin):
    att = block.attention
    H, Hkv, D = att.n_heads, att.n_kv_heads, att.head_dim
    B, T, _ = x.shape
    q, k, v = att.wqkv(block.attention_norm(x)).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


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
        for li, block in enumerate(model.layers):
            att = block.attention
            q, k, v = _qkv(block, x, cos, sin)
            Hkv, D = att.n_kv_heads, att.head_dim
            K = torch.zeros(1, Hkv, T, D, dtype=kv_dtype, device=dev)
            V = torch.zeros(1, Hkv, T, D, dtype=kv_dtype, device=dev)
            if N:
                K[:, :, :N] = reused[li][0]
                V[:, :, :N] = reused[li][1]
            K[:, :, R] = k.to(kv_dtype)
            V[:, :, R] = v.to(kv_dtype)
            o = sdpa_gqa(q.to(kv_dtype), K, V, mask).to(x.dtype)                  # (1, H, m, D)
            x = x + att.wo(o.transpose(1, 2).reshape(1, m, att.n_heads * D))
            x = x + block.feed_forward(block.ffn_norm(x))
            out.append((K, V))
        logits = model.output(model.norm(x[:, -1:])).float()[:, -1]
    return out, logits


@dataclass
class RagResult:
    prefilled: Prefilled
    chosen: list[int]             # context positions recomputed (within the budget)
    recomputed: list[int]         # chosen + every question position
    info: dict = field(default_factory=dict)


def rag_prefill(model: Transformer, chunks: list[list[int]], question: list[int], policy,
                store: ChunkStore | None = None, *, draft: Draft | None = None, tokenizer=None) -> RagResult:
    """`policy=rag` prefill of prompt = chunks + question; see the module docstring.

    draft / tokenizer: with `policy.draft_model` set, a loaded `Draft`, or the target's
    tokenizer to load one with (`load_draft`, cached per process). info["time"] holds the
    phases' seconds (placing the reused K/V, the selector, the selective recompute)."""
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
    kv_dtype = _get(policy, "kv_dtype", "auto")
    if store is None:
        store = ChunkStore(model, kv_dtype=kv_dtype)
    selector = _get(policy, "selector", "draft")
    dm = _get(policy, "draft_model", None)
    if selector == "draft" and dm is not None and draft is None:
        draft = load_draft(dm, model, tokenizer)
    dtype = store.dtype
    N = len(prompt) - len(question)
    dev = model.device
    times = {}
    sync(dev)
    t = time.perf_counter()
    reused = placed_kv(model, store, chunks) if chunks else []
    sync(dev)
    times["place_s"], t = time.perf_counter() - t, time.perf_counter()
    r = float(_get(policy, "recompute_ratio", 0.15))
    chosen, info = select(selector, r=r, chunks=chunks, model=model, prompt=prompt, reused=reused, policy=policy,
                          draft=draft if selector == "draft" else None)
    sync(dev)
    times["select_s"], t = time.perf_counter() - t, time.perf_counter()
    recompute = sorted(chosen) + list(range(N, len(prompt)))
    kv, logits = selective_prefill(model, prompt, reused, recompute, dtype)
    sync(dev)
    times["recompute_s"] = time.perf_counter() - t
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    info["store"] = dict(store.stats)
    info["time"] = times
    return RagResult(Prefilled(prompts=[prompt], pad=pad, kv=kv, logits=logits), chosen, recompute, info)


# ----------------------------------------------------------------------------- runtime.bench policy=rag

def target_tokenizer(model_cfg):
    """The target's tokenizer from its model config (for a separate draft's alignment); None for a
    random model (its ids mean nothing)."""
    from .tokenizer import from_gguf, from_hf

    source = getattr(model_cfg, "source", "random")
    if source == "gguf":
        return from_gguf(getattr(model_cfg, "path", None))
    if source == "hf" and getattr(model_cfg, "path", None):
        return from_hf(model_cfg.path)
    return None


def bench_rag(model: Transformer, cfg, prompt: list[int], params: SamplingParams, *, link=None,
              tokenizer=None) -> list[BatchResult]:
    """`python -m runtime.bench policy=rag`: one request per timed run, the engine's results.

    The prompt is cut by `split_prompt` (chunks of policy.chunk_len, a policy.question_len-token
    question), the chunk store is warmed untimed (host memory: the issue's default workload is
    a warm store; nothing of random-token prompts lands on disk), then each repeat times
    rag_prefill and decodes gen_len tokens from its Prefilled under a plain full-precision cache
    (`engine.generate(prefilled=...)`). TTFT = rag_prefill + loading its K/V + the first token.
    policy_stats: the selection (n_ctx, budget, chosen, recomputed) and the phases' seconds."""
    p, w = cfg.policy, cfg.workload
    if w.batch != 1:
        raise ConfigError(f"workload.batch={w.batch}: policy=rag runs one request at a time in runtime.bench "
                          "(set workload.batch=1; the simulator twin batches RAG prefills)")
    check_policy(p, model)
    chunks, question = split_prompt(prompt, int(p.chunk_len), int(p.question_len))
    draft = None
    if p.selector == "draft" and p.draft_model is not None:
        draft = load_draft(p.draft_model, model, tokenizer if tokenizer is not None else target_tokenizer(cfg.model))
    decode_policy = policy_spec("full", p.kv_dtype)
    on_disk = getattr(p, "store", "warm") == "disk"
    scratch = tempfile.TemporaryDirectory(prefix="kvtestbed-rag-") if on_disk else None
    store = ChunkStore(model, root=scratch.name if scratch else None, kv_dtype=p.kv_dtype, disk=on_disk)
    for c in chunks:                                      # fill the store, untimed
        store.get(c)
    if cfg.warmup:                                        # allocator, kernels: a tiny rag prompt, untimed
        small = [c[:8] for c in chunks[:2]]
        pre = rag_prefill(model, small, question[:8], p, store, draft=draft)
        generate(model, pre.prefilled.prompts, SamplingParams(max_new_tokens=2), decode_policy,
                 link=link, prefilled=pre.prefilled)
    runs = []
    for _ in range(cfg.repeats):
        if on_disk:              # store=disk: every chunk is read back from its file (the OS may cache it)
            store.mem.clear()
        with PeakMemory(model.device) as mem:
            sync(model.device)
            t0 = time.perf_counter()
            res = rag_prefill(model, chunks, question, p, store, draft=draft)
            sync(model.device)
            rag_s = time.perf_counter() - t0
        run = generate(model, [prompt], params, decode_policy, link=link, prefilled=res.prefilled,
                       progress=bool(getattr(cfg, "progress", False)))
        runs.append(_shifted(run, rag_s, mem.peak, res))
    runs[-1].policy_stats.update({f"store_{k}": v for k, v in store.stats.items()})
    if scratch:
        scratch.cleanup()
    return runs


def _shifted(run: BatchResult, rag_s: float, rag_peak: int, res: RagResult) -> BatchResult:
    """generate() timed from the loaded prefill: move its clock back to rag_prefill's start."""
    reqs = [replace(r, ttft_s=r.ttft_s + rag_s) for r in run.requests]
    info = res.info
    stats = {**run.policy_stats, "n_ctx": info["n_ctx"], "budget": info["budget"], "chosen": len(res.chosen),
             "recomputed": len(res.recomputed), "question_len": len(res.recomputed) - len(res.chosen),
             "rag_prefill_s": rag_s, **info["time"]}
    if "draft_layers" in info:
        stats["draft_layers"] = info["draft_layers"]
    return replace(run, requests=reqs, wall_s=run.wall_s + rag_s, prefill_s=run.prefill_s + rag_s,
                   peak_mem_bytes=max(run.peak_mem_bytes, rag_peak), policy_stats=stats)
