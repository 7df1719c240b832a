"""python -m runtime.serve: the runtime's own continuous batching, replaying a workload's arrivals.

    python -m runtime.serve                                            # static batch: what runtime.bench runs
    python -m runtime.serve workload=poisson workload.rate=2 workload.n_requests=8 \\
        workload.prompt_len=256 workload.gen_len=16
    python -m runtime.serve workload=trace workload.trace=my_trace.csv hardware.kv_budget_bytes=50000000

The real model serves the requests the simulator would (core/workload.py), in real time, under the
simulator's admission rules, and writes the simulator's results schema, so analysis.validate can
check the simulator's arrivals, admission and batching against something real. This module is the
command and its record; the loop is runtime/replay.py, its cohorts runtime/cohorts.py, the
requests runtime/arrivals.py. Why cohorts, their limits and the metrics: docs/runtime.md.

Beside the result: `<stem>.requests.csv` (`requests_path`), one row per request with its token
times' summary, in the columns simulator.run writes (core/per_request.py; the loop records each
token's time). phases=true (default): every prefill iteration (its cohort's prefill, first-token read-back and
SpeCache's speculative pass) and every decode iteration runs under the lap timer
(runtime/phases.py); `phases` holds the mean step of each. timeline=true writes the Chrome trace
beside the result: the iterations with their phases, and each request as an async span.
"""
from __future__ import annotations

import math

import hydra
import torch
from omegaconf import DictConfig

from core.checks import check_config, check_metrics
from core.cli import hydra_entry, run_point
from core.config import register
from core.provenance import provenance
from core.per_request import TokenTimes, request_rows, sidecars
from core.results import (goodput_row, key_value_table, latency_kv_rows, memory_stats_rows, phase_rows, pool_phases,
                          result_rows, results_folder, run_record, serving_metrics, serving_rows, slo_limits,
                          write_run_record)

from . import loaders, model as model_lib
from .arrivals import ServedRequest  # noqa: F401  (imported from here by tests and tools)
from .cohorts import Server  # noqa: F401
from .engine import SamplingParams, generate, resolve_device
from .phases import chrome_trace
from .replay import Outcome, kv_shape, serve  # noqa: F401
from .transfer import make_link

register()


def summarize(o: Outcome, cfg: DictConfig, rows: dict | None = None) -> dict:
    """simulator.run.summarize's keys, from a measured replay, plus the measured extras. `rows`:
    the requests' core/per_request.py request_rows, if already made."""
    reqs = o.requests
    times = TokenTimes.from_lists([r.token_times for r in reqs])     # every token's time, from the loop
    rows = request_rows(reqs, times) if rows is None else rows
    m = serving_metrics(reqs, cfg.slo, check_metrics(cfg.get("metrics")), times, rows)
    span = m["wall_s"]
    dev, host, _, fp16 = o.kv_peak
    return {
        **m,
        "kv_bytes_device": dev, "kv_bytes_host": host,
        "kv_ratio_vs_fp16": dev / fp16 if fp16 else math.nan,
        "max_batch_reached": o.max_batch_reached,
        "util_compute": o.busy_s / span if span > 0 else math.nan,
        "util_h2d": math.nan, "util_d2h": math.nan,
        # measured only
        "decode_tok_s": o.decode_tokens / o.decode_s if o.decode_tokens else math.nan,
        "prefill_s": o.prefill_s,
        "peak_mem_bytes": o.peak_mem_bytes,
        "policy_stats": o.policy_stats,
        "phases": pool_phases([o.phases]),     # the mean prefill / decode iteration (core/phases.py)
        "iterations": o.iterations, "prefill_iterations": o.prefill_iterations, "cohorts": o.cohorts,
        "per_request": [{"id": r.id, "arrival_s": r.arrival_s, "admitted_s": r.admitted_s,
                         "first_token_s": r.first_token_s, "done_s": r.done_s, "prompt_len": r.prompt_len,
                         "gen_len": r.gen_len, "reserved_bytes": r.reserved, "cohort": r.cohort,
                         "ttft_s": r.ttft_s, "tpot_s": r.tpot_s} for r in reqs],
    }


def run(cfg: DictConfig) -> dict:
    """Everything but the CLI: returns the result record (also written to results/measured/)."""
    results_folder(cfg.results_dir, "measured")      # before the measurement (and its timeline), not after it
    spec = check_config(cfg, "runtime.serve")      # checked once: the warm-up and the replay take it
    device = resolve_device(cfg.hardware.device)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    model = loaders.from_config(cfg.model, device)
    args = model.args
    link = make_link(cfg.hardware.link, device)
    try:
        if cfg.warmup:
            g = torch.Generator().manual_seed(0)
            warm = [torch.randint(3, args.vocab_size, (8,), generator=g).tolist() for _ in range(2)]
            generate(model, warm, SamplingParams(max_new_tokens=2), spec, link=link)
        out = serve(model, cfg, link=link, spec=spec)
    finally:
        link.close()

    w = cfg.workload
    labels = {"model": cfg.model.name, "policy": cfg.policy.name, "hardware": cfg.hardware.name,
              "experiment": cfg.experiment, "scheduler": cfg.scheduler.name, "runner": "runtime.serve"}
    rows = request_rows(out.requests, TokenTimes.from_lists([r.token_times for r in out.requests]))
    record = run_record(cfg, summarize(out, cfg, rows), labels,
                        {"n_params": model_lib.n_params(model), "weight_bytes": model_lib.weight_bytes(model)},
                        provenance(device))
    stem = (f"{cfg.experiment or 'serve'}_{cfg.model.name}_{cfg.policy.name}_{w.arrival}_n{record['requests']}_"
            f"p{w.prompt_len}_g{w.gen_len}")
    trace = None
    if cfg.get("timeline", False):     # iterations on the replay's clock; requests as async spans
        trace = chrome_trace(out.timeline, origin=out.t0, requests=record["per_request"],
                             name=f"runtime.serve {cfg.policy.name}")
    write_run_record(cfg, record, "measured", stem, trace, sidecars=sidecars(rows, iterations=out.steps))
    return record


def format_table(r: dict) -> str:
    mib = 2 ** 20
    budget = r["config"]["hardware"].get("kv_budget_bytes")
    rows = [
        ("model / policy", f"{r['model']} / {r['policy']}  ({r['provenance']['device']})"),
        ("requests, max batch", f"{r['requests']} ({r['config']['workload']['arrival']}, "
                                f"{r['config']['scheduler']['order']}), {r['max_batch_reached']} "
                                f"in {r['cohorts']} cohorts"),
        ("KV budget", "unlimited" if budget is None else f"{budget / mib:.1f} MiB"),
        ("throughput", f"{r['throughput_tok_s']:.1f} tok/s (decode {r['decode_tok_s']:.1f} tok/s), "
                       f"{goodput_row(r)}"),
        *latency_kv_rows(r),
        *serving_rows(r),
        *memory_stats_rows(r),
        ("span, busy", f"{r['wall_s']:.2f} s, {r['util_compute']:.0%} in {r['iterations']} iterations"),
        *phase_rows(r),
        *result_rows(r),
        *([("requests", r["requests_path"])] if r.get("requests_path") else []),
    ]
    return key_value_table(rows)


CSV_KEYS = ("throughput_tok_s", "decode_tok_s", "ttft_s", "ttft_s_p99", "tpot_s", "tpot_s_p99", "goodput_req_s",
            "kv_bytes_device", "kv_bytes_host", "kv_ratio_vs_fp16", "max_batch_reached", "peak_mem_bytes", "path",
            "completion_rate", "itl_p99_s", "e2e_p99_s")


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def task(cfg: DictConfig):
    """One run (or one point of a multirun: recorded in results/measured/sweeps/<sweep>.csv, failed or not)."""
    return run_point("runtime.serve", cfg, run, format_table, kind="measured", keys=CSV_KEYS,
                     objective="goodput_req_s" if slo_limits(cfg.get("slo")) else "completion_rate")


main = hydra_entry("runtime.serve", "serve", task)


if __name__ == "__main__":
    main()
