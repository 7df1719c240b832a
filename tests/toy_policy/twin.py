"""`policy=toy`'s simulator twin: the `full` twin's graphs, plus (with `mirror`) the prompt's K/V
copied to the host during prefill."""
from __future__ import annotations

from dataclasses import dataclass

from simulator.policies import Full, twin

from .declaration import ToyPolicyConfig


@twin
@dataclass
class Toy(ToyPolicyConfig, Full):

    def tables(self):
        return super().tables() + (("d2h_pinned",) if self.mirror else ())

    def prefill_store_bytes(self, s, prompts):
        return 2 * sum(prompts) * s.kv_row if self.mirror else 0
