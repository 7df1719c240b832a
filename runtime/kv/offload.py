"""`offload`: every layer's full K/V lives in host memory; the device holds at most two layers.

The choreography of transformers' `OffloadedCache`: when layer i starts attention it waits for
its own K/V (fetched while layer i-1 computed), starts fetching layer i+1 into the other device
slot, appends its new token to the device copy and writes it back to the host, attends, and
lets the slot go. The last layer prefetches layer 0 for the next step. Two device slots, shared
by all layers, are all the device KV there is.

On CUDA the fetch is a non-blocking copy from pinned memory on the link's copy stream; on CPU
it is a memcpy, or, with `hardware.link.gbps` set, a copy that completes at the time a link of
that speed would (runtime/transfer.py), so the overlap can be measured without a GPU.
"""
from __future__ import annotations

from core.policies.offload import OffloadPolicyConfig

from .. import phases
from ..transfer import DONE, DirectLink
from .base import CacheShape, KVCache, LayerKV, Step, grow_columns, register, sdpa_gqa


class _Slots:
    """The two device buffers and the fetch schedule shared by all layers of one cache."""

    def __init__(self, shape: CacheShape, link):
        self.bufs = [(shape.buffer(), shape.buffer()) for _ in range(2)]
        self.link = link
        self.layers: list[OffloadKV] = []
        self.slot_of: dict[int, int] = {}      # layer -> slot holding (or receiving) its K/V
        self.pending: dict[int, object] = {}   # layer -> transfer in flight
        self.next_slot = 0

    def fetch(self, i: int) -> None:
        """Start copying layer i's stored K/V into a free slot."""
        if i in self.pending or i in self.slot_of:
            return
        slot = self.next_slot
        self.next_slot ^= 1
        for j, s in list(self.slot_of.items()):
            if s == slot:
                del self.slot_of[j]
        layer = self.layers[i]
        k, v = self.bufs[slot]
        n = layer.len
        if n + 2 > k.shape[2]:   # room for this layer's stored tokens + a step's new ones (<= 2)
            # only the target slot: the other one may hold the layer computing right now
            k, v = grow_columns(k, n + 2, 0), grow_columns(v, n + 2, 0)
            self.bufs[slot] = (k, v)
        t1 = self.link.copy(k[:, :, :n], layer.k_host[:, :, :n]) if n else DONE
        t2 = self.link.copy(v[:, :, :n], layer.v_host[:, :, :n]) if n else DONE
        self.slot_of[i] = slot
        self.pending[i] = (t1, t2)

    def acquire(self, i: int):
        """Wait for layer i's K/V and return its device slot (k, v)."""
        self.fetch(i)
        for t in self.pending.pop(i):
            t.wait()
        return self.bufs[self.slot_of[i]]


@register
class OffloadKV(LayerKV):
    """Every layer's K/V in host memory, two device slots, layer i+1 fetched during layer i."""

    declaration = OffloadPolicyConfig

    def __init__(self, spec, shape: CacheShape, link=None, *, index: int = 0, slots: _Slots | None = None):
        self.dtype = shape.dtype
        pin = shape.device.type == "cuda"
        self.k_host, self.v_host = shape.buffer(pin=pin), shape.buffer(pin=pin)
        self.index, self.slots = index, slots
        self.len = 0
        self.n_real = 0

    @classmethod
    def build(cls, spec, shape: CacheShape, link=None) -> KVCache:
        slots = _Slots(shape, link if link is not None else DirectLink())
        slots.layers = [cls(spec, shape, link, index=i, slots=slots) for i in range(shape.n_layers)]
        return KVCache(slots.layers, spec.name)

    def _write_back(self, k, v, lo: int, hi: int) -> None:
        if hi > self.k_host.shape[2]:
            self.slots.link.drain()      # copies in flight target the buffers being replaced
            self.k_host, self.v_host = grow_columns(self.k_host, hi), grow_columns(self.v_host, hi)
        self.slots.link.copy(self.k_host[:, :, lo:hi], k[:, :, : hi - lo])
        self.slots.link.copy(self.v_host[:, :, lo:hi], v[:, :, : hi - lo])

    def load(self, k, v, step: Step) -> None:
        self._write_back(k, v, 0, step.stored_end)
        self.len = step.stored_end
        self.n_real = int((step.stored_end - step.pad).clamp(min=0).sum())
        phases.lap("store")                                     # the prompt's K/V to the host

    def decode(self, q, k, v, step: Step):
        slots = self.slots
        dk, dv = slots.acquire(self.index)
        slots.fetch((self.index + 1) % len(slots.layers))      # overlap the next layer's copy
        phases.lap("fetch")                                     # waiting for this layer + issuing the next
        k, v = k.to(self.dtype), v.to(self.dtype)
        if step.end > dk.shape[2]:
            raise RuntimeError("offload slot smaller than the step; capacity was underestimated")
        dk[:, :, step.start : step.end] = k
        dv[:, :, step.start : step.end] = v
        phases.lap("attention")                                 # the device copy's append
        self._write_back(k, v, step.start, step.stored_end)
        phases.lap("back")                                      # the new token to the host
        self.len = step.stored_end
        self.n_real = int((step.stored_end - step.pad).clamp(min=0).sum())
        o = sdpa_gqa(q.to(self.dtype), dk[:, :, : step.end], dv[:, :, : step.end], step.mask(group=q.shape[1] // dk.shape[1]))
        # the slot now also holds this step's token, but the host is the source of truth: the
        # next fetch of this layer re-reads it
        slots.slot_of.pop(self.index, None)
        return o.to(q.dtype)

    def nbytes(self):
        per_token = self.k_host.shape[1] * self.k_host.shape[3] * self.k_host.element_size()
        host = 2 * per_token * self.n_real
        # device: this layer's share of the two slots (at most two layers resident at once)
        n_layers = len(self.slots.layers)
        return int(host * min(2, n_layers) / n_layers), host
