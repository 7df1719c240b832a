"""Per-request distributions of a validation point with arrivals (poisson, gamma, trace): the
runtime's per-request records, pooled over the point's repeats, against the simulator's.

For each metric (TTFT, TPOT, the largest inter-token gap per request, E2E) a point's row gets the
two-sample Kolmogorov-Smirnov statistic and p-value (scipy.stats.ks_2samp), the Wasserstein
distance relative to the measured mean (scipy.stats.wasserstein_distance) and the relative errors
of the mean, p50, p90 and p99; blank for a point without arrivals, or whose per-request files are
gone (one warning line, the rest of the row kept). The same columns with the suffix `_corrected`
compare the measured rows with the drift-corrected prediction (the simulator at the compute scale
that corrects for the machine's drift since its profile: `simulated_corrected_path`); blank where
the row has none. Beside the validation CSV: `<experiment>.requests.csv` (the per-request rows,
`half` = measured | predicted | predicted_corrected) and the CDFs, `<experiment>.cdf.png` (both
written by analysis/dist_plots.py). What the columns mean: docs/validation.md.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from scipy import stats

from core.per_request import REQUEST_COLUMNS, requests_path

from .stats import rel_err

ARRIVALS = ("poisson", "gamma", "trace")      # workloads whose points have per-request distributions
# metric -> the per-request column it is read from. A request's mean inter-token gap is its TPOT
# ((done - first token) / (tokens - 1)), so the ITL comparison reads each request's largest gap:
# the stall another request's prefill puts into its stream.
SOURCES = {"ttft": "ttft_s", "tpot": "tpot_s", "itl_max": "itl_max_s", "e2e": "e2e_s"}
LABELS = {"ttft": "TTFT: time to first token", "tpot": "TPOT: time per output token",
          "itl_max": "ITL: largest gap per request", "e2e": "E2E: arrival to last token"}
STATS = ("mean", "p50", "p90", "p99")
PATHS_COLUMN = "measured_requests_paths"       # the runtime's per-request CSVs of a point, one per repeat (JSON list)
SIM_COLUMN = "simulated_path"                  # the prediction's result JSON (its `requests_path`: the CSV)
CORRECTED_COLUMN = "simulated_corrected_path"  # the drift-corrected prediction's result JSON (may be absent)
CORRECTED = "_corrected"                       # the suffix of the columns against the drift-corrected prediction
POOLED_COLUMNS = ("id", "half", "repeat", *REQUEST_COLUMNS)


class RequestsError(Exception):
    """A point's per-request records cannot be read (one line: the file and what to do)."""


def raw_columns() -> list[str]:
    """The distribution columns against the (raw) prediction, in the order the CSV keeps them."""
    out = ["dist_requests_measured", "dist_requests_predicted"]
    for m in SOURCES:
        out += [f"dist_{m}_ks", f"dist_{m}_ks_p", f"dist_{m}_w_rel", *(f"err_{m}_{s}" for s in STATS)]
    return out


def corrected_columns() -> list[str]:
    """The same columns against the drift-corrected prediction (suffix `_corrected`); the measured
    count is the same for both predictions, so it has no twin."""
    return [c + CORRECTED for c in raw_columns() if c != "dist_requests_measured"]


def columns() -> list[str]:
    """Every distribution column of a validation row, in the order the CSV keeps them: the raw
    prediction's, then the drift-corrected one's."""
    return raw_columns() + corrected_columns()


def has_arrivals(row: dict) -> bool:
    return str(row.get("arrival")) in ARRIVALS


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[np.isfinite(x)]


def _stat(x: np.ndarray, s: str) -> float:
    return float(x.mean()) if s == "mean" else float(np.percentile(x, float(s[1:])))


def compare(measured, predicted) -> dict[str, float]:
    """{ks, ks_p, w_rel, mean, p50, p90, p99} of one metric: the KS statistic and p-value of the two
    samples, the Wasserstein distance / the measured mean, and (predicted - measured) / measured of
    the mean and the (numpy, linear) percentiles. NaN samples are left out; all NaN when a side
    has none."""
    x, y = _finite(measured), _finite(predicted)
    keys = ("ks", "ks_p", "w_rel", *STATS)
    if not len(x) or not len(y):
        return dict.fromkeys(keys, math.nan)
    ks = stats.ks_2samp(x, y)
    mean = float(x.mean())
    out = {"ks": float(ks.statistic), "ks_p": float(ks.pvalue),
           "w_rel": float(stats.wasserstein_distance(x, y)) / mean if mean > 0 else math.nan}
    out.update({s: rel_err(_stat(y, s), _stat(x, s)) for s in STATS})
    return out


def distribution_row(measured: pd.DataFrame, predicted: pd.DataFrame) -> dict[str, float]:
    """The distribution columns of a point from its pooled measured and its predicted per-request rows."""
    out = {"dist_requests_measured": len(measured), "dist_requests_predicted": len(predicted)}
    for m, src in SOURCES.items():
        c = compare(measured[src], predicted[src])
        out.update({f"dist_{m}_ks": c["ks"], f"dist_{m}_ks_p": c["ks_p"], f"dist_{m}_w_rel": c["w_rel"]})
        out.update({f"err_{m}_{s}": c[s] for s in STATS})
    return out


# ----------------------------------------------------------------------------- reading the records

def load_requests(path: str | Path) -> pd.DataFrame:
    """One per-request CSV (core/per_request.py REQUEST_COLUMNS); RequestsError when it is gone,
    unreadable or lacks a column the comparison reads."""
    p = Path(path)
    try:
        df = pd.read_csv(p)
    except FileNotFoundError:
        raise RequestsError(f"{p}: no such per-request file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise RequestsError(f"{p} is not a readable per-request CSV ({type(e).__name__})") from None
    missing = [c for c in SOURCES.values() if c not in df.columns]
    if missing:
        raise RequestsError(f"{p} is not a per-request CSV (no column {missing[0]!r})")
    for c in SOURCES.values():
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise RequestsError(f"{p}: column {c} holds non-numbers (corrupt)")
    return df


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else str(v)


def measured_paths(row: dict) -> list[str]:
    """The runtime's per-request CSVs of a point (one per repeat), as the row records them."""
    raw = _text(row.get(PATHS_COLUMN))
    if not raw:
        raise RequestsError(f"the row has no {PATHS_COLUMN} (measured before per-request records were kept); "
                            "resume=false measures the point again")
    try:
        paths = json.loads(raw)
    except json.JSONDecodeError:
        raise RequestsError(f"{PATHS_COLUMN} is not a JSON list of paths ({raw[:60]!r})") from None
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise RequestsError(f"{PATHS_COLUMN} is not a JSON list of paths ({raw[:60]!r})")
    return paths


def predicted_path(row: dict, column: str = SIM_COLUMN) -> str:
    """The simulator's per-request CSV of a point: `requests_path` of the result JSON that the
    row's `column` names (SIM_COLUMN: the prediction; CORRECTED_COLUMN: the drift-corrected one)."""
    sim = _text(row.get(column))
    if not sim:
        raise RequestsError(f"the point has no prediction ({column}); halves=simulator predicts it")
    try:
        rec = json.loads(Path(sim).read_text())
    except FileNotFoundError:
        raise RequestsError(f"{sim}: no such simulator result; halves=simulator predicts the point again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestsError(f"{sim} is not a readable simulator result ({type(e).__name__})") from None
    p = rec.get("requests_path") if isinstance(rec, dict) else None
    if not p:
        raise RequestsError(f"{sim} has no requests_path (predicted before per-request records); "
                            "halves=simulator predicts the point again")
    return str(p)


def measured_requests(row: dict) -> pd.DataFrame:
    """The measured rows of a point pooled over its repeats (columns `half`, `repeat` added);
    RequestsError when a file cannot be read."""
    parts = [load_requests(p).assign(half="measured", repeat=i) for i, p in enumerate(measured_paths(row))]
    return pd.concat(parts, ignore_index=True)


def predicted_requests(row: dict, column: str = SIM_COLUMN) -> pd.DataFrame:
    """The predicted rows of the result the row's `column` names, `half` = predicted (SIM_COLUMN)
    or predicted_corrected (CORRECTED_COLUMN); RequestsError when a file cannot be read."""
    half = "predicted_corrected" if column == CORRECTED_COLUMN else "predicted"
    return load_requests(predicted_path(row, column)).assign(half=half, repeat=0)


def point_requests(row: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured rows pooled over the repeats, predicted rows) of a point, each with the columns
    `half` and `repeat` in front; RequestsError when a file cannot be read."""
    return measured_requests(row), predicted_requests(row)


# ----------------------------------------------------------------------------- the validation run

def requests_columns(row: dict, samples: Iterable[dict]) -> dict:
    """{PATHS_COLUMN: JSON list} of a measured point with arrivals: each repeat's per-request CSV
    (its record's `requests_path`, else the one beside its result); {} for other points."""
    if not has_arrivals(row):
        return {}
    paths = [str(s.get("requests_path") or requests_path(s["path"])) for s in samples if s.get("path")]
    return {PATHS_COLUMN: json.dumps(paths)} if paths else {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def corrected_row(measured: pd.DataFrame, predicted: pd.DataFrame) -> dict[str, float]:
    """The `_corrected` distribution columns of a point: distribution_row against the
    drift-corrected prediction's rows, renamed."""
    keep = set(corrected_columns())
    return {c + CORRECTED: v for c, v in distribution_row(measured, predicted).items() if c + CORRECTED in keep}


def distribution_columns(row: dict, warn: Callable[[str], None] | None = _stderr) -> dict:
    """The distribution columns of a validation row: computed for an ok point with arrivals and
    both halves, NaN otherwise; the `_corrected` ones likewise against the drift-corrected
    prediction where the row names one (CORRECTED_COLUMN). A file that cannot be read leaves its
    columns NaN with one `warn` line (one for both when it is a measured file)."""
    out = dict.fromkeys(columns(), math.nan)
    sides = [c for c in (SIM_COLUMN, CORRECTED_COLUMN) if _text(row.get(c))]
    if row.get("status") != "ok" or not has_arrivals(row) or not sides:
        return out

    def blank(e: RequestsError, which: str) -> None:
        if warn:
            warn(f"analysis.validate: {row.get('id')}: {e}; its {which}distribution columns are left blank")

    try:
        measured = measured_requests(row)
    except RequestsError as e:
        blank(e, "")
        return out
    for col in sides:
        try:
            predicted = predicted_requests(row, col)
        except RequestsError as e:
            blank(e, "drift-corrected " if col == CORRECTED_COLUMN else "")
            continue
        out.update(corrected_row(measured, predicted) if col == CORRECTED_COLUMN
                   else distribution_row(measured, predicted))
    return out


def pooled(df: pd.DataFrame) -> pd.DataFrame:
    """The per-request rows of every ok point with arrivals whose files can be read (POOLED_COLUMNS):
    measured, predicted and, where the point has one, the drift-corrected prediction's rows
    (half = predicted_corrected). A point whose measured files are gone is left out, and so is one
    whose files of both predictions are gone: their row said so."""
    parts = []
    for r in df[df.status == "ok"].to_dict("records"):
        sides = [c for c in (SIM_COLUMN, CORRECTED_COLUMN) if _text(r.get(c))]
        if not has_arrivals(r) or not sides:
            continue
        try:
            measured = measured_requests(r)
        except RequestsError:
            continue
        predicted = []
        for col in sides:
            try:
                predicted.append(predicted_requests(r, col))
            except RequestsError:
                continue
        if predicted:
            parts += [p.assign(id=str(r["id"])) for p in (measured, *predicted)]
    if not parts:
        return pd.DataFrame(columns=list(POOLED_COLUMNS))
    out = pd.concat(parts, ignore_index=True)
    return out[[c for c in POOLED_COLUMNS if c in out.columns]]


def requests_csv(path: str | Path) -> Path:
    """`<experiment>.requests.csv` beside `<experiment>.csv` (the name a result's rows take)."""
    return requests_path(path)


def cdf_png(path: str | Path) -> Path:
    """`<experiment>.cdf.png` beside `<experiment>.csv`."""
    p = Path(path)
    return p.with_name(f"{p.stem}.cdf.png")


def _pct(v) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{100 * v:+.1f}%" if np.isfinite(v) else "-"


def _is_finite(v) -> bool:
    try:
        return v is not None and bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def _dist_line(r: dict, label: str, suffix: str) -> str:
    """One printed line: per metric the errors of mean/p50/p90/p99 and the KS statistic of the
    columns with `suffix` ("" raw, "_corrected")."""
    parts = []
    for m in SOURCES:
        errs = "/".join(_pct(r.get(f"err_{m}_{s}{suffix}")) for s in STATS)
        k = r.get(f"dist_{m}_ks{suffix}")
        parts.append(f"{m} {errs} KS {float(k):.2f}" if _is_finite(k) else f"{m} -")
    return f"{label:<28} " + "  ".join(parts)


def format_distributions(df: pd.DataFrame) -> list[str]:
    """One line per ok point with distributions: per metric the mean / p50 / p90 / p99 errors
    (predicted vs measured) and the KS statistic; below it, where the point has them, the same
    against the drift-corrected prediction (`<id> (drift-corrected)`)."""
    lines, corrected = [], False
    for r in df[df.status == "ok"].to_dict("records") if "status" in df else []:
        if not has_arrivals(r):
            continue
        if _is_finite(r.get("dist_ttft_ks")):
            lines.append(_dist_line(r, str(r["id"]), ""))
        if _is_finite(r.get("dist_ttft_ks" + CORRECTED)):
            lines.append(_dist_line(r, f"{r['id']} (drift-corrected)", CORRECTED))
            corrected = True
    if lines:
        lines.insert(0, "per-request distributions (predicted vs measured, all repeats pooled): "
                        "error of mean/p50/p90/p99, KS statistic"
                        + ("; (drift-corrected): the prediction at the drift-corrected compute scale"
                           if corrected else ""))
    return lines
