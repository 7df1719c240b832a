"""python -m simulator.run: simulated serving from a hardware profile -> results/simulated/.

    python -m simulator.run                                        # shipped model, full KV, CPU profile
    python -m simulator.run hardware=h100-sxm model=llama7b_shape policy=specache policy.k=64
    python -m simulator.run workload=poisson workload.rate=4 scheduler.max_batch=32
    python -m simulator.run -m policy=specache policy.k=0,16,64,256  # one CSV per sweep

Same config tree as runtime.bench (conf/, primary conf/simulate.yaml), same results schema
(core/results.py), plus max batch reached, engine utilisation, `completion_rate` and goodput
(only under an `slo`); the per-request records beside the result (`<stem>.requests.csv`,
`requests_path`) and, with `timeseries=true`, the time series (`<stem>.timeseries.csv`).
In a multirun a failing point is a CSV row with its error, not the end of the sweep.

`phases=true` (default): the result's `phases` = {"prefill": ..., "decode": ...}, each
core/phases.py's stage record (mean seconds per step of each phase and layer part, from the
critical-path attribution of simulator/hardware.py); `timeline=true`: a Chrome trace-event JSON
of the run beside the result (`<result stem>.timeline.json`, its path in `timeline_path`): one
event per iteration, the ops of the first iterations per engine, each request's span.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from core.config import register
from core.cli import hydra_entry, run_point
from core.errors import ConfigError
from core.phases import STAGES
from core.provenance import git_revision
from core.results import (key_value_table, latency_kv_rows, results_folder, run_record, serving_metrics,
                          write_run_record)
from core.results import phase_line, timeline_path as timeline_file  # noqa: F401  (simulator.run's names)
from core.results import phase_rows as _phase_rows
from core.results import goodput_row, serving_rows, slo_limits
from core.checks import check_metrics
from core.per_request import request_rows, sidecars

from .costs import Costs, ModelShape
from .policies import ENGINES, make_policy
from .scheduler import TIMELINE_OP_ITERATIONS, Sim
from core.checks import check_config, check_shape
from core.files import check_room_for
from core.feasibility import check_simulation

register()

ROOT = Path(__file__).resolve().parents[1]
# which profile a run reads and which machine it predicts (DEFAULT_PROFILE: the committed CPU profile)
from .which_profile import DEFAULT_PROFILE, fallback_warning, hand_off_profiles, machine_note, profile_source  # noqa: E402,F401
CSV_KEYS = ("throughput_tok_s", "ttft_s", "ttft_s_p99", "tpot_s", "tpot_s_p99", "goodput_req_s",
            "kv_bytes_device", "kv_ratio_vs_fp16", "max_batch_reached", "util_compute", "util_h2d", "util_d2h",
            "completion_rate", "itl_p99_s", "e2e_p99_s")


# a multirun's CSV also says what each point read beyond its profile and which machine it predicts
# (core/sweeps.py sweep_row: a dotted key is a nested field)
SWEEP_KEYS = ("extrapolated", "extrapolated_reads", "provenance.predicts", "provenance.profile")


def profile_path(hw, model: str | None = None) -> Path:
    """hardware.profile; else (hardware=cpu|auto) a profile of this machine found by fingerprint
    (core/profile/lookup.py: the user cache, then profiles/; never measured here), else the
    committed CPU profile, which predicts the machine it was measured on (the summary says so).
    A cached profile of this machine that is corrupt or stale is one line naming it and the
    command that re-measures it, not a prediction from the committed profile."""
    p = hw.get("profile")
    if p is None:
        if hw.get("device") not in ("cpu", "auto"):
            raise ConfigError(f"hardware={hw.name} has no profile; set hardware.profile=PATH or pick one of "
                              "the profiled options (cpu, h100-sxm, h100-pcie, h200, a100, a6000, l40s)")
        from core.profile import lookup

        damaged: list = []
        # at the thread count the point describes (hardware.threads, else this machine's default),
        # not the one a launcher gave this worker; a multirun's parent looked it up once already
        found, _, _ = (lookup.point_profile(hw.get("device"), model, hw.get("threads"), damaged) if model
                       else (None, None, ""))
        if found is None and damaged:       # never another machine's profile in place of this one's
            bad, why = damaged[0]
            raise ConfigError(f"the cached profile of this machine {bad} is corrupt or stale ({why.removeprefix(f'{bad}: ')}); "
                              f"simulator.run does not measure: re-measure it with python -m runtime.profile --quick "
                              f"--model {model} --out {bad} (or python -m analysis.validate), or set hardware.profile=PATH")
        p = found or DEFAULT_PROFILE      # which then predicts another machine: `fallback_warning` says so
    path = Path(p)
    return path if path.is_absolute() or path.exists() else ROOT / path


SHAPE_FIELDS = ("dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len")


def requested_shape(model_cfg, costs: Costs, where: str = "model") -> dict:
    """The shape a model config asks for: model.args over the profile's shape of that model
    (a roofline profile need not have tabulated it: then model.args must give the whole shape)."""
    shape = {**costs.shape, **(model_cfg.get("args") or {})}
    if "args" in model_cfg and model_cfg.args and "dim" in model_cfg.args:
        shape["head_dim"] = shape["dim"] // shape["n_heads"]
    missing = [k for k in SHAPE_FIELDS if k not in shape]
    if missing:
        raise ConfigError(f"{where}={model_cfg.get('name')}: no shape for {', '.join(missing)} (the profile "
                          f"{costs.path.name} has no model of that name); set {where}.args.{missing[0]} or pick a "
                          "shape preset (conf/model/*_shape.yaml)")
    shape.setdefault("head_dim", shape["dim"] // shape["n_heads"])
    return shape
def model_shape(cfg, costs: Costs) -> tuple[ModelShape, int]:
    """Layers: model.full_n_layers, else model.args.n_layers, else the profile's; heads and
    head_dim from model.args over the profile's shape; kv_dtype auto = the profile's.
    Binds the costs to this shape (roofline: formulas for it; measured: refused if it is not
    the shape measured)."""
    shape = requested_shape(cfg.model, costs)
    n_layers = cfg.model.get("full_n_layers") or shape["n_layers"]
    kv = cfg.policy.kv_dtype
    kv = costs.kv_dtype_auto if kv == "auto" else kv
    from .costs import KV_ELEMENT_BYTES
    if kv not in KV_ELEMENT_BYTES:
        raise ConfigError(f"policy.kv_dtype={kv!r} is not known; use one of auto, {', '.join(KV_ELEMENT_BYTES)}")
    costs.bind(shape, int(n_layers), KV_ELEMENT_BYTES[kv])
    return ModelShape(int(n_layers), int(shape["n_kv_heads"]), int(shape["head_dim"]), kv), int(shape["max_seq_len"])


def model_preset(name: str, key: str) -> DictConfig:
    """conf/model/<name>.yaml, for a model named by another config key (policy.draft_model)."""
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
        raise ConfigError(f"{key}={name}: the simulator costs a separate model by its preset shape; name one of "
                          f"conf/model/*.yaml ({', '.join(presets)})")
    return OmegaConf.load(path)


def draft_costs(cfg, costs: Costs, path: Path, kv_elem: int) -> Costs | None:
    """policy.draft_model (RAG, selector=draft): the draft's own costs, from the same profile,
    for its preset shape (its weights share the device with the target's: build_sim gives the
    target's Costs their `extra_weights_bytes`)."""
    pol = cfg.policy
    if pol.get("selector") != "draft" or not pol.get("draft_model"):
        return None
    m = model_preset(str(pol.draft_model), "policy.draft_model")
    # one run, one record of what was read beyond the profile: the draft records into the target's set
    d = Costs.load(path, str(m.name), allow_extrapolation=costs.allow_extrapolation, extrapolated=costs.extrapolated)
    shape = requested_shape(m, d, "policy.draft_model")
    n_layers = int(m.get("full_n_layers") or shape["n_layers"])
    if not 1 <= pol.draft_layers <= n_layers:
        raise ConfigError(f"policy.draft_layers={pol.draft_layers} must be in [1, {n_layers}] "
                          f"(the layers of policy.draft_model={pol.draft_model})")
    return d.bind(shape, n_layers, kv_elem)


def build_sim(cfg: DictConfig, compute_scale: float | dict = 1.0) -> tuple[Sim, Path]:
    """The simulator a config describes, and the profile it reads."""
    check_config(cfg, "simulator.run")         # the same checks as runtime.bench and runtime.serve
    path = profile_path(cfg.hardware, cfg.model.name)
    link = cfg.hardware.get("link") or {}
    emulated = None                                 # null gbps = no link; 0 was refused by check_config
    if link.get("gbps") is not None:
        emulated = (float(link.gbps) * 1e9, float(link.get("latency_us") or 0.0) * 1e-6)
    costs = Costs.load(path, cfg.model.name, allow_extrapolation=bool(cfg.get("allow_extrapolation", False)),
                       link=emulated,
                       compute_scale=dict(compute_scale) if isinstance(compute_scale, dict) else float(compute_scale))
    if emulated is not None and costs.profile["device"].get("type") != "cpu":
        raise ConfigError(f"hardware.link.gbps={link.gbps} emulates a link on a CPU box, but {path} profiles "
                          f"a {costs.profile['device'].get('type')}; drop hardware.link.gbps (its copies are measured)")
    shape, max_seq = model_shape(cfg, costs)
    check_shape(cfg, "simulator.run", head_dim=shape.head_dim, max_seq_len=max_seq, n_layers=shape.n_layers)
    check_simulation(cfg, shape.n_layers)    # requests and simulated work within core/feasibility.py's limits
    check_room_for(cfg)                      # room for what the run writes, before its work
    policy = make_policy(cfg.policy)
    if getattr(policy, "gather", "host") == "device" and not costs.analytic and costs.link_kind == "device":
        costs.need("gather_device")       # a measured GPU profile: refused up front if it lacks the table
    draft = draft_costs(cfg, costs, path, shape.kv_elem)
    if draft is not None:
        policy.draft_costs = draft
        # the target's Costs, complete: the draft's weights take device memory from its KV
        costs = dataclasses.replace(costs, extra_weights_bytes=draft.weights_bytes)
    cap = cfg.hardware.get("kv_budget_bytes")       # null = the profile's; 0 was refused by check_config
    if cap is None:
        cap = int(costs.memory["kv_available_bytes"])
        if cap < 1:
            raise ConfigError(f"{path}: the device has no memory left for KV (kv_available_bytes={cap} after the "
                              "weights); set hardware.kv_budget_bytes or pick larger hardware")
    host = cfg.hardware.get("host_memory_bytes")
    s = cfg.scheduler
    sim = Sim(costs, shape, policy, int(cap), max_batch=s.max_batch, order=s.order, fidelity=cfg.fidelity,
              ctx_bucket=s.ctx_bucket, batching=s.get("batching", "cohorts"), max_seq_len=max_seq, host_capacity=None if host is None else int(host),
              phases=bool(cfg.get("phases", True)), timeline=bool(cfg.get("timeline", False)),
              timeseries=bool(cfg.get("timeseries", False)))
    return sim, path


def simulate(cfg: DictConfig, compute_scale: float | dict = 1.0) -> dict:
    """Everything but the CLI: returns the result record (also written to results/simulated/).
    `compute_scale` multiplies every kernel cost (analysis.validate's drift correction; a mapping:
    per table, "*" the rest: simulator/costs.py)."""
    results_folder(cfg.results_dir, "simulated")
    sim, path = build_sim(cfg, compute_scale)
    policy, costs = sim.policy, sim.costs
    t0 = time.perf_counter()
    reqs = sim.run(cfg.workload, progress=bool(cfg.get("progress", True)))
    wall = time.perf_counter() - t0
    labels = {"model": cfg.model.name, "policy": policy.name, "hardware": cfg.hardware.name,
              "experiment": cfg.experiment}
    extras = {"sim_wall_s": wall, "sim_iterations": sim.iterations,
              # axes (and shape keys) read beyond what the profile measured (allow_extrapolation=true)
              "extrapolated": sorted(costs.extrapolated),
              # and how far: {tag: {"read": farthest value, "limit": measured}} (only when something was)
              **({"extrapolated_reads": costs.extrapolated.record()} if getattr(costs.extrapolated, "far", None) else {})}
    times = sim.token_times(reqs)
    rows = request_rows(reqs, times)          # the per-request CSV beside the result
    record = run_record(cfg, summarize(sim, reqs, cfg, times, rows), labels, extras, {
        "kind": "simulated", "profile": str(path), "profile_sha256": sha256(path),
        "profile_kind": costs.profile["provenance"]["kind"], "device": costs.profile["device"]["name"],
        "fidelity": cfg.fidelity, "git_revision": git_revision(),
        **machine_note(costs, cfg.hardware.get("device", "cpu"), cfg.hardware.get("threads")), "compute_scale": compute_scale,
        "profile_from": profile_source(cfg.hardware, cfg.model.name, path),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if sim.phases:
        record["phases"] = {stage: sim.stages[stage].record() for stage in STAGES}
    stem = f"{cfg.experiment or 'sim'}_{cfg.model.name}_{policy.name}_{cfg.hardware.name}_{cfg.workload.arrival}"
    write_run_record(cfg, record, "simulated", stem, timeline_trace(sim, reqs, record) if sim.timeline else None,
                     sidecars=sidecars(rows, sim.series if sim.timeseries else None))
    if line := fallback_warning(cfg.hardware, record):
        print(line, file=sys.stderr)
    return record


# ops beyond this many events in all are left out too (each is ~250 bytes of indented JSON)
TIMELINE_OP_EVENTS = 200_000
_DEVICE, _REQUESTS = 1, 2           # trace pids: the simulated device (a track per engine), the requests


def timeline_trace(sim: Sim, reqs, record: dict | None = None) -> dict:
    """The run as a Chrome trace-event JSON object (ui.perfetto.dev, chrome://tracing); ts and
    dur are microseconds of simulated time. Device (pid 1): every iteration an X event on the
    `compute` track, and for the first iterations each op an X event on its engine's track
    (compute, h2d, d2h; cat = its phase). Requests (pid 2): each an async span (b/e, cat
    `request`, id = request id) from arrival to done, with instants (n) when admitted and at its
    first token."""
    us = 1e6
    tid = {e: i + 1 for i, e in enumerate(ENGINES)}
    ev: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": _DEVICE, "args": {"name": "simulated device"}},
        {"name": "process_name", "ph": "M", "pid": _REQUESTS, "args": {"name": "requests"}},
        *({"name": "thread_name", "ph": "M", "pid": _DEVICE, "tid": t, "args": {"name": e}} for e, t in tid.items()),
        *({"name": "thread_sort_index", "ph": "M", "pid": _DEVICE, "tid": t, "args": {"sort_index": t}}
          for t in tid.values()),
    ]
    with_ops, n_op = 0, 0
    for n, (stage, t0, dur, batch, ops) in enumerate(sim.steps):
        ts, end = t0 * us, (t0 + dur) * us
        ev.append({"name": stage, "cat": "iteration", "ph": "X", "pid": _DEVICE, "tid": tid["compute"],
                   "ts": ts, "dur": dur * us, "args": {"iteration": n, "batch": batch}})
        if ops is None or n_op + len(ops) > TIMELINE_OP_EVENTS:
            continue
        with_ops += 1
        n_op += len(ops)
        for name, engine, phase, a, b in ops:
            start = ts + a * us
            ev.append({"name": name, "cat": phase, "ph": "X", "pid": _DEVICE, "tid": tid.get(engine, 0),
                       "ts": start, "dur": max(min(ts + b * us, end) - start, 0.0)})
    for r in reqs:
        common = {"cat": "request", "id": r.id, "pid": _REQUESTS, "tid": 0}
        name = f"request {r.id}"
        ev.append({**common, "name": name, "ph": "b", "ts": r.arrival_s * us,
                   "args": {"prompt_len": r.prompt_len, "gen_len": r.gen_len}})
        if r.admitted_s is not None:
            ev.append({**common, "name": "admitted", "ph": "n", "ts": r.admitted_s * us})
        if r.first_token_s is not None:
            ev.append({**common, "name": "first token", "ph": "n", "ts": r.first_token_s * us})
        ev.append({**common, "name": name, "ph": "e", "ts": r.done_s * us})
    its = len(sim.steps)
    meta = {"kind": "simulated", "clock": "simulated seconds (ts, dur in microseconds)", "iterations": its,
            "op_iterations": with_ops,
            "note": (f"every iteration is an event; so are the ops of the first {with_ops} of the {its} iterations "
                     f"(ops are kept for at most {TIMELINE_OP_ITERATIONS} iterations and {TIMELINE_OP_EVENTS} events)")}
    if record is not None:
        meta.update({k: record.get(k) for k in ("model", "policy", "hardware", "experiment")})
        meta["fidelity"] = (record.get("provenance") or {}).get("fidelity")
    return {"traceEvents": ev, "displayTimeUnit": "ms", "metadata": meta}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summarize(sim: Sim, reqs, cfg, times=None, rows=None) -> dict:
    """The record's metrics: core/results.py serving_metrics (`times`: the requests' token times,
    sim.token_times(reqs) when None; `rows`: their per-request rows, if made) plus KV, batch and
    engine utilisation."""
    times = sim.token_times(reqs) if times is None else times
    m = serving_metrics(reqs, cfg.slo, check_metrics(cfg.get("metrics")), times, rows)
    span = m["wall_s"]
    dev, host, tokens = sim.kv_peak
    fp16 = tokens * sim.shape.n_layers * 2 * sim.shape.n_kv_heads * sim.shape.head_dim * 2
    return {
        **m,
        "kv_bytes_device": dev, "kv_bytes_host": host,
        "kv_ratio_vs_fp16": dev / fp16 if fp16 else math.nan,
        "max_batch_reached": sim.max_batch_reached,
        **{f"util_{k}": (v / span if span > 0 else math.nan) for k, v in sim.hw.busy.items()},
    }


def format_table(r: dict) -> str:
    rows = [
        ("model / policy / hardware", f"{r['model']} / {r['policy']} / {r['hardware']} ({r['provenance']['profile_kind']})"),
        ("requests, max batch", f"{r['requests']} ({r['config']['workload']['arrival']}), {r['max_batch_reached']}"),
        ("throughput", f"{r['throughput_tok_s']:.1f} tok/s, {goodput_row(r)}"),
        *latency_kv_rows(r),
        *serving_rows(r),
        ("utilisation compute / h2d / d2h", f"{r['util_compute']:.2f} / {r['util_h2d']:.2f} / {r['util_d2h']:.2f}"),
        *phase_rows(r),
        ("predicts", r["provenance"].get("predicts", "")),
        ("simulated in", f"{r['sim_wall_s']:.2f} s wall ({r['provenance']['fidelity']})"),
        ("result", r["path"]),
        ("requests", r["requests_path"]),
        *([("time series", r["timeseries_path"])] if r.get("timeseries_path") else []),
    ]
    return key_value_table(rows)


def phase_rows(r: dict) -> list[tuple[str, str]]:
    """The closing table's "where a step goes" rows in the predicted style (core/results.py)."""
    return _phase_rows(r, predicted=True)


@hydra.main(config_path="../conf", config_name="simulate", version_base="1.3")
def task(cfg: DictConfig) -> float | None:
    """One run; in a multirun one point, recorded in results/simulated/sweeps/<sweep>.csv (a failing
    point is a row with its error), returning goodput_req_s (completion_rate without an SLO): the
    objective an Optuna sweep maximises."""
    return run_point("simulator.run", cfg, simulate, format_table, kind="simulated", keys=(*CSV_KEYS, *SWEEP_KEYS),
                     objective="goodput_req_s" if slo_limits(cfg.get("slo")) else "completion_rate")


main = hydra_entry("simulator.run", "simulate", task, prepare=hand_off_profiles)


if __name__ == "__main__":
    main()
