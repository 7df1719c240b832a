"""The one results schema of measured and simulated runs: its metrics, the record, its one writer
(`write_run_record`, atomic, never over another run's file; a failed write keeps the record in the
cache: core/files.py, which also holds the atomic writes) and the closing table's shared rows.

Scalar means `throughput_tok_s`, `ttft_s`, `tpot_s`; percentiles as their own keys
(`ttft_s_p50`, `_p90`, `_p99`, same for `tpot_s`); runtime.serve and simulator.run add the
serving metrics (`serving_metrics`: `<m>_mean_s`, `_std_s`, `_p50_s`, ... of TTFT, TPOT, ITL,
E2E and queueing delay, `completion_rate`, goodput under an SLO; the per-request records are
core/per_request.py); `kv_bytes_device`, `kv_bytes_host`,
`kv_ratio_vs_fp16`; then the resolved config and provenance, so analysis joins measured and
simulated rows on the config.

`phases`: {"prefill": core.phases.stage_record(...), "decode": ...} (where a step's time goes;
{} when phases=false); `timeline_path`: the run's Chrome trace-event JSON beside the result
(`<stem>.timeline.json`, timeline=true only). Every key: docs/runtime.md ("Results schema").
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

# the file-writing half lives in core/files.py; its names stay importable from here
from .files import (ORPHAN_AGE_S, check_writable, clean_orphans, keep_unsaved,  # noqa: F401
                    results_folder, write_atomic, write_json_atomic)
from .phases import PARTS, PHASES, STAGES, UNACCOUNTED, add_totals, empty_totals, stage_record

# ----------------------------------------------------------------------------- metrics

from .per_request import PERCENTILES, METRICS, metric_stats, percentile_key, request_rows  # noqa: F401

SLO_KEYS = ("ttft_s", "tpot_s", "e2e_s")


def stats(name: str, xs: list[float]) -> dict[str, float]:
    """{name: mean, name_p50: ..., name_p90: ..., name_p99: ...}; NaN when there is no sample."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {name: math.nan, **{f"{name}_p{p}": math.nan for p in PERCENTILES}}
    a = np.asarray(xs, dtype=float)
    return {name: float(a.mean()), **{f"{name}_p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def slo_limits(slo) -> dict[str, float]:
    """The SLO limits that are set ({"ttft_s": 1.0, ...}); {} when none is."""
    get = (lambda k: slo.get(k)) if hasattr(slo, "get") else (lambda k: getattr(slo, k, None))
    return {k: float(get(k)) for k in SLO_KEYS if slo is not None and get(k) is not None}


def serving_metrics(reqs, slo, percentiles=(), times=None, rows: dict | None = None) -> dict:
    """The schema's metrics of served requests (anything with arrival_s, admitted_s, done_s,
    gen_len and the ttft_s / tpot_s properties, as core.workload.Request): throughput over the
    span from the first arrival to the last completion; TTFT / TPOT as before (`ttft_s`,
    `ttft_s_p50`, ...); `completion_rate` (requests completed per second of that span); goodput
    (`goodput_req_s`, `goodput_fraction`: requests within every limit of `slo`) only when a limit
    is set; then TTFT, TPOT, ITL, E2E and queueing delay each as `<m>_mean_s`, `_std_s`, `_p50_s`,
    `_p90_s`, `_p99_s` and the extra `percentiles` (core/per_request.py metric_stats). ITL pools
    every gap of every request (`times`, a core.per_request.TokenTimes; None: NaN). `rows`: the
    requests' core.per_request.request_rows, if already made. One definition for the simulator
    and runtime.serve, so the two are compared like for like."""
    span = max(r.done_s for r in reqs) - min(r.arrival_s for r in reqs)
    out_tokens = sum(r.gen_len for r in reqs)
    per_s = (lambda n: n / span) if span > 0 else (lambda n: math.nan)
    out = {
        "throughput_tok_s": per_s(out_tokens),
        **stats("ttft_s", [r.ttft_s for r in reqs]),
        **stats("tpot_s", [r.tpot_s for r in reqs]),
        "wall_s": span, "output_tokens": out_tokens, "requests": len(reqs),
    }
    lim = slo_limits(slo)
    if lim:
        t, p, e = lim.get("ttft_s"), lim.get("tpot_s"), lim.get("e2e_s")
        good = [r for r in reqs if (t is None or r.ttft_s <= t) and (p is None or r.gen_len < 2 or r.tpot_s <= p)
                and (e is None or r.done_s - r.arrival_s <= e)]
        out["goodput_req_s"] = per_s(len(good))
        out["goodput_fraction"] = len(good) / len(reqs)
    out["completion_rate"] = per_s(len(reqs))
    rows = rows if rows is not None else request_rows(reqs)
    for m in METRICS:
        if m == "itl":
            vals, counts = times.pooled() if times is not None else ([], None)
            out.update(metric_stats(m, vals, percentiles, counts))
        else:
            out.update(metric_stats(m, rows[f"{m}_s"], percentiles))
    return out


def completion_rate_of(record: dict) -> float:
    """A record's completion rate (requests/s), old records too: before `completion_rate` was
    written, `goodput_req_s` of a run without an SLO was that rate under another name."""
    if "completion_rate" in record:
        return record["completion_rate"]
    if not slo_limits((record.get("config") or {}).get("slo") or {}) and "goodput_req_s" in record:
        return record["goodput_req_s"]
    return math.nan


def summarize(runs) -> dict:
    """Pool the requests of one or more `engine.BatchResult`s into the schema's metrics."""
    reqs = [r for run in runs for r in run.requests]
    out_tokens = sum(run.output_tokens for run in runs)
    wall = sum(run.wall_s for run in runs)
    dec_tokens = sum(run.decode_tokens for run in runs)
    dec_s = sum(run.decode_s for run in runs)
    last = runs[-1]
    return {
        "throughput_tok_s": out_tokens / wall,
        **stats("ttft_s", [r.ttft_s for r in reqs]),
        **stats("tpot_s", [r.tpot_s for r in reqs]),
        "decode_tok_s": dec_tokens / dec_s if dec_tokens > 0 else math.nan,
        "prefill_s": float(np.mean([run.prefill_s for run in runs])),
        "wall_s": float(np.mean([run.wall_s for run in runs])),
        "output_tokens": out_tokens,
        "requests": len(reqs),
        "kv_bytes_device": last.kv_bytes_device,
        "kv_bytes_host": last.kv_bytes_host,
        "kv_ratio_vs_fp16": last.kv_ratio_vs_fp16,
        "peak_mem_bytes": max(run.peak_mem_bytes for run in runs),
        "policy_stats": last.policy_stats,
        "phases": pool_phases([getattr(run, "phases", None) for run in runs]),
    }


def pool_phases(totals: list[dict | None]) -> dict:
    """Per-stage phase totals of one or more runs ({stage: {"steps", "step_s", "phases", "parts"},
    seconds summed over steps: runtime.phases.PhaseLog.totals()) pooled into the result's `phases`:
    {stage: core.phases.stage_record(...)}, stages in STAGES order; {} when no run was timed."""
    pooled: dict[str, dict] = {}
    for run in totals:
        for stage, t in (run or {}).items():
            add_totals(pooled.setdefault(stage, empty_totals()), t["steps"], t["step_s"], t["phases"], t["parts"])
    return {st: stage_record(pooled[st]["phases"], pooled[st]["step_s"], pooled[st]["steps"], pooled[st]["parts"])
            for st in (*STAGES, *sorted(set(pooled) - set(STAGES))) if st in pooled and pooled[st]["steps"]}


# ----------------------------------------------------------------------------- the record

def run_record(cfg, metrics: dict, labels: dict, extras: dict, provenance: dict) -> dict:
    """A result record in the schema's order: the metrics, what ran (`labels`: model, policy, ...),
    the workload's shape, the runner's own `extras`, the resolved config, then `provenance`."""
    w = cfg.workload
    return {**metrics, **labels, "batch": w.batch, "prompt_len": w.prompt_len, "gen_len": w.gen_len, **extras,
            "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance}


def write_run_record(cfg, record: dict, kind: str, stem: str, trace: dict | None = None,
                     sidecars: dict | None = None) -> Path:
    """The one writer of runtime.bench's, runtime.serve's and simulator.run's records:
    `<results_dir>/<kind>/<stem>_<YYYYmmdd-HHMMSS>_<digest>.json` (digest: `config_digest` of
    record["config"], the resolved config), written by `write_result` (never over another run's
    file; with a Chrome `trace`, its timeline beside it). Sets record["path"]; returns it. A write
    that fails raises a one-line core.errors.WriteError naming where the record was kept instead
    (core/files.py keep_unsaved)."""
    from core.checks import check_result

    check_result(record)          # NaN / zero where a positive time must be: one line, not a result
    name = f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}_{config_digest(record['config'])}.json"
    path = Path(str(cfg.results_dir)) / kind / name
    try:
        return write_result(path, record, trace, sidecars)
    except OSError as e:          # a full disk, a vanished folder: the measurement is kept elsewhere
        raise keep_unsaved(path, record, e, lambda keep: write_result(keep, record, trace, sidecars)) from None


def config_digest(resolved: dict) -> str:
    """8 hex digits naming a resolved config: two runs of one config share it."""
    return hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]


def write_result(path: str | Path, record: dict, trace: dict | None = None, sidecars: dict | None = None) -> Path:
    """Write a result record under a name nobody holds (`write_json_atomic(exclusive=True)`) and,
    with a Chrome `trace`, the timeline beside it (atomically), its path in the record as
    `timeline_path`; `sidecars` {record key: (where(result path) -> path, write(path))}: other
    files beside it the same way (the per-request CSV: core/per_request.py). Sets record["path"]
    afterwards (not in the file); returns it."""
    path = Path(path)
    side = dict(sidecars or {})
    if trace is not None:
        side = {"timeline_path": (timeline_path, lambda p: write_json_atomic(p, trace)), **side}
    for key, (where, _) in side.items():
        record[key] = str(where(path))
    written = write_json_atomic(path, record, exclusive=True)
    if side:
        if written != path:                      # the name was taken (-2, -3, ...): follow it
            for key, (where, _) in side.items():
                record[key] = str(where(written))
            write_json_atomic(written, record)
        for key, (_, write) in side.items():
            write(Path(record[key]))
    record["path"] = str(written)
    return written


def timeline_path(result_path: str | Path) -> Path:
    """Where a result's timeline goes: beside it, `<stem>.timeline.json`."""
    p = Path(result_path)
    return p.with_name(f"{p.stem}.timeline.json")


# ----------------------------------------------------------------------------- the closing table

def latency_kv_rows(r: dict) -> list[tuple[str, str]]:
    """The TTFT / TPOT / KV rows every command's closing table shows, from a result record."""
    mib = 2 ** 20
    return [
        ("TTFT mean / p50 / p99", f"{r['ttft_s'] * 1e3:.1f} / {r['ttft_s_p50'] * 1e3:.1f} / {r['ttft_s_p99'] * 1e3:.1f} ms"),
        ("TPOT mean / p50 / p99", f"{r['tpot_s'] * 1e3:.2f} / {r['tpot_s_p50'] * 1e3:.2f} / {r['tpot_s_p99'] * 1e3:.2f} ms"),
        ("KV device / host", f"{r['kv_bytes_device'] / mib:.1f} / {r['kv_bytes_host'] / mib:.1f} MiB "
                             f"({r['kv_ratio_vs_fp16']:.3f}x of fp16)"),
    ]


def goodput_row(r: dict) -> str:
    """`goodput 1.2 req/s (93% within the SLO)` when the run had an SLO, else `completed 1.3 req/s`."""
    if "goodput_req_s" in r and slo_limits((r.get("config") or {}).get("slo") or {}):
        return f"goodput {r['goodput_req_s']:.3g} req/s ({r['goodput_fraction']:.0%} within the SLO)"
    return f"completed {completion_rate_of(r):.3g} req/s"


def serving_rows(r: dict) -> list[tuple[str, str]]:
    """The closing table's ITL / E2E / queueing rows, and one for the extra percentiles, if any."""
    def ms(x):
        return f"{x * 1e3:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"

    rows = [("ITL mean / p50 / p99", f"{ms(r.get('itl_mean_s'))} / {ms(r.get('itl_p50_s'))} / "
                                     f"{ms(r.get('itl_p99_s'))} ms"),
            ("E2E / queue p50 / p99", f"{ms(r.get('e2e_p50_s'))} / {ms(r.get('e2e_p99_s'))} ms, "
                                      f"queue {ms(r.get('queue_p50_s'))} / {ms(r.get('queue_p99_s'))} ms")]
    fixed = {percentile_key(p) for p in PERCENTILES}
    extra = sorted({k[len("ttft_"):-2] for k in r if k.startswith("ttft_p") and k.endswith("_s")} - fixed,
                   key=lambda k: float(k[1:].replace("_", ".")))
    for k in extra:
        rows.append((f"{k.replace('_', '.')} TTFT / TPOT / ITL / E2E / queue",
                     " / ".join(ms(r.get(f"{m}_{k}_s")) for m in METRICS) + " ms"))
    return rows


def memory_stats_rows(r: dict) -> list[tuple[str, str]]:
    """The peak-memory and policy-stats rows of a measured record (runtime.bench, runtime.serve)."""
    rows = [("peak memory", f"{r['peak_mem_bytes'] / 2 ** 20:.0f} MiB")]
    if r.get("policy_stats"):
        rows.append(("policy stats", ", ".join(f"{k} {v:.3g}" for k, v in r["policy_stats"].items())))
    return rows


def phase_rows(r: dict, predicted: bool = False) -> list[tuple[str, str]]:
    """The closing table's "where a step goes" rows of a result with `phases`, one per stage that ran.

    measured (runtime.bench, runtime.serve): `decode step  85.1 ms x 30: layer 78% (projections 20%,
    attention 20%, mlp 31%, other 7%), lm_head 9%, overhead 2%, unaccounted 0.4%`: every phase that
    occurred in PHASES order, the measured remainder last.
    predicted (simulator.run): `where a step goes  decode step 85.1 ms: ...` (`phase_line`)."""
    rows = []
    for stage, st in (r.get("phases") or {}).items():
        if not st or not st.get("steps"):
            continue
        if predicted:
            rows.append(("where a step goes" if not rows else "", phase_line(stage, st)))
        else:
            items = phase_items(st, by_share=False)
            rows.append((f"{stage} step", f"{st['step_s'] * 1e3:.1f} ms x {st['steps']}: " + ", ".join(items)))
    return rows


def phase_line(stage: str, st: dict, floor: float = 0.005) -> str:
    """A predicted stage record as `decode step 85.1 ms: layer 78% (mlp 31%, attention 20%, ...),
    lm_head 9%, overhead 2%`: phases largest first, the layer's parts (shares of the step) after it,
    shares under `floor` left out."""
    ms = st["step_s"] * 1e3
    size = f"{ms:.1f}" if ms >= 1 else f"{ms:.3g}"
    return f"{stage} step {size} ms: " + ", ".join(phase_items(st, by_share=True, floor=floor))


def phase_items(st: dict, *, by_share: bool, floor: float | None = None) -> list[str]:
    """A stage record's phases as `layer 78% (attention 20%, ...)` items. by_share: largest first
    (unaccounted, 0 by construction in a prediction, among them), else PHASES / PARTS order with the
    measured `unaccounted` last to one decimal; `floor`: phases (by magnitude) and parts below it
    are left out."""
    ph, parts = st.get("phases") or {}, st.get("parts") or {}
    if by_share:
        names = sorted(ph, key=lambda p: -ph[p]["share"])
        part_names = sorted(parts, key=lambda q: -parts[q]["share"])
    else:
        names = [p for p in PHASES if p in ph]
        part_names = [q for q in PARTS if q in parts]
    if floor is not None:
        names = [p for p in names if not abs(ph[p]["share"]) < floor]
        part_names = [q for q in part_names if parts[q]["share"] >= floor]
    items = []
    for p in names:
        text = f"{p} {_pct(ph[p]['share'])}"
        if p == "layer" and part_names:
            text += " (" + ", ".join(f"{q} {_pct(parts[q]['share'])}" for q in part_names) + ")"
        items.append(text)
    if not by_share and UNACCOUNTED in ph:
        items.append(f"{UNACCOUNTED} {_pct(ph[UNACCOUNTED]['share'], 1)}")
    return items


def _pct(x: float, digits: int = 0) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def result_rows(r: dict) -> list[tuple[str, str]]:
    """The closing table's last rows: where the record (and its timeline, if any) went."""
    return [("result", r["path"]), *([("timeline", r["timeline_path"])] if r.get("timeline_path") else [])]


def key_value_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns: the short tables `runtime.bench` and `simulator.run` print last."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
