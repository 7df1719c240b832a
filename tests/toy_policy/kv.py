"""`policy=toy` in the runtime: the `full` cache plus, with `mirror`, a host copy written with
every token."""
from __future__ import annotations

import torch

from runtime.kv import register
from runtime.kv.base import grow_columns
from runtime.kv.full import FullKV

from .declaration import ToyPolicyConfig


@register
class ToyKV(FullKV):
    declaration = ToyPolicyConfig

    def __init__(self, spec: ToyPolicyConfig, shape, link=None):
        super().__init__(spec, shape, link)
        self.spec = spec                # the checked declaration (runtime.kv.make_cache)
        self.hk = torch.empty(self.k.shape, dtype=self.k.dtype) if spec.mirror else None
        self.hv = torch.empty_like(self.hk) if spec.mirror else None

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
