"""`policy=offload`: every layer's K/V on the host, two device slots (layer i+1 is fetched while
layer i computes)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ModelShape, PolicyConfig, declare


@declare
@dataclass
class OffloadPolicyConfig(PolicyConfig):
    name: str = "offload"

    def layer_bytes(self, tokens: list[int], s: ModelShape):
        host = 2 * sum(tokens) * s.kv_row
        return int(host * min(2, s.n_layers) / s.n_layers), host

    def kv_bytes(self, tokens: list[int], s: ModelShape):
        d, h = self.layer_bytes(tokens, s)
        return s.n_layers * d, s.n_layers * h
