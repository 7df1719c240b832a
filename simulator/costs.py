"""Profile -> cost functions: every time the simulator uses comes from one profile and one model.

`Costs` is built once per run, complete: the profile's tables for the model, and the run's own
terms (an emulated link, a drift-correction scale, another model's weights beside it, and the
set that records what was read beyond what was measured). Its costs come in two parts:
simulator/copies.py (copies and gathers) and simulator/kernels.py (compute); each measured table
is read through simulator/tables.py's `Table`. docs/simulator.md and docs/profiles.md say why.

- Measured tables are keyed by the shape they were measured for (`models.<model>.shape`): a run
  whose per-layer shape (SHAPE_KEYS) differs is refused in one line naming the command that
  measures it (`shape:<key>` recorded in `extrapolated` with allow_extrapolation=true); so is a
  reading past EXTRAPOLATION_MARGIN x a grid's last point (`<table>:<axis>`).
- Roofline profiles are not read as grids at all: their costs are the formulas of
  core/profile/analytic.py for the bound shape and the point asked, so nothing is extrapolated
  and no shape is refused.
- A missing table is one ConfigError line naming the table and the file; the low-bit kernels
  have one table per bit-width (core/profile/schema.py bits_table).
- A kernel table timed on another code path than the runtime takes now is refused (schema 3)
  or warned about once (older profiles: CodePathWarning).
- `compute_scale` (analysis.validate's drift-corrected prediction): every measured kernel table
  (not the transfers) is multiplied by it; a mapping scales each table by its own entry, "*"
  the rest (a prefill's drift differs from a decode step's: docs/validation.md, "Drift").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.policies import KV_ELEMENT_BYTES, ModelShape  # noqa: F401  (simulator.costs.ModelShape, as before)
from core.profile.analytic import SHAPE_KEYS, Roofline
from core.profile.analytic import Shape as AnalyticShape
from core.profile.schema import (BITS_KERNELS, LOWBIT_KERNEL_ENV, TRANSFERS, current_code_path, is_table,
                                 recorded_code_path, tables_of)
from core.profile.schema import load as load_profile

from .copies import GATHERS, CopyCosts  # noqa: F401  (simulator.costs.GATHERS, as before)
from .kernels import KernelCosts
from .tables import EXTRAPOLATION_MARGIN, Extrapolated, Formula, Table

_WARNED: set = set()       # (profile, model) pairs already warned about (code paths of an older schema)


class CodePathWarning(UserWarning):
    """A table of a profile older than schema 3 (no code_path: read as torch) where the runtime
    takes another path now (Costs._check_code_path)."""


@dataclass
class Costs(CopyCosts, KernelCosts):
    """Cost functions of one profile and one model: interpolated measured tables, or (roofline
    profiles) the analytic formulas for the bound shape (`bind`)."""

    path: Path
    profile: dict
    model: str
    tables: dict[str, Table] = field(default_factory=dict)
    # hardware.link: (bytes/s, latency s) of an emulated link (runtime/transfer.py EmulatedLink)
    # on a CPU profile; None = the profile's own copies
    link: tuple[float, float] | None = None
    allow_extrapolation: bool = False
    # "<table>:<axis>" / "shape:<key>" read beyond what was measured; a RAG draft's Costs holds
    # the target's set itself, so one run records one set
    extrapolated: set = field(default_factory=Extrapolated)
    roofline: Roofline | None = None                  # set by bind() on a roofline profile
    extra_weights_bytes: int = 0                      # another model in device memory (a RAG draft)
    compute_scale: float | dict = 1.0   # kernel tables x this (drift correction); {table: x, "*": x}; 1 = as profiled

    @classmethod
    def load(cls, path: str | Path, model: str, allow_extrapolation: bool = False, *,
             link: tuple[float, float] | None = None, compute_scale: float | dict = 1.0, extra_weights_bytes: int = 0,
             extrapolated: set | None = None) -> "Costs":
        """The costs of `model` in the profile at `path`, with the run's own terms (see the fields);
        `extrapolated`: a set to record into (shared with another Costs of the run), else a new one."""
        path = Path(path)
        prof = load_profile(path)
        analytic = prof["provenance"].get("kind") == "roofline"
        if model not in prof["models"] and not analytic:
            raise ConfigError(f"{path}: no tables for model={model!r}; profiled models: "
                              f"{', '.join(prof['models'])} (python -m runtime.profile --model {model})")
        c = cls(path, prof, model, link=link, allow_extrapolation=bool(allow_extrapolation),
                extrapolated=Extrapolated() if extrapolated is None else extrapolated, extra_weights_bytes=extra_weights_bytes,
                compute_scale=compute_scale)
        if analytic and model in prof["models"]:          # until bind(): the shape the profile names
            s = prof["models"][model]["shape"]
            c.bind(s, s["n_layers"], KV_ELEMENT_BYTES[prof["models"][model]["kv_dtype"]])
        return c

    def scale_of(self, name: str) -> float:
        """The drift correction of kernel table `name` (compute_scale's entry, else its "*")."""
        s = self.compute_scale
        return float(s.get(name, s.get("*", 1.0))) if isinstance(s, dict) else float(s)

    @property
    def analytic(self) -> bool:
        """Roofline profile: costs are formulas of the shape (core/profile/analytic.py)."""
        return self.profile["provenance"].get("kind") == "roofline"

    def measure_command(self, model: str | None = None) -> str:
        return f"python -m runtime.profile --model {model or self.model} (on {self.profile['device'].get('name', 'its device')})"

    def bind(self, shape: dict, n_layers: int, kv_elem: int) -> "Costs":
        """The shape this run asks for (the model's per-layer shape, layers, K/V element bytes).
        Roofline: the formulas are built for it. Measured: it must be the shape the tables were
        measured for (SHAPE_KEYS), else refused (or recorded, with allow_extrapolation)."""
        if self.analytic:
            self.roofline = Roofline.of_profile(self.profile, AnalyticShape.of(shape, n_layers, kv_elem))
            self.tables.clear()
            return self
        have = self.shape
        hd = lambda d: d.get("head_dim") or d["dim"] // d["n_heads"]   # noqa: E731
        for key in SHAPE_KEYS:
            want, got = (hd(shape), hd(have)) if key == "head_dim" else (shape.get(key), have.get(key))
            if want is not None and got is not None and int(want) != int(got):
                self._beyond_measured(f"models.{self.model}.shape", key, want, got, shape=True)
        return self

    def _beyond_measured(self, where: str, axis: str, value, hi, shape: bool = False) -> None:
        tag = f"shape:{axis}" if shape else f"{where}:{axis}"
        if not shape and value <= hi * EXTRAPOLATION_MARGIN:
            if hasattr(self.extrapolated, "near"):           # read linearly past the grid, within the margin
                self.extrapolated.near(tag, value, hi)
            return
        if self.allow_extrapolation:
            note = getattr(self.extrapolated, "note", None)      # how far, where the set keeps it (Extrapolated)
            note(tag, value, hi) if note else self.extrapolated.add(tag)
            return
        what = (f"model.args.{axis}={value} differs from the shape {self.path.name} measured ({axis}={hi})" if shape else
                f"{axis}={value:g} is beyond {where}'s measured grid (last point {hi:g}, read up to "
                f"{EXTRAPOLATION_MARGIN:g}x)")
        raise ConfigError(f"{self.path}: {what}; measure it with {self.measure_command()}, "
                          "or run anyway with allow_extrapolation=true (recorded in the result's `extrapolated`)")

    # -- table access (built once, on first use)

    def table(self, name: str) -> Table:
        if name not in self.tables:
            if self.analytic:
                if self.roofline is None:
                    raise RuntimeError("Costs.bind(shape) first: roofline costs are computed for a shape")
                base = name.rpartition("_")[0]
                fname = base if base in BITS_KERNELS else name      # formulas take bits as an argument
                f = getattr(self.roofline, "gather_host" if fname == "gather" else fname, None)
                if f is None or name.startswith("_"):
                    raise ConfigError(f"{self.path}: roofline has no cost '{name}'")
                self.tables[name] = Formula(f, f"roofline.{name}")
                return self.tables[name]
            transfer = name in TRANSFERS or name in self.profile["transfers"] or name == "gather_device"
            src, where = (self.profile["transfers"], f"transfers.{name}") if transfer else \
                (self.profile["models"][self.model]["kernels"], f"models.{self.model}.kernels.{name}")
            t = src.get(name)
            base, _, bits = name.rpartition("_")
            if not is_table(t):
                if base in BITS_KERNELS:
                    raise ConfigError(f"{self.path}: no {bits.removesuffix('bit')}-bit table '{where}' (policy.bits="
                                      f"{bits.removesuffix('bit')}); re-profile: python -m runtime.profile --model {self.model}")
                raise ConfigError(f"{self.path}: missing table '{where}' (this policy needs it); re-profile")
            if not transfer:
                self._check_code_path(name, t, where)
            if not transfer and self.scale_of(name) != 1.0:
                t = {**t, **{q: (np.asarray(t[q], dtype=float) * self.scale_of(name)).tolist()
                             for q in ("p10", "p50", "p90") if q in t}}
            self.tables[name] = Table(t, where, beyond=self._beyond_measured)
        return self.tables[name]

    def _check_code_path(self, name: str, t: dict, where: str) -> None:
        """A kernel table timed on another code path than the runtime takes now for it
        (core/profile/schema.py current_code_path: fused low-bit CPU kernels, torch, CUDA) is
        refused in one line naming the re-measure command; a profile older than schema 3 does
        not say which path it timed (read as `torch`): a CodePathWarning, one line on stderr
        naming the profile and its tables, once per profile and model, and read (the committed
        profiles are schema 1)."""
        now = current_code_path(self.profile["device"].get("type", "cpu"), name)
        timed = recorded_code_path(t)
        if timed == now:
            return
        hint = {"fused_cpu": f" (the fused low-bit CPU kernels are on; {LOWBIT_KERNEL_ENV}=0 takes the torch path)",
                "torch": f" ({LOWBIT_KERNEL_ENV}=0, or no C compiler for the fused kernels)" if timed == "fused_cpu"
                else ""}.get(now, "")
        why = f"{where} was timed on the {timed} code path; the runtime takes {now} now{hint}"
        if int(self.profile.get("schema_version", 0)) >= 3:
            raise ConfigError(f"{self.path}: {why}; re-measure it with {self.measure_command()}")
        key = (str(self.path), self.model)
        if key not in _WARNED:           # once per profile and model, naming every such table
            _WARNED.add(key)
            dev = self.profile["device"].get("type", "cpu")
            others = [n for n, u in tables_of(self.profile["models"][self.model]["kernels"])
                      if recorded_code_path(u) != current_code_path(dev, n)]
            # one line on stderr, attributed to the profile file (line 0: no source line under it)
            warnings.warn_explicit(f"schema {self.profile.get('schema_version')} (no code_path: read as torch): "
                                   f"models.{self.model}.kernels.{{{', '.join(others)}}} were timed on the {timed} "
                                   f"code path; the runtime takes {now} now{hint}; predictions may not be this "
                                   f"runtime's; re-measure with {self.measure_command()}",
                                   CodePathWarning, str(self.path), 0)

    def need(self, *names: str) -> None:
        """Fail early, naming the first table a policy needs that the profile lacks."""
        for n in names:
            self.table(n)

    @property
    def memory(self) -> dict:
        if self.analytic and self.roofline is not None:
            r = self.roofline
            return {"total_bytes": int(r.memory_total), "weights_bytes": r.s.weights_bytes(),
                    "activation_peak_bytes": r.activation_bytes(),
                    "runtime_overhead_bytes": int(r.a["runtime_overhead_bytes"]),
                    "kv_available_bytes": r.kv_available_bytes(self.extra_weights_bytes)}
        m = dict(self.profile["models"][self.model]["memory"])
        if self.extra_weights_bytes:
            m["kv_available_bytes"] = max(int(m["kv_available_bytes"]) - self.extra_weights_bytes, 0)
        return m

    @property
    def kv_dtype_auto(self) -> str:
        m = self.profile["models"].get(self.model)
        if m is None:                 # a roofline profile asked for a model it never tabulated
            return "float16"
        return m["kv_dtype"]          # required by the schema (core/profile/schema.py): never assumed

    @property
    def shape(self) -> dict:
        """The profile's shape of this model ({} for a model a roofline profile never tabulated)."""
        m = self.profile["models"].get(self.model)
        return dict(m["shape"]) if m else {}

    @property
    def weights_bytes(self) -> int:
        """This model's weights in device memory (a RAG draft's: what it takes from the target's KV room)."""
        if self.analytic:
            return self.roofline.s.weights_bytes()
        return int(self.memory.get("weights_bytes", 0))
