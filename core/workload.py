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

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError, check_file
from core.values import number

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
    """The workload's values, for every entry point (core/checks.py calls it)."""
    if w.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={w.arrival!r} is not known; choose one of: {', '.join(ARRIVALS)}")
    for key in ("batch", "prompt_len", "gen_len", "n_requests", "users"):
        number(getattr(w, key), f"workload.{key}", ge=1, integer=True)
    if w.prompt_len_min is not None and not 1 <= w.prompt_len_min <= w.prompt_len:
        raise ConfigError(f"workload.prompt_len_min={w.prompt_len_min} must be in [1, workload.prompt_len={w.prompt_len}]")
    number(w.seed, "workload.seed", ge=0, integer=True)
    number(w.temperature, "workload.temperature", ge=0)
    number(w.top_p, "workload.top_p", gt=0, le=1)
    number(w.rate, "workload.rate", gt=0) if w.arrival == "poisson" else number(w.rate, "workload.rate")
    number(w.think_s, "workload.think_s", ge=0)
    if w.arrival == "trace" and (not w.trace or w.trace == "???"):
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


TRACE_COLUMNS = ("arrival_s", "prompt_len", "gen_len")


def read_trace(path: str) -> list[Request]:
    """A trace CSV (columns arrival_s, prompt_len, gen_len, any others ignored), every cell
    checked: finite non-negative arrivals, whole lengths >= 1; a bad cell is one line naming the
    file, the row (as a spreadsheet numbers it: the header is row 1) and the column."""
    import pandas as pd

    p = Path(path)
    where = f"workload.trace={path}"
    cols = ", ".join(TRACE_COLUMNS)
    check_file(p, where, f"give a CSV file with columns {cols}", f"no such file (CSV with columns {cols})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False)
    except pd.errors.ParserWarning:
        raise ConfigError(f"{where} has a row with more cells than its header; give one cell per column "
                          f"({', '.join(TRACE_COLUMNS)}) in every row") from None
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{where} is empty; give a header {','.join(TRACE_COLUMNS)} and one row per request") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{where} is not a readable CSV ({str(e).splitlines()[0]}); give columns "
                          f"{', '.join(TRACE_COLUMNS)}") from None
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{where} lacks column {missing[0]} (has {', '.join(map(str, df.columns)) or 'none'}); "
                          f"give columns {', '.join(TRACE_COLUMNS)}")
    if df.empty:
        raise ConfigError(f"{where} has a header but no requests; add one row per request")
    cols = {}
    for c in TRACE_COLUMNS:          # vectorised; the first bad cell of a column is named
        raw = df[c].str.strip()
        vals = pd.to_numeric(raw, errors="coerce")
        said_nan = raw.str.lower().isin(("nan", "-nan", "+nan"))
        checks = [(vals.isna() & ~said_nan, lambda r, v: f"is {r!r}, not a number; give a number in every cell")]
        checks.append((~np.isfinite(vals.fillna(np.nan).to_numpy(dtype=float)),
                       lambda r, v: f"is {r}, not a finite number; give a finite value"))
        if c == "arrival_s":
            checks.append((vals < 0, lambda r, v: f"is {v:g}; arrival times are seconds >= 0"))
        else:
            checks.append(((vals != np.floor(vals)) | (vals < 1),
                           lambda r, v: f"is {r}; lengths are whole numbers of tokens >= 1"))
        for mask, say in checks:
            bad = np.flatnonzero(np.asarray(mask, dtype=bool))
            if len(bad):
                i = int(bad[0])
                raise ConfigError(f"{where}: row {i + 2}, column {c} " + say(raw.iloc[i], vals.iloc[i]))
        cols[c] = vals
    out = [Request(i, float(a), int(pl), int(g))
           for i, (a, pl, g) in enumerate(zip(cols["arrival_s"], cols["prompt_len"], cols["gen_len"]))]
    return sorted(out, key=lambda r: (r.arrival_s, r.id))
