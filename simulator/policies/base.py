"""Per-step operation graphs of the KV policies: what runs on which engine, after what.

A step is a list of `Op`s in issue order; each engine (compute, h2d, d2h) is an in-order
stream, as a CUDA stream is. hardware.py executes a graph in two fidelities (SimPy processes,
or a recurrence). A twin is its policy's declaration (core/policies/<name>.py: knobs, checks,
KV bytes) plus the graphs; the README's "Simulator" section explains the cost rules.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from core.errors import ConfigError
from core.phases import PARTS, PHASES, phase_of
from core.policies import SPECS, ModelShape, Registry, knobs_of, load_plugin

from ..costs import EXTRAPOLATION_MARGIN, Costs

ENGINES = ("compute", "h2d", "d2h")


@dataclass(frozen=True)
class Op:
    """One operation of a step: `seconds` on `engine` after `deps` (and after the op issued before
    it on the same engine). `phase` (core/phases.py PHASES) says what the runtime's timers would
    call its time; default: phase_of(name) (`layer3` -> layer, `fetch0_next` -> fetch), "" for a
    free name that maps to none (a hand-built graph's `k`; the simulator's twins name all theirs).
    `parts`: a `layer` op's seconds split into core/phases.py PARTS ((part, seconds), ...; they sum
    to `seconds`), () where the profile has no tables for it (roofline)."""
    name: str
    engine: str            # compute | h2d | d2h
    seconds: float
    deps: tuple[str, ...] = ()
    phase: str = ""
    parts: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if not self.phase:
            try:
                object.__setattr__(self, "phase", phase_of(self.name))
            except ValueError:
                pass
        elif self.phase not in PHASES:
            raise ValueError(f"op {self.name!r}: phase {self.phase!r} is not one of core/phases.py PHASES {PHASES}")


def read_quiet(c: Costs, name: str, *x: float) -> float | None:
    """A measured table at a point, for a breakdown only: None where the profile lacks the table or
    the point lies beyond what it may read (EXTRAPOLATION_MARGIN, unless allow_extrapolation);
    never refuses the run nor enters `Costs.extrapolated` (that records what a *prediction* read)."""
    try:
        t = c.table(name)
    except ConfigError:
        return None
    over: list[bool] = []
    saved = getattr(t, "beyond", None)
    t.beyond = lambda where, axis, v, hi: over.append(v > hi * EXTRAPOLATION_MARGIN)
    try:
        v = float(t(*x))
    finally:
        t.beyond = saved
    return None if any(over) and not c.allow_extrapolation else v


def part_costs(c: Costs, tokens: Sequence[float], attention: tuple | None = None) -> dict[str, float] | None:
    """What a layer's parts cost by the profile's own tables: `projections` and `mlp` summed over
    sequences of `tokens` tokens each (decode: one sequence of its query rows; prefill: each
    prompt), and `attention` = (table, *point) read at that point (None: no attention table, as in
    prefill). None on a roofline profile (formulas, not these tables), or where a table is
    missing or read beyond its grid: then a step has no parts rather than guessed ones."""
    if c.analytic:
        return None
    out = {"projections": 0.0, "mlp": 0.0}
    for t in tokens:
        if t <= 0:
            continue
        for part in ("projections", "mlp"):
            v = read_quiet(c, part, t)
            if v is None:
                return None
            out[part] += v
    if attention is not None:
        v = read_quiet(c, *attention)
        if v is None:
            return None
        out["attention"] = v
    return out


def split_parts(seconds: float, base: dict[str, float] | None, attention: float = 0.0) -> tuple[tuple[str, float], ...]:
    """A layer op's `seconds` as PARTS: `base` (part_costs) plus `attention` seconds of the policy's
    own attention work (SpeCache's replace, a copy's issue on the compute thread), `other` the
    rest (norms, residuals, glue; a copy's slowdown of the GEMMs). Parts that exceed the op are
    scaled down to it (other = 0). () where base is None (no tables). Without an attention table
    and no attention seconds (prefill) the split is projections, mlp, other."""
    if base is None or seconds <= 0:
        return ()
    p = {**base}
    if attention or "attention" in p:           # prefill: no attention table, the part is left out
        p["attention"] = p.get("attention", 0.0) + attention
    named = sum(p.values())
    if named > seconds:
        scale = seconds / named
        p = {k: v * scale for k, v in p.items()}
        p["other"] = 0.0
    else:
        p["other"] = seconds - named
    return tuple((k, p[k]) for k in PARTS if k in p)


def attention_point(c: Costs, table: str, batch: float, ctx: float, rows: float) -> tuple:
    """Where Costs.decode_layer reads a decode's attention table: (batch, ctx) with a measured
    (batch, context) `decode_layer`, (rows, ctx) with the older (batch) form."""
    try:
        two = len(c.table("decode_layer").axes) == 2
    except (ConfigError, AttributeError):
        two = True
    return (table, batch, ctx) if two else (table, rows, ctx)


def chain(ops: list[Op], prev: str, name: str, engine: str, seconds: float, **kw) -> str:
    """Append op `name` after `prev`; returns its name, what the next op of the chain waits for."""
    ops.append(Op(name, engine, seconds, (prev,), **kw))
    return name


def lm_head(ops: list[Op], c: Costs, prev: str, rows: int) -> list[Op]:
    """The step's last op, the LM head and sampling of `rows` query rows after `prev`; returns ops."""
    ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(rows), (prev,)))
    return ops


def batched_gemms(c: Costs, n: int, T: int) -> float:
    """Seconds a prefill of n prompts padded to T tokens saves (< 0) or costs over n prefills of
    one: its projections and MLP run as one GEMM over n x T rows, the rest (attention, norms) per
    prompt, so (projections + mlp)(n T) - n (projections + mlp)(T) from the profile's own tables
    (on the 2-core VM, 4 x 128 tokens: -11.6% of 4 x prefill_layer(128), measured -12%).
    0 for one prompt, on a roofline profile (its formulas are linear in rows), or where a table
    is missing or would be read beyond its grid."""
    if n <= 1 or c.analytic:
        return 0.0
    one, many = part_costs(c, [T]), part_costs(c, [n * T])
    if one is None or many is None:
        return 0.0
    # a drift correction scales it as the prefill it belongs to, not as the lone GEMM tables
    return (sum(many.values()) - n * sum(one.values())) * c.scale_of("prefill_layer") / c.scale_of("projections")


def beside(d: float, c: float, s: float) -> float:
    """Compute d seconds long, started with a copy c seconds long that slows it by s
    (the profile's transfers.overlap.gemm_slowdown_with_copy): d + min(d (s - 1), c (1 - 1/s))."""
    if c <= 0 or s <= 1:
        return d
    return d + min(d * (s - 1), c * (1 - 1 / s))


def per_cohort(ops: list[Op], extra: float) -> list[Op]:
    """A decode graph whose every layer op (`layer<i>`, once per layer: SpeCache's `replace<i>` is of
    phase layer too) takes `extra` seconds more, counted as attention (Twin.cohort_attention: the
    calls of the cohorts beyond the first)."""
    if extra <= 0:
        return ops
    out = []
    for op in ops:
        if op.name.startswith("layer") and op.name[5:].isdigit() and op.engine == "compute":
            parts = op.parts
            if parts:
                p = dict(parts)
                p["attention"] = p.get("attention", 0.0) + extra
                parts = tuple((k, p[k]) for k in PARTS if k in p)
            op = replace(op, seconds=op.seconds + extra, parts=parts)
        out.append(op)
    return out


class Twin:
    """The step graphs every twin starts from (those of `full`); mixed into a declaration."""

    attn_table = "decode_attention_full"

    def tables(self) -> tuple[str, ...]:
        return ("decode_layer", "step_overhead", "lm_head_sample", "prefill_layer", self.attn_table)

    def key(self) -> tuple:
        return tuple(sorted(vars(self).items()))

    def prefill_graph(self, c: Costs, s: ModelShape, prompts: list[int]) -> list[Op]:
        n, T = len(prompts), max(prompts)
        # the runtime prefills a batch left-padded to its longest prompt: every row costs that, and
        # its GEMMs run once over all n x T rows (batched_gemms: what that saves over n prompts)
        compute = n * c.table("prefill_layer")(T) + batched_gemms(c, n, T)
        extra = self.prefill_extra(c, prompts)          # KIVI: quantize-and-pack, an op of phase store
        per_layer = compute + extra
        stored = self.prefill_store_bytes(s, prompts)
        store = c.d2h(stored)                  # per layer, to put the prompt's K/V in host memory
        issue = c.issue_cost(stored)           # the compute thread's share of that store (emulated link)
        base = part_costs(c, [n * T])
        ops = [Op("overhead", "compute", c.table("step_overhead")(n))]
        prev = "overhead"
        for i in range(s.n_layers):
            d = beside(per_layer, store, c.gemm_slowdown) if (i > 0 and store) else per_layer
            # the layer's own compute (+ a copy's slowdown of it); what the layer op held before
            # the split (KIVI's quantize, the store's issue) follows it as ops of phase store
            layer = compute + (d - per_layer) if (extra or issue) else d
            ops.append(Op(f"layer{i}", "compute", layer, (prev,), parts=split_parts(layer, base)))
            prev = f"layer{i}"
            if extra:
                prev = chain(ops, prev, f"quantize{i}", "compute", extra, phase="store")
            if issue:
                prev = chain(ops, prev, f"store_issue{i}", "compute", issue, phase="store")
            if store:
                ops.append(Op(f"store{i}", c.engine("d2h"), store, (prev,)))
        return lm_head(ops, c, prev, n)

    def prefill_extra(self, c: Costs, prompts: list[int]) -> float:
        return 0.0

    def prefill_store_bytes(self, s: ModelShape, prompts: list[int]) -> int:
        """Bytes per layer the prefill writes to the host (0: the policy keeps none there)."""
        return 0

    def layer_compute(self, c: Costs, s: ModelShape, batch: int, ctx: float) -> float:
        return c.decode_layer(batch, ctx, self.attn_table, rows=self.query_rows(batch))

    def layer_part_costs(self, c: Costs, batch: int, ctx: float) -> dict[str, float] | None:
        """part_costs of one decode layer: projections and MLP over the step's query rows, the
        policy's attention table at its point."""
        rows = self.query_rows(batch)
        return part_costs(c, [rows], attention_point(c, self.attn_table, batch, ctx, rows))

    def cohort_attention(self, c: Costs, batch: int, ctx: float, parts: tuple) -> float:
        """Seconds per layer a decode step of `batch` rows at mean context `ctx` takes beyond its
        graph's one attention call when the rows are cohorts `parts` ((rows, context), ...), each
        attended by its own call (runtime/cohorts.py): sum of attn(rows_i, ctx_i) - attn(batch,
        ctx) in the policy's lone attention table, which times one call whole (the cache write,
        the mask, the kernel), so each extra call brings its fixed cost. A roofline profile's
        attention is a bandwidth formula with no per-call cost: 0."""
        if c.analytic:
            return 0.0
        t = c.table(self.attn_table)
        return max(sum(float(t(n, x)) for n, x in parts) - float(t(batch, ctx)), 0.0)

    def decode_graph(self, c: Costs, s: ModelShape, batch: int, ctx: float) -> list[Op]:
        """One decode step of `batch` requests whose contexts average `ctx` tokens."""
        layer = self.layer_compute(c, s, batch, ctx)
        parts = split_parts(layer, self.layer_part_costs(c, batch, ctx))
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            ops.append(Op(f"layer{i}", "compute", layer, (prev,), parts=parts))
            prev = f"layer{i}"
        return lm_head(ops, c, prev, self.query_rows(batch))


TWINS = Registry("simulator.policies")    # name -> twin: simulator/policies/<name>.py, or a plugin's `twin`


def twin(cls: type) -> type:
    """Class decorator: enter a twin in the registry under its policy's `name`."""
    return TWINS.add(cls.name, cls)


def make_policy(cfg) -> Twin:
    """The checked twin of a policy config (`name` and its knobs, as in conf/policy/*.yaml)."""
    load_plugin(cfg, "twin")
    cls = TWINS.lookup(cfg.get("name") if hasattr(cfg, "get") else getattr(cfg, "name", None))
    pol = cls(**knobs_of(cfg, cls))
    pol.check()
    return pol


__all__ = ["ENGINES", "Op", "SPECS", "TWINS", "Twin", "attention_point", "beside", "chain", "lm_head", "make_policy",
           "part_costs", "per_cohort", "read_quiet", "split_parts", "twin"]
