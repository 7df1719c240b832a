"""Arrivals and request lengths, seeded (same seed -> the same requests).

`workload.arrival`:
- static: `batch` requests at t = 0, as runtime.bench runs them;
- poisson: `n_requests` with exponential gaps of mean 1 / `rate` (requests per second);
- gamma: `n_requests` with gamma gaps, shape `burstiness`, scale 1 / (`rate` * `burstiness`) (vLLM's
  serving benchmark's definition): mean 1 / `rate`, CV 1 / sqrt(`burstiness`); burstiness 1 is Poisson;
- closed: `users` clients, each sending its next request `think_s` after its last one finished,
  until `n_requests` have been sent;
- trace: a CSV file `trace` with columns arrival_s, prompt_len, gen_len.
Lengths (`Lengths`, prompt and output alike, `prompt_dist` / `gen_dist`): fixed (`prompt_len`),
uniform in [`prompt_len_min`, `prompt_len`], lognormal with mean `prompt_len_mean` and CV
`prompt_len_cv`, or resampled rows of the CSV `trace`; drawn lengths are clamped to
[`prompt_len_min` or 1, `prompt_len`], so `prompt_len` + `gen_len` bounds every request. Every draw
is here, from one numpy generator seeded `seed`: runtime.bench, runtime.serve and the simulator read
the same lengths. docs/simulator.md#workloads.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError, check_file
from core.values import number

ARRIVALS = ("static", "poisson", "gamma", "closed", "trace")
DISTS = ("fixed", "uniform", "lognormal", "trace")
# the keys that shape the draws, at the values that draw the requests the workloads always drew:
# analysis/compose.py config_hash leaves them out at these values (committed results still resume)
DRAW_DEFAULTS = {"burstiness": 1.0, "prompt_dist": None, "prompt_len_mean": None, "prompt_len_cv": 1.0,
                 "gen_dist": None, "gen_len_min": None, "gen_len_mean": None, "gen_len_cv": 1.0}
# The finest clock step results must keep. Both halves add step times to a float64 clock that starts
# at the first arrival; at time t a clock value is only resolved to np.spacing(t) (t * 2.2e-16), and
# every step adds up to half of that in rounding. 10 ns keeps TTFT / TPOT (printed to 0.01 ms)
# exact and a 10 us step (the shortest plausible decode step) within 0.05 %; it holds for
# arrivals within 2^26 s (~2 years). A workload whose arrivals go later is refused.
CLOCK_RESOLUTION_S = 1e-8
MAX_CV = 100.0          # a lognormal length's CV: beyond it sigma^2 = log(1 + CV^2) leaves every draw at a clamp
CLOCK_LIMIT_S = 2.0 ** (math.floor(52 + math.log2(CLOCK_RESOLUTION_S)) + 1)


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


def _get(w, key: str):
    """A key that shapes the draws, its default where `w` predates it."""
    return getattr(w, key, DRAW_DEFAULTS.get(key))


def dist_of(w, half: str) -> str:
    """The length distribution of `half` ("prompt" or "gen"); null: uniform when its _len_min is set."""
    d = _get(w, f"{half}_dist")
    if d is None:
        return "uniform" if _get(w, f"{half}_len_min") is not None else "fixed"
    return str(d)


def check_clock(t_last: float, where: str) -> None:
    """Refuse arrivals so late that float64 seconds there are coarser than CLOCK_RESOLUTION_S."""
    if not t_last < CLOCK_LIMIT_S:
        sp = f"{np.spacing(t_last):.3g} s apart" if math.isfinite(t_last) else "not finite"
        raise ConfigError(f"{where}: the last request arrives at ~{t_last:.3g} s, where clock values are {sp}, "
                          f"coarser than {CLOCK_RESOLUTION_S:g} s: step times would round away from TTFT and TPOT; "
                          f"keep arrivals within {CLOCK_LIMIT_S:.3g} s (raise workload.rate or send fewer requests)")


def _check_lengths(w, half: str) -> None:
    key = f"workload.{half}"
    d = _get(w, f"{half}_dist")
    if d is not None and d not in DISTS:
        raise ConfigError(f"{key}_dist={d!r} is not known; choose one of: {', '.join(DISTS)} (or null)")
    if w.arrival == "trace" and d not in (None, "trace"):
        raise ConfigError(f"{key}_dist={d}: workload.arrival=trace replays the trace's own lengths; drop it, or draw "
                          f"arrivals (workload.arrival=poisson|gamma) with {half}_dist={d}")
    hi, lo = getattr(w, f"{half}_len"), _get(w, f"{half}_len_min")
    if lo is not None and not (isinstance(lo, int) and 1 <= lo <= hi):
        raise ConfigError(f"{key}_len_min={lo} must be a whole number in [1, {key}_len={hi}]")
    number(_get(w, f"{half}_len_cv"), f"{key}_len_cv", ge=0, le=MAX_CV)
    mean = number(_get(w, f"{half}_len_mean"), f"{key}_len_mean", gt=0, null="set it for lognormal")
    dist = dist_of(w, half)
    if dist == "lognormal":
        if mean is None:
            raise ConfigError(f"{key}_len_mean is not set; {half}_dist=lognormal needs the mean length in tokens")
        if not (lo or 1) <= mean <= hi:
            raise ConfigError(f"{key}_len_mean={mean} must be in [{lo or 1}, {hi}] ({key}_len_min or 1 .. "
                              f"{key}_len: lognormal draws are clamped to that range)")
    if dist == "trace" and (not w.trace or w.trace == "???"):
        raise ConfigError(f"{key}_dist=trace needs workload.trace: a CSV with columns {', '.join(TRACE_COLUMNS)}")


def check(w, runner: str | None = None) -> None:
    """The workload's values, for every entry point (core/checks.py calls it with its runner)."""
    if w.arrival not in ARRIVALS:
        raise ConfigError(f"workload.arrival={w.arrival!r} is not known; choose one of: {', '.join(ARRIVALS)}")
    for key in ("batch", "prompt_len", "gen_len", "n_requests", "users"):
        number(getattr(w, key), f"workload.{key}", ge=1, integer=True)
    if w.prompt_len_min is not None and not 1 <= w.prompt_len_min <= w.prompt_len:
        raise ConfigError(f"workload.prompt_len_min={w.prompt_len_min} must be in [1, workload.prompt_len={w.prompt_len}]")
    for half in ("prompt", "gen"):
        _check_lengths(w, half)
    if runner == "runtime.bench" and dist_of(w, "gen") != "fixed":
        raise ConfigError(f"workload.gen_dist={dist_of(w, 'gen')}: runtime.bench generates workload.gen_len tokens for "
                          "every request of its batch; draw output lengths with python -m runtime.serve or "
                          "python -m simulator.run (or set workload.gen_dist=fixed)")
    number(w.seed, "workload.seed", ge=0, integer=True)
    number(w.temperature, "workload.temperature", ge=0)
    number(w.top_p, "workload.top_p", gt=0, le=1)
    number(w.rate, "workload.rate", gt=0) if w.arrival in ("poisson", "gamma") else number(w.rate, "workload.rate")
    number(w.think_s, "workload.think_s", ge=0)
    b = number(_get(w, "burstiness"), "workload.burstiness", gt=0)
    if b != 1 and w.arrival != "gamma":
        raise ConfigError(f"workload.burstiness={b} shapes gamma arrivals only (poisson is burstiness 1); set "
                          f"workload.arrival=gamma, or workload.burstiness=1 for arrival={w.arrival}")
    if w.arrival in ("poisson", "gamma"):      # the expected last arrival; open_arrivals checks the drawn one
        check_clock(w.n_requests / w.rate, "workload.rate")
    elif w.arrival == "closed":                # each user's last request waits ceil(n / users) - 1 pauses
        check_clock((math.ceil(w.n_requests / w.users) - 1) * float(w.think_s), "workload.think_s")
    if w.arrival == "trace" and (not w.trace or w.trace == "???"):
        raise ConfigError("workload.trace is not set; give a CSV with columns arrival_s, prompt_len, gen_len")


class Lengths:
    """Seeded prompt / output lengths, one request at a time in creation order, from `rng`: a trace
    row first (either half `trace`: one row gives both, keeping their pairing), then the prompt,
    then the output; a fixed half draws nothing."""

    def __init__(self, w, rng: np.random.Generator):
        self.w, self.rng = w, rng
        self.dists = {half: dist_of(w, half) for half in ("prompt", "gen")}
        self.bounds = {half: (int(_get(w, f"{half}_len_min") or 1), int(getattr(w, f"{half}_len")))
                       for half in ("prompt", "gen")}
        self.lognormal = {}                         # half -> (mu, sigma) of log length: mean and CV as given
        for half in ("prompt", "gen"):
            if self.dists[half] == "lognormal":
                s2 = math.log1p(float(_get(w, f"{half}_len_cv")) ** 2)
                self.lognormal[half] = (math.log(float(_get(w, f"{half}_len_mean"))) - s2 / 2, math.sqrt(s2))
        self.rows = None
        if "trace" in self.dists.values():          # the file's rows, in file order
            reqs = sorted(read_trace(w.trace), key=lambda r: r.id)
            self.rows = [(r.prompt_len, r.gen_len) for r in reqs]

    def pair(self) -> tuple[int, int]:
        """(prompt_len, gen_len) of the next request."""
        row = self.rows[int(self.rng.integers(len(self.rows)))] if self.rows else None
        return self._draw("prompt", row), self._draw("gen", row)

    def prompt(self) -> int:
        """The next request's prompt length (its output length drawn and dropped)."""
        return self.pair()[0]

    def _draw(self, half: str, row) -> int:
        dist, (lo, hi) = self.dists[half], self.bounds[half]
        if dist == "fixed":
            return hi
        if dist == "uniform":
            return int(self.rng.integers(lo, hi + 1))
        if dist == "trace":
            n = row[0 if half == "prompt" else 1]
        else:
            n = round(float(self.rng.lognormal(*self.lognormal[half])))
        return int(min(max(n, lo), hi))


def open_arrivals(w) -> list[Request]:
    """Every request of an open workload (static, poisson, gamma, trace), in arrival order: the gaps
    first (one vector), then each request's lengths, from one generator seeded `seed`."""
    rng = np.random.default_rng(w.seed)
    lengths = Lengths(w, rng) if w.arrival != "trace" else None
    if w.arrival == "static":
        return [Request(i, 0.0, *lengths.pair()) for i in range(w.batch)]
    if w.arrival in ("poisson", "gamma"):
        check_clock(w.n_requests / w.rate, "workload.rate")
        if w.arrival == "poisson":
            gaps = rng.exponential(1.0 / w.rate, size=w.n_requests)
        else:
            k = float(_get(w, "burstiness"))
            gaps = rng.gamma(k, 1.0 / (w.rate * k), size=w.n_requests)
        times = np.cumsum(gaps)
        check_clock(float(times[-1]), "workload.rate")
        return [Request(i, float(t), *lengths.pair()) for i, t in enumerate(times)]
    if w.arrival == "trace":
        reqs = read_trace(w.trace)
        check_clock(reqs[-1].arrival_s, f"workload.trace={w.trace}")
        return reqs
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
