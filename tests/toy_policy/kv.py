"""`policy=toy` in the runtime: the `full` cache plus, with `mirror`, a host copy written with
every token."""
from __future__ import annotations

import torch

from core.policies import knobs_of
from runtime.kv import register
from runtime.kv.base import grow_columns
from runtime.kv.full import FullKV

from .declaration import ToyPolicyConfig


class ToyKV(FullKV):
    def __init__(self, policy, shape, link=None):
        super().__init__(policy, shape, link)
        self.spec = ToyPolicyConfig(**{k: v for k, v in knobs_of(policy, ToyPolicyConfig).items() if k != "name"})
        self.spec.check(shape.head_dim)
        self.hk = torch.empty(self.k.shape, dtype=self.k.dtype) if self.spec.mirror else None
        self.hv = torch.empty_like(self.hk) if self.spec.mirror else None

    def _write(self, k, v, step) -> None:
        held = self.len
        super()._write(k, v, step)
        if self.hk is not None:
            self.hk, self.hv = grow_columns(self.hk, step.end, held), grow_columns(self.hv, step.end, held)
            self.hk[:, :, step.start:step.end] = k.cpu()
            self.hv[:, :, step.start:step.end] = v.cpu()

    def nbytes(self):
        device, _ = super().nbytes()
        return device, (device if self.spec.mirror else 0)


register("toy", ToyKV)
