"""The two halves of a validation point: measuring it (runtime.bench / runtime.serve, bracketed by
the machine's speed index, re-measured once on drift) and predicting it (simulator.run, raw and
drift-corrected), each turned into the point's columns of the validation CSV.

A `Job` carries one point through both halves; analysis.validate orders the jobs and writes the
rows. What the columns mean: docs/validation.md.
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from omegaconf import DictConfig

from core.errors import ConfigError

from . import phases as P
from .compose import Point, compose_halves, config_hash, describe, differing_keys
from .steps import step_columns
from .stats import drift_of, drifted, interval, profile_spread, rel_err, within_noise, worst_drift
from .table import HEADLINE, METRICS


def measure(entry: str, cfg: DictConfig) -> dict:
    if entry == "bench":
        from runtime.bench import run
    else:
        from runtime.serve import run
    return run(cfg)


def predict(cfg: DictConfig, compute_scale: float | dict = 1.0) -> dict:
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


def metric(rec: dict | None, m: str) -> float:
    """Metric `m` of a measured or simulated record (NaN where it has none)."""
    if not rec:
        return math.nan
    return decode_tok_s(rec) if m == "decode_tok_s" else rec.get(m, math.nan)


def interleaved(ids: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, id) in measuring order: every point once per round (A B C A B C)."""
    return [(r, i) for r in range(repeats) for i in ids]


# ----------------------------------------------------------------------------- one point's job

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
    probes: list[dict] = field(default_factory=list)     # runtime.profile.speed model_probe around each measurement
    flagged: bool = False
    failed: bool = False
    phases: dict = field(default_factory=dict)   # this point's row of the phases CSV (analysis/phases.py)
    done: bool = False           # resumed from the CSV: nothing left to do

    def phase_row(self) -> dict:
        """The columns that name the point in the phases CSV (the phases are added to them)."""
        return {"id": self.p.id, "split": self.p.split, "policy": self.row.get("policy"),
                "gen_len": self.row.get("gen_len")}


def prepare(p: Point, cfg: DictConfig) -> Job:
    job = Job(p, {"id": p.id, "split": p.split, "status": "ok"})
    try:
        job.run_cfg, job.sim_cfg, job.entry = compose_halves(p, cfg.experiment, cfg.results_dir)
        job.row.update(describe(job.sim_cfg))
        job.row["runtime_entry"] = job.entry
        if job.entry == "bench":     # one timed run per call: validate interleaves its own repeats and brackets each
            job.run_cfg.repeats, job.run_cfg.speed_index = 1, False
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


# ----------------------------------------------------------------------------- measuring

class Speed:
    """The speed index between measurements: the one after a measurement is the one before the next.
    With `probe` (model name, a function that builds the random-init model: probe_model) the model
    probe is taken beside it, for the points of that model (`probes_for`); the model is built for
    each probe and dropped after it, so it never sits in a measurement's peak memory."""

    def __init__(self, device, shape: dict | None, probe: tuple[str, Callable] | None = None):
        from runtime.profile.speed import model_probe, speed_index

        self.fn = lambda: speed_index(device, shape)["index"]
        self.probe_name = probe[0] if probe else None
        self.probe = (lambda: model_probe(probe[1]())) if probe else None
        self.last = self.fn()
        self.probes = [self.probe()] if self.probe else []

    def next(self) -> tuple[float, float]:
        before, self.last = self.last, self.fn()
        if self.probe:
            self.probes.append(self.probe())
        return before, self.last

    def probes_for(self, job: "Job") -> list[dict]:
        """The two model probes around the last measurement, if it ran the probe's model."""
        ok = self.probe and job.sim_cfg is not None and job.sim_cfg.model.name == self.probe_name
        return self.probes[-2:] if ok else []


def probe_model(sim_cfg: DictConfig, profile: str, device):
    """(model name, a function building random weights of the profile's model at the depth its
    whole-model tables were timed at: ~3 s for the shipped model on the 2-core VM) for Speed's
    model probe; None where the profile has no such tables (roofline, an older decode_layer,
    another device type) or the shape is not known here."""
    import torch

    from runtime.loaders import random_init
    from runtime.profile import load as load_profile
    from runtime.profile.grids import model_args

    try:
        prof = load_profile(profile)
        k = prof["models"][sim_cfg.model.name]["kernels"]
        depth = int(k["decode_layer"]["whole_model_layers"])
        if len(k["decode_layer"]["axes"]) != 2 or "prefill_layer" not in k or \
                prof["device"].get("type") != getattr(device, "type", str(device)):
            return None
        a = model_args(sim_cfg.model.name)
    except (ConfigError, KeyError, TypeError, ValueError, OSError):
        return None
    a.n_layers = depth
    dtype = torch.float32 if getattr(device, "type", "cpu") == "cpu" else torch.float16
    return sim_cfg.model.name, lambda: random_init(a, 0, dtype, device)


def drift_scale(row: dict, sim_cfg: DictConfig, profile: str, profile_index: float) -> tuple[float | dict, str]:
    """The drift correction of a point's prediction and where it came from: with model probes
    (`probe_decode_layer_s`, `probe_prefill_layer_s`), each over the profile's own value at the
    point it re-times (decode_layer at batch 1 and its first context; prefill_layer at
    PROBE_PREFILL_TOKENS): {"prefill_layer": prefill ratio, "*": decode ratio}, "model_probe";
    else the profile's speed index over the one measured, "speed_index"; NaN where neither."""
    from runtime.profile.speed import PROBE_PREFILL_TOKENS
    from simulator.costs import Costs

    dec, pre = row.get("probe_decode_layer_s"), row.get("probe_prefill_layer_s")
    if dec is not None and pre is not None and np.isfinite(dec) and np.isfinite(pre) and dec > 0 and pre > 0:
        try:
            c = Costs.load(profile, sim_cfg.model.name, allow_extrapolation=True)
            dl = c.table("decode_layer")
            d0 = float(dl(1, float(dl.axes[1][0])))
            p0 = float(c.table("prefill_layer")(PROBE_PREFILL_TOKENS))
            if d0 > 0 and p0 > 0:
                return {"prefill_layer": pre / p0, "*": dec / d0}, "model_probe"
        except (ConfigError, KeyError, IndexError, TypeError):
            pass
    idx = row.get("speed_index")
    return (profile_index / idx if idx else math.nan), "speed_index"


def measure_job(job: Job, speed: Speed, threshold: float, run: Callable[[str, DictConfig], dict] = measure) -> None:
    """One measurement of a point (`run`: analysis.validate passes its own `measure`), bracketed
    by the speed index; re-measured once on drift."""
    for attempt in range(2):
        t = time.perf_counter()
        meas = run(job.entry, job.run_cfg)
        wall = time.perf_counter() - t
        before, after = speed.next()
        d = drift_of(before, after)
        if not drifted(d, threshold) or attempt == 1:
            break
    job.flagged |= drifted(d, threshold)
    job.drifts.append(d)
    job.indices += [before, after]
    job.probes += speed.probes_for(job)
    job.samples.append({"wall": wall, "path": meas["path"], "phases": meas.get("phases"),
                        **{m: metric(meas, m) for m in METRICS}})


def measured_columns(job: Job, fp: str, repeats: int) -> dict:
    row = {"machine_fingerprint": fp, "host": platform.node(), "repeats": len(job.samples),
           "runtime_wall_s": sum(s["wall"] for s in job.samples), "measured_path": job.samples[-1]["path"],
           "speed_drift": worst_drift(job.drifts), "drift_flagged": job.flagged,
           "speed_index": float(np.median(job.indices)) if job.indices else math.nan}
    for key in ("decode_layer_s", "prefill_layer_s"):        # the model probes around the repeats
        vals = [p[key] for p in job.probes if p.get(key)]
        row[f"probe_{key}"] = float(np.median(vals)) if vals else math.nan
    for m in METRICS:
        med, lo, hi, kind = interval([s[m] for s in job.samples])
        row[f"measured_{m}"] = med
        if m in HEADLINE:
            row[f"measured_{m}_lo"], row[f"measured_{m}_hi"] = lo, hi
            row[f"{m}_noise"] = (hi - lo) / 2 / med if med else math.nan
            row["interval"] = kind
    return row


# what halves=simulator carries over from a measured row besides measured_* and *_noise
MEASURED_KEYS = ("runtime_wall_s", "host", "machine_fingerprint", "repeats", "speed_drift", "drift_flagged",
                 "speed_index", "interval", "measured_path", "probe_decode_layer_s", "probe_prefill_layer_s")


def measured_of(prev: dict) -> dict:
    """The measured half of a CSV row (halves=simulator predicts against it)."""
    return {k: v for k, v in prev.items() if k.startswith("measured_") or k.endswith("_noise") or k in MEASURED_KEYS}


# ----------------------------------------------------------------------------- predicting

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
    scale, out["drift_source"] = drift_scale(row, sim_cfg, profile, out["profile_speed_index"])
    out["compute_scale"] = scale.get("*") if isinstance(scale, dict) else scale          # decode steps, all tables
    out["compute_scale_prefill"] = scale.get("prefill_layer") if isinstance(scale, dict) else scale
    corr = predict(sim_cfg, compute_scale=scale) if np.isfinite(out["compute_scale"]) else None
    out["simulated_corrected_path"] = corr["path"] if corr else ""
    out.update(step_columns(row, sim_cfg, scale))        # serving points: each measured iteration priced
    out["profile_spread"] = spread = profile_spread(sim_cfg, profile)
    for m in METRICS:
        out[f"predicted_{m}"] = metric(pred, m)
        out[f"predicted_{m}_corrected"] = metric(corr, m)
        out[f"{m}_rel_err"] = rel_err(out[f"predicted_{m}"], row.get(f"measured_{m}"))
        out[f"{m}_rel_err_corrected"] = rel_err(out[f"predicted_{m}_corrected"], row.get(f"measured_{m}"))
        if m in HEADLINE:
            out[f"{m}_within_noise"] = within_noise(out[f"predicted_{m}"], row.get(f"measured_{m}_lo"),
                                                    row.get(f"measured_{m}_hi"), spread)
    return out
