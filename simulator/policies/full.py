"""The twin of runtime/kv/full.py: every token in device memory."""
from __future__ import annotations

from dataclasses import dataclass

from core.policies.full import FullPolicyConfig

from .base import Twin, twin


@twin
@dataclass
class Full(FullPolicyConfig, Twin):
    pass
