"""Structured configs (dataclasses) behind the Hydra tree in conf/, shared by runtime and simulator;
the policy schemas are the declarations in core/policies/.

Each group option yaml starts from its group's schema (`defaults: [base_<group>]`), so a typo'd
key or a wrong type fails at compose time with Hydra's message naming the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from core.policies import SPECS


@dataclass
class ModelConfig:
    name: str = MISSING             # the option's name, recorded in results
    source: str = "gguf"            # gguf | hf | random
    path: Optional[str] = None      # gguf file / hf folder; null = the shipped SmolLM2 GGUF
    dtype: str = "auto"             # weights: auto (float32 on CPU, float16 on CUDA) | float32 | float16 | bfloat16
    seed: int = 0                   # random init only
    args: dict[str, Any] = field(default_factory=dict)  # ModelArgs fields (random init: the shape)
    full_n_layers: Optional[int] = None  # the real model's depth when args.n_layers is cut for timing


@dataclass
class WorkloadConfig:
    batch: int = 4                  # static: requests that arrive together
    prompt_len: int = 512           # prompt tokens per request (random tokens, seeded); drawn lengths: the longest (draws are clamped to it)
    prompt_len_min: Optional[int] = None  # per-request prompt lengths uniform in [min, prompt_len]; null = all equal; drawn lengths: the shortest
    gen_len: int = 64               # tokens generated per request; drawn lengths: the longest
    seed: int = 0                   # prompt tokens, prompt lengths, arrivals and sampling
    ignore_eos: bool = True         # always generate gen_len tokens (benchmarks)
    temperature: float = 0.0        # sampling; 0 = greedy
    top_p: float = 1.0              # nucleus sampling, in (0, 1]
    # the simulator's arrivals (core/workload.py); runtime.bench runs `static` only
    arrival: str = "static"         # static | poisson | gamma | closed | trace
    rate: float = 1.0               # poisson / gamma: requests per second
    n_requests: int = 100           # poisson / gamma / closed: requests in all
    users: int = 1                  # closed: concurrent users
    think_s: float = 0.0            # closed: pause between a user's requests
    trace: Optional[str] = None     # trace: CSV with columns arrival_s, prompt_len, gen_len (also the rows prompt_dist / gen_dist = trace resample)
    burstiness: float = 1.0         # gamma: shape of the gaps (vLLM's definition), CV 1 / sqrt(burstiness); 1 = Poisson, < 1 burstier
    # request lengths (core/workload.py Lengths), drawn in [*_len_min or 1, *_len]
    prompt_dist: Optional[str] = None   # fixed | uniform | lognormal | trace (rows of `trace`); null = uniform when prompt_len_min is set, else fixed
    prompt_len_mean: Optional[float] = None  # lognormal: mean prompt tokens (before clamping)
    prompt_len_cv: float = 1.0      # lognormal: coefficient of variation (std / mean), 0..100
    gen_dist: Optional[str] = None  # output lengths, as prompt_dist; null = uniform when gen_len_min is set, else fixed (gen_len)
    gen_len_min: Optional[int] = None   # uniform / lognormal / trace: the shortest output
    gen_len_mean: Optional[float] = None  # lognormal: mean output tokens (before clamping)
    gen_len_cv: float = 1.0         # lognormal: coefficient of variation of the output lengths


@dataclass
class LinkConfig:
    """An emulated host<->device link for CPU-only machines (runtime/transfer.py)."""
    gbps: Optional[float] = None    # null = no emulation (a plain memcpy); meant for 0.5-4 GB/s; >= 0.001 (core/checks.py)
    latency_us: float = 0.0         # per copy; <= 1e6 (a second)


@dataclass
class HardwareConfig:
    name: str = "auto"              # the option's name, recorded in results
    device: str = "auto"            # auto | cpu | cuda[:N]
    threads: Optional[int] = None   # torch intra-op threads on CPU, 1..1024; null = torch's default for this machine's cores; simulator: the thread count whose profile of this machine it reads (part of the fingerprint), whatever threads a launcher gives its worker
    link: LinkConfig = field(default_factory=LinkConfig)
    profile: Optional[str] = None   # simulator: the profile JSON; null = this machine's profile found
                                    # by fingerprint, else the committed CPU profile (hardware=cpu|auto)
    kv_budget_bytes: Optional[int] = None   # device bytes for KV: runtime.serve admission and the simulator; null = the profile's kv_available_bytes (simulator) / unlimited (runtime)
    host_memory_bytes: Optional[int] = None  # simulator: host bytes for KV (SpeCache / offload keep 16-bit K/V there), admission respects it; null = unlimited


@dataclass
class SchedulerConfig:
    """Continuous batching in the simulator (simulator/scheduler.py)."""
    name: str = "continuous"        # the option's name, recorded in results
    max_batch: int = 256            # most requests running at once
    order: str = "prefill_first"    # prefill_first (vLLM's default) | decode_first
    ctx_bucket: int = 16            # decode steps are costed at the batch's mean context rounded up to this
    # cohorts: as runtime.serve batches (each prefill's requests a left-padded cohort, attention per
    # cohort, a finished row computed until its cohort is done) | ragged: one attention over all
    # running requests, a finished one leaves at once (a paged-attention server; simulator only)
    batching: str = "cohorts"


@dataclass
class SloConfig:
    ttft_s: Optional[float] = None  # time-to-first-token limit, seconds; goodput counts requests
                                    # within every limit set (null = no limit; no limit at all: no goodput_*)
    tpot_s: Optional[float] = None  # time-per-output-token limit, seconds
    e2e_s: Optional[float] = None   # end-to-end limit (arrival to last token), seconds


@dataclass
class MetricsConfig:
    """Which serving metrics a result carries beyond the fixed ones (core/results.py)."""
    # extra percentiles of TTFT, TPOT, ITL, E2E and queueing delay, each in (0, 100), beside the
    # p50 / p90 / p99 always written: [99.9] adds ttft_p99_9_s, ...
    percentiles: list[float] = field(default_factory=list)


@dataclass
class RunConfig:
    """What every command that runs a configuration shares (the groups analysis.validate
    compares between the halves, the experiment's name, where results go)."""
    model: Any = MISSING
    policy: Any = MISSING
    workload: Any = MISSING
    hardware: Any = MISSING
    experiment: Optional[str] = None   # name recorded in results; set by conf/experiment/*.yaml
    results_dir: str = "results"       # results go under <results_dir>/measured or /simulated
    allow_extrapolation: bool = False  # simulator: read measured tables beyond their shape / grid margin (recorded in `extrapolated`)
    # where a step's time goes (core/phases.py): the runtime's phase timers (perf_counter / CUDA
    # events) and the simulator's critical-path attribution write `phases` into the result
    phases: bool = True
    # a Chrome trace-event JSON of the run (steps, ops per engine, requests) beside the result,
    # its path in the result as `timeline_path`; open it in Perfetto (ui.perfetto.dev)
    timeline: bool = False


@dataclass
class BenchConfig(RunConfig):
    warmup: bool = True                # one short untimed generate first (allocator, kernels, caches)
    # timed runs of the whole batch after the warm-up: tokens/s is their median with an
    # order-statistic interval (`*_ci`, `ci_level`); TTFT / TPOT percentiles pool their requests
    repeats: int = 3
    speed_index: bool = True           # the machine's speed index before and after the timed runs (~0.2 s each)
    progress: bool = True              # a tqdm bar of decode steps


@dataclass
class SimulateConfig(RunConfig):
    scheduler: Any = MISSING
    fidelity: str = "fast"             # fast (cached recurrence) | detailed (a SimPy process per op)
    slo: SloConfig = field(default_factory=SloConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # the run's time series beside the result (`<stem>.timeseries.csv`, `timeseries_path`): batch,
    # queue, KV bytes held and busy at every scheduler event
    timeseries: bool = False
    progress: bool = True              # a tqdm bar of completed requests on runs longer than a second


@dataclass
class ServeConfig(RunConfig):
    """python -m runtime.serve: the runtime's continuous batching over a workload's arrivals."""
    scheduler: Any = MISSING
    warmup: bool = True                # one short untimed generate first (allocator, kernels, caches)
    slo: SloConfig = field(default_factory=SloConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    progress: bool = True              # a tqdm bar of completed requests


def register() -> None:
    # ${kvtestbed.pid:} in hydra.run.dir / hydra.sweep.dir (with microseconds): two runs or sweeps
    # started in the same second get their own folders (and sweep CSVs); cached like ${now:} so a
    # launcher's jobs resolve the value the sweep started with
    if not OmegaConf.has_resolver("kvtestbed.pid"):
        OmegaConf.register_new_resolver("kvtestbed.pid", lambda: str(os.getpid()), use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="base_bench", node=BenchConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    for name, spec in SPECS.items():          # one schema per declared policy (core/policies/)
        cs.store(group="policy", name=f"base_{name}", node=spec)
    cs.store(group="workload", name="base_workload", node=WorkloadConfig)
    cs.store(group="hardware", name="base_hardware", node=HardwareConfig)
    cs.store(name="base_simulate", node=SimulateConfig)
    cs.store(name="base_serve", node=ServeConfig)
    cs.store(group="scheduler", name="base_scheduler", node=SchedulerConfig)
