"""The twin of runtime/rag.py (`policy=rag`): chunk K/V reuse with selective recompute.

A prompt of P tokens is N context tokens (chunks of `chunk_len`, the last one possibly shorter)
followed by a question of Q = min(`policy.question_len`, P) tokens (32, as in
conf/workload/rag.yaml: prompt_len = 8 x 512 + 32): N = P - Q, cut exactly as runtime.bench
cuts its prompt (`runtime.rag.split_prompt`).
The prefill graph mirrors the runtime's order (placed_kv -> select -> selective_prefill):

- h2d, per layer: `chunk_load` of every chunk (one per chunk file, by its tokens); the loads
  are issued first and run beside the draft's compute;
- compute: `step_overhead`; the selector's own cost (draft: D x `prefill_layer`(N + Q);
  cacheblend: `prefill_layer`(N + Q) for layer 0 + `projections`(N + Q) for the layer-1 K/V
  deviation, after the chunks are placed; random / epic / reuse: none); per layer
  `rope_rerotate`(N) after that layer's loads; per layer `selective_prefill`(m, N + Q) with
  m = ceil(r N) + Q (reuse: m = Q; epic with a fixed `epic_prefix`: min(prefix, chunk) per
  chunk + Q, r ignored); `lm_head_sample`.
- a separate draft (`draft_model`, naming a shape preset in conf/model/, e.g. llama32_1b_shape):
  D x the *draft's* `prefill_layer`(N + Q), from the same profile for the draft's shape
  (roofline: the formulas for that shape; measured: the draft's own tables, else refused);
  its weights are taken out of the device memory left for KV.
- selector=full (or a prompt with no context tokens): the `full` twin's prefill exactly.

Copies are not stretched against compute (a chunk load is a file read, not a pinned DMA beside
a GEMM). Decode and KV bytes are the `full` twin's: the runtime decodes a RAG prefill with a
normal cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.errors import ConfigError

from .costs import Costs, ModelShape
from .policies import Op, Policy

SELECTORS = ("full", "reuse", "random", "epic", "cacheblend", "draft")


def budget_of(r: float, n_ctx: int) -> int:
    """As runtime.rag.budget_of: ceil(r N), at most N."""
    return min(n_ctx, math.ceil(r * n_ctx - 1e-9))


@dataclass
class Rag(Policy):
    name: str = "rag"
    selector: str = "draft"
    recompute_ratio: float = 0.15
    chunk_len: int = 512
    draft_layers: int = 5
    tau_smooth: float = 0.4
    tau_cover: float = 0.7
    span_max: int = 16
    seed: int = 0
    epic_prefix: int | None = None  # epic: fixed first tokens per chunk (null = ceil(r * chunk))
    draft_model: str | None = None  # a separate draft: a shape preset (conf/model/<name>.yaml), costed from its own shape
    question_len: int = 32          # Q: the prompt's last tokens (policy.question_len)
    store: str = "warm"             # warm: chunks already in device memory, no load | disk: chunk_load per chunk

    def tables(self):
        base = super().tables()
        if self.selector == "full":
            return base
        extra = ("rope_rerotate", "selective_prefill") + (("chunk_load",) if self.store == "disk" else ())
        if self.selector == "cacheblend":
            extra += ("projections",)
        return base + extra

    # -- one prompt

    def split(self, prompt: int) -> tuple[int, int]:
        """(N context tokens, Q question tokens) of a prompt of this length."""
        q = min(self.question_len, prompt)
        return prompt - q, q

    def chunks(self, n_ctx: int) -> list[int]:
        full, rest = divmod(n_ctx, self.chunk_len)
        return [self.chunk_len] * full + ([rest] if rest else [])

    def recomputed(self, n_ctx: int, q: int) -> int:
        """m: context tokens chosen (within the budget) + every question token."""
        if self.selector == "reuse":
            return q
        if self.selector == "epic" and self.epic_prefix is not None:
            return sum(min(self.epic_prefix, c) for c in self.chunks(n_ctx)) + q
        return budget_of(self.recompute_ratio, n_ctx) + q

    def selector_cost(self, c: Costs, s: ModelShape, total: int) -> float:
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

    def prefill_graph(self, c: Costs, s: ModelShape, prompts: list[int]) -> list[Op]:
        split = [self.split(p) for p in prompts]
        if self.selector == "full" or all(n == 0 for n, _ in split):
            return Policy.prefill_graph(self, c, s, prompts)
        # a warm store hands back K/V already in device memory (runtime/rag.py ChunkStore.mem):
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


def check(p: Rag) -> None:
    """The runtime's shape-free knob checks (runtime.rag.check_policy), one line each."""
    if p.selector not in SELECTORS:
        raise ConfigError(f"policy.selector={p.selector!r} is not known; choose one of: {', '.join(SELECTORS)}")
    if p.store not in ("warm", "disk"):
        raise ConfigError(f"policy.store={p.store!r} is not known; choose one of: warm, disk")
    r = float(p.recompute_ratio)
    if math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ConfigError(f"policy.recompute_ratio={r} must be in [0, 1]")
    if p.chunk_len < 1:
        raise ConfigError(f"policy.chunk_len={p.chunk_len} must be >= 1")
    if p.selector == "draft" and p.draft_layers < 1:
        raise ConfigError(f"policy.draft_layers={p.draft_layers} must be >= 1")
    for f in ("tau_smooth", "tau_cover"):
        if not 0.0 <= float(getattr(p, f)) <= 1.0:
            raise ConfigError(f"policy.{f}={getattr(p, f)} must be in [0, 1]")
    if p.span_max < 1:
        raise ConfigError(f"policy.span_max={p.span_max} must be >= 1")
    if p.question_len < 1:
        raise ConfigError(f"policy.question_len={p.question_len} must be >= 1 (a rag prompt ends with a question)")
    if p.epic_prefix is not None and p.epic_prefix < 1:
        raise ConfigError(f"policy.epic_prefix={p.epic_prefix} must be >= 1 (tokens per chunk) or null (= ceil(r * chunk))")

