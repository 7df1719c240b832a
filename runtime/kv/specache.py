"""`specache`: SpeCache (ICML 2025): low-bit KV on the device, 16-bit KV on the host, top-k fetch.

Full-precision K/V of every token live in host memory (pinned on CUDA). The device holds a KIVI
copy (the `kivi` knobs and defaults) plus the residual. Each decode step, per layer:

1. score the query against the low-bit keys, q . K_lowbit, over every quantized column;
2. keep the top `k` columns per KV head and fetch those rows' 16-bit K and V from the host;
3. attend over the low-bit cache with the top-k columns replaced by their 16-bit rows, plus the
   residual. k = 0 is exactly `kivi`; k >= the quantized length is exactly `full`.

GQA rule: the G query heads that share a KV head share its fetched rows, so one top-k per KV
head is chosen from the *sum of the G heads' attention probabilities* (softmax of the low-bit
scores, per head). A token's summed probability is the attention mass the group would lose to
its quantization error; max or mean of raw logits would let one head's scale dominate.
Pad columns get -1 (below any probability): they are only picked when a row has fewer real
quantized tokens than k, and are then marked invalid and ignored.

Speculative pre-decoding (`prefetch=true`), as in the paper: the engine decodes the first output
token once from the low-bit cache alone (a pass that stores nothing), which picks the first
top-k and guesses the next token. Every step then carries two tokens, the real one and the
guess of the next; both attend to the mixed cache; the guess's scores pick each layer's top-k
for the *next* step, whose fetch runs on the link (copy stream) while this step computes. Per
run it reports `topk_recall`: the fraction of the exact top-k (from the real query's own low-bit
scores) that the prefetched set already held; the engine reports `guess_accuracy`.
"""
from __future__ import annotations

import math

import torch

from core.policies.specache import SpecachePolicyConfig

from .. import phases
from ..transfer import DirectLink, gather_rows
from .base import CacheShape, KVCache, Step, grow_columns, register
from .kivi import KiviKV, fold, masked_softmax, unfold


class _Fetch:
    """Top-k rows in flight or arrived: indices (B, H_kv, k) on the device, valid mask, rows."""

    def __init__(self, idx, valid, k_rows, v_rows, transfers):
        self.idx, self.valid, self.k_rows, self.v_rows = idx, valid, k_rows, v_rows
        self.transfers = transfers

    def wait(self) -> "_Fetch":
        for t in self.transfers:
            t.wait()
        self.transfers = ()
        return self


@register
class SpeCacheKV(KiviKV):
    """KIVI's device copy + every token's 16-bit K/V on the host, k rows fetched per step."""
    declaration = SpecachePolicyConfig

    def __init__(self, spec, shape: CacheShape, link=None):
        super().__init__(spec, shape, link)             # the KIVI copy: self.spec, the low-bit buffers
        self.k_top = min(int(self.spec.k), shape.capacity)   # clamped to the context before any allocation
        self.prefetch = bool(self.spec.prefetch)
        self.gather = str(self.spec.gather)
        self.link = link if link is not None else DirectLink()
        self.on_cuda = shape.device.type == "cuda"
        # the 16-bit store of every token, in host memory (on a CPU run the "device" is the host).
        # Its rows are written through the link as tokens are stored, and read by the gather;
        # top-k only ever picks quantized columns, which are at least residual - group_size + 1
        # tokens old, so a row is never gathered while its own write may still be in flight.
        self.k_host, self.v_host = shape.buffer(pin=self.on_cuda), shape.buffer(pin=self.on_cuda)
        B, H, D = shape.batch, shape.n_kv_heads, shape.head_dim
        # staging for k fetched rows: host side (pinned on CUDA; gather=host only) and device
        # side, reused every step
        stage_k = self.k_top if self.gather == "host" else 0
        self.k_stage = torch.empty(B, H, stage_k, D, dtype=self.dtype, pin_memory=self.on_cuda)
        self.v_stage = torch.empty_like(self.k_stage)
        self.k_rows = torch.empty(B, H, self.k_top, D, dtype=self.dtype, device=shape.device)
        self.v_rows = torch.empty_like(self.k_rows)
        self.pending: _Fetch | None = None     # prefetched for the next step
        self._staged: tuple = ()               # the copies that last read the staging buffers
        self.counters = {"topk_recall_hits": 0, "topk_recall_total": 0, "fetched_rows": 0}
        self._fetched_dev = None               # gather=device on CUDA: fetched rows, summed on the device

    @classmethod
    def build(cls, spec: SpecachePolicyConfig, shape: CacheShape, link=None) -> KVCache:
        cache = super().build(spec, shape, link)
        spec = cache.layers[0].spec                    # a config built in code, checked by the layer
        cache.speculative = bool(spec.prefetch) and spec.k > 0
        return cache

    # -- host store

    def _store_host(self, k, v, lo: int, hi: int) -> None:
        """Write stored tokens' 16-bit rows to the host (a D2H copy on CUDA, behind the link)."""
        if hi <= lo:
            return
        if hi > self.k_host.shape[2]:
            self.link.drain()            # copies in flight target the buffers being replaced
            self.k_host, self.v_host = grow_columns(self.k_host, hi), grow_columns(self.v_host, hi)
        n = hi - lo
        self.link.copy(self.k_host[:, :, lo:hi], k[:, :, :n].to(self.dtype))
        self.link.copy(self.v_host[:, :, lo:hi], v[:, :, :n].to(self.dtype))

    def load(self, k, v, step: Step) -> None:
        self._store_host(k, v, 0, step.stored_end)
        super().load(k, v, step)                 # KIVI's quantize-and-pack: `store` too (its own lap)

    # -- top-k selection and fetch

    def select(self, s_low: torch.Tensor, rows: slice, group: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k columns per KV head from low-bit scores s_low (B, H_kv, G*n, kq) of the queries
        `rows` (a slice of the n new tokens). Returns idx (B, H_kv, k), valid (B, H_kv, k)."""
        B, H, _, kq = s_low.shape
        valid_cols = (torch.arange(kq, device=s_low.device)[None, :] >= self.pad[:, None])   # (B, kq)
        s = s_low.view(B, H, group, n, kq)[:, :, :, rows]
        s = s.masked_fill(~valid_cols[:, None, None, None], -math.inf)
        mass = torch.softmax(s.float(), dim=-1).sum(dim=(2, 3))                              # (B, H, kq)
        mass = mass.masked_fill(~valid_cols[:, None], -1.0)
        k = min(self.k_top, kq)
        top, idx = mass.topk(k, dim=-1)
        return idx, top >= 0

    def fetch(self, idx: torch.Tensor, valid: torch.Tensor) -> _Fetch:
        """Start fetching the 16-bit rows at idx from the host store (policy.gather: `host` =
        index_select on the host into staging, then one copy each for K and V; `device` = the
        link gathers straight into the device buffers, the indices staying on the device)."""
        if self.gather == "device":
            return self._fetch_device(idx, valid)
        k = idx.shape[-1]
        host_idx = idx.cpu() if self.on_cuda else idx          # the gather runs where the store is
        ks, vs = self.k_stage[:, :, :k], self.v_stage[:, :, :k]
        if not ks.is_contiguous():
            ks, vs = ks.contiguous(), vs.contiguous()
        for t in self._staged:     # the previous copy out of the staging buffers must be done
            t.wait_host()
        gather_rows(self.k_host, host_idx, ks)
        gather_rows(self.v_host, host_idx, vs)
        kr, vr = self.k_rows[:, :, :k], self.v_rows[:, :, :k]
        if not kr.is_contiguous():
            kr, vr = torch.empty_like(ks, device=self.k_rows.device), torch.empty_like(vs, device=self.k_rows.device)
        t = (self.link.copy(kr, ks), self.link.copy(vr, vs))
        self._staged = t
        self.counters["fetched_rows"] += int(valid.sum())
        return _Fetch(idx, valid, kr, vr, t)

    def _fetch_device(self, idx: torch.Tensor, valid: torch.Tensor) -> _Fetch:
        k = idx.shape[-1]
        kr, vr = self.k_rows[:, :, :k], self.v_rows[:, :, :k]
        if not kr.is_contiguous():
            kr, vr = torch.empty_like(kr), torch.empty_like(vr)
        # the rows of the previous fetch may still be read by the step that uses them: the
        # compute stream orders that before this gather's event wait (CudaLink.gather)
        t = (self.link.gather(kr, self.k_host, idx), self.link.gather(vr, self.v_host, idx))
        if self.on_cuda:    # summed on the device: int() here would synchronise the host every layer
            self._fetched_dev = valid.sum() + (self._fetched_dev if self._fetched_dev is not None else 0)
        else:
            self.counters["fetched_rows"] += int(valid.sum())
        return _Fetch(idx, valid, kr, vr, t)

    # -- decode

    def decode(self, q, k, v, step: Step):
        # phases (runtime/phases.py), the simulator twin's op names: the new token's host write is
        # `back`, low-bit scores + top-k `score`, the gather, copy and wait of the rows `fetch`;
        # the cache append and the mixed attention stay in the model's `attention` lap
        self._store_host(k, v, step.start, step.stored_end)
        phases.lap("back")
        if self.k_top == 0:                      # exactly kivi
            return super().decode(q, k, v, step)
        self._append(k, v, step)
        Hkv, H = self.k_res.shape[1], q.shape[1]
        group, n = H // Hkv, step.n_new
        qf = fold(q.to(self.dtype), Hkv)                                   # (B, H_kv, G*n, D)
        phases.lap("attention")
        s_low = self.lowbit_scores(qf)                                      # (B, H_kv, G*n, kq)
        real = slice(0, step.n_store)

        if not self.prefetch:
            idx, valid = self.select(s_low, real, group, n)
            phases.lap("score")
            got = self.fetch(idx, valid).wait()
            phases.lap("fetch")
        elif self.pending is not None:
            phases.lap("score")
            got = self.pending.wait()                                       # prefetched during the last step
            phases.lap("fetch")
            if step.n_store:                                                # recall vs the exact top-k
                exact, ok = self.select(s_low, real, group, n)
                self._count_recall(got, exact, ok)
                phases.lap("score")                                         # (a statistic: a second top-k)
        else:
            got = None                                                      # the first pass: low-bit only
            phases.lap("score")

        o = self._mixed_attention(q, qf, s_low, k, v, step, got)
        if self.prefetch:
            phases.lap("attention")
            guess = slice(n - 1, n)                                         # the speculative token's scores
            idx, valid = self.select(s_low, guess, group, n)
            phases.lap("score")
            self.pending = self.fetch(idx, valid)                           # issued for the next step
            phases.lap("fetch")
        return o

    def _count_recall(self, got: _Fetch, exact: torch.Tensor, ok: torch.Tensor) -> None:
        have = torch.zeros(exact.shape[:2] + (self.kq,), dtype=torch.bool, device=exact.device)
        have.scatter_(-1, got.idx, got.valid)
        hit = have.gather(-1, exact) & ok
        self.counters["topk_recall_hits"] += int(hit.sum())
        self.counters["topk_recall_total"] += int(ok.sum())

    def _mixed_attention(self, q, qf, s_low, k, v, step: Step, got: _Fetch | None):
        D = self.D
        k_res, v_res = self.residual_kv(k, v, step)
        if got is not None and got.idx.shape[-1]:
            # exact scores at the fetched columns replace their low-bit scores
            exact = (qf @ got.k_rows.transpose(-1, -2)) / math.sqrt(D)     # (B, H_kv, G*n, k)
            idx = got.idx[:, :, None].expand(-1, -1, qf.shape[2], -1)
            s_low = s_low.scatter(-1, idx, exact)
        scores = torch.cat([s_low, (qf @ k_res.transpose(-1, -2)) / math.sqrt(D)], -1)
        p = masked_softmax(scores, step, q.shape[1] // k_res.shape[1])
        o = self.lowbit_values(p[..., : self.vq]) + p[..., self.vq :] @ v_res
        if got is not None and got.idx.shape[-1]:
            # fetched values replace their dequantized values: add p * (v_16bit - v_lowbit)
            in_q = got.valid & (got.idx < self.vq)
            safe = got.idx.clamp(max=max(self.vq - 1, 0))
            delta = (got.v_rows - self.dequant_value_rows(safe)) * in_q[..., None]   # (B, H_kv, k, D)
            p_sel = p.gather(-1, got.idx[:, :, None].expand(-1, -1, p.shape[2], -1))  # (B, H_kv, G*n, k)
            o = o + p_sel @ delta
        return unfold(o, q.shape[1]).to(q.dtype)

    def stats(self) -> dict[str, float]:
        out = dict(self.counters)
        if self._fetched_dev is not None:
            out["fetched_rows"] += int(self._fetched_dev)
        return out

    def nbytes(self):
        dev, _ = super().nbytes()
        # device: the KIVI copy + the k fetched 16-bit rows (K and V); host: every token's 16-bit K/V
        e = self.k_host.element_size()
        H = self.k_host.shape[1]
        fetched = 2 * self.pad.shape[0] * H * min(self.k_top, self.kq) * self.D * e
        host = 2 * self.real_tokens(0, self.len) * H * self.D * e
        return dev + fetched, host
