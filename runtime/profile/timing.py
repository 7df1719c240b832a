"""How every profile point is timed: `Timer` (warm-up runs, then p10/p50/p90 of timed ones)
and `grid` (a table of timings over the product of its axes). Why percentiles and a per-point
time budget: docs/profiles.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.profile.schema import table

from ..engine import sync


def wall_times(fn: Callable[[], object], device: torch.device, n: int, budget_s: float | None = None) -> list[float]:
    """Seconds of up to `n` runs of fn, each waited for (CUDA: synchronised) before the clock
    stops; with `budget_s`, no more runs once 3 have taken longer than it together."""
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if budget_s is not None and i >= 2 and sum(times) > budget_s:
            break
    return times


@dataclass
class Timer:
    device: torch.device
    repeats: int = 5
    warmup: int = 2
    budget_s: float = 2.0          # per point: fewer repeats when one run is slow (not below 3)
    points: int = field(default=0)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        for _ in range(self.warmup):
            fn()
        sync(self.device)
        a = np.asarray(wall_times(fn, self.device, self.repeats, self.budget_s))
        self.points += 1
        return float(np.percentile(a, 10)), float(np.median(a)), float(np.percentile(a, 90))


def grid(timer: Timer, axes: dict[str, list], fn: Callable[..., Callable[[], object]], progress=None,
         unit: str = "s") -> dict:
    """Time fn(*point)() at every point of the axes' product; a table in axis order."""
    names = list(axes)
    shape = [len(axes[n]) for n in names]
    p10, p50, p90 = (np.zeros(shape) for _ in range(3))
    for idx in np.ndindex(*shape):
        point = [axes[n][i] for n, i in zip(names, idx)]
        p10[idx], p50[idx], p90[idx] = timer(fn(*point))
        if progress is not None:
            progress.update(1)
    return table(axes, p50.tolist(), p10.tolist(), p90.tolist(), unit)


def grid_size(axes: dict[str, list]) -> int:
    return int(np.prod([len(v) for v in axes.values()]))
