"""Per-request records and the serving metrics' statistics, shared by simulator.run and runtime.serve.

- `TokenTimes`: every request's token times, compact (CSR: the first token time per request, then
  its later tokens' times as a slice of one array, which the simulator shares between requests:
  one float per decode iteration, not per token), with each request's inter-token latencies
  (`per_request`) and all gaps pooled (`pooled`, as values with counts).
- `metric_stats`: `<m>_mean_s`, `_std_s`, `_p50_s`, `_p90_s`, `_p99_s` plus the extra
  `metrics.percentiles` (99.9 -> `_p99_9_s`), optionally weighted (exactly numpy's linear
  percentile of the values repeated by their counts).
- `request_rows` / `write_requests_csv`: `<result stem>.requests.csv`, columns REQUEST_COLUMNS;
  `write_timeseries_csv`: `<stem>.timeseries.csv`, columns TIMESERIES_COLUMNS; runtime.serve's
  iterations (`<stem>.iterations.csv`, ITERATION_COLUMNS: what each measured step ran, so the
  simulator can price that very step: analysis/steps.py). Atomic writes.
Column meanings: docs/runtime.md ("Per-request records").
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.files import write_atomic

PERCENTILES = (50, 90, 99)           # always written; metrics.percentiles adds more
METRICS = ("ttft", "tpot", "itl", "e2e", "queue")
REQUEST_COLUMNS = ("request_id", "arrival_s", "admitted_s", "first_token_s", "done_s", "prompt_len", "output_len",
                   "queue_s", "ttft_s", "tpot_s", "e2e_s", "itl_mean_s", "itl_p50_s", "itl_p90_s", "itl_p99_s",
                   "itl_max_s", "preemptions")
TIMESERIES_COLUMNS = ("t_s", "batch", "queue", "kv_device_bytes", "kv_host_bytes", "busy")
# one row per serving iteration: its stage (prefill | decode), start on the replay's clock and
# seconds; rows computed; `cohorts` "rows:context ..." (each live cohort's rows and the columns its
# attention reads, decode only); `prompts` "len ..." (the prompts a prefill admits, prefill only)
ITERATION_COLUMNS = ("stage", "t_s", "seconds", "rows", "cohorts", "prompts")
_CHUNK = 1 << 21                     # gaps per block when summarising requests of one length


def percentile_key(p: float) -> str:
    """`p50`, `p99`, `p99_9`, `p0_5`: a percentile as a key (shortest decimal, '.' -> '_')."""
    return "p" + np.format_float_positional(float(p), trim="-").replace(".", "_")


def percentile_list(extra=()) -> tuple[float, ...]:
    """PERCENTILES then the extra ones not among them, in the order given."""
    out = [float(p) for p in PERCENTILES]
    for p in extra or ():
        if float(p) not in out:
            out.append(float(p))
    return tuple(out)


def weighted_percentiles(values: np.ndarray, counts: np.ndarray | None, ps) -> np.ndarray:
    """numpy's (linear) percentiles of `values` each repeated `counts` times, without repeating."""
    v = np.asarray(values, dtype=float)
    if counts is None:
        return np.percentile(v, list(ps))
    c = np.asarray(counts, dtype=np.int64)
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(c[order])
    n = int(cum[-1])
    out = []
    for p in ps:
        h = (n - 1) * float(p) / 100.0
        lo = math.floor(h)
        a = v[np.searchsorted(cum, lo, side="right")]
        b = v[np.searchsorted(cum, min(lo + 1, n - 1), side="right")]
        out.append(a + (h - lo) * (b - a))
    return np.asarray(out)


def metric_stats(m: str, xs, extra=(), counts=None) -> dict[str, float]:
    """{`<m>_mean_s`, `<m>_std_s` (population), `<m>_p50_s`, ...}; NaN samples are left out (a
    request of one token has no TPOT); every value NaN when none is left. `counts`: how many times
    each x occurs (pooled gaps)."""
    ps = percentile_list(extra)
    x = np.asarray(xs, dtype=float)
    w = None if counts is None else np.asarray(counts, dtype=np.int64)
    keep = ~np.isnan(x) if w is None else ~np.isnan(x) & (w > 0)
    x = x[keep]
    keys = [f"{m}_mean_s", f"{m}_std_s", *(f"{m}_{percentile_key(p)}_s" for p in ps)]
    if not len(x):
        return dict.fromkeys(keys, math.nan)
    if w is None:
        mean, std = float(x.mean()), float(x.std())
    else:
        w = w[keep]
        mean = float(np.dot(w, x) / w.sum())
        std = float(math.sqrt(np.dot(w, (x - mean) ** 2) / w.sum()))
    return dict(zip(keys, [mean, std, *(float(q) for q in weighted_percentiles(x, w, ps))]))


@dataclass
class TokenTimes:
    """Token times of requests (in the order of the requests they describe): request i's are
    `first[i]`, then `later[start[i] : start[i] + count[i]]` (count = output tokens - 1). The
    simulator shares `later` (every running request gets a token at each decode iteration's end);
    the runtime lays each request's own times end to end (`from_lists`)."""
    first: np.ndarray
    start: np.ndarray
    count: np.ndarray
    later: np.ndarray

    @classmethod
    def from_lists(cls, times: list) -> "TokenTimes":
        """Each request's own token times (the first token's, then the rest's)."""
        n = [max(len(t) - 1, 0) for t in times]
        start = np.concatenate(([0], np.cumsum(n)[:-1])).astype(np.int64) if times else np.zeros(0, np.int64)
        later = np.fromiter((x for t in times for x in t[1:]), dtype=float, count=sum(n))
        first = np.asarray([t[0] if len(t) else math.nan for t in times], dtype=float)
        return cls(first, start, np.asarray(n, dtype=np.int64), later)

    def per_request(self) -> dict[str, np.ndarray]:
        """Each request's inter-token latencies (gaps between consecutive token times):
        itl_mean_s, itl_p50_s, itl_p90_s, itl_p99_s, itl_max_s arrays; NaN below 2 tokens."""
        n = len(self.first)
        out = {k: np.full(n, math.nan) for k in ("itl_mean_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "itl_max_s")}
        for c in np.unique(self.count):
            if c < 1:
                continue
            rows = np.flatnonzero(self.count == c)
            step = max(1, _CHUNK // int(c))
            for lo in range(0, len(rows), step):
                r = rows[lo:lo + step]
                t = np.empty((len(r), int(c) + 1))
                t[:, 0] = self.first[r]
                t[:, 1:] = self.later[self.start[r][:, None] + np.arange(int(c))]
                g = np.diff(t, axis=1)
                out["itl_mean_s"][r] = g.mean(axis=1)
                p50, p90, p99 = np.percentile(g, PERCENTILES, axis=1)
                out["itl_p50_s"][r], out["itl_p90_s"][r], out["itl_p99_s"][r] = p50, p90, p99
                out["itl_max_s"][r] = g.max(axis=1)
        return out

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """Every gap of every request as (values, counts): each request's first gap once, and each
        gap between consecutive entries of `later` as many times as requests span it."""
        has = self.count >= 1
        s, c = self.start[has], self.count[has]
        first_gaps = self.later[s] - self.first[has]
        cover = np.zeros(len(self.later) + 1, dtype=np.int64)     # requests holding both j-1 and j
        np.add.at(cover, s + 1, 1)
        np.add.at(cover, s + c, -1)
        cover = np.cumsum(cover)[1:len(self.later)]
        inner = np.diff(self.later)
        return (np.concatenate((first_gaps, inner)),
                np.concatenate((np.ones(len(first_gaps), dtype=np.int64), cover)))


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def request_rows(reqs, times: TokenTimes | None = None) -> dict[str, np.ndarray]:
    """The per-request table (REQUEST_COLUMNS -> arrays, one entry per request, reqs' order) of
    requests with id, arrival_s, admitted_s, first_token_s, done_s, prompt_len, gen_len (and
    `preemptions`, 0 when absent); `times`: their TokenTimes (None: the ITL columns are NaN)."""
    col = {
        "request_id": np.asarray([r.id for r in reqs], dtype=np.int64),
        "arrival_s": np.asarray([_nan(r.arrival_s) for r in reqs]),
        "admitted_s": np.asarray([_nan(r.admitted_s) for r in reqs]),
        "first_token_s": np.asarray([_nan(r.first_token_s) for r in reqs]),
        "done_s": np.asarray([_nan(r.done_s) for r in reqs]),
        "prompt_len": np.asarray([r.prompt_len for r in reqs], dtype=np.int64),
        "output_len": np.asarray([r.gen_len for r in reqs], dtype=np.int64),
    }
    col["queue_s"] = col["admitted_s"] - col["arrival_s"]
    col["ttft_s"] = col["first_token_s"] - col["arrival_s"]
    with np.errstate(divide="ignore", invalid="ignore"):
        col["tpot_s"] = np.where(col["output_len"] > 1, (col["done_s"] - col["first_token_s"])
                                 / np.maximum(col["output_len"] - 1, 1), math.nan)
    col["e2e_s"] = col["done_s"] - col["arrival_s"]
    itl = times.per_request() if times is not None else {}
    for k in ("itl_mean_s", "itl_p50_s", "itl_p90_s", "itl_p99_s", "itl_max_s"):
        col[k] = itl.get(k, np.full(len(reqs), math.nan))
    col["preemptions"] = np.asarray([getattr(r, "preemptions", 0) or 0 for r in reqs], dtype=np.int64)
    return {k: col[k] for k in REQUEST_COLUMNS}


def requests_path(result_path: str | Path) -> Path:
    """Where a result's per-request records go: beside it, `<stem>.requests.csv`."""
    p = Path(result_path)
    return p.with_name(f"{p.stem}.requests.csv")


def timeseries_path(result_path: str | Path) -> Path:
    """Where a result's time series goes: beside it, `<stem>.timeseries.csv`."""
    p = Path(result_path)
    return p.with_name(f"{p.stem}.timeseries.csv")


def iterations_path(result_path: str | Path) -> Path:
    """Where runtime.serve's iterations go: beside its result, `<stem>.iterations.csv`."""
    p = Path(result_path)
    return p.with_name(f"{p.stem}.iterations.csv")


def sidecars(rows: dict, series: list | None = None, iterations: list | None = None) -> dict:
    """core.results.write_run_record's `sidecars`: the per-request CSV (`requests_path`) and,
    given the rows of a time series (tuples in TIMESERIES_COLUMNS order), `timeseries_path`;
    given iterations (tuples in ITERATION_COLUMNS order), `iterations_path`."""
    out = {"requests_path": (requests_path, lambda p: write_requests_csv(p, rows))}
    for key, where, columns, tuples in (("timeseries_path", timeseries_path, TIMESERIES_COLUMNS, series),
                                        ("iterations_path", iterations_path, ITERATION_COLUMNS, iterations)):
        if tuples is not None:
            table = {c: [row[i] for row in tuples] for i, c in enumerate(columns)}
            out[key] = (where, lambda p, columns=columns, table=table: _write_columns(p, columns, table))
    return out


def _write_columns(path: str | Path, columns: tuple[str, ...], table: dict) -> Path:
    cells = [table[c].tolist() if isinstance(table[c], np.ndarray) else list(table[c]) for c in columns]

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        w.writerows(zip(*cells))         # floats as repr: the exact value; NaN as nan
    return write_atomic(path, write)


def write_requests_csv(path: str | Path, rows: dict) -> Path:
    """`rows` (request_rows) as CSV, atomically; returns the path."""
    return _write_columns(path, REQUEST_COLUMNS, rows)


def write_timeseries_csv(path: str | Path, series: dict) -> Path:
    """A time series ({column: sequence} over TIMESERIES_COLUMNS) as CSV, atomically."""
    return _write_columns(path, TIMESERIES_COLUMNS, series)
