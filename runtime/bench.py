"""python -m runtime.bench: a static batch through the real runtime under one KV policy.

    python -m runtime.bench                                  # shipped SmolLM2, full KV, batch 4
    python -m runtime.bench experiment=decode_2k             # a named experiment (conf/experiment/)
    python -m runtime.bench model=tiny workload.batch=8 workload.prompt_len=1024
    python -m runtime.bench -m workload.batch=1,2,4          # Hydra multirun sweep

Writes one JSON per run to results/measured/ (core/results.py; every key: docs/runtime.md) and
prints a table. `repeats` (default 3) timed runs follow the warm-up: the record gives the median
tokens/s with an order-statistic interval and the machine's speed index before and after the runs
(runtime/repeats.py; docs/runtime.md "Repeats and spread").
Prompts are random token ids (seeded): timing does not depend on what the tokens say.
phases=true (default) records where each step's time goes (`phases`, runtime/phases.py);
timeline=true also writes the run's Chrome trace beside the result (`<stem>.timeline.json`).
"""
from __future__ import annotations

import importlib

import hydra
import torch
from omegaconf import DictConfig

from core.checks import check_config, check_shape
from core.cli import hydra_entry, run_point
from core.config import register
from core.files import check_room_for
from core.feasibility import check_runtime_memory
from core.policies import load_plugin
from core.provenance import provenance
from core.workload import open_arrivals
from core.results import (key_value_table, latency_kv_rows, memory_stats_rows, phase_rows, result_rows,
                          results_folder, run_record, summarize, write_run_record)

from . import loaders, model as model_lib
from .engine import SamplingParams, generate, resolve_device
from .kv import POLICIES
from .phases import chrome_trace
from .repeats import repeat_summary, spread_rows
from .transfer import make_link

register()


def own_bench(cache_cls):
    """The timed runs of a policy with its own prefill (its cache class's `bench`, "module:function"),
    or None for the engine's generate()."""
    if not cache_cls.bench:
        return None
    module, _, name = cache_cls.bench.partition(":")
    return getattr(importlib.import_module(module), name)


def _speed(cfg: DictConfig, device) -> dict | None:
    """The machine's speed index (runtime/profile/speed.py: its default probes, the shipped model's
    shape, a fraction of a second whatever model runs), taken before and after the timed runs;
    None with speed_index=false (analysis.validate brackets its own calls)."""
    if not cfg.get("speed_index", True):
        return None
    from .profile.speed import speed_index

    return speed_index(device, reps=5)


def make_prompts(w, vocab_size: int, special_ids: set[int]) -> list[list[int]]:
    """Seeded random prompts: their lengths are the static batch's (core/workload.py, the lengths the
    simulator and runtime.serve draw), their token ids from a torch generator seeded `seed`."""
    g = torch.Generator().manual_seed(w.seed)
    lens = [r.prompt_len for r in open_arrivals(w)]
    low = max(special_ids) + 1 if max(special_ids) + 1 < vocab_size else 0
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lens]


def run(cfg: DictConfig) -> dict:
    """Everything but the CLI: returns the result record (also written to results/measured/)."""
    results_folder(cfg.results_dir, "measured")      # before the measurement (and its timeline), not after it
    spec = check_config(cfg, "runtime.bench")       # the same checks as runtime.serve and simulator.run
    device = resolve_device(cfg.hardware.device)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    if cfg.model.source == "hf":   # a local transformers folder, checked before loading; never a download
        from .hf import check_hf_folder

        check_hf_folder(cfg.model.path)
    model = loaders.from_config(cfg.model, device)
    args = model.args
    spec = check_shape(cfg, "runtime.bench", head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                       n_layers=args.n_layers, spec=spec)
    check_runtime_memory(cfg, "runtime.bench", spec, model, device)   # before prompts, caches, links
    check_room_for(cfg)                      # room for what the run writes, before its work
    w = cfg.workload
    params = SamplingParams(max_new_tokens=w.gen_len, temperature=w.temperature, top_p=w.top_p,
                            ignore_eos=w.ignore_eos, seed=w.seed)
    prompts = make_prompts(w, args.vocab_size, {args.bos_id, args.eos_id, args.pad_id})

    timing = {"phases": bool(cfg.get("phases", True)), "timeline": bool(cfg.get("timeline", False))}
    link = make_link(cfg.hardware.link, device)
    try:
        load_plugin(cfg.policy, "kv")
        own = own_bench(POLICIES[cfg.policy.name])
        if own is not None:            # a policy with its own prefill (rag: runtime/bench_rag.py)
            before = _speed(cfg, device)
            runs = own(model, cfg, prompts, params, link, spec=spec)
            after = _speed(cfg, device)
        else:
            if cfg.warmup:
                generate(model, [p[:8] for p in prompts[:2]], SamplingParams(max_new_tokens=2), spec, link=link,
                         **timing)
            before = _speed(cfg, device)
            runs = [generate(model, prompts, params, spec, link=link, progress=cfg.progress, **timing)
                    for _ in range(cfg.repeats)]
            after = _speed(cfg, device)
    finally:
        link.close()

    record = run_record(cfg, {**summarize(runs), **repeat_summary(runs, before, after)},
                        {"model": cfg.model.name, "policy": cfg.policy.name, "experiment": cfg.experiment},
                        {"n_params": model_lib.n_params(model), "weight_bytes": model_lib.weight_bytes(model)},
                        provenance(device))
    stem = f"{cfg.experiment or 'bench'}_{cfg.model.name}_{cfg.policy.name}_b{w.batch}_p{w.prompt_len}_g{w.gen_len}"
    trace = None
    if timing["timeline"]:             # the repeats one after another, on the clock they ran on
        trace = chrome_trace([s for run in runs for s in run.timeline], name=f"runtime.bench {cfg.policy.name}")
    write_run_record(cfg, record, "measured", stem, trace)
    return record


def format_table(r: dict) -> str:
    rows = [
        ("model / policy", f"{r['model']} / {r['policy']}  ({r['provenance']['device']})"),
        ("batch x prompt + gen", f"{r['batch']} x {r['prompt_len']} + {r['gen_len']}"),
        ("throughput", f"{r['throughput_tok_s']:.1f} tok/s (decode {r['decode_tok_s']:.1f} tok/s)"),
        *spread_rows(r),
        *latency_kv_rows(r),
        *memory_stats_rows(r),
        *phase_rows(r),
        *result_rows(r),
    ]
    return key_value_table(rows)


CSV_KEYS = ("throughput_tok_s", "decode_tok_s", "ttft_s", "ttft_s_p99", "tpot_s", "tpot_s_p99", "prefill_s",
            "kv_bytes_device", "kv_bytes_host", "kv_ratio_vs_fp16", "peak_mem_bytes", "path")


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def task(cfg: DictConfig) -> None:
    """One run (or one point of a multirun: recorded in results/measured/sweeps/<sweep>.csv, failed or not)."""
    return run_point("runtime.bench", cfg, run, format_table, kind="measured", keys=CSV_KEYS)


main = hydra_entry("runtime.bench", "bench", task)


if __name__ == "__main__":
    main()
