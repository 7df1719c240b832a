"""One validation of a run's configuration, whichever half runs it (docs/configuration.md).

`runtime.bench`, `runtime.serve` and `simulator.run` call `check_config(cfg, runner)` before any
work, and `check_shape(cfg, runner, ..., spec=)` once the model's shape is known (the runtime's
loaded model, the simulator's profile shape): the same code accepts or refuses a configuration
for both halves, so a sweep cannot hold a point the simulator predicts and no runtime can run.
`check_config` builds the policy's declaration and checks it, once; the run carries that object
(to check_shape, the engine, the KV caches) instead of the raw config.

What it checks, each rule written once here or in the policy declaration it belongs to:
- every number in the config is finite (NaN / inf are refused wherever they appear);
- `null` is "unset" and zero is zero: `hardware.link.gbps`, `hardware.kv_budget_bytes`,
  `hardware.host_memory_bytes`, `hardware.threads` are null or > 0 (`0` is an error, not "off");
- the workload (core/workload.py `check`), the hardware, the scheduler, the SLO;
- the policy's knobs (core/policies/<name>.py `check`, with the model's head_dim) and its
  model-dependent checks (`check_model`), except the knobs its declaration lists in
  `simulator_only` (a different form on purpose in the simulator, each with the reason);
- what a runner cannot run: runtime.bench runs static batches only.
Feasibility (memory, simulated work) is core/feasibility.py, called by the same entry points.

What only one half checks, by design: that the device is here (`hardware.device=cuda`; the
simulator predicts hardware that is not), that weight files exist (`model.path`; the simulator
reads shapes from the profile), `policy.draft_model`'s form (the declaration's `simulator_only`),
and the simulator's own knobs (`fidelity`, `allow_extrapolation`, `hardware.profile`), which the
runtime does not read.
"""
from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from core.policies import PolicyConfig, spec_of
from core.values import number
from core.workload import check as check_workload

RUNNERS = ("runtime.bench", "runtime.serve", "simulator.run")
# the emulated link sleeps bytes / gbps (+ latency) per copy: slower than 1 MB/s or a latency over a
# second per copy turns a tiny run into hours (and 1e-300 GB/s overflows the sleep)
MIN_LINK_GBPS = 1e-3
MAX_LINK_LATENCY_US = 1e6
MAX_THREADS = 1024     # hardware.threads: torch's intra-op pool; 10^5 threads end in a crash (libgomp, segfault)


def _walk(node: Any, prefix: str):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def check_finite(cfg) -> None:
    """No NaN or infinity anywhere in a config (a nested dict, DictConfig or dataclass)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    for key, v in _walk(tree, ""):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}={v} is not a finite number; give a finite value")


def _get(node, key, default=None):
    if node is None:
        return default
    return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)


def check_threads(v, key: str) -> int | None:
    """torch's intra-op threads: null (torch's default) or 1..MAX_THREADS (the one rule for
    hardware.threads and the --threads of runtime.evals)."""
    return number(v, key, ge=1, le=MAX_THREADS, integer=True, null="torch's default")


def check_hardware(hw) -> None:
    """null = unset for every optional hardware number; a zero is refused, not read as unset."""
    check_threads(_get(hw, "threads"), "hardware.threads")
    link = _get(hw, "link") or {}
    gbps = number(_get(link, "gbps"), "hardware.link.gbps", gt=0, null="no emulated link")
    if gbps is not None:
        number(gbps, "hardware.link.gbps", ge=MIN_LINK_GBPS, null="no emulated link")
    number(_get(link, "latency_us", 0.0), "hardware.link.latency_us", ge=0, le=MAX_LINK_LATENCY_US)
    number(_get(hw, "kv_budget_bytes"), "hardware.kv_budget_bytes", ge=1, integer=True,
           null="the profile's kv_available_bytes in the simulator, unlimited in runtime.serve")
    number(_get(hw, "host_memory_bytes"), "hardware.host_memory_bytes", ge=1, integer=True, null="unlimited")


def check_scheduler(s) -> None:
    from core.admission import check_scheduler as rules

    number(_get(s, "max_batch"), "scheduler.max_batch", ge=1, integer=True)
    rules(int(_get(s, "max_batch")), _get(s, "order"), _get(s, "batching", "cohorts"))
    number(_get(s, "ctx_bucket", 1), "scheduler.ctx_bucket", ge=1, integer=True)


def check_slo(slo) -> None:
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        number(_get(slo, key), f"slo.{key}", gt=0, null="no limit")


def check_metrics(m) -> tuple[float, ...]:
    """metrics.percentiles: each a number in (0, 100) (the extra percentiles core/results.py adds
    beside p50 / p90 / p99); returns them as floats."""
    ps = _get(m, "percentiles") or []
    for i, p in enumerate(ps):
        number(p, f"metrics.percentiles[{i}]")          # a finite number
        if not 0 < p < 100:
            raise ConfigError(f"metrics.percentiles[{i}]={p} is outside (0, 100); give percentiles strictly "
                              "between 0 and 100, e.g. metrics.percentiles=[99.9]")
    return tuple(float(p) for p in ps)


def check_config(cfg, runner: str) -> PolicyConfig:
    """Everything that can be told from the config alone, for `runner` (one of RUNNERS);
    returns the policy's checked declaration. Call before any work."""
    if runner not in RUNNERS:
        raise ValueError(runner)
    w = cfg.workload
    if runner == "runtime.bench" and w.arrival != "static":
        raise ConfigError(f"workload.arrival={w.arrival}: runtime.bench runs one static batch (workload.batch "
                          "requests at t = 0); replay arrivals with python -m runtime.serve (or simulate them "
                          "with python -m simulator.run), or use workload=default")
    check_workload(w, runner)
    check_hardware(cfg.hardware)
    if runner in ("runtime.serve", "simulator.run"):
        check_scheduler(cfg.scheduler)
        check_slo(_get(cfg, "slo"))
        check_metrics(_get(cfg, "metrics"))
    if runner == "runtime.bench":
        number(_get(cfg, "repeats", 1), "repeats", ge=1, integer=True)
    check_finite(cfg)            # every other number (policy knobs, model args, ...): finite
    return spec_of(cfg.policy, head_dim=head_dim_of(cfg.model))


def head_dim_of(model_cfg) -> int | None:
    """head_dim when the model config gives the shape (model.args), else None (known later)."""
    args = _get(model_cfg, "args") or {}
    if _get(args, "head_dim"):
        return int(args["head_dim"])
    if _get(args, "dim") and _get(args, "n_heads"):
        return int(args["dim"]) // int(args["n_heads"])
    return None


# A result's times and rates that are positive whenever a run served a request (keys starting so,
# every percentile included): NaN, infinity, zero or a negative there is a fault upstream (a
# profile table of zeros, a timer that read nothing), not a number to compare.
POSITIVE_RESULT_KEYS = ("throughput_tok_s", "ttft_s", "wall_s", "prefill_s")
# NaN only where documented: TPOT and the decode rate when no request generated a second token
# (gen_len = 1); otherwise positive too. An idle engine's utilisation (util_*, NaN or 0) and
# analysis.validate's uncorrected prediction are not checked here.
ONE_TOKEN_NAN_KEYS = ("tpot_s", "decode_tok_s")


def _keyed(key: str, names: tuple[str, ...]) -> bool:
    """`key` is one of `names` or one of their suffixed keys (`ttft_s_p99`), not another metric
    that shares the prefix (`ttft_std_s`, which is 0 when every request waits alike)."""
    return key in names or key.startswith(tuple(f"{n}_" for n in names))


class ResultError(ConfigError):
    """A result that cannot be represented: NaN, infinity or <= 0 where a positive time must be."""


def check_result(record: dict) -> None:
    """Refuse (one line, ResultError) a runtime.bench / runtime.serve / simulator.run record with
    a NaN, an infinity, a zero or a negative where a positive time or rate must be
    (POSITIVE_RESULT_KEYS; ONE_TOKEN_NAN_KEYS unless every request generated one token; each
    stage's `phases.<stage>.step_s` when it has steps). core/results.py write_run_record calls
    it before writing: such a record is never written. docs/runtime.md (results schema)."""
    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    one_token = record.get("output_tokens") is not None and record.get("requests") \
        and record["output_tokens"] <= record["requests"]
    bad = []
    # runtime.bench's `<metric>_ci`: [lo, hi] of the median over its repeats, each end checked as
    # the metric is; null with one run (runtime/repeats.py)
    items = [(k, x) for k, v in record.items()
             for x in ((v or []) if k.endswith("_ci") and (v is None or isinstance(v, list)) else [v])]
    for key, v in items:
        if _keyed(key, POSITIVE_RESULT_KEYS) and not positive(v):
            bad.append((key, v))
        elif _keyed(key, ONE_TOKEN_NAN_KEYS) and not positive(v):
            if not (one_token and isinstance(v, float) and math.isnan(v)):
                bad.append((key, v))
    for stage, st in (record.get("phases") or {}).items():
        if isinstance(st, dict) and st.get("steps") and not positive(st.get("step_s")):
            bad.append((f"phases.{stage}.step_s", st.get("step_s")))
    if bad:
        key, v = bad[0]
        more = f" (and {', '.join(k for k, _ in bad[1:4])}{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
        raise ResultError(f"the result has {key}={v!r}{more} where a positive time or rate must be: not a result, "
                          "nothing written (a profile table of zeros, or a timer that read nothing: check "
                          "hardware.profile or re-run)")


def check_shape(cfg, runner: str, *, head_dim: int, max_seq_len: int, n_layers: int,
                spec: PolicyConfig | None = None) -> PolicyConfig:
    """The checks that need the model's shape (the runtime's loaded model, the simulator's
    profile shape): the policy's knobs against head_dim, its model checks (context, layers),
    every request's length against the context. `spec`: the declaration check_config returned
    (None: built and checked here). Returns the checked declaration."""
    if spec is None:
        spec = spec_of(cfg.policy, head_dim=int(head_dim))
    else:
        spec.check_head_dim(int(head_dim))
    spec.check_model(int(max_seq_len), int(n_layers), runner=runner)
    w = cfg.workload
    if w.arrival != "trace" and w.prompt_len + w.gen_len > max_seq_len:
        raise ConfigError(f"workload.prompt_len + workload.gen_len = {w.prompt_len + w.gen_len} exceeds the model's "
                          f"context of {max_seq_len}; lower workload.prompt_len or workload.gen_len")
    return spec
