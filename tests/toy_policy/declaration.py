"""`policy=toy`'s declaration: its knobs, their checks and its KV bytes, read by both halves.
A newcomer's example (README "Add a KV policy"): a `full` cache that, with `mirror`, also keeps
a host copy of every token's K/V."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.policies import ModelShape, PolicyConfig, declare


@declare
@dataclass
class ToyPolicyConfig(PolicyConfig):
    name: str = "toy"
    mirror: bool = True             # keep a host copy of every token's K/V

    def check(self, head_dim: int | None = None) -> None:
        super().check(head_dim)
        if not isinstance(self.mirror, bool):
            raise ConfigError(f"policy.mirror={self.mirror!r} must be true or false")

    def layer_bytes(self, tokens: list[int], s: ModelShape):
        held = 2 * sum(tokens) * s.kv_row
        return held, (held if self.mirror else 0)
