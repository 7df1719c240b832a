"""`policy=specache`: a `kivi` copy on the device + the k fetched 16-bit rows per KV head; every
token's K/V in `kv_dtype` on the host."""
from __future__ import annotations

from dataclasses import dataclass

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

    def check(self, head_dim: int | None = None) -> None:
        super().check(head_dim)
        if self.k < 0:
            raise ConfigError(f"policy.k={self.k} must be >= 0 (0 = plain KIVI; k beyond the context is clamped)")
        if self.gather not in GATHERS:
            raise ConfigError(f"policy.gather={self.gather!r} is not known; choose one of: {', '.join(GATHERS)}")

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

    def query_rows(self, batch: int) -> int:
        return 2 * batch if (self.prefetch and self.k > 0) else batch
