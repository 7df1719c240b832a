"""What the policies' compute costs: a decode layer, low-bit scores and quantization, SpeCache's
replace step and its in-model extras.

`KernelCosts` is the part of simulator/costs.py `Costs` that prices compute: each cost reads the
profile's kernel tables (measured) or the roofline formulas for the bound shape (analytic).
docs/simulator.md says how a decode layer is composed from the whole-model and lone-kernel
tables.
"""
from __future__ import annotations

import numpy as np

from core.policies import ModelShape
from core.profile.schema import bits_table

from .tables import Table


def _lowbit(bits: float | None, group_size: int | None) -> dict:
    """The formulas' low-bit knobs: the policy's, else the profile's defaults (2 bits, group 64)."""
    return {"bits": 2 if bits is None else bits, "group_size": 64 if group_size is None else group_size}


class KernelCosts:
    """Compute costs (seconds) of a Costs: reads self.profile, self.model, self.analytic,
    self.roofline, self.compute_scale, self.table and self.gather (simulator/costs.py)."""

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

    def specache_extra(self, bits: int = 2) -> tuple[float, float]:
        """Per-layer seconds a SpeCache step's fetch and host write take in the whole model beyond
        what the lone transfer tables give for the same bytes (runtime/profile/lowbit.py
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
        return fetch * self.scale_of(name), back * self.scale_of(name)

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
        # in the whole model (runtime/profile/lowbit.py `in_model_lowbit`): the replace part of a
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
