"""The per-layer KV-policy interface.

Attention in `runtime/model.py` never touches K/V storage itself: each layer hands its new,
already RoPE-rotated keys and values plus its queries to a `LayerKV`, which stores them however
the policy wants (full precision, offloaded, low-bit, ...) and returns the attention output.
That is why a policy owns `attend` rather than a `get/update` pair: low-bit and top-k policies
compute attention differently, not just store differently (the HF `Cache.update` shape forces a
dequantized copy of the whole cache every step).

Batches use *left padding*: row b of a batch has `pad[b]` pad columns before its first real
token, so every row appends its next token at the same column and the cache stays a dense
(B, H_kv, T, D) tensor. Pad columns are never valid keys, and a policy that keeps statistics
(quantization ranges, top-k scores) must exclude them: `Step.valid_keys` says which columns hold
real tokens.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from core.policies import PolicyConfig, Registry

POLICIES = Registry("runtime.kv")     # name -> LayerKV class: runtime/kv/<name>.py, or a plugin's `kv`


def register(name, cls: type | None = None):
    """Enter a runtime policy (a LayerKV subclass with `build`) in POLICIES: `@register` on a
    class with a `declaration` (its name is the declaration's), or `register(name, cls)` (a
    plugin's `kv` module)."""
    if cls is None and isinstance(name, type):
        return POLICIES.add(name.declaration.name, name)
    return POLICIES.add(name, cls)


@dataclass
class Step:
    """What one forward pass over the batch is; shared by every layer of that pass."""

    start: int              # cache column where the first new token goes (same for all rows)
    n_new: int              # new tokens per row in this pass (prompt length on prefill, 1 on decode)
    pad: torch.Tensor       # (B,) long: left-pad columns of each row
    positions: torch.Tensor # (B, n_new) long: RoPE position of each new token (pads clamp to 0)
    spec: bool = False      # the last new token is a speculative guess: it attends, it is never stored
    # per-pass memo: every layer of a pass asks for the same mask; building it (and the
    # `pad.any()` behind has_pad, a host sync on CUDA) once per pass instead of once per layer
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # derived once: a step is never changed after it is made
    end: int = field(init=False, repr=False, compare=False)         # column after the last new token (a guess included)
    n_store: int = field(init=False, repr=False, compare=False)     # new tokens that enter the cache (all but a guess)
    stored_end: int = field(init=False, repr=False, compare=False)  # column after the last stored token

    def __post_init__(self):
        self.n_store = self.n_new - int(self.spec)
        self.end, self.stored_end = self.start + self.n_new, self.start + self.n_store

    @property
    def is_prefill(self) -> bool:
        return self.start == 0

    @property
    def has_pad(self) -> bool:
        if "has_pad" not in self._memo:
            self._memo["has_pad"] = bool((self.pad > 0).any())
        return self._memo["has_pad"]

    def valid_keys(self, t_k: int | None = None) -> torch.Tensor:
        """(B, t_k) bool: True where a cache column holds a real token of that row."""
        t_k = self.end if t_k is None else t_k
        cols = torch.arange(t_k, device=self.pad.device)
        return cols[None, :] >= self.pad[:, None]

    def mask(self, t_k: int | None = None, group: int = 1) -> torch.Tensor | None:
        """(B, 1, n_new, t_k) bool attention mask (True = attend), or None when none is needed.

        Query i (column start+i) sees real keys at columns <= start+i. A pad query would see no
        key at all and SDPA would return NaN, so pad queries see themselves: their outputs are
        never used, they only have to stay finite.

        group > 1: the mask of G = group folded query heads, (B, 1, G * n_new, t_k) in (g, t)
        row order (see `sdpa_gqa`). Built once per pass and shared by the layers: callers must
        not modify it in place.
        """
        t_k = self.end if t_k is None else t_k
        if self.n_new == 1 and not self.has_pad:
            return None
        key = ("mask", t_k, group)
        if key not in self._memo:
            m = self._mask(t_k)
            self._memo[key] = m.repeat(1, 1, group, 1) if group > 1 else m
        return self._memo[key]

    def _mask(self, t_k: int) -> torch.Tensor:
        dev = self.pad.device
        q_cols = self.start + torch.arange(self.n_new, device=dev)  # (T,)
        k_cols = torch.arange(t_k, device=dev)                       # (Tk,)
        causal = k_cols[None, :] <= q_cols[:, None]                  # (T, Tk)
        m = causal[None] & self.valid_keys(t_k)[:, None, :]          # (B, T, Tk)
        m = m | (k_cols[None, None, :] == q_cols[None, :, None])     # pad queries see themselves
        return m[:, None]                                            # (B, 1, T, Tk)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention without repeating K/V.

    q: (B, H, T, D); k, v: (B, H_kv, Tk, D); mask: (B, 1, T, Tk) bool or None.
    Query head h uses KV head h // G (G = H / H_kv, the HF `repeat_kv` order). The G query heads
    of one KV head are folded into the query-length axis, so one SDPA call per KV head reads each
    K/V row once instead of G times.
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    qf = q.reshape(B, H_kv, G * T, D)                  # rows ordered (g, t)
    if mask is not None and G > 1 and mask.shape[2] != G * T:
        mask = mask.repeat(1, 1, G, 1)                 # (B, 1, G*T, Tk), same (g, t) order
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)  # (B, H_kv, G*T, D)
    return o.reshape(B, H, T, D)


def attention_reference(q, k, v, mask):
    """Dense attention written out by hand (repeat K/V, softmax). Tests compare against it."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.double()).to(q.dtype)


@dataclass
class CacheShape:
    n_layers: int
    batch: int
    n_kv_heads: int
    head_dim: int
    capacity: int           # columns the engine expects to write (prompt + new tokens)
    dtype: torch.dtype      # the dtype K/V are held in (`policy.kv_dtype` resolved)
    device: torch.device

    def buffer(self, pin: bool = False) -> torch.Tensor:
        """An empty (B, H_kv, capacity, D) K or V buffer; `pin` = page-locked host memory."""
        shape = (self.batch, self.n_kv_heads, max(self.capacity, 1), self.head_dim)
        if pin:
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        return torch.empty(shape, dtype=self.dtype, device=self.device)


def grow_columns(t: torch.Tensor, need: int, keep: int | None = None) -> torch.Tensor:
    """`t` with at least `need` entries along dim 2 (doubling), the first `keep` (default all)
    copied over; pinned stays pinned. Returns `t` itself when it is already big enough."""
    cap = t.shape[2]
    if need <= cap:
        return t
    keep = cap if keep is None else keep
    shape = t.shape[:2] + (max(need, 2 * cap),) + t.shape[3:]
    new = torch.zeros(shape, dtype=t.dtype, pin_memory=True) if t.is_pinned() else t.new_zeros(shape)
    new[:, :, :keep] = t[:, :, :keep]
    return new


class LayerKV(ABC):
    """One layer's K/V under one policy.

    Prefill is the same for every policy: attention over the prompt in full precision (in the
    held dtype), then `load` stores the prompt's K/V however the policy keeps them. So one
    prefill can be shared by all policies (`engine.prefill_once`), and only decode differs.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """Store the new k, v (B, H_kv, n_new, D) at columns [start, stored_end) and return the
        attention of q (B, H, n_new, D) over every stored token (plus a speculative guess's own
        k, v for the guess's query): (B, H, n_new, D)."""
        if step.is_prefill:
            k, v = k.to(self.dtype), v.to(self.dtype)
            self.load(k, v, step)
            return sdpa_gqa(q.to(self.dtype), k, v, step.mask(group=q.shape[1] // k.shape[1])).to(q.dtype)
        return self.decode(q, k, v, step)

    dtype: torch.dtype
    declaration: ClassVar[type[PolicyConfig]]   # its knobs (core/policies/<name>.py); `spec` is the checked instance
    serves = True          # runtime.serve can batch it continuously
    # runtime.bench's timed runs for a policy with its own prefill: "module:function" naming
    # bench(model, cfg, prompts, params, link, spec=<the checked declaration>) -> [BatchResult];
    # None = the engine's generate(). A name, not the function: the runner imports it when it
    # runs, so the cache module does not import the runner (runtime/bench_rag.py for rag).
    bench: str | None = None

    @abstractmethod
    def load(self, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Store a prompt's full-precision k, v (B, H_kv, T, D), columns [0, T)."""

    @abstractmethod
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor:
        """A decode pass (n_new = 1, or 2 with a speculative guess)."""

    @abstractmethod
    def nbytes(self) -> tuple[int, int]:
        """(device bytes, host bytes) of the K/V this layer holds now, for the dtype held."""

    def stats(self) -> dict[str, float]:
        """Per-run counters a policy wants reported (summed over layers by KVCache.stats)."""
        return {}

    @classmethod
    def build(cls, spec: PolicyConfig, shape: CacheShape, link=None) -> "KVCache":
        """A model's cache of this policy from its checked declaration (runtime.kv.make_cache):
        one layer object per layer by default."""
        return KVCache([cls(spec, shape, link) for _ in range(shape.n_layers)], spec.name)


class KVCache:
    """A model's KV: one `LayerKV` per layer, plus what the engine needs to know about it."""

    speculative = False     # True: the engine runs speculative pre-decoding for this cache

    def __init__(self, layers: list[LayerKV], name: str):
        self.layers = layers
        self.name = name
        self.n_tokens = 0   # real (non-pad) tokens held per layer, summed over the batch
        self.len = 0        # columns written, pads included

    def advance(self, step: Step) -> None:
        """Called once per forward pass, after every layer has stored its K/V."""
        self.len = step.stored_end
        self.n_tokens = int((step.stored_end - step.pad).clamp(min=0).sum())

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> tuple[int, int]:
        dev = host = 0
        for layer in self.layers:
            d, h = layer.nbytes()
            dev += d
            host += h
        return dev, host

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer in self.layers:
            for key, val in layer.stats().items():
                out[key] = out.get(key, 0) + val
        return out

    def fp16_bytes(self, n_kv_heads: int, head_dim: int) -> int:
        """What a 16-bit full cache would hold for the same real tokens: the ratio's denominator."""
        return self.n_tokens * len(self.layers) * 2 * n_kv_heads * head_dim * 2
