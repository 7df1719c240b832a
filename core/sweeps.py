"""A Hydra multirun's own files and lines (core/cli.py runs its points): the sweep CSV every point
appends a row to, the summary printed when the sweep ends, the line that says what a prediction
read beyond a profile's grid, and the check that a Ray launcher has a cluster to talk to.

- **The CSV** (`sweep_row`): `job`, `overrides`, then every override of the point as its own
  column (`policy.k`, `workload.rate`: the swept value, not only inside `overrides`), `error`, the
  entry point's keys (simulator.run adds `extrapolated`, `extrapolated_reads`, `predicts`,
  `profile`), and every latency statistic of the record (`<m>_{mean,std,p50,p90,p99}_s` for m in
  ttft, tpot, itl, e2e, queue, and any extra percentile). The columns depend only on the command
  line (an extra percentile on the record too), and every row keeps to the header the sweep's
  first row wrote.
- **The summary** (`SweepSummary`, hydra.callbacks.sweep_summary): the CSV's path, the failed
  count, which machine points predicted when it was not this one, and what was extrapolated.

docs/simulator.md (sweeps, launchers, extrapolation).
"""
from __future__ import annotations

import csv
import os
import re
import socket
import tempfile
from pathlib import Path

from core.files import append_csv_row

STATS = ("mean", "std", "p50", "p90", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2e", "queue")
# every point's CSV row carries these (blank where the record has none: a failed point, a runtime record)
METRIC_COLUMNS = tuple(f"{m}_{s}_s" for m in LATENCIES for s in STATS)
_EXTRA_PERCENTILE = re.compile(rf"^({'|'.join(LATENCIES)})_p\d+(_\d+)?_s$")


# ----------------------------------------------------------------------------- the CSV

def sweep_csv(cfg, kind: str) -> Path:
    """The CSV a multirun's points append to: named after the sweep's folder (unique per sweep)."""
    from hydra.core.hydra_config import HydraConfig

    sweep = Path(HydraConfig.get().sweep.dir)
    return Path(str(cfg.results_dir)) / kind / "sweeps" / f"{sweep.parent.name}_{sweep.name}.csv"


def sweep_csv_of(config, kind: str) -> Path:
    """The same path as `sweep_csv`, from a config that carries its hydra node (a callback's)."""
    sweep = Path(str(config.hydra.sweep.dir))
    return Path(str(config.results_dir)) / kind / "sweeps" / f"{sweep.parent.name}_{sweep.name}.csv"


def override_columns(overrides: list[str]) -> dict[str, str]:
    """{key: value as written} of a point's overrides (`+a.b=1` -> a.b; a deletion has no value)."""
    out = {}
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and not key.startswith("~"):
            out[key.lstrip("+")] = value
    return out


def _cell(v) -> str | float | int:
    if v is None:
        return ""
    if isinstance(v, dict):                      # extrapolated_reads
        return reads_text(v)
    if isinstance(v, (list, tuple, set)):        # extrapolated
        return " ".join(map(str, v))
    return v


def _value(record: dict, key: str):
    """record[key]; a dotted key reads a nested field (provenance.predicts)."""
    v = record
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def sweep_row(path: Path, job: int, overrides: list[str], record: dict | None, error: str | None,
              keys: tuple[str, ...]) -> None:
    """Append one point to a sweep's CSV (core/files.py append_csv_row: locked, a header only on an
    empty file): its overrides one column each, `keys` (a dotted key is a nested field, its column
    the last part), METRIC_COLUMNS and any further percentile the record has."""
    record = record or {}
    row = {"job": job, "overrides": " ".join(overrides)}
    row.update({k: v for k, v in override_columns(overrides).items() if k not in ("job", "overrides", "error")})
    row["error"] = error or ""
    for k in keys:
        row[k.rpartition(".")[2]] = _cell(_value(record, k))
    for k in (*METRIC_COLUMNS, *sorted(k for k in record if _EXTRA_PERCENTILE.match(k) and k not in METRIC_COLUMNS)):
        row[k] = _cell(record.get(k))
    header = _header(path)            # written once, by the sweep's first row: every row keeps to it
    if header:
        row = {h: row.get(h, "") for h in header}
    append_csv_row(path, row)


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="") as f:
            return next(csv.reader(f), [])
    except OSError:
        return []


# ----------------------------------------------------------------------------- what was extrapolated

def reads_text(reads: dict) -> str:
    """`extrapolated_reads` in a CSV cell: `<tag>@<read>/<limit>` space-separated."""
    return " ".join(f"{t}@{r['read']:g}/{r['limit']:g}" for t, r in sorted(reads.items()))


def parse_reads(text) -> dict:
    """`reads_text` back into {tag: {"read", "limit"}} (what is not of that form is left out)."""
    out = {}
    for item in str(text or "").split():
        tag, _, far = item.rpartition("@")
        read, _, limit = far.partition("/")
        if not tag:
            continue
        try:
            out[tag] = {"read": float(read), "limit": float(limit)}
        except ValueError:
            continue
    return out


def merge_reads(many) -> dict:
    """The farthest read of each tag over several points."""
    out: dict = {}
    for reads in many:
        for t, r in reads.items():
            if t not in out or r["read"] > out[t]["read"]:
                out[t] = r
    return out


def stretched_line(reads: dict, tags=(), points: str = "") -> str:
    """One line naming each table and axis (or shape key) a prediction read beyond what was
    measured, and how far; '' when nothing was. `tags`: those read past the margin that needs
    allow_extrapolation=true (the result's `extrapolated`); the other `reads` went past a grid's
    last point within it (linear, allowed by default)."""
    tags = {str(t) for t in tags if t}

    def far(t: str) -> str:
        r = reads.get(t)
        if r is None:
            return t
        if t.startswith("shape:"):
            return f"{t} = {r['read']:g} where the profile measured {r['limit']:g}"
        times = f", {r['read'] / r['limit']:.3g}x" if r["limit"] > 0 else ""
        return f"{t} read at {r['read']:g} (its grid ends at {r['limit']:g}{times})"
    past = [far(t) for t in sorted(tags)]
    near = [far(t) for t in sorted(set(reads) - tags)]
    if not past and not near:
        return ""
    parts = ([f"past the measured margin (allow_extrapolation=true): {'; '.join(past)}"] if past else []) + \
            ([f"past a grid's last point, linearly: {'; '.join(near)}"] if near else [])
    return f"extrapolated{' in ' + points if points else ''}, not measured: " + " | ".join(parts)


def record_stretched_line(record: dict) -> str:
    """`stretched_line` of one result record ('' for one that read nothing beyond its profile)."""
    return stretched_line(record.get("extrapolated_reads") or {}, record.get("extrapolated") or ())


# ----------------------------------------------------------------------------- the summary

try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:                       # pragma: no cover  (hydra-core < 1.1)
    _Callback = object


class SweepSummary(_Callback):
    """hydra.callbacks.sweep_summary (conf/bench.yaml, serve.yaml, simulate.yaml): at the end of a
    multirun, the sweep CSV's path and how many of its points failed; a line when points
    predicted another machine than this one, and one naming what was extrapolated, how far."""

    def __init__(self, kind: str = "simulated"):
        self.kind = kind

    def on_multirun_end(self, config, **kwargs) -> None:
        from core.profile.lookup import HANDOFF_ENV

        os.environ.pop(HANDOFF_ENV, None)        # the parent's profiles were for this sweep only
        path = sweep_csv_of(config, self.kind)
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError:
            print(f"sweep CSV: {path} (not written: no point finished)")
            return
        for line in summary_lines(path, rows):
            print(line)


def summary_lines(path: Path, rows: list[dict]) -> list[str]:
    """The closing lines of a multirun, the CSV's path and failed count last."""
    failed = sum(1 for r in rows if r.get("error"))
    lines = []
    elsewhere: dict[str, list[str]] = {}
    for r in rows:
        p = r.get("predicts") or ""
        if p and p != "this machine":
            elsewhere.setdefault(p, []).append(r.get("job", "?"))
    for p, jobs in elsewhere.items():
        lines.append(f"{len(jobs)} of {len(rows)} points (job {', '.join(jobs)}) predicted {p}, not this machine "
                     "(no profile of this machine: python -m runtime.profile)")
    stretched = [r for r in rows if r.get("extrapolated") or r.get("extrapolated_reads")]
    if stretched:
        reads = merge_reads(parse_reads(r.get("extrapolated_reads")) for r in stretched)
        tags = {t for r in stretched for t in (r.get("extrapolated") or "").split()}
        lines.append(stretched_line(reads, tags, points=f"{len(stretched)} of {len(rows)} points"))
    return [*lines, f"sweep CSV: {path} ({len(rows)} points, {failed} failed)"]


# ----------------------------------------------------------------------------- Ray

def ray_cluster_problem(address) -> str:
    """'' when a Ray cluster answers at the launcher's `ray.init.address` (auto: RAY_ADDRESS, else
    the cluster `ray start --head` last started on this machine), else the one line that says how
    to get one. Only an address of the form host:port (or ray://host:port) is probed."""
    fix = "start one with `ray start --head` (ray stop ends it) or point RAY_ADDRESS at yours (host:port)"
    addr = str(address)
    if addr in ("auto", "None", "null", ""):
        addr = os.environ.get("RAY_ADDRESS", "")
        if not addr:
            try:
                addr = (Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster").read_text().strip()
            except OSError:
                return (f"hydra.launcher.ray.init.address={address}: no running Ray cluster (RAY_ADDRESS is unset and "
                        f"none was started on this machine); {fix}")
    scheme, _, rest = addr.rpartition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("", "ray") or not host or not port.isdigit():
        return ""
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
            return ""
    except OSError as e:
        return (f"hydra.launcher.ray.init.address={address}: no Ray cluster answers at {addr} "
                f"({e.strerror or type(e).__name__}); {fix}")
