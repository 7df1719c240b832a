"""Host <-> device copies: the link (a copy engine) and gathers of scattered K/V rows.

Three links, one interface (`copy(dst, src) -> Transfer`, `Transfer.wait()`):

- `DirectLink`  CPU without emulation: host and "device" are the same memory, a copy is a memcpy
                done at once.
- `EmulatedLink` CPU with `hardware.link.gbps` set: the bytes move at once (a memcpy on the
                caller's thread), and the copy counts as complete at a deadline set by the
                link: start = max(now, link free), deadline = start + latency + bytes / bandwidth.
                Waiting sleeps until that absolute deadline, never for accumulated durations: on
                a 2-core box sleep jitter exceeds a real per-layer transfer, and summing sleeps
                adds it up.
                So offload and prefetch overlap behave as over a link of that speed.
- `CudaLink`    a side CUDA stream: the copy waits (on the GPU) for the producer's event,
                runs `non_blocking` from pinned memory, and records an event the consumer's
                stream waits on. No host synchronisation.

Gathers never copy one row at a time: `gather_rows` is one `index_select` over a flattened
(B * H * T, D) view into a reused staging buffer; on CUDA the staging buffer is pinned and goes
to the device in one non-blocking copy (`policy.gather=host`).

`policy.gather=device` skips the host pass: `link.gather(dst, store, idx)` reads the rows
straight from the (pinned) host store into device memory:
- `CudaLink`: a CUDA view of the pinned store (`host_mapped`: the same pointer under unified
  virtual addressing, no copy) and one `index_select` kernel on the copy stream, so the GPU
  reads the k rows over PCIe itself (zero-copy); the indices never visit the host (no
  `.cpu()` synchronisation);
- `EmulatedLink`: the index_select straight into the destination on the caller's thread, and
  the bytes' completion at the link's deadline (one transfer);
- `DirectLink`: the index_select straight into the destination.
"""
from __future__ import annotations

import time

import torch

from core.errors import ConfigError

from . import phases


class Transfer:
    """A copy in flight."""

    def wait(self) -> None:
        """Order the caller's later work after the copy (on CUDA: the current stream waits)."""

    def wait_host(self) -> None:
        """Block the host until the copy is done (before reusing its source buffer)."""
        self.wait()


class _Done(Transfer):
    pass


DONE = _Done()


class LinkStats:
    def __init__(self):
        self.bytes = 0
        self.copies = 0
        self.wait_s = 0.0    # time callers spent blocked in wait(): the part the link did not hide

    def as_dict(self, prefix: str = "link") -> dict[str, float]:
        return {f"{prefix}_bytes": self.bytes, f"{prefix}_copies": self.copies, f"{prefix}_wait_s": self.wait_s}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DirectLink:
    name = "direct"

    def __init__(self):
        self.stats = LinkStats()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Transfer:
        dst.copy_(src)
        self.stats.bytes += _nbytes(src)
        self.stats.copies += 1
        return DONE

    def gather(self, dst: torch.Tensor, store: torch.Tensor, idx: torch.Tensor) -> Transfer:
        """policy.gather=device: dst = the rows of `store` at `idx`, no staging (one memory here)."""
        gather_rows(store, idx, dst)
        self.stats.bytes += _nbytes(dst)
        self.stats.copies += 1
        return DONE

    def drain(self) -> None:
        """Return once every copy issued so far has landed (before replacing a buffer)."""

    def close(self) -> None:
        pass


class _Timed(Transfer):
    """An emulated copy: its bytes have moved; it counts as done at `deadline`."""

    def __init__(self, deadline: float, stats: LinkStats, error: BaseException | None = None):
        self.deadline = deadline
        self.error = error
        self.stats = stats

    def wait(self) -> None:
        t0 = time.perf_counter()
        if self.error is not None:      # the copy failed: it surfaces where a failed DMA would
            raise RuntimeError("emulated link copy failed") from self.error
        while (left := self.deadline - time.perf_counter()) > 0:
            time.sleep(left if left > 2e-4 else 0)   # the last fraction of a ms: yield, don't oversleep
        self.stats.wait_s += time.perf_counter() - t0


class EmulatedLink:
    """A copy engine of `gbps` GB/s (1e9 bytes/s) and `latency_us` per copy, on CPU.

    The bytes move at once, on the caller's thread (a memcpy: host and "device" are the same
    memory); what is emulated is *when the copy counts as done*: start = max(now, link free),
    deadline = start + latency + bytes / bandwidth, and `wait()` sleeps until that absolute
    deadline. An earlier design did the memcpy on a worker thread; on the 2-core box that third
    runnable thread preempted torch's two compute threads at every small copy and doubled a
    SpeCache decode step even at 100 GB/s (docs/results/validation.md): a real copy engine
    steals no CPU core. The memcpy's own cost (bytes / memcpy bandwidth) stays on the caller."""

    name = "emulated"

    def __init__(self, gbps: float, latency_us: float = 0.0):
        if not gbps or gbps <= 0:
            raise ConfigError(f"hardware.link.gbps={gbps} must be > 0 (or null for no emulated link)")
        if latency_us < 0:
            raise ConfigError(f"hardware.link.latency_us={latency_us} must be >= 0")
        self.bw = gbps * 1e9
        self.latency = latency_us * 1e-6
        self.free_at = 0.0
        self.stats = LinkStats()

    def _move(self, n: int, move) -> Transfer:
        """Book `n` bytes on the link (FIFO: after the previous copy's deadline, one latency),
        move them now with `move()`, and hand back a transfer that lands at the deadline."""
        start = max(time.perf_counter(), self.free_at)
        deadline = start + self.latency + n / self.bw
        self.free_at = deadline
        self.stats.bytes += n
        self.stats.copies += 1
        phases.copy_span(start, deadline, n)      # the timeline's h2d / d2h track (no-op without one)
        try:
            move()
        except Exception as e:          # handed to the waiter, as a failed DMA would surface there
            return _Timed(deadline, self.stats, error=e)
        return _Timed(deadline, self.stats)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Transfer:
        return self._move(_nbytes(src), lambda: dst.copy_(src))

    def gather(self, dst: torch.Tensor, store: torch.Tensor, idx: torch.Tensor) -> Transfer:
        """policy.gather=device, emulated: the index_select moves the rows at once, straight into
        `dst` (no staging, no second copy), and they count as landed when a link of this speed
        would have carried their bytes (one transfer: one latency)."""
        return self._move(_nbytes(dst), lambda: gather_rows(store, idx, dst))

    def drain(self) -> None:
        """Every copy so far has landed (the bytes moved at issue); nothing to wait for before a
        buffer is replaced."""

    def close(self) -> None:
        pass


class _CudaTransfer(Transfer):
    def __init__(self, event):
        self.event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)

    def wait_host(self) -> None:
        self.event.synchronize()


class CudaLink:
    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.stats = LinkStats()
        self._mapped: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # host store -> its CUDA view

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Transfer:
        ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            dst.copy_(src, non_blocking=True)
            done = self.stream.record_event()
        for t in (dst, src):
            if t.is_cuda:
                t.record_stream(self.stream)   # the allocator must not reuse them before the copy ends
        self.stats.bytes += _nbytes(src)
        self.stats.copies += 1
        return _CudaTransfer(done)

    def gather(self, dst: torch.Tensor, store: torch.Tensor, idx: torch.Tensor) -> Transfer:
        """policy.gather=device: one index_select kernel on the copy stream reads the rows at
        `idx` (on the device) from the pinned host `store` through its UVA view into `dst`
        (device memory). The kernel waits for the producer of `idx` (the compute stream's
        top-k) with an event, as `copy` does; the consumer waits on the returned event."""
        src = self.mapped(store)
        ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            gather_rows(src, idx, dst)
            done = self.stream.record_event()
        for t in (dst, idx):
            if t.is_cuda:
                t.record_stream(self.stream)
        self.stats.bytes += _nbytes(dst)
        self.stats.copies += 1
        return _CudaTransfer(done)

    def mapped(self, store: torch.Tensor) -> torch.Tensor:
        """The CUDA view of a pinned host tensor, made once per buffer (a grown store is a new
        buffer; the old view is dropped with it)."""
        key = (store.data_ptr(), tuple(store.shape), tuple(store.stride()), store.dtype)
        hit = self._mapped.get(key)
        if hit is None:
            if len(self._mapped) > 8:
                self._mapped.clear()
            hit = self._mapped[key] = (host_mapped(store, self.device), store)   # the store kept alive with its view
        return hit[0]

    def drain(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        pass


class _CudaArrayInterface:
    """The `__cuda_array_interface__` of a raw device-accessible pointer (for `host_mapped`)."""

    def __init__(self, ptr: int, shape: tuple, strides: tuple, typestr: str):
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": shape, "strides": strides,
                                         "typestr": typestr, "version": 2}


_INT_OF_SIZE = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


def host_mapped(t: torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """A CUDA tensor over the pinned host tensor `t`'s own memory (zero-copy, no allocation).

    CUDA allocates pinned memory (cudaHostAlloc, what `pin_memory()` uses) mapped into the
    device's address space, and under unified virtual addressing (every 64-bit CUDA platform)
    the device pointer equals the host pointer. `torch.as_tensor` over a
    `__cuda_array_interface__` of that pointer gives a CUDA tensor whose reads by any kernel
    (here `index_select`) go over PCIe to host memory. torch looks the pointer up with
    cudaPointerGetAttributes and refuses memory CUDA does not know (pageable), hence the check.
    The interface has no bfloat16 type string: the bytes are viewed as the same-width integer
    and viewed back. The view does not own the memory: keep `t` alive while it is used."""
    if not t.is_pinned():
        raise ConfigError("policy.gather=device needs the host store in pinned memory (a CUDA run pins it)")
    it, typestr = _INT_OF_SIZE[t.element_size()]
    raw = t.view(it)
    cai = _CudaArrayInterface(raw.data_ptr(), tuple(raw.shape), tuple(s * raw.element_size() for s in raw.stride()), typestr)
    view = torch.as_tensor(cai, device=device)
    return view.view(t.dtype)


def make_link(link_cfg, device: torch.device):
    """The link for `hardware.link` on `device`: CUDA stream on a GPU, else emulated if
    `gbps` is set, else direct."""
    if device.type == "cuda":
        return CudaLink(device)
    gbps = getattr(link_cfg, "gbps", None) if link_cfg is not None else None
    if gbps is not None:            # null = no link; 0 is refused by core/checks.py
        return EmulatedLink(gbps, getattr(link_cfg, "latency_us", 0.0) or 0.0)
    return DirectLink()


def gather_rows(store: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, h, j] = store[b, h, idx[b, h, j]] for store (B, H, T, D), idx (B, H, k).

    One index_select over the flattened rows into `out` (B, H, k, D), a reused buffer. `idx`
    must live where `store` does (the host, for a host store).
    """
    B, H, T, D = store.shape
    k = idx.shape[-1]
    base = (torch.arange(B * H, device=idx.device) * T).view(B, H, 1)
    flat = (idx + base).reshape(-1)
    rows = store.reshape(B * H * T, D)          # a view: the store is contiguous
    torch.index_select(rows, 0, flat, out=out.view(B * H * k, D))
    return out
