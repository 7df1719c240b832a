"""`full`: the uncompressed baseline. K/V of every token in device memory, in `kv_dtype`."""
from __future__ import annotations

from core.policies.full import FullPolicyConfig

from .base import CacheShape, LayerKV, Step, grow_columns, register, sdpa_gqa


@register
class FullKV(LayerKV):
    """A preallocated (B, H_kv, capacity, D) buffer written in place.

    Appending with `torch.cat` (what HF's DynamicCache does) copies the whole cache every step;
    a buffer sized for prompt + max new tokens is written once per token instead. It doubles
    if a caller goes past the capacity it asked for.
    """

    declaration = FullPolicyConfig

    def __init__(self, spec, shape: CacheShape, link=None):
        self.dtype = shape.dtype
        self.k, self.v = shape.buffer(), shape.buffer()
        self.len = 0          # columns written, pads included
        self.pad = None       # (B,) left-pad columns of the rows held (set by the first write)

    def _write(self, k, v, step: Step) -> None:
        # a speculative guess is written too (at column stored_end) so it can attend to itself;
        # `len` stops before it, and the next step's token overwrites it
        self.k, self.v = grow_columns(self.k, step.end, self.len), grow_columns(self.v, step.end, self.len)
        self.k[:, :, step.start : step.end] = k      # (B, H_kv, n_new, D)
        self.v[:, :, step.start : step.end] = v
        self.len = step.stored_end
        self.pad = step.pad   # n_real is counted when asked for, not per layer per step

    @property
    def n_real(self) -> int:
        """Real tokens held, summed over rows."""
        return 0 if self.pad is None else int((self.len - self.pad).clamp(min=0).sum())

    def load(self, k, v, step: Step) -> None:
        self._write(k.to(self.dtype), v.to(self.dtype), step)

    def decode(self, q, k, v, step: Step):
        self._write(k.to(self.dtype), v.to(self.dtype), step)
        mask = step.mask(group=q.shape[1] // self.k.shape[1])
        o = sdpa_gqa(q.to(self.dtype), self.k[:, :, : step.end], self.v[:, :, : step.end], mask)
        return o.to(q.dtype)

    def nbytes(self):
        # bytes of the real tokens held: what a ragged or paged cache would need, and what the
        # simulator's twin counts. Left-pad columns and spare capacity are a property of this
        # dense layout, not of the policy.
        per_token = self.k.shape[1] * self.k.shape[3] * self.k.element_size()
        return 2 * per_token * self.n_real, 0

    def dense_kv(self, end: int):
        """K/V of columns [0, end) as dense tensors (transformers' Cache.update fallback)."""
        return self.k[:, :, :end], self.v[:, :, :end]
