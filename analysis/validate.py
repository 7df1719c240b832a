"""python -m analysis.validate experiment=validate_cpu: predicted vs measured on the same configs.

    python -m analysis.validate experiment=validate_quick        # the README's 5-minute check
    python -m analysis.validate experiment=validate_cpu only=[full_b1_p1k]   # some points
    python -m analysis.validate experiment=validate_cpu halves=simulator     # re-predict only

Each point of an experiment (conf/experiment/validate_*.yaml: id, split, overrides) is composed
twice from the same overrides, as the runtime and as the simulator see it (the shared sections
must come out identical), measured here with interleaved repeats and a speed index around each,
predicted from a profile of this machine (or `hardware.profile`), and joined into
`results/validation/<experiment>.csv` with errors, intervals and drift flags. Profiles, noise,
drift and splits: the README's "Validate the simulator".
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from scipy import stats
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from core.config import register
from core.errors import ConfigError, cli_errors
from core.results import clean_orphans
from core.policies import spec_of

from analysis import phases as P

register()          # the base_* schemas every group option starts from

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SPLITS = ("calibration", "heldout")
HALVES = ("both", "runtime", "simulator")
SECTIONS = ("model", "policy", "workload", "hardware")        # must agree between the halves
METRICS = ("throughput_tok_s", "ttft_s", "tpot_s", "decode_tok_s", "kv_bytes_device")
HEADLINE = ("throughput_tok_s", "ttft_s", "tpot_s")


@dataclass
class ValidationSpec:
    base: list[str] = field(default_factory=list)     # overrides every point starts from
    points: list[Any] = field(default_factory=list)   # {id, split, overrides, [runtime], [simulator]}
    repeats: int = 1                  # measurements per point, interleaved across points (>= 1)
    drift_threshold: float = 1.2      # speed index after/before beyond [1/t, t]: re-measure once, then flag


@dataclass
class ValidateConfig:
    experiment: Optional[str] = None
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    only: Optional[list[str]] = None    # point ids to run (default: all)
    overrides: list[str] = field(default_factory=list)   # appended to every point, both halves
                                        # (e.g. [hardware.profile=PATH] for a GPU measured elsewhere)
    halves: str = "both"                # both | runtime | simulator (the other half from the CSV)
    resume: bool = True                 # skip points this machine already measured with the same config
    results_dir: str = "results"
    progress: bool = True
    figure: bool = True


ConfigStore.instance().store(name="base_validate", node=ValidateConfig)


# ----------------------------------------------------------------------------- composing a point

@dataclass
class Point:
    id: str
    split: str
    overrides: list[str]
    runtime: list[str]            # overrides for the runtime half only (e.g. repeats)
    simulator: list[str]          # ... the simulator half only (e.g. fidelity)


def points_of(cfg: DictConfig) -> list[Point]:
    spec = cfg.validation
    if not spec.points:
        raise ConfigError("validation.points is empty; pick an experiment that lists points, "
                          "e.g. experiment=validate_quick (conf/experiment/validate_*.yaml)")
    out, seen = [], set()
    for i, p in enumerate(spec.points):
        if "id" not in p or "split" not in p:
            raise ConfigError(f"validation.points[{i}] needs an `id` and a `split` ({' | '.join(SPLITS)})")
        if p.split not in SPLITS:
            raise ConfigError(f"validation.points[{i}] ({p.id}): split={p.split!r}; use one of {', '.join(SPLITS)}")
        if p.id in seen:
            raise ConfigError(f"validation.points: id {p.id!r} is used twice; ids name rows of the CSV")
        seen.add(p.id)
        out.append(Point(str(p.id), str(p.split), [*spec.base, *p.get("overrides", []), *cfg.get("overrides", [])],
                         list(p.get("runtime", [])), list(p.get("simulator", []))))
    if cfg.only:
        unknown = set(cfg.only) - seen
        if unknown:
            raise ConfigError(f"only={sorted(unknown)}: no such point ids in experiment {cfg.experiment}")
        out = [p for p in out if p.id in set(cfg.only)]
    return out


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml with Hydra overrides; a bad override is one ConfigError line with the valid
    choices (core/cli.py, as the Hydra entry points say it: the halves of a point are composed
    in-process, so Hydra's own CLI error handling is not there)."""
    from core.cli import compose_or_explain

    GlobalHydra.instance().clear()
    return compose_or_explain(name, list(overrides), CONF)


def runtime_entry(cfg: DictConfig) -> str:
    """Static batches (and policies runtime.serve cannot batch, e.g. rag) go through runtime.bench,
    open arrivals through runtime.serve."""
    from runtime.kv import POLICIES

    serves = getattr(POLICIES.get(cfg.policy.name), "serves", True)
    return "bench" if cfg.workload.arrival == "static" or not serves else "serve"


def compose_halves(p: Point, experiment: str | None, results_dir: str) -> tuple[DictConfig, DictConfig, str]:
    common = [*p.overrides, f"results_dir={results_dir}"]
    sim_cfg = compose_config("simulate", common + p.simulator)
    entry = runtime_entry(sim_cfg)
    run_cfg = compose_config(entry, common + p.runtime + ["progress=false"])
    for c in (run_cfg, sim_cfg):        # the records name the validation experiment and point
        c.experiment = f"{experiment or 'validate'}-{p.id}"
    return run_cfg, sim_cfg, entry


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def differing_keys(a: DictConfig, b: DictConfig) -> list[str]:
    """Keys of the shared sections whose values differ between the two halves (a key only one
    half has is that half's own business: e.g. the scheduler, which runtime.bench lacks)."""
    fa = flatten({s: OmegaConf.to_container(a[s], resolve=True) for s in SECTIONS if s in a})
    fb = flatten({s: OmegaConf.to_container(b[s], resolve=True) for s in SECTIONS if s in b})
    return sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k])


def config_hash(run_cfg: DictConfig, sim_cfg: DictConfig) -> str:
    both = {"runtime": OmegaConf.to_container(run_cfg, resolve=True), "simulator": OmegaConf.to_container(sim_cfg, resolve=True)}
    for half in both.values():
        for key in ("results_dir", "progress", "experiment", "phases", "timeline"):   # not what is measured
            half.pop(key, None)
        half["hardware"].pop("profile", None)   # where the profile lies (GPU box vs here) is not the config
    return hashlib.sha1(json.dumps(both, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the two halves

def measure(entry: str, cfg: DictConfig) -> dict:
    if entry == "bench":
        from runtime.bench import run
    else:
        from runtime.serve import run
    return run(cfg)


def predict(cfg: DictConfig, compute_scale: float = 1.0) -> dict:
    from simulator.run import simulate

    return simulate(cfg, compute_scale=compute_scale)


def decode_tok_s(rec: dict) -> float:
    """Decode throughput; the simulator's record has none for a static batch, so it is derived
    as the runtime defines it: tokens after the first / time after the first token."""
    if rec.get("decode_tok_s") is not None:
        return float(rec["decode_tok_s"])
    b, g = rec.get("batch"), rec.get("gen_len")
    wall, ttft = rec.get("wall_s"), rec.get("ttft_s")
    if rec.get("requests") == b and None not in (b, g, wall, ttft) and wall > ttft and g > 1:
        return b * (g - 1) / (wall - ttft)
    return math.nan


def describe(cfg: DictConfig) -> dict:
    """The columns that say what a point is (for grouping in the notebook)."""
    p, w, h = cfg.policy, cfg.workload, cfg.hardware
    return {"policy": p.name, "label": spec_of(p, check=False).label(), "model": cfg.model.name, "batch": w.batch, "prompt_len": w.prompt_len,
            "gen_len": w.gen_len, "arrival": w.arrival, "rate": w.rate if w.arrival == "poisson" else math.nan,
            "n_requests": w.n_requests if w.arrival != "static" else w.batch,
            "link_gbps": h.link.gbps if h.link.gbps else math.nan}


def rel_err(pred: float, meas: float) -> float:
    if pred is None or meas is None or not np.isfinite(pred) or not np.isfinite(meas) or meas == 0:
        return math.nan
    return (pred - meas) / meas


# ----------------------------------------------------------------------------- noise

def interval(samples) -> tuple[float, float, float, str]:
    """(median, lo, hi, kind) of one metric's repeats: a 95% percentile bootstrap interval of the
    median (scipy.stats.bootstrap, seeded) with >= 5 finite samples, else the min-max range."""
    x = np.asarray([v for v in samples if v is not None and np.isfinite(v)], dtype=float)
    if not len(x):
        return math.nan, math.nan, math.nan, ""
    med = float(np.median(x))
    if len(x) >= 5 and np.ptp(x) > 0:
        ci = stats.bootstrap((x,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        return med, float(ci.low), float(ci.high), "bootstrap95"
    return med, float(x.min()), float(x.max()), ("bootstrap95" if len(x) >= 5 else "minmax")


def within_noise(pred: float, lo: float, hi: float, spread: float) -> bool:
    """The prediction inside [lo (1 - spread), hi (1 + spread)]."""
    if None in (pred, lo, hi) or not all(np.isfinite(v) for v in (pred, lo, hi)):
        return False
    s = spread if np.isfinite(spread) else 0.0
    return bool(lo * (1 - s) <= pred <= hi * (1 + s))


def table_spread(t: dict) -> float:
    """Median over a table's points of the relative p10-p90 half-spread (p90 - p10) / (2 p50)."""
    p50, p10, p90 = (np.asarray(t[q], dtype=float).ravel() for q in ("p50", "p10", "p90"))
    keep = p50 > 0
    return float(np.median((p90[keep] - p10[keep]) / (2 * p50[keep]))) if keep.any() else math.nan


def profile_spread(sim_cfg: DictConfig, path: str | Path) -> float:
    """Median of table_spread over the profile tables the point's policy twin reads."""
    from runtime.profile import load as load_profile
    from simulator.policies import make_policy

    prof = load_profile(path)
    kernels = prof["models"].get(sim_cfg.model.name, {}).get("kernels", {})
    spreads = []
    for name in make_policy(sim_cfg.policy).tables():
        t = kernels.get(name) or prof["transfers"].get(name)
        if isinstance(t, dict) and "p50" in t:
            spreads.append(table_spread(t))
    spreads = [v for v in spreads if np.isfinite(v)]
    return float(np.median(spreads)) if spreads else math.nan


def drift_of(before: float, after: float) -> float:
    return after / before if before and after else math.nan


def drifted(d: float, threshold: float) -> bool:
    return bool(np.isfinite(d) and max(d, 1 / d) > threshold)


def worst_drift(drifts: list[float]) -> float:
    ok = [d for d in drifts if np.isfinite(d)]
    return max(ok, key=lambda d: abs(math.log(d))) if ok else math.nan


def interleaved(ids: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, id) in measuring order: every point once per round (A B C A B C)."""
    return [(r, i) for r in range(repeats) for i in ids]


# ----------------------------------------------------------------------------- one validation

@dataclass
class Job:
    p: Point
    row: dict
    run_cfg: DictConfig | None = None
    sim_cfg: DictConfig | None = None
    entry: str = ""
    samples: list[dict] = field(default_factory=list)
    drifts: list[float] = field(default_factory=list)
    indices: list[float] = field(default_factory=list)
    flagged: bool = False
    failed: bool = False
    phases: dict = field(default_factory=dict)   # this point's row of the phases CSV (analysis/phases.py)
    done: bool = False           # resumed from the CSV: nothing left to do


def prepare(p: Point, cfg: DictConfig) -> Job:
    job = Job(p, {"id": p.id, "split": p.split, "status": "ok"})
    try:
        job.run_cfg, job.sim_cfg, job.entry = compose_halves(p, cfg.experiment, cfg.results_dir)
        job.row.update(describe(job.sim_cfg))
        job.row["runtime_entry"] = job.entry
        job.row["config_hash"] = config_hash(job.run_cfg, job.sim_cfg)
        diff = differing_keys(job.run_cfg, job.sim_cfg)
        if diff:
            raise ConfigError("the halves' configs differ in " + ", ".join(diff) +
                              "; give these keys in the point's `overrides`, not in `runtime`/`simulator`")
    except Exception as e:
        fail(job, e)
    return job


def fail(job: Job, e: BaseException) -> None:
    job.failed = True
    job.row["status"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


class Speed:
    """The speed index between measurements: the one after a measurement is the one before the next."""

    def __init__(self, device, shape: dict | None):
        from runtime.machine import speed_index

        self.fn = lambda: speed_index(device, shape)["index"]
        self.last = self.fn()

    def next(self) -> tuple[float, float]:
        before, self.last = self.last, self.fn()
        return before, self.last


def measure_job(job: Job, speed: Speed, threshold: float) -> None:
    """One measurement of a point, bracketed by the speed index; re-measured once on drift."""
    for attempt in range(2):
        t = time.perf_counter()
        meas = measure(job.entry, job.run_cfg)
        wall = time.perf_counter() - t
        before, after = speed.next()
        d = drift_of(before, after)
        if not drifted(d, threshold) or attempt == 1:
            break
    job.flagged |= drifted(d, threshold)
    job.drifts.append(d)
    job.indices += [before, after]
    job.samples.append({"wall": wall, "path": meas["path"], "phases": meas.get("phases"),
                        **{m: decode_tok_s(meas) if m == "decode_tok_s" else meas.get(m, math.nan) for m in METRICS}})


def measured_columns(job: Job, fp: str, repeats: int) -> dict:
    row = {"machine_fingerprint": fp, "host": platform.node(), "repeats": len(job.samples),
           "runtime_wall_s": sum(s["wall"] for s in job.samples), "measured_path": job.samples[-1]["path"],
           "speed_drift": worst_drift(job.drifts), "drift_flagged": job.flagged,
           "speed_index": float(np.median(job.indices)) if job.indices else math.nan}
    for m in METRICS:
        med, lo, hi, kind = interval([s[m] for s in job.samples])
        row[f"measured_{m}"] = med
        if m in HEADLINE:
            row[f"measured_{m}_lo"], row[f"measured_{m}_hi"] = lo, hi
            row[f"{m}_noise"] = (hi - lo) / 2 / med if med else math.nan
            row["interval"] = kind
    return row


def predicted_columns(row: dict, sim_cfg: DictConfig, profile: str, phases: dict | None = None) -> dict:
    """Raw and drift-corrected predictions, errors, within-noise flags; the prediction's phase
    columns go into `phases` (the point's row of the phases CSV) when given."""
    from runtime.profile import load as load_profile

    out = {"profile_path": profile}
    prof = load_profile(profile)
    out["profile_fingerprint"] = prof["device"].get("fingerprint")
    out["profile_speed_index"] = (prof.get("speed_index") or {}).get("index", math.nan)
    t = time.perf_counter()
    pred = predict(sim_cfg)
    out["sim_wall_s"] = time.perf_counter() - t
    out["simulated_path"] = pred["path"]
    if phases is not None:
        phases.update(P.predicted_phase_columns(pred))
    scale = out["profile_speed_index"] / row.get("speed_index", math.nan) if row.get("speed_index") else math.nan
    out["compute_scale"] = scale
    corr = predict(sim_cfg, compute_scale=scale) if np.isfinite(scale) else None
    out["profile_spread"] = spread = profile_spread(sim_cfg, profile)
    for m in METRICS:
        get = lambda r: (decode_tok_s(r) if m == "decode_tok_s" else r.get(m, math.nan)) if r else math.nan  # noqa: E731
        out[f"predicted_{m}"] = get(pred)
        out[f"predicted_{m}_corrected"] = get(corr)
        out[f"{m}_rel_err"] = rel_err(out[f"predicted_{m}"], row.get(f"measured_{m}"))
        out[f"{m}_rel_err_corrected"] = rel_err(out[f"predicted_{m}_corrected"], row.get(f"measured_{m}"))
        if m in HEADLINE:
            out[f"{m}_within_noise"] = within_noise(out[f"predicted_{m}"], row.get(f"measured_{m}_lo"),
                                                    row.get(f"measured_{m}_hi"), spread)
    return out


def profiles_for(jobs: list[Job], cfg: DictConfig, device, fp: str) -> None:
    """Set each job's simulator profile: hardware.profile when given (a line when it is another
    machine's while the runtime half runs here), else this machine's, found or measured."""
    from runtime.machine import speed_index
    from runtime.profile import load as load_profile
    from runtime.profile import lookup

    needs: dict[str, lookup.Need] = {}
    warned: set[str] = set()
    for j in jobs:
        if j.failed:
            continue
        hw = j.sim_cfg.hardware
        if hw.get("profile"):
            prof = load_profile(simulator_profile(hw))
            other = prof["device"].get("fingerprint")
            if cfg.halves != "simulator" and other != fp:
                if hw.profile not in warned:
                    theirs = (prof.get("speed_index") or {}).get("index")
                    speed_here = speed_index(device, (prof.get("speed_index") or {}).get("shape"))["index"] if theirs else None
                    ratio = f"{theirs / speed_here:.2f}" if theirs and speed_here else "unknown (no speed index)"
                    print(f"analysis.validate: hardware.profile={hw.profile} is machine {other or 'unfingerprinted'} "
                          f"({prof['device']['name']}); the runtime half runs on this machine {fp}; "
                          f"speed index theirs/here = {ratio}", file=sys.stderr)
                    warned.add(hw.profile)
            continue
        if hw.get("device") not in ("cpu", "auto"):
            continue
        n = lookup.need_of(j.sim_cfg)
        needs[j.sim_cfg.model.name] = needs[j.sim_cfg.model.name].merge(n) if j.sim_cfg.model.name in needs else n
    paths = {m: lookup.ensure(device, m, n, progress=cfg.progress) for m, n in needs.items()}
    for j in jobs:
        if not j.failed and not j.sim_cfg.hardware.get("profile") and j.sim_cfg.model.name in paths:
            j.sim_cfg.hardware.profile = str(paths[j.sim_cfg.model.name])


def simulator_profile(hw) -> Path:
    from simulator.run import profile_path

    return profile_path(hw)


# ----------------------------------------------------------------------------- results

def csv_path(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / "validation" / f"{cfg.experiment or 'validate'}.csv"


def write_csv_atomic(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            df.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    clean_orphans(path.parent)            # a killed earlier write's temp file, once an hour old
    return path


CSV_COLUMNS = ("id", "status")     # what every row of a validation CSV has (the rest may be NaN)
TEXT_COLUMNS = ("id", "config_hash", "machine_fingerprint", "profile_fingerprint", "host")


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
    failed = df[df.status != "ok"]
    for r in failed.itertuples():
        lines.append(f"FAILED {r.id}: {r.status}")
    return "\n".join(lines)


def format_points(df: pd.DataFrame) -> str:
    lines = [f"{'point':<28} {'split':<11} {'TTFT meas/pred ms':>20} {'TPOT meas/pred ms':>19} {'tok/s meas/pred':>17}"]
    for r in df[df.status == "ok"].to_dict("records"):
        # a half may be missing (halves=runtime into a CSV without predictions): blank, not an error
        v = lambda side, m: r.get(f"{side}_{m}", math.nan)  # noqa: E731
        f = lambda m, k=1e3: f"{v('measured', m) * k:8.1f} /{v('predicted', m) * k:8.1f}"  # noqa: E731
        lines.append(f"{r['id']:<28} {r['split']:<11} {f('ttft_s'):>20} {f('tpot_s'):>19} "
                     f"{f('throughput_tok_s', 1):>17}")
    return "\n".join(lines)


def plot_fidelity(df: pd.DataFrame, out: str | Path) -> Path:
    """Predicted vs measured (log-log, y = x and +-10 % bands), one panel per headline metric."""
    plt, sns = _plt()
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    import matplotlib

    ok = df[df.status == "ok"]
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 4.6))
    units = {"throughput_tok_s": ("tok/s", 1), "ttft_s": ("ms", 1e3), "tpot_s": ("ms", 1e3)}
    for ax, m in zip(axes, HEADLINE):
        unit, k = units[m]
        d = ok.assign(measured=ok[f"measured_{m}"] * k, predicted=ok[f"predicted_{m}"] * k).dropna(subset=["measured", "predicted"])
        if len(d):
            if f"measured_{m}_lo" in d:      # the measured interval (repeats) as horizontal error bars
                lo, hi = d[f"measured_{m}_lo"] * k, d[f"measured_{m}_hi"] * k
                ax.errorbar(d.measured, d.predicted, xerr=[(d.measured - lo).clip(lower=0).fillna(0),
                                                           (hi - d.measured).clip(lower=0).fillna(0)],
                            fmt="none", ecolor="grey", elinewidth=1, capsize=2, zorder=0)
            sns.scatterplot(data=d, x="measured", y="predicted", hue="policy", style="split", s=60, ax=ax,
                            legend=(ax is axes[-1]))
            lo, hi = d[["measured", "predicted"]].min().min() * 0.8, d[["measured", "predicted"]].max().max() * 1.25
            xs = np.geomspace(lo, hi, 50)
            ax.plot(xs, xs, color="black", lw=1)
            ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, lw=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):            # plain numbers, no crowded minor labels
                axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(m)
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
    if ax.get_legend():
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("simulator vs runtime (y = x; band: +-10 %; bars: measured interval)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def plot_errors(df: pd.DataFrame, out: str | Path | None = None):
    """Signed relative error per point, by policy (rows: headline metrics; colour: split)."""
    plt, sns = _plt()
    ok = df[df.status == "ok"]
    long = ok.melt(id_vars=["id", "policy", "split"], value_vars=[f"{m}_rel_err" for m in HEADLINE],
                   var_name="metric", value_name="rel_err")
    long["metric"] = long.metric.str.removesuffix("_rel_err")
    long["rel_err_pct"] = 100 * long.rel_err
    g = sns.catplot(data=long, x="policy", y="rel_err_pct", hue="split", col="metric", kind="strip",
                    dodge=True, height=3.6, aspect=1.2, s=55, hue_order=list(SPLITS))
    for ax in g.axes.flat:
        ax.axhline(0, color="black", lw=1)
        ax.axhspan(-10, 10, color="grey", alpha=0.15, lw=0)
        ax.set_ylabel("(predicted - measured) / measured, %")
        ax.tick_params(axis="x", rotation=30)
    if out:
        g.savefig(out, dpi=120, bbox_inches="tight")
    return g


def plot_engine_time(df: pd.DataFrame, out: str | Path | None = None):
    """Wall time of each half per point: what the simulator saves over running the model."""
    plt, sns = _plt()
    ok = df[df.status == "ok"].dropna(subset=["runtime_wall_s", "sim_wall_s"])
    long = ok.melt(id_vars=["id"], value_vars=["runtime_wall_s", "sim_wall_s"], var_name="engine", value_name="seconds")
    long["engine"] = long.engine.map({"runtime_wall_s": "runtime (measured)", "sim_wall_s": "simulator (predicted)"})
    fig, ax = plt.subplots(figsize=(9, 0.28 * max(len(ok), 4) + 1))
    sns.barplot(data=long, y="id", x="seconds", hue="engine", ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds (log)")
    ax.set_ylabel("")
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def validate(cfg: DictConfig) -> pd.DataFrame:
    from runtime.engine import resolve_device
    from runtime.machine import this_fingerprint

    if cfg.halves not in HALVES:
        raise ConfigError(f"halves={cfg.halves!r}; use one of {', '.join(HALVES)}")
    repeats = cfg.validation.repeats
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"validation.repeats={repeats!r} must be >= 1 (measurements per point)")
    points = points_of(cfg)
    path = csv_path(cfg)
    old = {r["id"]: r for r in load(path).to_dict("records")} if path.exists() else {}   # a corrupt one: one line
    rows = dict(old)
    ppath = P.phases_path(path)
    old_ph = {r["id"]: r for r in P.load_phases(ppath).to_dict("records")} if ppath.exists() else {}
    ph_rows = dict(old_ph)
    order = [q.id for q in points_of(OmegaConf.merge(cfg, {"only": None}))]   # the CSV keeps the file's order
    jobs = [prepare(p, cfg) for p in points]
    live = [j for j in jobs if not j.failed]
    # the machine the runtime half runs on (halves=simulator: this box, whatever the points ask)
    device = resolve_device(live[0].run_cfg.hardware.device if live and cfg.halves != "simulator" else "cpu")
    fp = this_fingerprint(device)

    def save():
        df = pd.DataFrame([rows[i] for i in order if i in rows])
        write_csv_atomic(df, path)             # after every measurement: a crash loses little
        ph = [ph_rows[i] for i in order if i in ph_rows]
        if ph:
            write_csv_atomic(pd.DataFrame(ph), ppath)

    # resume: the same config measured on this machine with as many repeats
    for j in live:
        prev = old.get(j.p.id)
        if cfg.resume and cfg.halves == "both" and prev and prev.get("status") == "ok" \
                and prev.get("config_hash") == j.row["config_hash"] and prev.get("machine_fingerprint") == fp \
                and prev.get("repeats") == repeats:
            j.row, j.done = prev, True
            j.phases = old_ph.get(j.p.id, {})
    todo = [j for j in live if not j.done]
    if todo and cfg.halves in ("both", "simulator"):
        profiles_for(todo, cfg, device, fp)
    speed = None
    if todo and cfg.halves in ("both", "runtime"):     # after a first-use profile: "before" is now
        speed = Speed(device, speed_shape(todo[0].sim_cfg))
    if cfg.halves in ("both", "runtime"):
        by_id = {j.p.id: j for j in todo}
        bar = tqdm(total=len(todo) * repeats, desc=f"validate {cfg.experiment}", unit="run", disable=not cfg.progress)
        for r, pid in interleaved(list(by_id), repeats):
            j = by_id[pid]
            if not j.failed:
                bar.set_postfix_str(f"{pid} ({r + 1}/{repeats})")
                try:
                    measure_job(j, speed, cfg.validation.drift_threshold)
                    j.row.update(measured_columns(j, fp, repeats))
                    j.phases = {"id": pid, "split": j.p.split, "policy": j.row.get("policy"),
                                "gen_len": j.row.get("gen_len"), **P.measured_phase_columns(j.samples)}
                    ph_rows[pid] = j.phases
                except Exception as e:          # recorded, and the sweep goes on
                    fail(j, e)
                rows[pid] = j.row
                save()
            bar.update(1)
        bar.close()
    else:
        for j in todo:
            prev = old.get(j.p.id)
            if not prev or prev.get("config_hash") != j.row["config_hash"] or prev.get("status") != "ok":
                fail(j, ConfigError(f"halves=simulator needs a measured row for {j.p.id} with the same config; "
                                    "run halves=both first"))
                continue
            j.row.update({k: v for k, v in prev.items() if k.startswith("measured_") or k.endswith("_noise") or k in (
                "runtime_wall_s", "host", "machine_fingerprint", "repeats", "speed_drift", "drift_flagged",
                "speed_index", "interval", "measured_path")})
            # the measured phases come over too (none in a CSV written before phases existed)
            j.phases = {k: v for k, v in old_ph.get(j.p.id, {}).items() if not k.startswith("predicted_")} \
                or {"id": j.p.id, "split": j.p.split, "policy": j.row.get("policy"), "gen_len": j.row.get("gen_len")}
    if cfg.halves in ("both", "simulator"):
        for j in todo:
            if j.failed:
                continue
            try:
                if not j.phases:
                    j.phases = {"id": j.p.id, "split": j.p.split, "policy": j.row.get("policy"), "gen_len": j.row.get("gen_len")}
                j.row.update(predicted_columns(j.row, j.sim_cfg, j.sim_cfg.hardware.profile or str(simulator_profile(j.sim_cfg.hardware)),
                                               j.phases))
                ph_rows[j.p.id] = j.phases
            except Exception as e:
                fail(j, e)
    for j in jobs:
        rows[j.p.id] = {k: v for k, v in j.row.items() if not k.endswith("_abs_err")}
        if not j.done:
            rows[j.p.id]["point_wall_s"] = sum(v for k in ("runtime_wall_s", "sim_wall_s")
                                               if isinstance(v := j.row.get(k), (int, float)) and np.isfinite(v))
    save()
    df = load(path)
    if cfg.figure and (df.status == "ok").any():
        plot_fidelity(df, path.with_suffix(".png"))
        if ppath.exists():
            P.plot_phases(P.load_phases(ppath), P.phases_path(path).with_suffix(".png"))
    return df


def speed_shape(sim_cfg: DictConfig) -> dict | None:
    """The model shape the speed index probes (the shipped model's when it cannot be told)."""
    try:
        from runtime.profile.measure import model_args

        a = model_args(sim_cfg.model.name)
        return {**vars(a), "head_dim": a.head_dim}
    except ConfigError:
        return None


def main(argv: list[str] | None = None) -> None:
    """Hydra-style overrides on the command line (`experiment=validate_cpu only=[a,b]`); the
    halves are composed per point with Hydra's compose API, so no Hydra app wraps this one."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    with cli_errors("analysis.validate"):
        cfg = compose_config("validate", argv)
        df = validate(cfg)
    path = csv_path(cfg)
    print(format_points(df))
    print()
    print(format_summary(df))
    ppath = P.phases_path(path)
    why = P.explain(df, P.load_phases(ppath), HEADLINE) if ppath.exists() else []
    if why:
        print("\npoints off by more than their noise, and the phase that accounts for most of the error "
              "(measured -> predicted per step):")
        print("\n".join(why))
    print(f"\n{path}" + (f"\n{ppath}" if ppath.exists() else "")
          + (f"\n{path.with_suffix('.png')}" if cfg.figure and (df.status == 'ok').any() else "")
          + (f"\n{ppath.with_suffix('.png')}" if cfg.figure and ppath.exists() and (df.status == 'ok').any() else ""))


if __name__ == "__main__":
    main()
