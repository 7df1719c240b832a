"""python -m analysis.validate experiment=validate_cpu: predicted vs measured on the same configs.

    python -m analysis.validate experiment=validate_quick        # the README's 5-minute check
    python -m analysis.validate experiment=validate_cpu only=[full_b1_p1k]   # some points
    python -m analysis.validate experiment=validate_cpu halves=simulator     # re-predict only

Each point of an experiment (conf/experiment/validate_*.yaml: id, split, overrides) is composed
twice from the same overrides, as the runtime and as the simulator see it (the shared sections
must come out identical), measured here with interleaved repeats and a speed index around each,
predicted from a profile of this machine (or `hardware.profile`), and joined into
`results/validation/<experiment>.csv` with errors, intervals and drift flags: row by row, merged
under a lock, so runs into one folder keep each other's rows. Without a table of
its own, a run starts from the committed `results/reference/validation/<experiment>.csv` (resume,
halves=simulator) and leaves it as it is. Profiles, noise, drift and splits: docs/validation.md.

This module orders the work and writes the rows; the parts: compose.py (the two configs and the
profile), halves.py (measure, predict), stats.py (intervals, drift), table.py (the CSV and the
printed tables), validate_plots.py and phases.py (figures), distributions.py and dist_plots.py
(per-request distributions of points with arrivals).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from core.errors import ConfigError, cli_errors

from . import distributions as D
from . import phases as P
from .dist_plots import write_outputs as write_distributions
from .steps import format_steps
# the names below are this module's public face (tests, notebooks and analysis.sweep import them here)
from .compose import (CONF, ROOT, SECTIONS, Point, argv_or_help, compose_config,  # noqa: F401
                      compose_halves, config_hash, describe, differing_keys, file_sha256, flatten,
                      points_of, profiles_for, runtime_entry, simulator_profile, speed_shape)
from .halves import (Job, Speed, decode_tok_s, fail, interleaved, measure, measure_job, probe_model,  # noqa: F401
                     measured_columns, measured_of, predict, predicted_columns, prepare)
from .stats import (drift_of, drifted, interval, profile_spread, rel_err, table_spread,  # noqa: F401
                    within_noise, worst_drift)
from .table import (CSV_COLUMNS, HEADLINE, METRICS, SPLITS, TEXT_COLUMNS, csv_path,  # noqa: F401
                    format_points, format_summary, load, merge_rows, read_rows, reference_path, summary,
                    unpredicted_ids, write_csv_atomic)
from .validate_plots import plot_engine_time, plot_errors, plot_fidelity  # noqa: F401

HALVES = ("both", "runtime", "simulator")


@dataclass
class ValidationSpec:
    base: list[str] = field(default_factory=list)     # overrides every point starts from
    points: list[Any] = field(default_factory=list)   # {id, split, overrides, [runtime], [simulator]}
    repeats: int = 1                  # measurements per point, interleaved across points (>= 1)
    drift_threshold: float = 1.2      # speed index after/before beyond [1/t, t]: re-measure once, then flag
    # time two of the profile's whole-model points again around each measurement (a decode step, a
    # prefill: ~6 s on the 2-core VM with building the model) and correct the prediction by them, not by the speed index
    model_probe: bool = True


@dataclass
class ValidateConfig:
    experiment: Optional[str] = None
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    only: Optional[list[str]] = None    # point ids to run (default: all)
    overrides: list[str] = field(default_factory=list)   # appended to every point, both halves
                                        # (e.g. [hardware.profile=PATH] for a GPU measured elsewhere)
    halves: str = "both"                # both | runtime | simulator (the other half from the CSV)
    resume: bool = True                 # keep what this machine already measured with the same config;
                                        # skip a point whose prediction from the same profile is there too
    results_dir: str = "results"
    progress: bool = True
    figure: bool = True


ConfigStore.instance().store(name="base_validate", node=ValidateConfig)


def check(cfg: DictConfig) -> int:
    """The top-level keys a run cannot start without; returns the repeats."""
    if cfg.halves not in HALVES:
        raise ConfigError(f"halves={cfg.halves!r}; use one of {', '.join(HALVES)}")
    repeats = cfg.validation.repeats
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"validation.repeats={repeats!r} must be >= 1 (measurements per point)")
    return repeats


def previous_rows(cfg: DictConfig, path: Path) -> tuple[dict, dict, bool]:
    """{id: row} of the table a run starts from, of its phases table, and whether that is the
    committed reference of the same experiment (read, never written) because the run has no
    table of its own yet."""
    ref = reference_path(cfg)
    src = path if path.exists() or not ref.exists() else ref
    if src == ref:
        print(f"analysis.validate: no {path} yet; starting from the committed {ref} (it stays as it is)",
              file=sys.stderr)
    old = read_rows(src) if src.exists() else {}       # a corrupt one: one line
    if old:
        load(src)                                       # ... refused before any work
    psrc = P.phases_path(src)
    old_ph = {str(r["id"]): r for r in P.load_phases(psrc).to_dict("records")} if psrc.exists() else {}
    return old, old_ph, src == ref and src.exists()


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else str(v)


def measured_here(prev: dict | None, job: Job, fp: str, repeats: int) -> bool:
    """The point's measured half can be trusted: the same config measured ok on this machine with
    as many repeats (what a run stopped mid-repeats leaves has fewer)."""
    return bool(prev) and prev.get("status") == "ok" and _text(prev.get("config_hash")) == job.row["config_hash"] \
        and _text(prev.get("machine_fingerprint")) == fp and prev.get("repeats") == repeats \
        and bool(_text(prev.get("measured_path")))


def predicted_with(prev: dict | None, profile: str) -> bool:
    """The point's prediction is there and came from this profile: the same path and the same
    bytes (a row without profile_sha256, written before it existed, is predicted again: cheap)."""
    return bool(prev) and bool(_text(prev.get("simulated_path"))) and _text(prev.get("profile_path")) == profile \
        and _text(prev.get("profile_sha256")) == file_sha256(profile) != ""


def resumable(prev: dict | None, job: Job, fp: str, repeats: int, profile: str | None = None) -> bool:
    """Both halves done: measured here (measured_here) and, given the profile, predicted from it."""
    return measured_here(prev, job, fp, repeats) and (profile is None or predicted_with(prev, profile))


def profile_of(job: Job) -> str:
    return job.sim_cfg.hardware.profile or str(simulator_profile(job.sim_cfg.hardware))


def drawable(df: pd.DataFrame) -> bool:
    """Some ok point has both halves (halves=runtime leaves none predicted: no figure)."""
    return bool((df.status == "ok").any()) and len(unpredicted_ids(df)) < int((df.status == "ok").sum())


def validate(cfg: DictConfig) -> pd.DataFrame:
    from runtime.engine import resolve_device
    from core.machine import this_fingerprint

    repeats = check(cfg)
    points = points_of(cfg)
    path = csv_path(cfg)
    ppath = P.phases_path(path)
    old, old_ph, from_ref = previous_rows(cfg, path)
    rows, ph_rows = {}, {}
    order = [q.id for q in points_of(OmegaConf.merge(cfg, {"only": None}))]   # the CSV keeps the file's order
    jobs = [prepare(p, cfg) for p in points]
    live = [j for j in jobs if not j.failed]
    # the machine the runtime half runs on (halves=simulator: this box, whatever the points ask)
    device = resolve_device(live[0].run_cfg.hardware.device if live and cfg.halves != "simulator" else "cpu")
    fp = this_fingerprint(device)

    def save(ids):
        """This run's rows merged into the table under its lock; other runs' rows stay."""
        merge_rows(path, {i: rows[i] for i in ids if i in rows}, order, seed=old if from_ref else None)
        ph = {i: ph_rows[i] for i in ids if i in ph_rows}
        if ph:
            merge_rows(ppath, ph, order, seed=old_ph if from_ref else None)

    def measured_phases(pid: str) -> dict:
        return {k: v for k, v in old_ph.get(pid, {}).items() if not k.startswith("predicted_")}

    # resume: the measured half is kept when it is this machine's with the same config (never
    # re-measured for a missing newer column); the point is done when its prediction is there too
    kept: set[str] = set()
    if cfg.resume and cfg.halves in ("both", "runtime"):
        for j in live:
            prev = old.get(j.p.id)
            if measured_here(prev, j, fp, repeats):
                kept.add(j.p.id)
                if cfg.halves == "runtime":
                    j.row, j.done = prev, True
                else:
                    j.row.update(measured_of(prev))
                    j.phases = measured_phases(j.p.id) or j.phase_row()
    if cfg.halves in ("both", "simulator"):
        profiles_for([j for j in live if not j.done], cfg, device, fp)
        for j in live:
            try:
                same = j.p.id in kept and predicted_with(old.get(j.p.id), profile_of(j))
            except Exception:       # no profile to predict from: the predicting step records why
                same = False
            if same:
                j.row, j.done = old[j.p.id], True
                j.phases = old_ph.get(j.p.id, {})
    if cfg.halves in ("both", "runtime"):
        todo = [j for j in live if not j.done and j.p.id not in kept]
        # after a first-use profile: "before" is now
        first = next((j for j in todo if not j.failed), None)
        probe = probe_model(first.sim_cfg, profile_of(first), device) if first and cfg.validation.model_probe else None
        speed = Speed(device, speed_shape(todo[0].sim_cfg), probe) if todo else None
        by_id = {j.p.id: j for j in todo}
        bar = tqdm(total=len(todo) * repeats, desc=f"validate {cfg.experiment}", unit="run", disable=not cfg.progress)
        for r, pid in interleaved(list(by_id), repeats):
            j = by_id[pid]
            if not j.failed:
                bar.set_postfix_str(f"{pid} ({r + 1}/{repeats})")
                try:
                    measure_job(j, speed, cfg.validation.drift_threshold, measure)
                    j.row.update(measured_columns(j, fp, repeats))
                    j.row.update(D.requests_columns(j.row, j.samples))   # per-request CSVs of the repeats
                    j.phases = {**j.phase_row(), **P.measured_phase_columns(j.samples)}
                    ph_rows[pid] = j.phases
                except Exception as e:          # recorded, and the sweep goes on
                    fail(j, e)
                rows[pid] = j.row
                save([pid])
            bar.update(1)
        bar.close()
    else:           # halves=simulator: the measured half comes from the table (measured anywhere:
        for j in live:    # validate_gpu's rows are a GPU box's, so no fingerprint match here)
            prev = old.get(j.p.id)
            if not prev or _text(prev.get("config_hash")) != j.row["config_hash"] or prev.get("status") != "ok":
                fail(j, ConfigError(f"halves=simulator needs a measured row for {j.p.id} with the same config; "
                                    "run halves=both first"))
                continue
            j.row.update(measured_of(prev))
            # the measured phases come over too (none in a CSV written before phases existed)
            j.phases = measured_phases(j.p.id) or j.phase_row()
    if cfg.halves in ("both", "simulator"):
        for j in live:
            if j.failed or j.done:
                continue
            try:
                if not j.phases:
                    j.phases = j.phase_row()
                profile = profile_of(j)
                j.row.update(predicted_columns(j.row, j.sim_cfg, profile, j.phases))
                j.row["profile_sha256"] = file_sha256(profile)
                ph_rows[j.p.id] = j.phases
            except Exception as e:
                fail(j, e)
            rows[j.p.id] = j.row
            save([j.p.id])
    for j in jobs:
        if j.done:
            continue
        rows[j.p.id] = {k: v for k, v in j.row.items() if not k.endswith("_abs_err")}
        rows[j.p.id]["point_wall_s"] = sum(v for k in ("runtime_wall_s", "sim_wall_s")
                                           if isinstance(v := j.row.get(k), (int, float)) and np.isfinite(v))
        rows[j.p.id].update(D.distribution_columns(rows[j.p.id]))   # per-request distributions (arrivals)
    save([j.p.id for j in jobs if not j.done])
    if not path.exists():      # everything resumed from the committed reference: the run's own table
        merge_rows(path, {}, order, seed=old)
    df = load(path)
    if cfg.figure and drawable(df):
        plot_fidelity(df, path.with_suffix(".png"))
        if ppath.exists():
            P.plot_phases(P.load_phases(ppath), ppath.with_suffix(".png"))
    write_distributions(df, path, cfg.figure)      # <experiment>.requests.csv and .cdf.png
    return df


def main(argv: list[str] | None = None) -> None:
    """Hydra-style overrides on the command line (`experiment=validate_cpu only=[a,b]`); the
    halves are composed per point with Hydra's compose API, so no Hydra app wraps this one."""
    argv = argv_or_help(argv, __doc__)
    if argv is None:
        return
    with cli_errors("analysis.validate", resume="run the same command again: resume=true skips the points measured"):
        cfg = compose_config("validate", argv)
        df = validate(cfg)
    path = csv_path(cfg)
    print(format_points(df))
    print()
    print(format_summary(df))
    dist = D.format_distributions(df)
    if dist:
        print("\n" + "\n".join(dist))
    if steps := format_steps(df):
        print("\n" + "\n".join(steps))
    ppath = P.phases_path(path)
    why = P.explain(df, P.load_phases(ppath), HEADLINE) if ppath.exists() else []
    if why:
        print("\npoints off by more than their noise, and the phase that accounts for most of the error "
              "(measured -> predicted per step):")
        print("\n".join(why))
    figures = cfg.figure and drawable(df)
    print(f"\n{path}" + (f"\n{ppath}" if ppath.exists() else "")
          + (f"\n{path.with_suffix('.png')}" if figures else "")
          + (f"\n{ppath.with_suffix('.png')}" if figures and ppath.exists() else "")
          + "".join(f"\n{q}" for q in (D.requests_csv(path), D.cdf_png(path)) if dist and q.exists()))


if __name__ == "__main__":
    main()
