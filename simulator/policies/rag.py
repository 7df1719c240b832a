"""The twin of runtime/kv/rag.py (`policy=rag`): chunk K/V reuse with selective recompute.

The prefill graph mirrors the runtime's order (placed_kv -> select -> selective_prefill): per
layer, chunk loads on h2d (store=disk) beside the draft's compute; `step_overhead`; the
selector's own cost (draft: D x `prefill_layer`(N + Q), from a separate draft's own shape when
`draft_model` names a preset; cacheblend: layer 0 + the layer-1 projections); per layer
`rope_rerotate`(N) and `selective_prefill`(m, N + Q); `lm_head_sample`. selector=full is the
`full` twin's prefill. Decode and KV bytes are the `full` twin's.

The draft variants add to the draft's D x `prefill_layer`(N + Q), over its deep third
(k = ceil(D/3) layers):
- draft_dev: k x `rope_rerotate`(N), one elementwise pass over the deep layers' fresh and reused
  K/V (it reads the re-rotated chunk K/V, so it runs after the re-rotation, like cacheblend);
- draft_rel: nothing more to compute; with store=disk each chunk's stored chunk-alone norms
  (core.policies.rag.feature_bytes: 4 bytes per token and layer) are loaded on h2d before the
  selection, costed as `chunk_load` scaled by their bytes over the chunk's one-layer K/V bytes;
- draft_attn: k x `selective_prefill`(Q, N + Q), the question rows' q and their attention over
  the whole prompt with the probabilities materialised (an upper bound: that table also holds
  the Q rows' MLP).
At recompute_ratio 0 (budget ceil(r N) = 0) no selector runs, as in the runtime: nothing is
recomputed but the question, so there is nothing to pick (docs/rag.md).
oracle_dev / oracle_norm need the target's own full prefill: runtime-only, refused here.
sink_tokens moves tokens inside the same budget: no cost change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import ConfigError
from core.policies.rag import DRAFT_SELECTORS, ORACLES, RagPolicyConfig, budget_of, feature_bytes

from ..costs import Costs
from .base import Op, part_costs, split_parts, twin
from .full import Full


@twin
@dataclass
class Rag(RagPolicyConfig, Full):

    def check(self, head_dim: int | None = None) -> None:
        super().check(head_dim)
        if self.selector in ORACLES:
            raise ConfigError(f"policy.selector={self.selector} is a runtime-only measuring stick (the target's own "
                              "full prefill); the simulator has no twin for it, simulate full or a draft selector")

    def tables(self):
        base = super().tables()
        if self.selector == "full":
            return base
        extra = ("rope_rerotate", "selective_prefill") + (("chunk_load",) if self.store == "disk" else ())
        if self.selector == "cacheblend":
            extra += ("projections",)
        if self.selector == "draft_rel" and self.store == "disk" and "chunk_load" not in extra:
            extra += ("chunk_load",)
        return base + extra

    def deep(self) -> int:
        """Layers of the draft's deep third, ceil(D/3)."""
        return math.ceil(self.draft_layers / 3)

    def selects(self, n_ctx: int) -> bool:
        """Whether the selector runs for a prompt of `n_ctx` context tokens: not when its budget
        ceil(r N) is 0 (r = 0: nothing to pick; the runtime's `select` returns before the draft),
        except full and a fixed-prefix epic, which do not read r (and cost nothing to select)."""
        return self.selector in ("full", "epic") or budget_of(self.recompute_ratio, n_ctx) > 0

    def selector_cost(self, c: Costs, s, total: int, n_ctx: int | None = None) -> float:
        """The selector's own compute for one prompt of `total` tokens (`n_ctx` of them context);
        0 when it does not run (`selects`)."""
        n_ctx = total if n_ctx is None else n_ctx
        if not self.selects(n_ctx):
            return 0.0
        if self.selector in DRAFT_SELECTORS:
            draft = getattr(self, "draft_costs", None)     # set by simulator.run for policy.draft_model
            if draft is not None:
                return self.draft_layers * draft.table("prefill_layer")(total)
            if not 1 <= self.draft_layers <= s.n_layers:
                raise ConfigError(f"policy.draft_layers={self.draft_layers} must be in [1, {s.n_layers}] "
                                  "(the model's layers)")
            cost = self.draft_layers * c.table("prefill_layer")(total)
            if self.selector == "draft_dev" and n_ctx:
                cost += self.deep() * c.table("rope_rerotate")(n_ctx)
            if self.selector == "draft_attn" and total > n_ctx:
                cost += self.deep() * c.table("selective_prefill")(total - n_ctx, total)
            return cost
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
        sel = sum(self.selector_cost(c, s, n + q, n) for n, q in split)
        # draft_rel reads each chunk's stored chunk-alone norms (a disk store loads them first)
        feat = sum(c.table("chunk_load")(t) * feature_bytes(t, s.n_layers) / (2 * t * s.kv_row)
                   for n, _ in split if self.selects(n) for t in self.chunks(n)) \
            if self.selector == "draft_rel" and self.store == "disk" else 0.0
        recompute = sum(c.table("selective_prefill")(self.recomputed(n, q), n + q) for n, q in split)
        L = s.n_layers
        ops = [Op("overhead", "compute", c.table("step_overhead")(len(prompts)))]
        if feat:                                  # first on h2d: the selection waits for them
            ops.append(Op("load_features", c.engine("h2d"), feat))
        for i in range(L):
            if load:
                ops.append(Op(f"load{i}", c.engine("h2d"), load))
        prev = "overhead"
        # the draft needs no reused K/V: it runs beside the loads (draft_dev reads them: after)
        early = self.selector in ("draft", "draft_rel", "draft_attn")
        if early and sel:
            ops.append(Op("select", "compute", sel, (prev, "load_features") if feat else (prev,)))
            prev = "select"
        for i in range(L):
            ops.append(Op(f"rerotate{i}", "compute", rerot, (prev, f"load{i}") if load else (prev,)))
            prev = f"rerotate{i}"
        if not early and sel:
            ops.append(Op("select", "compute", sel, (prev,)))
            prev = "select"
        # the selective recompute's projections and MLP run over the recomputed tokens only
        parts = split_parts(recompute, part_costs(c, [self.recomputed(n, q) for n, q in split]))
        for i in range(L):
            ops.append(Op(f"layer{i}", "compute", recompute, (prev,), parts=parts))
            prev = f"layer{i}"
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(len(prompts)), (prev,)))
        return ops
