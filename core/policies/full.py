"""`policy=full`: every token's K/V in device memory, in `kv_dtype`."""
from __future__ import annotations

from dataclasses import dataclass

from .base import PolicyConfig, declare


@declare
@dataclass
class FullPolicyConfig(PolicyConfig):
    name: str = "full"
