"""`policy=full`: every token's K/V in device memory, in `kv_dtype`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import PolicyConfig, declare


@declare
@dataclass
class FullPolicyConfig(PolicyConfig):
    """No knob but kv_dtype; the base of the policies whose held cache is a `full` one (rag)."""
    name: str = "full"
    hf_fallback: ClassVar[bool] = True     # transformers' dense Cache.update path: the buffer itself
