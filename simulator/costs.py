"""Profile -> cost functions: every time the simulator uses comes from a profile table.

A profile table (core/profile/schema.py) is a function measured (or derived) on a grid. Each
is turned into one interpolator, built once, with one rule for every table:

- measured noise: every table is first made non-decreasing along each axis (a running max);
- inside the grid: core/profile/interp.py's rule, the one the profiler uses too. Per axis a
  quadratic in the *raw* axis value through three neighbouring grid points (the mean of the two
  such quadratics where the cell has neighbours on both sides; an axis of two points: linear in
  the raw value; of one point: constant), clamped to the range of the bracketing cell's grid
  values. Over two axes each axis' rule, read on its profile (the table summed over the other
  axis), gives how far across its cell the point lies, and the cell's four corner values are
  blended multilinearly at those fractions. Costs are a + b x (transfers, GEMMs, decode
  attention) or a + b x + c x^2 (prefill attention): the rule reads both exactly between the
  points of a geometric grid (16, 64, 256 ...), where linear over log(x) read a + b x up to 25%
  high and c x^2 112% high at a 4x grid's geometric midpoints; over two axes it is exact for a +
  b batch + c context + d batch x context; the clamp keeps a noisy point from being overshot, and
  a non-decreasing table stays non-decreasing along every axis;
- below the grid: the first grid value (nearest; a fixed cost does not vanish for tiny sizes);
- above the grid: linear extrapolation in the raw axis value, with the slope of the last grid
  segment (transfers and kernels grow linearly in bytes / tokens / rows once past their fixed
  costs), clamped at zero; only up to EXTRAPOLATION_MARGIN x the grid's last point. Beyond that
  a measured table is refused in one line naming the table, the axis and the command that
  measures it; with the top-level `allow_extrapolation=true` it is read anyway and the axis is
  recorded (`Costs.extrapolated`, the result's `extrapolated` field).

Measured tables are keyed by the shape they were measured for (`models.<model>.shape`): a run
whose per-layer shape (SHAPE_KEYS) differs is refused the same way (`shape:<key>` when allowed).

Roofline profiles are not read as grids at all: their costs are the formulas of
core/profile/analytic.py, computed for the shape and point asked (any batch, context, k,
bits, heads, head_dim, dim, ffn), so nothing is extrapolated and no shape is refused.

Missing tables raise one ConfigError line naming the table and the file. The low-bit kernels
have one table per bit-width (core/profile/schema.py bits_table); a measured profile without
the table for the policy's bits is refused, naming the re-profile command (a roofline profile
computes every bit-width from its formulas).

`compute_scale` (analysis.validate's drift-corrected prediction): every measured kernel table (not
the transfers) is multiplied by it, the profile's speed index over the one measured at the point.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from core.policies import KV_ELEMENT_BYTES, ModelShape  # noqa: F401  (simulator.costs.ModelShape, as before)
from core.profile.schema import load as load_profile
from core.profile.analytic import SHAPE_KEYS, Roofline
from core.profile.analytic import Shape as AnalyticShape
from core.profile.interp import Grid
from core.profile.schema import (BITS_KERNELS, LOWBIT_KERNEL_ENV, TRANSFERS, bits_table, current_code_path,
                                 recorded_code_path)

# a measured grid is read (linearly extrapolated) up to this factor above its last point; beyond
# it a run is refused unless allow_extrapolation=true (then the axis is recorded)
EXTRAPOLATION_MARGIN = 2.0
GATHERS = ("host", "device")
_WARNED: set = set()       # (profile, model) pairs already warned about (code paths of an older schema)


class CodePathWarning(UserWarning):
    """A table of a profile older than schema 3 (no code_path: read as torch) where the runtime
    takes another path now (Costs._check_code_path)."""


class Table:
    """One profile table as a function of its axes (in axis order), p50 values."""

    def __init__(self, t: dict, where: str, beyond=None):
        self.where = where
        self.beyond = beyond           # called (where, axis, value, last grid point) above the grid
        self.names = list(t["axes"])
        self.axes = [np.asarray(v, dtype=float) for v in t["axes"].values()]
        self.values = np.asarray(t["p50"], dtype=float)
        self.extra = {k: v for k, v in t.items() if k not in ("axes", "unit", "p50", "p10", "p90")}
        self._build()

    def _build(self) -> None:
        # an axis with one point is constant along it: drop it from the interpolator
        self._live = [i for i, a in enumerate(self.axes) if len(a) > 1]
        # measured p50s carry noise (a gather of 64 rows timed below one of 16): a larger size
        # never costs less, so each table is made non-decreasing along every axis (running max)
        vals = self.values.reshape([len(a) for a in self.axes])
        for ax in range(vals.ndim):
            vals = np.maximum.accumulate(vals, axis=ax)
        self.values = vals
        vals = vals[tuple(slice(None) if i in self._live else 0 for i in range(len(self.axes)))]
        if not self._live:
            self._const = float(vals)
            return
        self._grid = Grid([self.axes[i] for i in self._live], vals)     # core/profile/interp.py's rule
        self._lo = [float(self.axes[i][0]) for i in self._live]
        self._hi = [float(self.axes[i][-1]) for i in self._live]
        self._prev = [float(self.axes[i][-2]) for i in self._live]

    def __call__(self, *x: float) -> float:
        if len(x) != len(self.axes):
            raise TypeError(f"{self.where} takes {self.names}, got {len(x)} values")
        if not self._live:
            return self._const
        x = [float(x[i]) for i in self._live]
        clip = [min(max(v, lo), hi) for v, lo, hi in zip(x, self._lo, self._hi)]
        f = self._grid.inside(clip)
        for j, (v, hi, prev) in enumerate(zip(x, self._hi, self._prev)):
            if v > hi:                                   # last segment's slope, raw axis
                if self.beyond is not None:
                    self.beyond(self.where, self.names[self._live[j]], v, hi)
                at_prev = list(clip)
                at_prev[j] = prev
                slope = (self._grid.inside(clip) - self._grid.inside(at_prev)) / (hi - prev)
                f += (v - hi) * slope
        return max(f, 0.0)


class Formula:
    """A roofline cost as a table-like callable: the analytic formula, for any point."""

    def __init__(self, f, where: str):
        self.f, self.where = f, where

    def __call__(self, *x: float, **kw) -> float:
        return float(self.f(*x, **kw))


@dataclass
class Costs:
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
    extrapolated: set = field(default_factory=set)   # "<table>:<axis>" / "shape:<key>" read beyond what was measured
    roofline: Roofline | None = None                  # set by bind() on a roofline profile
    extra_weights_bytes: int = 0                      # another model in device memory (a RAG draft)
    compute_scale: float = 1.0      # kernel tables x this (drift correction); 1 = as profiled

    @classmethod
    def load(cls, path: str | Path, model: str, allow_extrapolation: bool = False) -> "Costs":
        path = Path(path)
        prof = load_profile(path)
        analytic = prof["provenance"].get("kind") == "roofline"
        if model not in prof["models"] and not analytic:
            raise ConfigError(f"{path}: no tables for model={model!r}; profiled models: "
                              f"{', '.join(prof['models'])} (python -m runtime.profile --model {model})")
        c = cls(path, prof, model, allow_extrapolation=bool(allow_extrapolation))
        if analytic and model in prof["models"]:          # until bind(): the shape the profile names
            s = prof["models"][model]["shape"]
            c.bind(s, s["n_layers"], KV_ELEMENT_BYTES[prof["models"][model]["kv_dtype"]])
        return c

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
        if not shape and value <= hi * EXTRAPOLATION_MARGIN:
            return
        tag = f"shape:{axis}" if shape else f"{where}:{axis}"
        if self.allow_extrapolation:
            self.extrapolated.add(tag)
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
            if not isinstance(t, dict) or "axes" not in t:
                if base in BITS_KERNELS:
                    raise ConfigError(f"{self.path}: no {bits.removesuffix('bit')}-bit table '{where}' (policy.bits="
                                      f"{bits.removesuffix('bit')}); re-profile: python -m runtime.profile --model {self.model}")
                raise ConfigError(f"{self.path}: missing table '{where}' (this policy needs it); re-profile")
            if not transfer:
                self._check_code_path(name, t, where)
            if not transfer and self.compute_scale != 1.0:
                t = {**t, **{q: (np.asarray(t[q], dtype=float) * self.compute_scale).tolist()
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
            others = [n for n, u in self.profile["models"][self.model]["kernels"].items()
                      if isinstance(u, dict) and "axes" in u and recorded_code_path(u) != current_code_path(dev, n)]
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

    @cached_property
    def overlap(self) -> dict:
        o = self.profile["transfers"].get("overlap")
        if not isinstance(o, dict) or "gemm_slowdown_with_copy" not in o:
            raise ConfigError(f"{self.path}: missing 'transfers.overlap.gemm_slowdown_with_copy'; re-profile")
        return o

    @property
    def link_kind(self) -> str:
        """How copies run, as the runtime runs them (runtime/transfer.py):
        - `device`: a GPU's copy engines, H2D and D2H each beside the compute stream;
        - `emulated`: one worker thread on a CPU box (hardware.link.gbps), both directions in
          one FIFO, beside compute;
        - `direct`: a CPU box without emulation: a copy is a memcpy on the compute thread,
          so it overlaps nothing."""
        if self.profile["device"].get("type") != "cpu":
            return "device"
        return "emulated" if self.link else "direct"

    def engine(self, name: str) -> str:
        """The engine a copy op (`h2d` / `d2h`) occupies under `link_kind`."""
        kind = self.link_kind
        if kind == "direct":
            return "compute"
        if kind == "emulated":
            return "h2d"
        return name

    @property
    def gemm_slowdown(self) -> float:
        """How much a copy running beside compute slows it (1: not at all)."""
        kind = self.link_kind
        if kind == "direct":
            return 1.0                      # the copy is not beside compute but in series with it
        if kind == "emulated":              # the bytes move on the caller's thread: see issue_cost
            return 1.0
        return float(self.overlap["gemm_slowdown_with_copy"])

    def issue_cost(self, nbytes: float) -> float:
        """Compute-thread seconds to issue copies of `nbytes`: the emulated link moves the bytes
        at once with a memcpy on the caller's thread (runtime/transfer.py EmulatedLink), and only
        their completion waits for the link. Zero elsewhere (a copy engine or DirectLink's copy,
        which is already an op of its own on the compute engine)."""
        if self.link_kind != "emulated" or nbytes <= 0:
            return 0.0
        return self.table("h2d_pinned")(nbytes)

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

    # -- costs the policies use (seconds)

    def decode_layer(self, batch: float, ctx: float, attn: str, rows: float | None = None,
                     bits: float | None = None, group_size: int | None = None) -> float:
        """One decode layer of `batch` sequences over `ctx` tokens with attention table `attn`,
        carrying `rows` query rows in all (default `batch`; SpeCache's speculative token makes
        it 2 x batch: two query rows of one sequence, which read that sequence's K/V once).

        The profile's `decode_layer` is a whole layer (kernels + Python glue) timed inside the
        whole model. Three forms:
        - (batch, context), measured with the `full` policy: read at (batch, ctx); extra query
          rows add what they add at the table's smallest context (GEMM rows, no K/V),
          dl(rows, c0) - dl(batch, c0); another policy's attention adds its difference from
          `full` in the lone-layer kernel tables, attn(B, ctx) - full(B, ctx);
        - (batch) at a small context (its "context" key; older measured profiles): the
          attention table adds its growth from there, attn(B, ctx) - attn(B, context);
        - (batch) without a "context" key: no attention at all (roofline profiles derive it
          from the weight GEMMs and the glue), so attn(B, ctx) is added whole.
        Roofline profiles: the formulas, the weight GEMMs at `rows` and the attention reading
        `batch` sequences' K/V (at `bits` / `group_size` for the low-bit table) once.
        (A measured profile's low-bit table is chosen by name: the policy's `attn` is
        decode_attention_kivi[_<b>bit]; `bits` is read by the formulas only.)"""
        rows = batch if rows is None else rows
        if self.analytic:
            r = self.roofline
            if attn == "decode_attention_full":
                a = r.decode_attention_full(batch, ctx, rows)
            else:
                a = r.decode_attention_kivi(batch, ctx, rows, **_lowbit(bits, group_size))
            return r.decode_layer(rows) + a
        dl = self.table("decode_layer")
        a = self.table(attn)
        if len(dl.axes) == 2:
            c0 = float(dl.axes[1][0])
            base = dl(batch, ctx) + (dl(rows, c0) - dl(batch, c0) if rows != batch else 0.0)
            if attn != "decode_attention_full":          # kivi at its bits: decode_attention_kivi[_<b>bit]
                base += a(batch, ctx) - self.table("decode_attention_full")(batch, ctx)
            return max(base, 0.0)
        base = dl(rows)
        ctx0 = dl.extra.get("context")
        if ctx0 is None:
            return base + a(rows, ctx)
        ctx0 = max(float(ctx0), float(a.axes[1][0]))
        return max(base + a(rows, ctx) - a(rows, ctx0), 0.0)

    def h2d(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self._over_link(nbytes) if self.link else self.table("h2d_pinned")(nbytes)

    def d2h(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        return self._over_link(nbytes) if self.link else self.table("d2h_pinned")(nbytes)

    def _over_link(self, nbytes: float) -> float:
        """One copy over the emulated link: the deadline rule of runtime/transfer.py."""
        bw, latency = self.link
        return latency + nbytes / bw

    def score_topk(self, rows: float, ctx: float, bits: float | None = None, group_size: int | None = None,
                   batch: float | None = None) -> float:
        """Low-bit scores of `rows` query rows over `ctx` tokens and the top-k (SpeCache)."""
        if self.analytic:
            return self.roofline.score_topk(rows, ctx, batch=batch, **_lowbit(bits, group_size))
        return self.table(bits_table("score_topk", 2 if bits is None else bits))(rows, ctx)

    def quantize(self, tokens: float, bits: float | None = None, group_size: int | None = None) -> float:
        if self.analytic:
            return self.roofline.quantize(tokens, **_lowbit(bits, group_size))
        return self.table(bits_table("quantize", 2 if bits is None else bits))(tokens)

    def gather(self, nbytes: float, mode: str = "host", over_link: bool = True) -> float:
        """Fetch scattered 16-bit rows from host memory (`policy.gather`):
        - host: index_select into a staging buffer + one copy, by the gather table's own row size
          (roofline: host gather rate + the link);
        - device: a device kernel reads the rows from pinned host memory (UVA), no host pass:
          roofline at the link's rate; a measured GPU profile's `transfers.gather_device`; a CPU
          profile emulates it with the same index_select (there host and device are one memory),
          so it costs as `host`."""
        if nbytes <= 0:
            return 0.0
        if mode not in GATHERS:
            raise ConfigError(f"policy.gather={mode!r} is not known; choose one of: {', '.join(GATHERS)}")
        if self.analytic:
            return self.roofline.gather_device(nbytes) if mode == "device" else self.roofline.gather_host(nbytes)
        if mode == "device" and self.link_kind == "device":
            t = self.table("gather_device")
            return t(nbytes / float(t.extra.get("row_bytes", 256)))
        t = self.table("gather")
        rows = t(nbytes / float(t.extra.get("row_bytes", 256)))
        if self.link and over_link:   # the gathered K and V then cross the emulated link: two copies
            bw, latency = self.link
            rows += 2 * latency + nbytes / bw
        return rows

    def gather_split(self, nbytes: float, mode: str = "host") -> tuple[float, float]:
        """`gather` as (compute-thread seconds, link seconds). Over an emulated link on a CPU box
        the runtime's fetch (runtime/kv/specache.py `fetch`) index_selects the rows into staging
        and memcpys them on the caller's thread (the gather table's own measurement: index_select
        + one copy); only the transit waits for the link (two copies, K and V: latency + bytes /
        bandwidth each). Elsewhere the whole gather is one op on the link's engine (a GPU's copy
        engines; without emulation, `engine("h2d")` is the compute thread anyway)."""
        if nbytes <= 0:
            return 0.0, 0.0
        if self.link_kind != "emulated" or self.analytic:
            return 0.0, self.gather(nbytes, mode)
        if mode not in GATHERS:
            raise ConfigError(f"policy.gather={mode!r} is not known; choose one of: {', '.join(GATHERS)}")
        t = self.table("gather")
        bw, latency = self.link
        return t(nbytes / float(t.extra.get("row_bytes", 256))), 2 * latency + nbytes / bw

    def specache_extra(self, bits: int = 2) -> tuple[float, float]:
        """Per-layer seconds a SpeCache step's fetch and host write take in the whole model beyond
        what the lone transfer tables give for the same bytes (runtime/profile/measure.py
        `in_model_lowbit`, CPU profiles): (fetch, back); (0, 0) without that measurement."""
        if self.analytic or self.profile["device"].get("type") != "cpu":
            return 0.0, 0.0
        name = bits_table("gather_replace", bits)
        t = self.profile["models"][self.model]["kernels"].get(name) or {}
        im = t.get("in_model") or {}
        if im.get("fetch_s") is None:
            return 0.0, 0.0
        fetch = max(float(im["fetch_s"]) - self.gather(float(im["fetch_bytes"]), over_link=False), 0.0)
        back = max(float(im["back_s"]) - self.table("d2h_pinned")(float(im["back_bytes"])), 0.0)
        return fetch * self.compute_scale, back * self.compute_scale

    def replace(self, batch: float, k: float, shape: ModelShape, bits: int = 2) -> float:
        """Compute cost of attending with k fetched 16-bit rows replacing their low-bit ones.

        The profile's `gather_replace` (batch x k) includes the fetch; a measured one also
        includes the mixed attention over its "context" key. Both are taken out (the fetch runs
        on the H2D engine, the attention is the kivi table's), clamped at zero, made monotone in
        k (a running max) and anchored at k = 0 -> 0 (k = 0 is plain kivi)."""
        if k <= 0:
            return 0.0
        if self.analytic:
            return self.roofline.replace(batch, k)
        key = f"replace_{bits}bit"
        if key not in self.tables:
            self.tables[key] = self._replace_table(shape, bits)
        return self.tables[key](batch, k)

    def _replace_table(self, shape: ModelShape, bits: int = 2) -> Table:
        gr = self.table(bits_table("gather_replace", bits))
        kivi = self.table(bits_table("decode_attention_kivi", bits))
        ctx = gr.extra.get("context")
        B, K = gr.axes
        vals = np.empty((len(B), len(K)))
        for i, b in enumerate(B):
            for j, k in enumerate(K):
                # the gather as the table timed it (no emulated link: that is the run's, not the table's)
                v = gr.values[i][j] - self.gather(2 * b * k * shape.kv_row, over_link=False)
                if ctx is not None:
                    v -= kivi(b, ctx)
                vals[i, j] = max(v, 0.0)
        vals = np.maximum.accumulate(vals, axis=1)
        # in the whole model (runtime/profile/measure.py `in_model_lowbit`): the replace part of a
        # SpeCache layer as the engine ran it. The table keeps its growth with batch and k and is
        # shifted to that level at the measured point (a shift, not a scale: the lone-layer
        # difference is often 0 there, all of it fixed per-layer work the lone kernels miss)
        im = gr.extra.get("in_model") or {}
        if im.get("replace_s") is not None and not self.analytic:
            at = Table({"axes": {"batch": list(B), "k": list(K)}, "unit": "s", "p50": vals.tolist()}, "replace")
            vals = np.maximum(vals + (float(im["replace_s"]) - at(im["rows"], im["k"])), 0.0)
            vals = np.maximum.accumulate(vals, axis=1)
        # anchor k=0 -> 0 on a log axis: a point well below the first k keeps interpolation
        # monotone; below it the value is 0 (nearest)
        k0 = K[0] / 16
        t = {"axes": {"batch": list(B), "k": [k0, *K]}, "unit": "s",
             "p50": np.concatenate([np.zeros((len(B), 1)), vals], axis=1).tolist()}
        t["p10"] = t["p90"] = t["p50"]
        return Table(t, f"models.{self.model}.kernels.{bits_table('gather_replace', bits)} (replace part)",
                     beyond=self._beyond_measured)


def _lowbit(bits: float | None, group_size: int | None) -> dict:
    """The formulas' low-bit knobs: the policy's, else the profile's defaults (2 bits, group 64)."""
    return {"bits": 2 if bits is None else bits, "group_size": 64 if group_size is None else group_size}
