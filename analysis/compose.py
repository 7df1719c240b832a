"""Composing a validation point: its two configs (runtime and simulator) from the same overrides,
the check that their shared sections agree, the hash that says "same config" on resume, and the
profile the simulator half reads (hardware.profile, or this machine's, found or measured).

Used by analysis.validate (and analysis.sweep for `compose_config` / `describe`). Why the halves
are composed apart and what a profile is: docs/validation.md, docs/profiles.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from core.config import register
from core.errors import ConfigError
from core.policies import spec_of
from core.workload import DRAW_DEFAULTS

from .table import SPLITS

register()          # the base_* schemas every group option starts from

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SECTIONS = ("model", "policy", "workload", "hardware")        # must agree between the halves


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


def argv_or_help(argv: list[str] | None, doc: str) -> list[str] | None:
    """The command line's Hydra-style overrides (sys.argv when None), or None once `doc` is
    printed for -h / --help."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return None
    return argv


def runtime_entry(cfg: DictConfig) -> str:
    """Static batches (and policies runtime.serve cannot batch, e.g. rag) go through runtime.bench,
    open arrivals through runtime.serve."""
    from runtime.kv import POLICIES

    serves = getattr(POLICIES.get(cfg.policy.name), "serves", True)
    return "bench" if cfg.workload.arrival == "static" or not serves else "serve"


def compose_halves(p: Point, experiment: str | None, results_dir: str) -> tuple[DictConfig, DictConfig, str]:
    """(runtime config, simulator config, runtime entry point) of one point."""
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
        for key in ("results_dir", "progress", "experiment", "phases", "timeline", "speed_index",
                    "metrics", "timeseries"):   # not what is measured
            half.pop(key, None)
        if "slo" in half and half["slo"].get("e2e_s", 0) is None:   # unset: the hash of before it existed
            half["slo"].pop("e2e_s")
        if half.get("scheduler", {}).get("batching") == "cohorts":   # the default: the hash of before it existed
            half["scheduler"].pop("batching")
        half["hardware"].pop("profile", None)   # where the profile lies (GPU box vs here) is not the config
        for key, default in DRAW_DEFAULTS.items():   # the draw keys at the values that draw what they always drew
            if half["workload"].get(key, default) == default:
                half["workload"].pop(key, None)
    return hashlib.sha1(json.dumps(both, sort_keys=True, default=str).encode()).hexdigest()[:12]


def describe(cfg: DictConfig) -> dict:
    """The columns that say what a point is (for grouping in the notebook)."""
    p, w, h = cfg.policy, cfg.workload, cfg.hardware
    return {"policy": p.name, "label": spec_of(p, check=False).label(), "model": cfg.model.name, "batch": w.batch, "prompt_len": w.prompt_len,
            "gen_len": w.gen_len, "arrival": w.arrival, "rate": w.rate if w.arrival in ("poisson", "gamma") else math.nan,
            "n_requests": w.n_requests if w.arrival != "static" else w.batch,
            "link_gbps": h.link.gbps if h.link.gbps else math.nan}


def speed_shape(sim_cfg: DictConfig) -> dict | None:
    """The model shape the speed index probes (the shipped model's when it cannot be told)."""
    try:
        from runtime.profile.grids import model_args

        a = model_args(sim_cfg.model.name)
        return {**vars(a), "head_dim": a.head_dim}
    except ConfigError:
        return None


# ----------------------------------------------------------------------------- the simulator's profile

_SHA: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a profile file's bytes ("" when it cannot be read): resume re-predicts a point
    whose profile changed under the same path."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return ""
    k = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if k not in _SHA:
        _SHA[k] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _SHA[k]


def simulator_profile(hw) -> Path:
    from simulator.run import profile_path

    return profile_path(hw)


def profiles_for(jobs: list, cfg: DictConfig, device, fp: str) -> None:
    """Set each job's simulator profile: hardware.profile when given (a line when it is another
    machine's while the runtime half runs here), else this machine's, found or measured."""
    from core.profile.lookup import Need, need_of
    from runtime.profile import load as load_profile
    from runtime.profile.first_use import ensure
    from runtime.profile.speed import speed_index

    needs: dict[str, Need] = {}
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
        n = need_of(j.sim_cfg)
        needs[j.sim_cfg.model.name] = needs[j.sim_cfg.model.name].merge(n) if j.sim_cfg.model.name in needs else n
    paths = {m: ensure(device, m, n, progress=cfg.progress) for m, n in needs.items()}
    for j in jobs:
        if not j.failed and not j.sim_cfg.hardware.get("profile") and j.sim_cfg.model.name in paths:
            j.sim_cfg.hardware.profile = str(paths[j.sim_cfg.model.name])
