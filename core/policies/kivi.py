"""`policy=kivi`: packed low-bit K/V (keys per channel in groups of `group_size` tokens, values
per token in groups of `group_size` channels) + the newest `residual` tokens in `kv_dtype`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

from core.errors import ConfigError

from .base import ModelShape, PolicyConfig, declare

BITS = (1, 2, 4, 8)
ONE_BIT_RULES = ("specache", "plain")


def value_group(group_size: int, head_dim: int) -> int:
    """Channels per value group: group_size, or the whole head when the head is smaller."""
    return min(group_size, head_dim)


@declare
@dataclass
class KiviPolicyConfig(PolicyConfig):
    name: str = "kivi"
    bits: int = 2                   # 1 | 2 | 4 | 8
    group_size: int = 64            # tokens per key group, channels per value group
    residual: int = 64              # newest tokens kept in full precision; a multiple of group_size
    one_bit_rule: str = "specache"  # specache: codes decode to half-range centres | plain: to min/max

    hf_fallback: ClassVar[bool] = True
    short_form: ClassVar[Optional[str]] = "kivi<bits>[-g<N>][-r<N>]"
    short_head: ClassVar[str] = "bits"
    short_options: ClassVar[dict[str, str]] = {"g": "group_size", "r": "residual"}
    label_knobs: ClassVar[tuple[str, ...]] = ("bits",)

    def check_knobs(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"policy.bits={self.bits} is not supported; use one of {', '.join(map(str, BITS))}")
        if self.group_size < 1:
            raise ConfigError(f"policy.group_size={self.group_size} must be >= 1 (32 or 64 are usual)")
        if self.residual < self.group_size or self.residual % self.group_size:
            raise ConfigError(f"policy.residual={self.residual} must be a positive multiple of "
                              f"policy.group_size={self.group_size} (keys are quantized a group at a time)")
        if self.one_bit_rule not in ONE_BIT_RULES:
            raise ConfigError(f"policy.one_bit_rule={self.one_bit_rule!r}; use one of {', '.join(ONE_BIT_RULES)}")

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % value_group(self.group_size, head_dim):
            raise ConfigError(f"policy.group_size={self.group_size} must divide head_dim={head_dim} "
                              "(values are grouped along channels)")

    def quantized(self, n: int) -> tuple[int, int]:
        """(keys, values) quantized at n tokens: keys a whole group at a time once the residual
        overflows, values token by token."""
        G, R = self.group_size, self.residual
        return (G * math.ceil((n - R) / G) if n > R else 0), max(n - R, 0)

    def layer_bytes(self, tokens: list[int], s: ModelShape):
        D, e, H = s.head_dim, s.kv_elem, s.n_kv_heads
        cg = min(self.group_size, D)
        codes = D * self.bits / 8
        dev = 0.0
        for n in tokens:
            kq, vq = self.quantized(n)
            dev += kq * H * (codes + 2 * D * e / self.group_size)       # + scale, zero per group of keys
            dev += vq * H * (codes + 2 * (D // cg) * e)                 # + scale, zero per value group
            dev += ((n - kq) + (n - vq)) * H * D * e                    # the residual window
        return dev, 0

    def peak_lengths(self, n: int) -> list[int]:
        # bytes grow with n between key quantizations and drop at each: the peak up to n is at n
        # or just before the last quantization (n' with one group fewer quantized)
        kq, _ = self.quantized(n)
        if kq == 0:
            return [n]
        return [n, self.residual + kq - self.group_size]

    def knob_label(self) -> str:
        return f"{self.bits}b"

    def topk_rows(self) -> int | None:
        return 0

    def profile_bits(self) -> set[int]:
        return {int(self.bits)}
