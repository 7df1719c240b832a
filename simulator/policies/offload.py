"""The twin of runtime/kv/offload.py: every layer on the host, two device slots; layer i+1 is
fetched while layer i computes (the last layer fetches layer 0 for the next step)."""
from __future__ import annotations

from dataclasses import dataclass

from core.policies.offload import OffloadPolicyConfig

from .base import Op, beside, chain, lm_head, split_parts, twin
from .full import Full


@twin
@dataclass
class Offload(OffloadPolicyConfig, Full):

    def tables(self):
        return super().tables() + ("h2d_pinned", "d2h_pinned")

    def prefill_store_bytes(self, s, prompts):
        return 2 * sum(prompts) * s.kv_row

    def decode_graph(self, c, s, batch, ctx):
        layer = self.layer_compute(c, s, batch, ctx)
        fetch = c.h2d(2 * batch * ctx * s.kv_row)
        back = c.d2h(2 * batch * s.kv_row)                 # this step's token, written back
        issue = c.issue_cost(2 * batch * (ctx + 1) * s.kv_row)
        base = self.layer_part_costs(c, batch, ctx)
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            deps = (prev,) if i == 0 else (prev, f"fetch{i}")
            nxt = (i + 1) % s.n_layers
            # the slot of layer i+1 frees when layer i-1 is done: the fetch waits for it
            ops.append(Op(f"fetch{nxt}" if nxt else "fetch0_next", c.engine("h2d"), fetch, (prev,)))
            # phase layer: issuing the copies (an emulated link's memcpy on the compute thread) is
            # part of the layer's attention call in the runtime; the wait for the fetch is `fetch`
            d = beside(layer, fetch, c.gemm_slowdown) + issue
            ops.append(Op(f"layer{i}", "compute", d, deps, parts=split_parts(d, base, attention=issue)))
            prev = f"layer{i}"
            chain(ops, prev, f"back{i}", c.engine("d2h"), back)
        return lm_head(ops, c, prev, batch)
