"""The admission rules of continuous batching, without a clock, so that the SimPy scheduler and
runtime.serve admit the same requests in the same order: FIFO with head-of-line blocking, at
most `max_batch` running, a request's whole device KV (and host KV, where host memory is
bounded) reserved at admission and given back at completion, and the iteration order
(prefill_first: admitted requests prefill before the next decode step; decode_first: new
requests wait until the running batch has drained). Reserving the whole KV up front is what
keeps KV that grows during decode from deadlocking a full memory."""
from __future__ import annotations

from collections import deque

from core.errors import ConfigError

ORDERS = ("prefill_first", "decode_first")
# how the running requests are batched in a decode step (scheduler.batching):
# cohorts: runtime.serve's way: the requests one prefill admitted form a left-padded cohort with its
#          own KV cache and its own attention call per layer; a finished request's row is computed
#          until its whole cohort is done (runtime/cohorts.py)
# ragged:  one attention over every running request's own context, a finished request leaves the
#          batch at once (a paged-attention server's way; the simulator only)
BATCHINGS = ("cohorts", "ragged")


class Pool:
    """Bytes of one memory, taken and given back (SimPy's Container has the same face)."""

    def __init__(self, capacity: float):
        self.level = capacity

    def get(self, n: float) -> None:
        self.level -= n

    def put(self, n: float) -> None:
        self.level += n


def check_scheduler(max_batch: int, order: str, batching: str = "cohorts") -> None:
    if batching not in BATCHINGS:
        raise ConfigError(f"scheduler.batching={batching!r} is not known; choose one of: {', '.join(BATCHINGS)}")
    if order not in ORDERS:
        raise ConfigError(f"scheduler.order={order!r} is not known; choose one of: {', '.join(ORDERS)}")
    if max_batch < 1:
        raise ConfigError(f"scheduler.max_batch={max_batch} must be >= 1")


class Admission:
    """Requests wait here in arrival order; each carries `reserved` (device bytes) and, where the
    host pool is bounded, `reserved_host`. `device` / `host` are pools (`Pool`, or SimPy
    Containers); host None = unlimited."""

    def __init__(self, max_batch: int, order: str, device, host=None):
        check_scheduler(max_batch, order)
        self.max_batch, self.order = max_batch, order
        self.device, self.host = device, host
        self.waiting: deque = deque()

    def arrive(self, r) -> None:
        self.waiting.append(r)

    def admit(self, n_running: int) -> list:
        """The requests admitted now (their memory taken), in order."""
        if self.order == "decode_first" and n_running:
            return []
        new = []
        while self.waiting and n_running + len(new) < self.max_batch:
            r = self.waiting[0]
            if self.device.level < r.reserved:
                break                                  # FIFO: the head waits for memory
            if self.host is not None and self.host.level < r.reserved_host:
                break                                  # ... or for host memory (SpeCache / offload KV)
            self.device.get(r.reserved)                # available now: granted at once
            if self.host is not None and r.reserved_host:
                self.host.get(r.reserved_host)
            new.append(self.waiting.popleft())
        return new

    def prefill_next(self, new: list, n_running: int) -> bool:
        """Whether this iteration prefills `new` (else it decodes the running batch)."""
        return bool(new) and (self.order == "prefill_first" or not n_running)

    def release(self, r) -> list:
        """Give a finished request's memory back; the pools' put results (SimPy events to wait on)."""
        out = [self.device.put(r.reserved)]
        if self.host is not None and r.reserved_host:
            out.append(self.host.put(r.reserved_host))
        return out
