"""`policy=specache`: a `kivi` copy on the device + the k fetched 16-bit rows per KV head; every
token's K/V in `kv_dtype` on the host."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from core.errors import ConfigError

from .base import ModelShape, declare
from .kivi import KiviPolicyConfig

GATHERS = ("host", "device")


@declare
@dataclass
class SpecachePolicyConfig(KiviPolicyConfig):
    name: str = "specache"
    k: int = 64                     # 16-bit rows fetched per KV head per step; 0 = kivi; > context: clamped
    prefetch: bool = True           # speculative pre-decoding: fetch the next step's top-k during this one
    gather: str = "host"            # host: index_select into pinned staging + one copy | device: a device kernel reads the pinned host rows (UVA, zero-copy)

    hf_fallback: ClassVar[bool] = False
    hf_defaults: ClassVar[dict] = {"prefetch": False}   # speculative pre-decoding needs the engine's loop
    short_form: ClassVar[Optional[str]] = "specache-k<k>-b<bits>[-g<N>][-r<N>][-noprefetch]"
    short_head: ClassVar[str] = ""
    short_options: ClassVar[dict[str, str]] = {"k": "k", "b": "bits", "g": "group_size", "r": "residual"}
    short_flags: ClassVar[dict[str, tuple]] = {"noprefetch": ("prefetch", False)}
    short_required: ClassVar[tuple[str, ...]] = ("k", "b")
    label_knobs: ClassVar[tuple[str, ...]] = ("k", "bits", "prefetch")

    def check(self, head_dim: int | None = None) -> None:
        super().check(head_dim)
        if self.k < 0:
            raise ConfigError(f"policy.k={self.k} must be >= 0 (0 = plain KIVI; k beyond the context is clamped)")
        self.require_choice("gather", self.gather, GATHERS)

    def hf_check(self) -> None:
        if self.prefetch:
            raise ConfigError("kvtestbed_cache('specache'): prefetch=True (speculative pre-decoding) is not available "
                              "inside transformers' generate(): it needs two tokens per forward (the real one and a "
                              "guess of the next) and an extra first pass, and generate() feeds one. Use "
                              "prefetch=False (exact top-k, the default here) or this project's runtime "
                              "(python -m runtime.bench policy=specache)")

    def k_eff(self, ctx: float) -> int:
        return min(self.k, self.quantized(int(ctx))[0])

    def layer_bytes(self, tokens: list[int], s: ModelShape):
        dev, _ = super().layer_bytes(tokens, s)
        fetched = sum(2 * s.n_kv_heads * min(self.k, self.quantized(n)[0]) * s.head_dim * s.kv_elem for n in tokens)
        return dev + fetched, 2 * sum(tokens) * s.kv_row

    def peak_lengths(self, n: int) -> list[int]:
        return sorted(set(super().peak_lengths(n)))

    def knob_label(self) -> str:
        return f"k{self.k}-{self.bits}b" + ("" if self.prefetch else "-noprefetch")

    def topk_rows(self) -> int | None:
        return self.k

    def query_rows(self, batch: int) -> int:
        return 2 * batch if (self.prefetch and self.k > 0) else batch
