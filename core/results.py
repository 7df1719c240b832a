"""The one results schema of measured and simulated runs: its metrics, the record, its one writer
(`write_run_record`, atomic, never over another run's file) and the closing table's shared rows.

Scalar means `throughput_tok_s`, `ttft_s`, `tpot_s`; percentiles as their own keys
(`ttft_s_p50`, `_p90`, `_p99`, same for `tpot_s`); `kv_bytes_device`, `kv_bytes_host`,
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
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
from omegaconf import OmegaConf

from .phases import PARTS, PHASES, STAGES, UNACCOUNTED, add_totals, empty_totals, stage_record

# ----------------------------------------------------------------------------- metrics

PERCENTILES = (50, 90, 99)


def stats(name: str, xs: list[float]) -> dict[str, float]:
    """{name: mean, name_p50: ..., name_p90: ..., name_p99: ...}; NaN when there is no sample."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return {name: math.nan, **{f"{name}_p{p}": math.nan for p in PERCENTILES}}
    a = np.asarray(xs, dtype=float)
    return {name: float(a.mean()), **{f"{name}_p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def serving_metrics(reqs, slo) -> dict:
    """The schema's metrics of served requests (anything with arrival_s, done_s, gen_len and the
    ttft_s / tpot_s properties, as core.workload.Request): throughput over the span from the
    first arrival to the last completion, TTFT / TPOT statistics, goodput under `slo`. One
    definition for the simulator and runtime.serve, so the two are compared like for like."""
    span = max(r.done_s for r in reqs) - min(r.arrival_s for r in reqs)
    out_tokens = sum(r.gen_len for r in reqs)
    good = [r for r in reqs if (slo.ttft_s is None or r.ttft_s <= slo.ttft_s)
            and (slo.tpot_s is None or r.gen_len < 2 or r.tpot_s <= slo.tpot_s)]
    per_s = (lambda n: n / span) if span > 0 else (lambda n: math.nan)
    return {
        "throughput_tok_s": per_s(out_tokens),
        **stats("ttft_s", [r.ttft_s for r in reqs]),
        **stats("tpot_s", [r.tpot_s for r in reqs]),
        "wall_s": span, "output_tokens": out_tokens, "requests": len(reqs),
        "goodput_req_s": per_s(len(good)),
        "goodput_fraction": len(good) / len(reqs),
    }


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


def write_run_record(cfg, record: dict, kind: str, stem: str, trace: dict | None = None) -> Path:
    """The one writer of runtime.bench's, runtime.serve's and simulator.run's records:
    `<results_dir>/<kind>/<stem>_<YYYYmmdd-HHMMSS>_<digest>.json` (digest: `config_digest` of
    record["config"], the resolved config), written by `write_result` (never over another run's
    file; with a Chrome `trace`, its timeline beside it). Sets record["path"]; returns it."""
    name = f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}_{config_digest(record['config'])}.json"
    return write_result(Path(str(cfg.results_dir)) / kind / name, record, trace)


def config_digest(resolved: dict) -> str:
    """8 hex digits naming a resolved config: two runs of one config share it."""
    return hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]


def write_result(path: str | Path, record: dict, trace: dict | None = None) -> Path:
    """Write a result record under a name nobody holds (`write_json_atomic(exclusive=True)`) and,
    with a Chrome `trace`, the timeline beside it (atomically), its path in the record as
    `timeline_path`. Sets record["path"] afterwards (not in the file); returns it."""
    path = Path(path)
    if trace is not None:
        record["timeline_path"] = str(timeline_path(path))
    written = write_json_atomic(path, record, exclusive=True)
    if trace is not None:
        if written != path:                      # the name was taken (-2, -3, ...): follow it
            record["timeline_path"] = str(timeline_path(written))
            write_json_atomic(written, record)
        write_json_atomic(record["timeline_path"], trace)
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


# ----------------------------------------------------------------------------- files

def results_folder(results_dir, kind: str) -> Path:
    """`<results_dir>/<kind>`, checked writable before a run (an empty results_dir is refused, not
    read as the current folder)."""
    from core.errors import ConfigError

    if results_dir is None or not str(results_dir).strip():
        raise ConfigError(f"results_dir={results_dir!r} is empty; set results_dir=PATH (default: results)")
    return check_writable(Path(str(results_dir)) / kind)


def check_writable(folder: str | Path, field: str = "results_dir") -> Path:
    """Before a run: `folder` (or, if it does not exist yet, its deepest existing parent, which the
    run will create it in) takes a file, or a one-line ConfigError naming `field`, so a measurement
    is never taken only to be lost when its result cannot be written. Creates nothing."""
    from core.errors import ConfigError

    folder = Path(folder)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        where = "" if existing == folder else f" (on the way to {folder})"
        raise ConfigError(f"{field}: {existing} is a file, not a folder{where}; move it or set "
                          f"{field}=/a/writable/folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{field}: {folder} is not writable ({e.strerror or e} in {existing}); fix its "
                          f"permissions or set {field}=/a/writable/folder") from None
    if existing == folder:
        clean_orphans(folder)
    return folder


ORPHAN_AGE_S = 3600.0     # a temp file this old is from a killed write (a write takes milliseconds)


def clean_orphans(folder: str | Path, max_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove `.<name>.<random>.tmp` files older than `max_age_s` that a killed atomic write left in
    `folder` (readers ignore them anyway: they never end in .json); returns what was removed."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(".") and e.name.endswith(".tmp") and e.is_file(follow_symlinks=False):
            try:
                if now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            except OSError:
                pass            # another process removed or renamed it first
    return removed


def write_json_atomic(path: str | Path, obj, *, exclusive: bool = False) -> Path:
    """`obj` as indented JSON, written by `write_atomic` (exclusive: see there)."""
    def dump(f):
        json.dump(obj, f, indent=2, allow_nan=True, default=str)
        f.write("\n")
    return write_atomic(path, dump, exclusive=exclusive)


def write_atomic(path: str | Path, write: Callable[[TextIO], object], *, exclusive: bool = False) -> Path:
    """Call `write(f)` on a temp file in the same folder, fsync, then rename over `path`:
    a reader never sees half a file and a crash never leaves one (a killed process may leave a
    hidden `.<name>.*.tmp`, which the next write in that folder removes once it is an hour old).

    exclusive=True never replaces an existing file: if `path` exists (the same config in the same
    second, written by another run) the file goes to `<stem>-2<suffix>`, `-3`, ... and that path is
    returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)          # mkstemp makes 0600; results and profiles are for sharing
        if exclusive:
            path = _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    clean_orphans(path.parent)
    return path


def _link_new(tmp: str, path: Path) -> Path:
    """Give the finished temp file a name nobody holds: a hard link fails if the name exists
    (atomic, never clobbers); then the temp name goes."""
    for i in range(1, 10_000):
        cand = path if i == 1 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        try:
            os.link(tmp, cand)
        except FileExistsError:
            continue
        except OSError:                  # a file system without hard links: claim the name, then replace it
            try:
                os.close(os.open(cand, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            os.replace(tmp, cand)
            return cand
        os.unlink(tmp)
        return cand
    raise FileExistsError(f"{path}: 10,000 results of that name already; clear the folder")
