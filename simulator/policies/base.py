"""Per-step operation graphs of the KV policies: what runs on which engine, after what.

A step is a list of `Op`s in issue order; each engine (compute, h2d, d2h) is an in-order
stream, as a CUDA stream is. hardware.py executes a graph in two fidelities (SimPy processes,
or a recurrence). A twin is its policy's declaration (core/policies/<name>.py: knobs, checks,
KV bytes) plus the graphs; the README's "Simulator" section explains the cost rules.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.policies import SPECS, ModelShape, knobs_of, load_plugin

from ..costs import Costs

ENGINES = ("compute", "h2d", "d2h")


@dataclass(frozen=True)
class Op:
    name: str
    engine: str            # compute | h2d | d2h
    seconds: float
    deps: tuple[str, ...] = ()


def beside(d: float, c: float, s: float) -> float:
    """Compute d seconds long, started with a copy c seconds long that slows it by s
    (the profile's transfers.overlap.gemm_slowdown_with_copy): d + min(d (s - 1), c (1 - 1/s))."""
    if c <= 0 or s <= 1:
        return d
    return d + min(d * (s - 1), c * (1 - 1 / s))


class Twin:
    """The step graphs every twin starts from (those of `full`); mixed into a declaration."""

    attn_table = "decode_attention_full"

    def tables(self) -> tuple[str, ...]:
        return ("decode_layer", "step_overhead", "lm_head_sample", "prefill_layer", self.attn_table)

    def key(self) -> tuple:
        return tuple(sorted(vars(self).items()))

    def prefill_graph(self, c: Costs, s: ModelShape, prompts: list[int]) -> list[Op]:
        n = len(prompts)
        # the runtime prefills a batch left-padded to its longest prompt: every row costs that
        per_layer = n * c.table("prefill_layer")(max(prompts)) + self.prefill_extra(c, prompts)
        stored = self.prefill_store_bytes(s, prompts)
        store = c.d2h(stored)                  # per layer, to put the prompt's K/V in host memory
        ops = [Op("overhead", "compute", c.table("step_overhead")(n))]
        prev = "overhead"
        for i in range(s.n_layers):
            d = beside(per_layer, store, c.gemm_slowdown) if (i > 0 and store) else per_layer
            d += c.issue_cost(stored)
            ops.append(Op(f"layer{i}", "compute", d, (prev,)))
            prev = f"layer{i}"
            if store:
                ops.append(Op(f"store{i}", c.engine("d2h"), store, (prev,)))
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(n), (prev,)))
        return ops

    def prefill_extra(self, c: Costs, prompts: list[int]) -> float:
        return 0.0

    def prefill_store_bytes(self, s: ModelShape, prompts: list[int]) -> int:
        """Bytes per layer the prefill writes to the host (0: the policy keeps none there)."""
        return 0

    def layer_compute(self, c: Costs, s: ModelShape, batch: int, ctx: float) -> float:
        return c.decode_layer(batch, ctx, self.attn_table, rows=self.query_rows(batch))

    def decode_graph(self, c: Costs, s: ModelShape, batch: int, ctx: float) -> list[Op]:
        """One decode step of `batch` requests whose contexts average `ctx` tokens."""
        layer = self.layer_compute(c, s, batch, ctx)
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            ops.append(Op(f"layer{i}", "compute", layer, (prev,)))
            prev = f"layer{i}"
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(self.query_rows(batch)), (prev,)))
        return ops


TWINS: dict[str, type] = {}


def twin(cls: type) -> type:
    """Class decorator: enter a twin in the registry under its policy's `name`."""
    TWINS[cls.name] = cls
    return cls


def make_policy(cfg) -> Twin:
    """The checked twin of a policy config (`name` and its knobs, as in conf/policy/*.yaml)."""
    load_plugin(cfg, "twin")
    name = cfg.get("name") if hasattr(cfg, "get") else getattr(cfg, "name", None)
    if name not in TWINS:
        raise ConfigError(f"policy={name!r} is not known; choose one of: {', '.join(sorted(TWINS))}")
    cls = TWINS[name]
    pol = cls(**knobs_of(cfg, cls))
    pol.check()
    return pol


__all__ = ["ENGINES", "Op", "SPECS", "TWINS", "Twin", "beside", "make_policy", "twin"]
