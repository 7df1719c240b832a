"""Profile -> cost functions: every time the simulator uses comes from a profile table.

A profile table (runtime/profile/schema.py) is a function measured (or derived) on a grid. Each
is turned into one interpolator, built once, with one rule for every table:

- inside the grid: linear interpolation of the p50 value over the *logarithm* of each axis
  (the grids are geometric: 16, 64, 256 ...), with scipy's RegularGridInterpolator;
- below the grid: the first grid value (nearest; a fixed cost does not vanish for tiny sizes);
- measured noise: every table is first made non-decreasing along each axis (a running max);
- above the grid: linear extrapolation in the raw axis value, with the slope of the last grid
  segment (transfers and kernels grow linearly in bytes / tokens / rows once past their fixed
  costs; extrapolating in log space would flatten them), clamped at zero.

Missing tables raise one ConfigError line naming the table and the file. The low-bit kernels
have one table per bit-width (runtime/profile/schema.py bits_table); a roofline profile without
the 1-/4-bit tables reads its 2-bit ones (its low-bit costs are analytic and bit-agnostic so far),
a measured one is refused, naming the re-profile command.

`compute_scale` (analysis.validate's drift-corrected prediction): every kernel table (not the
transfers) is multiplied by it, the profile's speed index over the one measured at the point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from runtime.errors import ConfigError
from runtime.profile import load as load_profile
from runtime.profile.schema import BITS_KERNELS, TRANSFERS, bits_table

KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class Table:
    """One profile table as a function of its axes (in axis order), p50 values."""

    def __init__(self, t: dict, where: str):
        self.where = where
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
        self._interp = RegularGridInterpolator([np.log(self.axes[i]) for i in self._live], vals, method="linear")
        self._lo = [self.axes[i][0] for i in self._live]
        self._hi = [self.axes[i][-1] for i in self._live]
        self._prev = [self.axes[i][-2] for i in self._live]

    def __call__(self, *x: float) -> float:
        if len(x) != len(self.axes):
            raise TypeError(f"{self.where} takes {self.names}, got {len(x)} values")
        if not self._live:
            return self._const
        x = [float(x[i]) for i in self._live]
        clip = [min(max(v, lo), hi) for v, lo, hi in zip(x, self._lo, self._hi)]
        f = float(self._interp([np.log(clip)])[0])
        for j, (v, hi, prev) in enumerate(zip(x, self._hi, self._prev)):
            if v > hi:                                   # last segment's slope, raw axis
                at_prev = list(clip)
                at_prev[j] = prev
                slope = (f - float(self._interp([np.log(at_prev)])[0])) / (hi - prev)
                f += (v - hi) * slope
        return max(f, 0.0)


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
class Costs:
    """Interpolated cost functions of one profile and one model in it."""

    path: Path
    profile: dict
    model: str
    tables: dict[str, Table] = field(default_factory=dict)
    # hardware.link: (bytes/s, latency s) of an emulated link (runtime/transfer.py EmulatedLink)
    # on a CPU profile; None = the profile's own copies
    link: tuple[float, float] | None = None
    compute_scale: float = 1.0      # kernel tables x this (drift correction); 1 = as profiled

    @classmethod
    def load(cls, path: str | Path, model: str) -> "Costs":
        path = Path(path)
        prof = load_profile(path)
        if model not in prof["models"]:
            raise ConfigError(f"{path}: no tables for model={model!r}; profiled models: "
                              f"{', '.join(prof['models'])} (python -m runtime.profile --model {model})")
        return cls(path, prof, model)

    # -- table access (built once, on first use)

    def table(self, name: str) -> Table:
        if name not in self.tables:
            transfer = name in TRANSFERS or name in self.profile["transfers"]
            src, where = (self.profile["transfers"], f"transfers.{name}") if transfer else \
                (self.profile["models"][self.model]["kernels"], f"models.{self.model}.kernels.{name}")
            t = src.get(name)
            base, _, bits = name.rpartition("_")
            if t is None and base in BITS_KERNELS and self.profile["provenance"].get("kind") == "roofline":
                t = src.get(base)             # roofline: the 2-bit table stands for every bit-width
            if not isinstance(t, dict) or "axes" not in t:
                if base in BITS_KERNELS:
                    raise ConfigError(f"{self.path}: no {bits.removesuffix('bit')}-bit table '{where}' (policy.bits="
                                      f"{bits.removesuffix('bit')}); re-profile: python -m runtime.profile --model {self.model}")
                raise ConfigError(f"{self.path}: missing table '{where}' (this policy needs it); re-profile")
            if not transfer and self.compute_scale != 1.0:
                t = {**t, **{q: (np.asarray(t[q], dtype=float) * self.compute_scale).tolist()
                             for q in ("p10", "p50", "p90") if q in t}}
            self.tables[name] = Table(t, where)
        return self.tables[name]

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
        return self.profile["models"][self.model]["memory"]

    @property
    def kv_dtype_auto(self) -> str:
        return self.profile["models"][self.model].get("kv_dtype", "float16")

    @property
    def shape(self) -> dict:
        return self.profile["models"][self.model]["shape"]

    # -- costs the policies use (seconds)

    def decode_layer(self, batch: float, ctx: float, attn: str, rows: float | None = None) -> float:
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
          from the weight GEMMs and the glue), so attn(B, ctx) is added whole."""
        dl = self.table("decode_layer")
        a = self.table(attn)
        rows = batch if rows is None else rows
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

    def gather(self, nbytes: float) -> float:
        """Gathered rows (index_select into staging + one copy), by the table's own row size."""
        if nbytes <= 0:
            return 0.0
        t = self.table("gather")
        rows = t(nbytes / float(t.extra.get("row_bytes", 256)))
        if self.link:             # the gathered K and V then cross the emulated link: two copies
            bw, latency = self.link
            rows += 2 * latency + nbytes / bw
        return rows

    def replace(self, batch: float, k: float, shape: ModelShape, bits: int = 2) -> float:
        """Compute cost of attending with k fetched 16-bit rows replacing their low-bit ones.

        The profile's `gather_replace` (batch x k) includes the fetch; a measured one also
        includes the mixed attention over its "context" key. Both are taken out (the fetch runs
        on the H2D engine, the attention is the kivi table's), clamped at zero, made monotone in
        k (a running max) and anchored at k = 0 -> 0 (k = 0 is plain kivi)."""
        if k <= 0:
            return 0.0
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
                v = gr.values[i][j] - self.gather(2 * b * k * shape.kv_row)
                if ctx is not None:
                    v -= kivi(b, ctx)
                vals[i, j] = max(v, 0.0)
        vals = np.maximum.accumulate(vals, axis=1)
        # anchor k=0 -> 0 on a log axis: a point well below the first k keeps interpolation
        # monotone; below it the value is 0 (nearest)
        k0 = K[0] / 16
        t = {"axes": {"batch": list(B), "k": [k0, *K]}, "unit": "s",
             "p50": np.concatenate([np.zeros((len(B), 1)), vals], axis=1).tolist()}
        t["p10"] = t["p90"] = t["p50"]
        return Table(t, f"models.{self.model}.kernels.{bits_table('gather_replace', bits)} (replace part)")
