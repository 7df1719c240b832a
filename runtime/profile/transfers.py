"""A profile's `transfers` section: host <-> device bandwidth curves (both directions, pinned and
pageable), row gathers, copy/compute overlap, and on CPU the emulated link's achieved rate.
Timed through runtime/transfer.py, the code the runtime's offloading policies run. Why each
curve: docs/profiles.md.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable

import torch

from ..transfer import EmulatedLink, gather_rows
from .timing import Timer, grid


def transfer_sizes(quick: bool) -> list[int]:
    """The h2d / d2h curves' sizes: 4 KiB up to 64 MiB (quick, x4 steps) or 1 GiB (x2 steps)."""
    top = 64 << 20 if quick else 1 << 30
    sizes, s = [], 4 << 10
    while s <= top:
        sizes.append(s)
        s *= 4 if quick else 2
    return sizes


def measure_transfers(timer: Timer, device: torch.device, quick: bool, progress=None, head_dim: int = 128,
                      dtype: torch.dtype = torch.float16) -> dict:
    """Bandwidth curves (bytes -> seconds) for both directions and memory kinds, row gathers,
    copy/compute overlap, and on CPU the emulated link's achieved rate and contention."""
    sizes = transfer_sizes(quick)
    out = {}
    cuda = device.type == "cuda"
    for direction in ("h2d", "d2h"):
        for mem in ("pinned", "pageable"):
            def point(n, direction=direction, mem=mem):
                host = torch.empty(n, dtype=torch.uint8, pin_memory=cuda and mem == "pinned")
                dev = torch.empty(n, dtype=torch.uint8, device=device)
                if direction == "h2d":
                    return lambda: dev.copy_(host, non_blocking=cuda and mem == "pinned")
                return lambda: host.copy_(dev, non_blocking=cuda and mem == "pinned")
            out[f"{direction}_{mem}"] = grid(timer, {"bytes": sizes}, point, progress)
    # gathered rows: k rows of head_dim x dtype out of N, index_select into staging + one copy
    n_rows = 1 << 16 if quick else 1 << 18
    rows = [16, 64, 256, 1024, 4096, 16384] + ([] if quick else [65536])
    store = torch.randn(1, 1, n_rows, head_dim).to(dtype)
    if cuda:
        store = store.pin_memory()

    def gpoint(k):
        idx = torch.randint(0, n_rows, (1, 1, k))
        stage = torch.empty(1, 1, k, head_dim, dtype=dtype, pin_memory=cuda)
        dst = torch.empty(1, 1, k, head_dim, dtype=dtype, device=device)
        return lambda: dst.copy_(gather_rows(store, idx, stage), non_blocking=cuda)
    out["gather"] = grid(timer, {"rows": rows}, gpoint, progress)
    out["gather"]["row_bytes"] = head_dim * torch.finfo(dtype).bits // 8
    if cuda:
        # policy.gather=device: one index_select kernel through the pinned store's zero-copy UVA
        # view, on the copy stream, straight into device memory (runtime/transfer.py CudaLink.gather)
        from ..transfer import CudaLink
        link = CudaLink(device)

        def gdpoint(k):
            idx = torch.randint(0, n_rows, (1, 1, k), device=device)
            dst = torch.empty(1, 1, k, head_dim, dtype=dtype, device=device)
            return lambda: link.gather(dst, store, idx)
        out["gather_device"] = grid(timer, {"rows": rows}, gdpoint, progress)
        out["gather_device"]["row_bytes"] = out["gather"]["row_bytes"]
    out["overlap"] = measure_overlap(timer, device, quick)
    if not cuda:
        out["emulated_link"] = measure_emulated_link(quick)
        out["notes"] = ("CPU: host and device are the same memory; h2d/d2h are memcpy curves and "
                        "pinned = pageable (no page-locking without CUDA)")
    if progress is not None:
        progress.update(2)
    return out


def _gemm(device, n=1024):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return lambda: a @ b


@contextlib.contextmanager
def busy(fn: Callable[[], object]):
    """Run fn in a loop on another thread for the duration of the block."""
    stop = threading.Event()

    def loop():
        with torch.inference_mode():     # per thread: the buffers are inference tensors
            while not stop.is_set():
                fn()
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def measure_overlap(timer: Timer, device: torch.device, quick: bool) -> dict:
    """How much a concurrent copy slows a GEMM, and the reverse (CUDA: copy stream vs compute
    stream; CPU: a copy thread vs the compute thread)."""
    gemm = _gemm(device, 512 if quick else 1024)
    n = (16 if quick else 64) << 20
    cuda = device.type == "cuda"
    host = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    copy = lambda: dev.copy_(host, non_blocking=cuda)  # noqa: E731
    t_gemm = timer(gemm)[1]
    t_copy = timer(copy)[1]
    if cuda:
        side = torch.cuda.Stream(device)

        def both():
            with torch.cuda.stream(side):
                copy()
            gemm()
        t_both = timer(both)[1]
        gemm_slowdown = max(t_both / max(t_gemm, t_copy), 1.0)
        copy_slowdown = gemm_slowdown
    else:
        with busy(copy):
            t_gemm_busy = timer(gemm)[1]
        with busy(gemm):
            t_copy_busy = timer(copy)[1]
        gemm_slowdown, copy_slowdown = t_gemm_busy / t_gemm, t_copy_busy / t_copy
    return {"gemm_s": t_gemm, "copy_s": t_copy, "copy_bytes": n,
            "gemm_slowdown_with_copy": gemm_slowdown, "copy_slowdown_with_gemm": copy_slowdown}


def measure_emulated_link(quick: bool) -> dict:
    """Achieved rate of the emulated link at several set rates (its bytes move at issue, on the
    caller's thread: their memcpy cost is the h2d curve; only completion follows the link)."""
    rates = [0.5, 1.0, 2.0, 4.0]
    n = (8 if quick else 32) << 20
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    achieved = []
    for gbps in rates:
        link = EmulatedLink(gbps, latency_us=10)
        try:
            t = time.perf_counter()
            for _ in range(3):
                link.copy(dst, src)
            link.copy(dst, src).wait()
            achieved.append(4 * n / (time.perf_counter() - t) / 1e9)
        finally:
            link.close()
    return {"set_gbps": rates, "achieved_gbps": achieved, "copy_bytes": n, "latency_us": 10}
