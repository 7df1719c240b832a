"""The twin of runtime/kv/rag.py (`policy=rag`): chunk K/V reuse with selective recompute.

The prefill graph mirrors the runtime's order (placed_kv -> select -> selective_prefill): per
layer, chunk loads on h2d (store=disk) beside the draft's compute; `step_overhead`; the
selector's own cost (draft: D x `prefill_layer`(N + Q), from a separate draft's own shape when
`draft_model` names a preset; cacheblend: layer 0 + the layer-1 projections); per layer
`rope_rerotate`(N) and `selective_prefill`(m, N + Q); `lm_head_sample`. selector=full is the
`full` twin's prefill. Decode and KV bytes are the `full` twin's.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.policies.rag import RagPolicyConfig

from ..costs import Costs
from .base import Op, twin
from .full import Full


@twin
@dataclass
class Rag(RagPolicyConfig, Full):

    def tables(self):
        base = super().tables()
        if self.selector == "full":
            return base
        extra = ("rope_rerotate", "selective_prefill") + (("chunk_load",) if self.store == "disk" else ())
        if self.selector == "cacheblend":
            extra += ("projections",)
        return base + extra

    def selector_cost(self, c: Costs, s, total: int) -> float:
        if self.selector == "draft":
            draft = getattr(self, "draft_costs", None)     # set by simulator.run for policy.draft_model
            if draft is not None:
                return self.draft_layers * draft.table("prefill_layer")(total)
            if not 1 <= self.draft_layers <= s.n_layers:
                raise ConfigError(f"policy.draft_layers={self.draft_layers} must be in [1, {s.n_layers}] "
                                  "(the model's layers)")
            return self.draft_layers * c.table("prefill_layer")(total)
        if self.selector == "cacheblend":
            return c.table("prefill_layer")(total) + c.table("projections")(total)
        return 0.0

    # -- the step graph

    def prefill_graph(self, c: Costs, s, prompts: list[int]) -> list[Op]:
        split = [self.split(p) for p in prompts]
        if self.selector == "full" or all(n == 0 for n, _ in split):
            return Full.prefill_graph(self, c, s, prompts)
        # a warm store hands back K/V already in device memory (runtime/rag/store.py ChunkStore.mem):
        # nothing to load; a disk store reads every chunk's file and copies it up
        load = sum(c.table("chunk_load")(t) for n, _ in split for t in self.chunks(n)) if self.store == "disk" else 0.0
        rerot = sum(c.table("rope_rerotate")(n) for n, _ in split if n)
        sel = sum(self.selector_cost(c, s, n + q) for n, q in split)
        recompute = sum(c.table("selective_prefill")(self.recomputed(n, q), n + q) for n, q in split)
        L = s.n_layers
        ops = [Op("overhead", "compute", c.table("step_overhead")(len(prompts)))]
        for i in range(L):
            if load:
                ops.append(Op(f"load{i}", c.engine("h2d"), load))
        prev = "overhead"
        early = self.selector == "draft"          # the draft needs no reused K/V: it runs beside the loads
        if early and sel:
            ops.append(Op("select", "compute", sel, (prev,)))
            prev = "select"
        for i in range(L):
            ops.append(Op(f"rerotate{i}", "compute", rerot, (prev, f"load{i}") if load else (prev,)))
            prev = f"rerotate{i}"
        if not early and sel:
            ops.append(Op("select", "compute", sel, (prev,)))
            prev = "select"
        for i in range(L):
            ops.append(Op(f"layer{i}", "compute", recompute, (prev,)))
            prev = f"layer{i}"
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(len(prompts)), (prev,)))
        return ops
