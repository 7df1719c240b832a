"""What every policy declaration shares: the model shape its byte formulas read, the base
dataclass (`name`, `kv_dtype`), the registry both halves look names up in, and `spec_of`, which
builds and checks a run's declaration once (docs/policies.md)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import ClassVar, Optional

from omegaconf import MISSING

from core.errors import ConfigError

from .registry import Registry

KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_DTYPES = ("auto", *KV_ELEMENT_BYTES)


def kv_dtype_name(name: str, device_type: str) -> str:
    """policy.kv_dtype resolved on a device type: `auto` is float32 on CPU, float16 on CUDA
    (runtime/kv/__init__.py says why)."""
    if name == "auto":
        return "float32" if device_type == "cpu" else "float16"
    if name not in KV_ELEMENT_BYTES:
        raise ConfigError(f"policy.kv_dtype={name!r} is not known; use one of {', '.join(KV_DTYPES)}")
    return name


@dataclass
class ModelShape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    kv_dtype: str            # resolved: float32 | float16 | bfloat16

    @property
    def kv_elem(self) -> int:
        return KV_ELEMENT_BYTES[self.kv_dtype]

    @property
    def kv_row(self) -> int:
        """Bytes of one token's K (or V) of one layer, all KV heads."""
        return self.n_kv_heads * self.head_dim * self.kv_elem


@dataclass
class PolicyConfig:
    """A policy's knobs (the Hydra schema of conf/policy/<name>.yaml), their checks and its KV
    bytes. Subclasses add knobs, extend `check` and override the byte formulas."""

    name: str = MISSING
    kv_dtype: str = "auto"          # auto (float32 on CPU, float16 on CUDA) | float32 | float16 | bfloat16

    # Knobs whose runtime rule the simulator does not apply, on purpose, each with the reason
    # (core/checks.py: every other check is the same code in both halves). Empty for most.
    simulator_only: ClassVar[dict[str, str]] = {}

    # -- what the policy is to the other entry points (properties of the policy, not of a run)

    # runtime/hf.py, transformers' generate(): whether it has a Cache class there, whether a dense
    # Cache.update fallback exists (attention other than attn_implementation="kvtestbed"), and
    # knob defaults that differ there
    hf_cache: ClassVar[bool] = True
    hf_fallback: ClassVar[bool] = False
    hf_defaults: ClassVar[dict] = {}
    # runtime/evals/specs.py, short command-line names (`kivi2-g32`, `specache-k64-b2`): the
    # grammar shown (None = no short name), the knob the name's own digits give, option letter ->
    # integer knob, flag -> (knob, value), the options that must be given
    short_form: ClassVar[Optional[str]] = ""     # "": the bare name (`full`); None: none
    short_head: ClassVar[str] = ""
    short_options: ClassVar[dict[str, str]] = {}
    short_flags: ClassVar[dict[str, tuple]] = {}
    short_required: ClassVar[tuple[str, ...]] = ()
    # analysis/sweep.py: the knobs a result label (`label()`) encodes, in order, e.g. ("k", "bits")
    label_knobs: ClassVar[tuple[str, ...]] = ()

    def check(self, head_dim: int | None = None) -> None:
        """One-line ConfigErrors naming the field; `head_dim` when the model is known. Every
        number a knob holds is finite (NaN / inf refused by core/checks.py before this). A run
        calls it once (core/checks.py check_config) and carries the checked object."""
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"policy.kv_dtype={self.kv_dtype!r} is not known; use one of {', '.join(KV_DTYPES)}")
        self.check_knobs()
        if head_dim is not None:
            self.check_head_dim(head_dim)

    def check_knobs(self) -> None:
        """A subclass's own knob rules, run by `check` before the head_dim ones (which may
        divide by a knob this refuses)."""

    @staticmethod
    def require_choice(key: str, value, allowed) -> None:
        """The one-line error of a knob that takes one of a few names."""
        if value not in allowed:
            raise ConfigError(f"policy.{key}={value!r} is not known; choose one of: {', '.join(allowed)}")

    def check_head_dim(self, head_dim: int) -> None:
        """The knob rules that need the model's head_dim (run by `check` when it is known, and
        by core/checks.py check_shape / runtime.kv make_cache once the model is loaded)."""

    @classmethod
    def plugin(cls) -> str | None:
        """The package a declaration shipped outside this project lives in (its `policy.plugin`,
        whose `kv` and `twin` modules the halves import), None for one in tree."""
        pkg = cls.__module__.rpartition(".")[0]
        return None if pkg in ("core.policies", "runtime.kv", "simulator.policies") else pkg

    def hf_check(self) -> None:
        """Refuse knobs transformers' generate() cannot run (runtime/hf.py)."""

    def check_model(self, max_seq_len: int, n_layers: int, runner: str = "runtime.bench") -> None:
        """The checks that need the model (its context, its layers), for `runner`
        (runtime.bench | runtime.serve | simulator.run); core/checks.py calls it in both halves."""

    # -- bytes (the runtime's KVCache.nbytes() must equal these for the same config and tokens)

    def layer_bytes(self, tokens: list[int], s: ModelShape) -> tuple[float, float]:
        """(device, host) bytes of one layer holding a batch with these real-token counts."""
        return 2 * sum(tokens) * s.kv_row, 0

    def kv_bytes(self, tokens: list[int], s: ModelShape) -> tuple[int, int]:
        d, h = self.layer_bytes(tokens, s)
        return s.n_layers * int(round(d)), s.n_layers * int(round(h))

    def peak_lengths(self, n: int) -> list[int]:
        return [n]

    def reserve_bytes(self, n: int, s: ModelShape) -> int:
        """Device bytes to reserve for a request that will reach n tokens: the most it holds
        at any length up to n (the low-bit policies shrink when a group is quantized)."""
        return max(self.kv_bytes([m], s)[0] for m in self.peak_lengths(n))

    def reserve_host_bytes(self, n: int, s: ModelShape) -> int:
        """Host bytes to reserve for a request that will reach n tokens (its host KV only grows)."""
        return self.kv_bytes([n], s)[1]

    def label(self) -> str:
        """A short name of this configuration for tables (`kivi-2b`, `specache-k64-2b`)."""
        return self.name + (f"-{self.knob_label()}" if self.knob_label() else "")

    def knob_label(self) -> str:
        return ""

    def topk_rows(self) -> int | None:
        """16-bit rows fetched per KV head per step, for tables that compare the low-bit
        policies on one axis (kivi: 0, specache: k); None where the notion does not apply."""
        return None

    def profile_bits(self) -> set[int]:
        """The low-bit widths whose profile tables this policy reads."""
        return set()

    def query_rows(self, batch: int) -> int:
        """Query rows a decode step carries per batch (SpeCache's guess doubles them)."""
        return batch

    def reads_rag_tables(self) -> bool:
        """Whether a profile needs the RAG tables (selective_prefill, rope_rerotate) for it."""
        return False

    def requests_per_prefill(self) -> int | None:
        """At most this many requests share one prefill (None: any)."""
        return None


SPECS = Registry("core.policies")      # name -> declaration: core/policies/<name>.py, or a plugin's


def declare(cls: type[PolicyConfig]) -> type[PolicyConfig]:
    """Class decorator: enter a policy declaration in the registry under its `name`."""
    return SPECS.add(cls.name, cls)


def _get(cfg, key, default=None):
    if isinstance(cfg, dict) or hasattr(cfg, "keys"):
        return cfg.get(key, default) if hasattr(cfg, "get") else default
    return getattr(cfg, key, default)


def load_plugin(cfg, part: str = "declaration") -> None:
    """Import `<policy.plugin>.<part>`, if the config sets `plugin`: a policy shipped outside this
    package is a package with `declaration` (its knobs, checks and bytes), `kv` (the runtime
    cache) and `twin` (the simulator twin) modules, each entering itself in its registry."""
    pkg = cfg.plugin() if isinstance(cfg, PolicyConfig) else _get(cfg, "plugin")
    if pkg:
        try:
            importlib.import_module(f"{pkg}.{part}")
        except ImportError as e:
            raise ConfigError(f"policy.plugin={pkg}: cannot import {pkg}.{part} ({e}); name a package with "
                              "declaration, kv and twin modules") from None


def knobs_of(cfg, cls: type) -> dict:
    """The fields of `cls` that a config (DictConfig, dict or namespace) sets."""
    out = {}
    for f in fields(cls):
        if isinstance(cfg, dict) or hasattr(cfg, "keys"):
            if f.name in cfg:
                out[f.name] = cfg[f.name]
        elif hasattr(cfg, f.name):
            out[f.name] = getattr(cfg, f.name)
    return out


def spec_of(cfg, head_dim: int | None = None, check: bool = True) -> PolicyConfig:
    """The declaration of a policy config (`name` and its knobs: a DictConfig, dict or
    namespace), checked unless told not to. A declaration is returned as it is: it was built
    and checked once, where the run began (core/checks.py)."""
    if isinstance(cfg, PolicyConfig):
        return cfg
    load_plugin(cfg)
    cls = SPECS.lookup(_get(cfg, "name"))
    spec = cls(**knobs_of(cfg, cls))
    if check:
        spec.check(head_dim)
    return spec


def defaults(name: str) -> dict:
    """A policy's knobs and their declared defaults (without `name` and `plugin`)."""
    return {f.name: f.default for f in fields(SPECS[name]) if f.name != "name"}
