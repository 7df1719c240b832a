"""`policy=rag`: chunk K/V reuse with selective recompute (SpecCache and its baselines). A prompt
is N context tokens in chunks of `chunk_len` and a question of Q = min(`question_len`, P)
tokens; ceil(r N) context tokens plus the question are recomputed. The KV held afterwards is a
`full` cache."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from core.errors import ConfigError

from .base import declare
from .full import FullPolicyConfig

DRAFT_SELECTORS = ("draft", "draft_dev", "draft_rel", "draft_attn")   # the D-layer draft's signals, span completion
ORACLES = ("oracle_dev", "oracle_norm")       # the target's own full prefill: runtime-only measuring sticks
SELECTORS = ("full", "reuse", "random", "epic", "cacheblend") + DRAFT_SELECTORS + ORACLES
SINK_SELECTORS = ("random", "cacheblend") + DRAFT_SELECTORS + ORACLES    # those that take policy.sink_tokens
FEATURE_BYTES = 4                 # draft_rel's chunk-alone feature: one float32 hidden-state norm per token and layer
STORES = ("warm", "disk")         # policy.store: where a request finds its chunks' K/V


def knob(policy, name: str):
    """A `policy=rag` knob of any config object (DictConfig, namespace; None = none), else its
    declared default."""
    default = getattr(RagPolicyConfig, name)
    return getattr(policy, name, default) if policy is not None else default


def deep_layers(n_layers: int) -> range:
    """The last third of n layers (ceil(n/3) of them): where the draft and the oracles read."""
    return range(n_layers - math.ceil(n_layers / 3), n_layers)


def feature_bytes(n_tokens: int, n_layers: int) -> int:
    """Bytes of a chunk's stored chunk-alone features (draft_rel): one float32 norm per token and
    layer, every layer (any draft_layers reads its own deep third)."""
    return FEATURE_BYTES * n_tokens * n_layers


def budget_of(r: float, n_ctx: int) -> int:
    """ceil(r N) context tokens, at most N (the 1e-9 keeps r N = 15.000000000000002 at 15)."""
    return min(n_ctx, math.ceil(r * n_ctx - 1e-9))


@declare
@dataclass
class RagPolicyConfig(FullPolicyConfig):
    name: str = "rag"
    selector: str = "draft"         # full | reuse | random | epic | cacheblend | draft (SpecCache) | draft_dev | draft_rel | draft_attn | oracle_dev | oracle_norm (runtime only)
    recompute_ratio: float = 0.15   # r: budget = ceil(r * N) of the N chunk tokens; the question is always recomputed
    chunk_len: int = 512            # tokens per document chunk (each prefilled alone at positions 0..n-1)
    draft_layers: int = 5           # draft = the target's first D layers (selector=draft*; they read its last ceil(D/3))
    tau_smooth: float = 0.4         # span cut where neighbouring normalised scores differ by more
    tau_cover: float = 0.7          # a span is completed when this share of it is chosen
    span_max: int = 16              # longest span
    seed: int = 0                   # selector=random
    epic_prefix: Optional[int] = None   # selector=epic: the first n tokens of every chunk (the paper's 8/16/32, r ignored); null = n = ceil(r * chunk)
    draft_model: Optional[str] = None   # selector=draft: a separate draft; runtime: GGUF file or transformers folder (tokens aligned by character offsets); simulator: a shape preset of conf/model/ (e.g. llama32_1b_shape); null = the target
    store: str = "warm"             # warm: chunk K/V already in device memory | disk: read from the store's files
    sink_tokens: int = 0            # the first n tokens of every chunk always recomputed, inside the ceil(r N) budget (random, cacheblend, draft*, oracle_*)
    store_max_bytes: Optional[int] = 4 * 2 ** 30   # store=disk (runtime only): cap of the chunk files under <cache root>/chunks; least recently used evicted past it; null = no cap
    question_len: int = 32          # runtime.bench / simulator: the prompt's last tokens are the question, the rest chunks of chunk_len

    hf_cache: ClassVar[bool] = False         # a prefill technique, not a decode cache
    hf_fallback: ClassVar[bool] = False
    short_form: ClassVar[Optional[str]] = None
    label_knobs: ClassVar[tuple[str, ...]] = ("selector", "recompute_ratio", "draft_layers", "sink_tokens")

    def check(self, head_dim: int | None = None) -> None:
        super().check(head_dim)
        self.require_choice("selector", self.selector, SELECTORS)
        self.require_choice("store", self.store, STORES)
        r = float(self.recompute_ratio)
        if math.isnan(r) or not 0.0 <= r <= 1.0:
            raise ConfigError(f"policy.recompute_ratio={r} must be in [0, 1]")
        if self.chunk_len < 1:
            raise ConfigError(f"policy.chunk_len={self.chunk_len} must be >= 1")
        if self.selector in DRAFT_SELECTORS and self.draft_layers < 1:
            raise ConfigError(f"policy.draft_layers={self.draft_layers} must be >= 1")
        for f in ("tau_smooth", "tau_cover"):
            if not 0.0 <= float(getattr(self, f)) <= 1.0:
                raise ConfigError(f"policy.{f}={getattr(self, f)} must be in [0, 1]")
        if self.span_max < 1:
            raise ConfigError(f"policy.span_max={self.span_max} must be >= 1")
        if self.question_len < 1:
            raise ConfigError(f"policy.question_len={self.question_len} must be >= 1 (a rag prompt ends with a question)")
        if self.store_max_bytes is not None and self.store_max_bytes < 1:
            raise ConfigError(f"policy.store_max_bytes={self.store_max_bytes} must be >= 1 (bytes of chunk files on "
                              "disk) or null (no cap)")
        if self.epic_prefix is not None and self.epic_prefix < 1:
            raise ConfigError(f"policy.epic_prefix={self.epic_prefix} must be >= 1 (tokens per chunk) or null (= ceil(r * chunk))")
        self._check_selection()

    def _check_selection(self) -> None:
        """The knobs of the deviation / attention selectors and sink tokens."""
        if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or self.sink_tokens < 0:
            raise ConfigError(f"policy.sink_tokens={self.sink_tokens!r} must be an integer >= 0")
        if self.sink_tokens and self.selector not in SINK_SELECTORS:
            raise ConfigError(f"policy.sink_tokens={self.sink_tokens} does not apply to selector={self.selector} "
                              f"(only {', '.join(SINK_SELECTORS)}); set policy.sink_tokens=0")
        if self.selector == "draft_dev" and self.draft_layers == 1:
            raise ConfigError("policy.draft_layers=1: draft_dev's deep third is layer 0, whose K/V depend on the token "
                              "alone and never deviate; use draft_layers >= 2")
        if self.draft_model is not None and self.selector in DRAFT_SELECTORS and self.selector != "draft":
            raise ConfigError(f"policy.draft_model={self.draft_model}: selector={self.selector} runs the target's own "
                              "first draft_layers layers only; use draft_model=null or selector=draft")

    simulator_only: ClassVar[dict[str, str]] = {
        "draft_model": "runtime: a GGUF file or transformers folder that must exist; simulator: the name of a "
                       "shape preset in conf/model/ (simulator/run.py checks it and bounds draft_layers by it)",
    }

    def check_model(self, max_seq_len: int, n_layers: int, runner: str = "runtime.bench",
                    separate_draft: bool = False) -> None:
        """The checks that need the target model, the same in both halves; draft_model's form
        is each half's own (simulator_only)."""
        if self.chunk_len > max_seq_len:
            raise ConfigError(f"policy.chunk_len={self.chunk_len} must be in [1, {max_seq_len}] (the model's context)")
        separate = separate_draft or self.draft_model is not None
        if self.selector in DRAFT_SELECTORS and not separate and not 1 <= self.draft_layers <= n_layers:
            raise ConfigError(f"policy.draft_layers={self.draft_layers} must be in [1, {n_layers}] (the model's layers)")
        dm = self.draft_model
        if runner == "simulator.run":
            return
        if self.selector == "draft" and dm is not None and not Path(str(dm)).expanduser().exists():
            raise ConfigError(f"policy.draft_model={dm}: no such file or folder; give a GGUF file or a local "
                              "transformers folder, or null (= the target's first draft_layers layers)")

    def knob_label(self) -> str:
        return f"{self.selector}-r{self.recompute_ratio:g}" + (f"-D{self.draft_layers}" if self.selector in DRAFT_SELECTORS else "") \
            + (f"-s{self.sink_tokens}" if self.sink_tokens else "")

    def requests_per_prefill(self) -> int | None:
        return 1                    # the runtime runs one RAG request at a time

    def reads_rag_tables(self) -> bool:
        return True

    # -- one prompt, cut as runtime.bench cuts it

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
