"""Arrivals and request lengths, seeded (same seed -> the same requests).

`workload.arrival`:
- static: `batch` requests at t = 0, as runtime.bench runs them;
- poisson: `n_requests` with exponential gaps of mean 1 / `rate` (requests per second);
- closed: `users` clients, each sending its next request `think_s` after its last one finished,
  until `n_requests` have been sent;
- trace: a CSV file `trace` with columns arrival_s, prompt_len, gen_len.
Prompt lengths are `prompt_len`, or uniform in [prompt_len_min, prompt_len]; outputs `gen_len`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError

ARRIVALS = ("static", "poisson", "closed", "trace")


@dataclass
class Request:
    id: int
    arrival_s: float
    prompt_len: int
    gen_len: int
    # filled in by the scheduler
    admitted_s: float | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    generated: int = 0
    reserved: int = 0
    reserved_host: int = 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        return (self.done_s - self.first_token_s) / (self.gen_len - 1) if self.gen_len > 1 else float("nan")


def check(w) -> None:
    if w.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={w.arrival!r} is not known; choose one of: {', '.join(ARRIVALS)}")
    for key in ("batch", "prompt_len", "gen_len", "n_requests", "users"):
        if getattr(w, key) < 1:
            raise ConfigError(f"workload.{key}={getattr(w, key)} must be >= 1")
    if w.prompt_len_min is not None and not 1 <= w.prompt_len_min <= w.prompt_len:
        raise ConfigError(f"workload.prompt_len_min={w.prompt_len_min} must be in [1, workload.prompt_len={w.prompt_len}]")
    if w.arrival == "poisson" and not w.rate > 0:
        raise ConfigError(f"workload.rate={w.rate} must be > 0 requests/s for arrival=poisson")
    if w.think_s < 0:
        raise ConfigError(f"workload.think_s={w.think_s} must be >= 0")
    if w.arrival == "trace" and not w.trace:
        raise ConfigError("workload.trace is not set; give a CSV with columns arrival_s, prompt_len, gen_len")


class Lengths:
    """Seeded prompt / output lengths."""

    def __init__(self, w, rng: np.random.Generator):
        self.w, self.rng = w, rng

    def prompt(self) -> int:
        w = self.w
        if w.prompt_len_min is None:
            return int(w.prompt_len)
        return int(self.rng.integers(w.prompt_len_min, w.prompt_len + 1))


def open_arrivals(w) -> list[Request]:
    """Every request of an open workload (static, poisson, trace), in arrival order."""
    rng = np.random.default_rng(w.seed)
    lengths = Lengths(w, rng)
    if w.arrival == "static":
        return [Request(i, 0.0, lengths.prompt(), int(w.gen_len)) for i in range(w.batch)]
    if w.arrival == "poisson":
        gaps = rng.exponential(1.0 / w.rate, size=w.n_requests)
        times = np.cumsum(gaps)
        return [Request(i, float(t), lengths.prompt(), int(w.gen_len)) for i, t in enumerate(times)]
    if w.arrival == "trace":
        return read_trace(w.trace)
    raise ValueError(w.arrival)


def read_trace(path: str) -> list[Request]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"workload.trace={path}: no such file (CSV with columns arrival_s, prompt_len, gen_len)")
    out = []
    with p.open() as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                r = Request(i, float(row["arrival_s"]), int(row["prompt_len"]), int(row["gen_len"]))
            except (KeyError, ValueError, TypeError):
                raise ConfigError(f"workload.trace={path}: row {i + 2} needs numeric arrival_s, prompt_len, gen_len") from None
            if r.arrival_s < 0 or r.prompt_len < 1 or r.gen_len < 1:
                raise ConfigError(f"workload.trace={path}: row {i + 2} has a negative time or a length < 1")
            out.append(r)
    return sorted(out, key=lambda r: (r.arrival_s, r.id))
