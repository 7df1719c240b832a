"""The twin of runtime/kv/kivi.py: packed low-bit K/V + a full-precision residual window."""
from __future__ import annotations

from dataclasses import dataclass

from core.policies.kivi import KiviPolicyConfig
from core.profile.schema import bits_table

from .base import twin
from .full import Full


@twin
@dataclass
class Kivi(KiviPolicyConfig, Full):

    @property
    def attn_table(self) -> str:
        """The profile's KIVI attention table for these bits (decode_attention_kivi[_<b>bit])."""
        return bits_table("decode_attention_kivi", self.bits)

    def tables(self):
        return super().tables() + (bits_table("quantize", self.bits),)

    def prefill_extra(self, c, prompts):
        return sum(c.quantize(t, self.bits, self.group_size) for t in prompts)

    def layer_compute(self, c, s, batch, ctx):
        return c.decode_layer(batch, ctx, self.attn_table, rows=self.query_rows(batch),
                              bits=self.bits, group_size=self.group_size)
