"""The twin of runtime/kv/specache.py: a kivi copy on the device, 16-bit K/V on the host, k rows
per KV head fetched every step (k = 0: exactly kivi; k beyond the quantized keys: clamped).
With prefetch the step carries the real token and the guess (2 x batch query rows); the
runtime's storing-nothing first pass after prefill is not modelled."""
from __future__ import annotations

from dataclasses import dataclass

from core.policies.specache import SpecachePolicyConfig
from core.profile.schema import bits_table

from .base import Op, beside, chain, lm_head, split_parts, twin
from .kivi import Kivi


@twin
@dataclass
class Specache(SpecachePolicyConfig, Kivi):

    def tables(self):
        # gather=device on a measured GPU profile also reads transfers.gather_device (Costs.gather)
        return super().tables() + (bits_table("score_topk", self.bits), bits_table("gather_replace", self.bits),
                                   "gather", "d2h_pinned")

    def prefill_store_bytes(self, s, prompts):
        return 2 * sum(prompts) * s.kv_row

    def decode_graph(self, c, s, batch, ctx):
        if self.k == 0:                                   # the runtime runs plain kivi
            return Kivi.decode_graph(self, c, s, batch, ctx)
        rows = self.query_rows(batch)
        k = self.k_eff(ctx)
        layer = c.decode_layer(batch, ctx, self.attn_table, rows=rows, bits=self.bits, group_size=self.group_size)
        score = c.score_topk(rows, ctx, self.bits, self.group_size, batch=batch)
        attend = layer + score
        # attending with the fetched rows: phase layer, all of it the attention part
        replace = c.replace(rows, k, s, self.bits)
        # the fetch as the runtime runs it: over an emulated link the rows are gathered and
        # memcpy'd on the compute thread (phase fetch) and only their transit is the link's;
        # the new token's rows are memcpy'd to the host store on the compute thread too (back)
        fetch_cpu, fetch = c.gather_split(2 * batch * k * s.kv_row, self.gather)
        back_cpu = c.issue_cost(2 * batch * s.kv_row)
        back = c.d2h(2 * batch * s.kv_row)
        # what the whole model's step spends around those copies beyond the transfer tables
        # (measured at batch 1: a per-layer fixed cost, Python and bookkeeping, on the compute thread)
        fetch_more, back_more = c.specache_extra(self.bits)
        if c.engine("h2d") == "compute":
            fetch += fetch_more
        else:
            fetch_cpu += fetch_more
        back_cpu += back_more
        base = self.layer_part_costs(c, batch, ctx)
        plain = split_parts(layer, base)
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            if back_cpu:
                ops.append(Op(f"back_issue{i}", "compute", back_cpu, (prev,), phase="back"))
                prev = f"back_issue{i}"
            if self.prefetch:
                # rows for this step were fetched during the previous one; this layer's guess
                # picks the next step's rows, fetched beside the next layer's compute (whose
                # slowdown is the layer's `other`)
                d = attend + replace
                own = layer + (beside(d, fetch, c.gemm_slowdown) - d) if i else layer
                ops.append(Op(f"layer{i}", "compute", own, (prev,), parts=split_parts(own, base) if i else plain))
                ops.append(Op(f"score{i}", "compute", score, (f"layer{i}",)))
                ops.append(Op(f"replace{i}", "compute", replace, (f"score{i}",), phase="layer",
                              parts=(("attention", replace),)))
                prev = f"replace{i}"
                prev = self.fetch_ops(ops, c, prev, i, fetch_cpu, fetch)
            else:
                # score -> fetch -> attend with the rows: the fetch is on the critical path
                ops.append(Op(f"layer{i}", "compute", layer, (prev,), parts=plain))
                ops.append(Op(f"score{i}", "compute", score, (f"layer{i}",)))
                self.fetch_ops(ops, c, f"score{i}", i, fetch_cpu, fetch)
                ops.append(Op(f"replace{i}", "compute", replace, (f"fetch{i}",), phase="layer",
                              parts=(("attention", replace),)))
                prev = f"replace{i}"
            chain(ops, prev, f"back{i}", c.engine("d2h"), back)
        return lm_head(ops, c, prev, rows)

    @staticmethod
    def fetch_ops(ops: list[Op], c, after: str, i: int, fetch_cpu: float, fetch: float) -> str:
        """Layer i's fetch of its rows after `after`: the gather and memcpy on the compute thread
        (an emulated link, phase fetch), then the transit on h2d. Returns the compute chain's end
        (the fetch itself runs beside it)."""
        if fetch_cpu:
            after = chain(ops, after, f"fetch_issue{i}", "compute", fetch_cpu, phase="fetch")
        ops.append(Op(f"fetch{i}", c.engine("h2d"), fetch, (after,)))
        return after
