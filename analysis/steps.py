"""A serving replay's steps, priced one by one: the simulator's error per iteration, apart from queueing.

runtime.serve writes every iteration it ran (`<stem>.iterations.csv`, core/per_request.py
ITERATION_COLUMNS: a prefill's prompts, a decode step's cohorts with their rows and contexts).
Here each measured iteration is priced as the simulator's serving loop prices it
(`Sim.step_seconds`, the point's profile; raw, and at the drift-corrected scale), so the two are
compared at the same batch, cohorts and context, whatever the queue did. Columns (pooled over the
repeats): `step_err_<stage>` the median of predicted / measured - 1 over that stage's
iterations, `_p10` / `_p90` its spread, `_corrected` the same against the corrected prediction;
`step_iterations` how many were priced.

Why: a replay's latencies are its steps through the queue. At utilisation rho a step error grows
by about 1 / (1 - rho) in the waiting time, so a replay that is 30% off may hold steps that are
10% off; and steps that are right with latencies that are not point at the scheduling instead.
docs/validation.md ("Steps priced one by one").
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from core.errors import ConfigError
from core.per_request import ITERATION_COLUMNS

from .distributions import PATHS_COLUMN, _stderr, has_arrivals

STAGES = ("prefill", "decode")
STATS = {"": 50, "_p10": 10, "_p90": 90}
VARIANTS = ("", "_corrected")


def columns() -> list[str]:
    """The step columns of a validation row, in CSV order."""
    return ["step_iterations", *(f"step_err_{st}{s}{v}" for v in VARIANTS for st in STAGES for s in STATS)]


def iteration_paths(row: dict) -> list[Path]:
    """The runtime's iteration CSVs of a point, one per repeat: beside each per-request CSV."""
    try:
        reqs = json.loads(row.get(PATHS_COLUMN) or "[]")
    except (TypeError, ValueError):
        return []
    out = []
    for p in reqs:
        p = Path(str(p))
        out.append(p.with_name(p.name.removesuffix(".requests.csv") + ".iterations.csv"))
    return out


def load_iterations(paths: list[Path]) -> pd.DataFrame:
    """The iterations of every repeat, one frame (ITERATION_COLUMNS; empty text cells as "")."""
    parts = [pd.read_csv(p, keep_default_na=False, dtype={"cohorts": str, "prompts": str}) for p in paths]
    df = pd.concat(parts, ignore_index=True)
    missing = [c for c in ITERATION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"no column {missing[0]!r}")
    return df


def priced(df: pd.DataFrame, step_seconds: Callable[..., float]) -> np.ndarray:
    """Each iteration's seconds as `step_seconds` (Sim.step_seconds) prices it."""
    out = np.empty(len(df))
    for i, (stage, cohorts, prompts) in enumerate(zip(df["stage"], df["cohorts"], df["prompts"])):
        if stage == "prefill":
            out[i] = step_seconds("prefill", [int(x) for x in str(prompts).split()])
        else:
            parts = tuple((int(n), int(c)) for n, c in (x.split(":") for x in str(cohorts).split()))
            rows = sum(n for n, _ in parts)
            out[i] = step_seconds("decode", rows, sum(n * c for n, c in parts) / rows, parts)
    return out


def errors(df: pd.DataFrame, predicted: np.ndarray, suffix: str = "") -> dict[str, float]:
    """`step_err_<stage><stat><suffix>` of predicted against the measured `seconds`."""
    out = {}
    measured = df["seconds"].to_numpy(dtype=float)
    for st in STAGES:
        mask = (df["stage"] == st).to_numpy() & (measured > 0)
        rel = predicted[mask] / measured[mask] - 1.0
        for s, q in STATS.items():
            out[f"step_err_{st}{s}{suffix}"] = float(np.percentile(rel, q)) if rel.size else math.nan
    return out


def step_columns(row: dict, sim_cfg: DictConfig, scale, warn: Callable[[str], None] = _stderr) -> dict:
    """The step columns of a point with arrivals whose iterations were written; NaN otherwise (a
    file there that cannot be read: NaN and one `warn` line). `scale`: the drift correction
    (simulator/costs.py compute_scale; NaN: no corrected columns)."""
    from simulator.run import build_sim

    out = dict.fromkeys(columns(), math.nan)
    paths = iteration_paths(row) if has_arrivals(row) else []
    if not paths or not all(p.exists() for p in paths):     # measured before runtime.serve wrote them
        return out
    try:
        df = load_iterations(paths)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        warn(f"analysis.validate: {row.get('id')}: the runtime's iterations cannot be read ({type(e).__name__}: "
            f"{e}); its step columns are left blank")
        return out
    finite = np.all(np.isfinite(list(scale.values()))) if isinstance(scale, dict) else np.isfinite(scale)
    for suffix, s in (("", 1.0), ("_corrected", scale)):
        if suffix and not finite:
            continue
        try:
            sim, _ = build_sim(sim_cfg, s)
            out.update(errors(df, priced(df, sim.step_seconds), suffix))
        except ConfigError as e:      # a measured step the profile cannot price (e.g. past its batch grid)
            warn(f"analysis.validate: {row.get('id')}: a measured iteration cannot be priced ({e}); its step "
                "columns are left blank")
            return dict.fromkeys(columns(), math.nan)
    out["step_iterations"] = len(df)
    return out


def _pct(v) -> str:
    return f"{100 * float(v):+.1f}%" if v is not None and np.isfinite(float(v)) else "-"


def format_steps(df: pd.DataFrame) -> list[str]:
    """One line per point with priced steps: per stage the median error and its p10..p90, raw
    and drift-corrected."""
    lines = []
    if "step_iterations" not in df:
        return lines
    for r in df[df.status == "ok"].to_dict("records"):
        n = r.get("step_iterations")
        if n is None or not np.isfinite(float(n)):
            continue
        parts = []
        for v, label in (("", "raw"), ("_corrected", "corrected")):
            stages = [f"{st} {_pct(r.get(f'step_err_{st}{v}'))} ({_pct(r.get(f'step_err_{st}_p10{v}'))}.."
                      f"{_pct(r.get(f'step_err_{st}_p90{v}'))})" for st in STAGES]
            parts.append(f"{label}: " + ", ".join(stages))
        lines.append(f"{str(r['id']):<28} {int(n)} iterations  " + "  ".join(parts))
    if lines:
        lines.insert(0, "steps priced one by one (each measured iteration at its own prompts / cohorts; "
                        "median error, p10..p90):")
    return lines
