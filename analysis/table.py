"""The validation table: where `<experiment>.csv` lies (and its committed reference), writing it
atomically, merging rows into it under a lock (two runs into one folder keep every row), reading
it back (a file that is not one is one line), and the two printed tables (per point, and the
per-split summary of errors and noise).

    <results_dir>/validation/<experiment>.csv                 what a run writes (git-ignored)
    <results_dir>/reference/validation/<experiment>.csv       the committed measurements

Column meanings, resume and concurrent runs: docs/validation.md.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from core.errors import ConfigError
from core.files import flocked, write_kept

SPLITS = ("calibration", "heldout")
METRICS = ("throughput_tok_s", "ttft_s", "tpot_s", "decode_tok_s", "kv_bytes_device")
HEADLINE = ("throughput_tok_s", "ttft_s", "tpot_s")
CSV_COLUMNS = ("id", "status")     # what every row of a validation CSV has (the rest may be NaN)
# identifiers stay text when read back: an all-digit hash or fingerprint read as a number (and one
# with a leading 0 losing it) never matches again, so nothing would resume
TEXT_COLUMNS = ("id", "config_hash", "machine_fingerprint", "profile_fingerprint", "profile_sha256", "profile_path",
                "host", "measured_path", "simulated_path", "simulated_corrected_path", "drift_source", "grid",
                "overrides")


def csv_path(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / "validation" / f"{cfg.experiment or 'validate'}.csv"


def reference_path(cfg: DictConfig) -> Path:
    """The committed table of the same experiment: a run without a table of its own starts from
    it (resume, halves=simulator) and writes its own; the reference stays as it is."""
    return Path(cfg.results_dir) / "reference" / "validation" / f"{cfg.experiment or 'validate'}.csv"


def write_csv_atomic(df: pd.DataFrame, path: Path, exact: bool = False) -> Path:
    """The table written atomically (core/results.py write_atomic): a reader, or a crash, never
    sees half of it. exact=True writes NaN as `nan`, so an empty string reads back as one."""
    # a failed write (a full disk) keeps the table in the cache and is one line (core/files.py write_kept)
    return write_kept(path, lambda f: df.to_csv(f, index=False, **({"na_rep": "nan"} if exact else {})))


def lock_path(path: str | Path) -> Path:
    """The lock beside a table: `<name>.lock`. Not the table itself, which an atomic write
    replaces (a lock held on the old file would lock nothing)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """One writer at a time for the table at `path` (an exclusive flock on its lock file; it is
    released when the holder exits, even by kill -9)."""
    with flocked(lock_path(path)):
        yield


def read_rows(path: str | Path, key: str = "id", exact: bool = False) -> dict[str, dict]:
    """{key: row} of a table as written (identifiers as text), {} when there is none; exact: one
    written with exact=True (empty strings stay strings)."""
    path = Path(path)
    if not path.exists():
        return {}
    df = _read(path, exact)
    if key not in df.columns:
        raise ConfigError(f"{path} has no column {key!r}; move it away (or delete it) and run again")
    return {str(r[key]): {k: v for k, v in r.items() if not k.endswith("_abs_err")} for r in df.to_dict("records")}


def _read(path: Path, exact: bool = False) -> pd.DataFrame:
    na = {"keep_default_na": False, "na_values": ["nan"]} if exact else {}
    if path.is_dir():
        raise ConfigError(f"{path} is a directory where the validation CSV should be; move it away (or delete "
                          "it) and run again")
    try:
        return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, **na)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} is not a readable CSV ({type(e).__name__}); move it away (or delete it) "
                          "and run again") from None


def merge_rows(path: str | Path, updates: dict[str, dict], order: Iterable[str] | None = None, *,
               key: str = "id", seed: dict[str, dict] | None = None, exact: bool = False) -> pd.DataFrame:
    """Read, merge, replace under the table's lock: `updates` replace the rows of the same `key`,
    every other row of the file stays (another run's). `order`: the keys in the order the table
    keeps (rows not in it are dropped: points no longer in the experiment); `seed`: the rows a
    table that does not exist yet starts from (the committed reference); exact: see write_csv_atomic."""
    path = Path(path)
    with locked(path):
        rows = read_rows(path, key, exact) if path.exists() else dict(seed or {})
        rows.update({str(k): v for k, v in updates.items()})
        keys = [str(k) for k in order] if order is not None else list(rows)
        df = pd.DataFrame([rows[k] for k in keys if k in rows])
        write_csv_atomic(df, path, exact)
    return df


def load(path: str | Path) -> pd.DataFrame:
    """A validation CSV, with the absolute errors the summaries use; a file that is not one (a
    directory, unreadable, not a CSV, without the id / status columns) is one ConfigError line."""
    path = Path(path)
    fix = "move it away (or delete it) and run again; nothing in it can be resumed"
    if path.is_dir():
        raise ConfigError(f"{path} is a directory where the validation CSV should be; {fix}")
    try:
        # identifiers stay text: an all-digit config hash or fingerprint read as a number
        # (and one with a leading 0 losing it) never matches again, so nothing would resume
        df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such validation CSV; run python -m analysis.validate experiment=NAME") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} is not a readable validation CSV ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {fix}") from None
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{path} is not a validation CSV (no column {missing[0]!r}); {fix}")
    for m in METRICS:
        col = f"{m}_rel_err"
        if col in df and not pd.api.types.is_numeric_dtype(df[col]):
            raise ConfigError(f"{path}: column {col} holds non-numbers (corrupt); {fix}")
    for m in METRICS:
        if f"{m}_rel_err" in df:
            df[f"{m}_abs_err"] = df[f"{m}_rel_err"].abs()
    return df


# ----------------------------------------------------------------------------- printed tables

def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per split and headline metric over the ok points: median, p90 and worst |relative error|,
    the drift-corrected median, the median measured noise and how many predictions lie within
    noise (NaN / 0 for CSVs written before these columns existed)."""
    ok = df[df.status == "ok"]
    rows = []
    nan = pd.Series(dtype=float)
    for split in SPLITS:
        part = ok[ok.split == split]
        for m in HEADLINE:
            e = part[f"{m}_rel_err"].abs().dropna() if f"{m}_rel_err" in part else nan
            c = part[f"{m}_rel_err_corrected"].abs().dropna() if f"{m}_rel_err_corrected" in part else nan
            noise = part[f"{m}_noise"].dropna() if f"{m}_noise" in part else nan
            within = part.loc[e.index, f"{m}_within_noise"].astype(bool) if f"{m}_within_noise" in part else nan
            worst = part.loc[e.idxmax(), "id"] if len(e) else ""
            rows.append({"split": split, "metric": m, "points": len(e),
                         "median": e.median() if len(e) else math.nan,
                         "p90": e.quantile(0.9) if len(e) else math.nan,
                         "worst": e.max() if len(e) else math.nan, "worst_point": worst,
                         "median_corrected": c.median() if len(c) else math.nan,
                         "median_noise": noise.median() if len(noise) else math.nan,
                         "within_noise": int(within.sum()) if len(within) else 0})
    return pd.DataFrame(rows)


def format_summary(df: pd.DataFrame) -> str:
    s = summary(df)
    lines = [f"{'split':<12} {'metric':<17} {'points':>6} {'median':>8} {'p90':>8} {'worst':>8} {'corr.':>8} "
             f"{'noise':>7}  within noise  worst point"]
    pct = lambda v: f"{100 * v:7.1f}%" if np.isfinite(v) else "      -"  # noqa: E731
    for r in s.itertuples():
        lines.append(f"{r.split:<12} {r.metric:<17} {r.points:>6} {pct(r.median)} {pct(r.p90)} {pct(r.worst)} "
                     f"{pct(r.median_corrected)} {pct(r.median_noise)[1:]}  {r.within_noise:>3} of {r.points:<3}     "
                     f"{r.worst_point}")
    lines.append("median |error| raw and drift-corrected (corr.); noise: median relative half-width of the "
                 "measured interval; within noise: predictions inside it (widened by the profile's spread)")
    if "drift_flagged" in df and df.drift_flagged.fillna(False).astype(bool).any():
        lines.append("drift flagged (the machine's speed changed during the point twice): "
                     + ", ".join(df[df.drift_flagged.fillna(False).astype(bool)].id))
    unpredicted = unpredicted_ids(df)
    if unpredicted:
        lines.append(f"measured, not predicted ({len(unpredicted)}, left out above; python -m analysis.validate "
                     f"halves=simulator predicts them): " + ", ".join(unpredicted))
    failed = df[df.status != "ok"]
    for r in failed.itertuples():
        lines.append(f"FAILED {r.id}: {r.status}")
    return "\n".join(lines)


def unpredicted_ids(df: pd.DataFrame) -> list[str]:
    """The ok points without a prediction (halves=runtime, or a run stopped before predicting)."""
    ok = df[df.status == "ok"]
    if "predicted_ttft_s" not in ok:
        return [str(i) for i in ok.id]
    return [str(i) for i in ok[pd.to_numeric(ok.predicted_ttft_s, errors="coerce").isna()].id]


def format_points(df: pd.DataFrame) -> str:
    lines = [f"{'point':<28} {'split':<11} {'TTFT meas/pred ms':>20} {'TPOT meas/pred ms':>19} {'tok/s meas/pred':>17}"]
    for r in df[df.status == "ok"].to_dict("records"):
        # a half may be missing (halves=runtime into a CSV without predictions): blank, not an error
        v = lambda side, m: r.get(f"{side}_{m}", math.nan)  # noqa: E731
        f = lambda m, k=1e3: f"{v('measured', m) * k:8.1f} /{v('predicted', m) * k:8.1f}"  # noqa: E731
        lines.append(f"{r['id']:<28} {r['split']:<11} {f('ttft_s'):>20} {f('tpot_s'):>19} "
                     f"{f('throughput_tok_s', 1):>17}")
    return "\n".join(lines)
