"""runtime.serve's continuous-batching loop: replay a workload's arrivals through the real model,
in real time, under the simulator's admission rules (core/admission.py).

`serve(model, cfg)` checks the config and every request against the model's context and the KV
budget, then `_replay` runs iterations until every request is done: a prefill iteration admits a
new cohort, a decode iteration steps every cohort once; each runs under the phase timer
(runtime/phases.py). Nothing is written here (runtime/serve.py writes the record).
Metrics and their definitions: docs/runtime.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from core.admission import Admission, Pool
from core.checks import check_config, check_shape
from core.errors import ConfigError
from core.files import check_room_for
from core.feasibility import check_runtime_memory
from core.policies import ModelShape, load_plugin
from core.workload import Request

from .arrivals import Arrivals, ServedRequest
from .cohorts import Cohort, Server
from .engine import PeakMemory, prepare_cache, sync
from .kv import POLICIES, make_cache, resolve_kv_dtype
from .model import Transformer
from .phases import PhaseLog, make_timer

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Outcome:
    requests: list[ServedRequest]
    iterations: int = 0
    prefill_iterations: int = 0
    prefill_s: float = 0.0               # seconds in prefill iterations (speculate passes included)
    decode_s: float = 0.0                # seconds in decode iterations
    decode_tokens: int = 0               # tokens of unfinished requests the decode steps produced
    busy_s: float = 0.0
    max_batch_reached: int = 0
    cohorts: int = 0
    kv_peak: tuple[int, int, int, int] = (0, 0, 0, 0)   # device, host, tokens, fp16 bytes at the largest holding
    peak_mem_bytes: int = 0
    policy_stats: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict] = field(default_factory=dict)   # runtime.phases.PhaseLog.totals() of the iterations
    timeline: list[dict] = field(default_factory=list)      # timeline=true: each iteration's window and laps
    steps: list[tuple] = field(default_factory=list)         # every iteration, core/per_request.py ITERATION_COLUMNS
    t0: float = 0.0                                          # perf_counter of the replay's clock 0


def kv_shape(model: Transformer, policy, device: torch.device) -> ModelShape:
    """The ModelShape of the model that runs (for the declaration's reserve_bytes)."""
    a = model.args
    return ModelShape(a.n_layers, a.n_kv_heads, a.head_dim, DTYPE_NAMES[resolve_kv_dtype(policy.kv_dtype, device)])


def serve(model: Transformer, cfg: DictConfig, *, link=None, spec=None) -> Outcome:
    """Replay cfg.workload's arrivals through `model` under cfg.scheduler's rules and
    cfg.hardware.kv_budget_bytes; no warmup, nothing written. `spec`: the policy declaration
    check_config already built and checked (None: check cfg here)."""
    w, s = cfg.workload, cfg.scheduler
    if spec is None:                           # the same checks as runtime.bench and simulator.run
        spec = check_config(cfg, "runtime.serve")
    load_plugin(cfg.policy, "kv")
    served = sorted(n for n, c in POLICIES.items() if c.serves)
    if not POLICIES[cfg.policy.name].serves:
        raise ConfigError(f"runtime.serve runs policy={'/'.join(served)}; policy={cfg.policy.name!r} "
                          "is not one (it has its own prefill: python -m runtime.bench)")
    if s.get("batching", "cohorts") != "cohorts":
        raise ConfigError(f"scheduler.batching={s.batching}: runtime.serve batches in cohorts (runtime/cohorts.py); "
                          "ragged batching is the simulator's what-if: drop the override, or run simulator.run")
    a = model.args
    twin = check_shape(cfg, "runtime.serve", head_dim=a.head_dim, max_seq_len=a.max_seq_len, n_layers=a.n_layers,
                       spec=spec)
    budget = cfg.hardware.get("kv_budget_bytes")       # null = unlimited (checked: never 0)
    capacity = math.inf if budget is None else int(budget)
    host = cfg.hardware.get("host_memory_bytes")       # host KV (offload, specache), as the simulator bounds it
    device = model.device
    check_runtime_memory(cfg, "runtime.serve", twin, model, device)   # before any prompt is drawn
    check_room_for(cfg)                      # room for what the run writes, before its work
    shape = kv_shape(model, cfg.policy, device)
    max_seq = model.args.max_seq_len
    where = f"workload.trace={w.trace}" if w.arrival == "trace" else "workload.prompt_len / workload.gen_len"

    def check(r: Request) -> None:
        if r.prompt_len + r.gen_len > max_seq:
            raise ConfigError(f"request {r.id}: prompt_len + gen_len = {r.prompt_len + r.gen_len} exceeds the "
                              f"model's context of {max_seq}; shorten it ({where})")
        r.reserved = twin.reserve_bytes(r.prompt_len + r.gen_len, shape)
        if r.reserved > capacity:
            raise ConfigError(f"request {r.id} needs {r.reserved} bytes of KV ({r.prompt_len} + {r.gen_len} tokens, "
                              f"policy={twin.name}) but hardware.kv_budget_bytes={budget}; raise the budget, "
                              f"shorten the request ({where}) or pick a smaller policy")
        r.reserved_host = twin.reserve_host_bytes(r.prompt_len + r.gen_len, shape)
        if host is not None and r.reserved_host > host:
            raise ConfigError(f"request {r.id} needs {r.reserved_host} bytes of host KV ({r.prompt_len} + {r.gen_len} "
                              f"tokens, policy={twin.name}) but hardware.host_memory_bytes={host}; raise it or "
                              f"shorten the request ({where})")

    if w.arrival == "closed":        # every request is at most prompt_len + gen_len: fail before running
        check(Request(-1, 0.0, int(w.prompt_len), int(w.gen_len)))
    arrivals = Arrivals(w, model.args, check)
    server = Server(model, twin, link=link, temperature=w.temperature, top_p=w.top_p, seed=w.seed)
    with PeakMemory(device) as mem:
        admission = Admission(int(s.max_batch), s.order, Pool(capacity), None if host is None else Pool(int(host)))
        timer = make_timer(device, bool(cfg.get("phases", True)), bool(cfg.get("timeline", False)))
        out = _replay(server, arrivals, admission, bool(cfg.get("progress", False)), timer,
                      PhaseLog(bool(cfg.get("timeline", False))))
    out.peak_mem_bytes = mem.peak
    return out


def _replay(server: Server, arrivals: Arrivals, admission: Admission, progress: bool, timer=None,
            log: PhaseLog | None = None) -> Outcome:
    timer = timer if timer is not None else make_timer(server.model.device, False)
    log = log if log is not None else PhaseLog()
    running: list[ServedRequest] = []
    cohorts: list[Cohort] = []
    done: list[ServedRequest] = []
    o = Outcome(requests=done)
    args = server.model.args
    device = server.model.device
    bar = tqdm(total=arrivals.total, desc="serve", unit="req", disable=not progress, leave=False)
    # the kernels a cohort's decode steps build on first use are built now, before the clock, with or
    # without a warm-up (a throwaway one-row cache of the policy: the same hook runtime.bench's runs take)
    prepare_cache(server.model, make_cache(server.policy, n_layers=args.n_layers, batch=1, n_kv_heads=args.n_kv_heads,
                                           head_dim=args.head_dim, capacity=256, device=device, link=server.link))
    sync(device)
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    while True:
        for r in arrivals.due(clock()):
            admission.arrive(r)
        new: list[ServedRequest] = admission.admit(len(running))
        for r in new:
            r.admitted_s = clock()
        if not running and not new:
            if not admission.waiting and arrivals.exhausted:
                break
            t_next = arrivals.next_time()
            if t_next is None:
                raise RuntimeError(f"{len(admission.waiting)} requests wait with nothing running (serve bug)")
            time.sleep(max(0.0, t_next - clock()))
            continue
        # -- one iteration (its window is the phase timer's step: runtime/phases.py)
        ts = clock()
        if admission.prefill_next(new, len(running)):
            with timer.step() as rec:
                c = server.prefill(new)
                ids = c.nxt.tolist()            # forces the step to finish
                sync(device)
                now = clock()
                for r, t in zip(c.reqs, ids):
                    r.tokens.append(t)
                    r.token_times.append(now)
                    r.generated, r.first_token_s = 1, now
                server.speculate(c)
                cohorts.append(c)
                running += new
                te = clock()
            o.prefill_iterations += 1
            o.prefill_s += te - ts
            o.steps.append(("prefill", ts, te - ts, len(new), "", " ".join(str(r.prompt_len) for r in new)))
            log.add("prefill", rec, t0 + ts, t0 + te, requests=[r.id for r in new])
        else:
            # each cohort's rows and the columns its attention reads this step (its cache + the new token)
            shape = " ".join(f"{len(c.reqs)}:{c.cache.len + 1}" for c in cohorts)
            with timer.step() as rec:
                server.decode(cohorts)
                ids = [c.nxt.tolist() for c in cohorts]
                sync(device)
                now = clock()
                for c, cids in zip(cohorts, ids):
                    for r, t in zip(c.reqs, cids):
                        if not r.finished:
                            r.tokens.append(t)
                            r.token_times.append(now)
                            r.generated += 1
                            o.decode_tokens += 1
            o.decode_s += now - ts
            rows = sum(len(c.reqs) for c in cohorts)
            o.steps.append(("decode", ts, now - ts, rows, shape, ""))
            log.add("decode", rec, t0 + ts, t0 + now, batch=rows, cohorts=len(cohorts))
        o.iterations += 1
        o.busy_s += clock() - ts
        o.max_batch_reached = max(o.max_batch_reached, len(running))
        # -- KV held after this iteration, kept at its peak (Sim._account)
        tokens = sum(c.cache.n_tokens for c in cohorts)
        if tokens > o.kv_peak[2]:
            dev = host = fp16 = 0
            for c in cohorts:
                d, h = c.cache.nbytes()
                dev, host, fp16 = dev + d, host + h, fp16 + c.cache.fp16_bytes(args.n_kv_heads, args.head_dim)
            o.kv_peak = (dev, host, tokens, fp16)
        # -- completions: reservation back at once; a cohort goes when all its requests are done
        for r in [r for r in running if r.finished]:
            running.remove(r)
            r.done_s = now
            admission.release(r)
            done.append(r)
            arrivals.completed(r, now)
            bar.update(1)
        for c in [c for c in cohorts if c.done]:
            cohorts.remove(c)
            server.drop(c)
    bar.close()
    if len(done) != arrivals.total:
        raise RuntimeError(f"{arrivals.total - len(done)} requests never ran (serve bug)")
    done.sort(key=lambda r: r.id)
    o.cohorts = server.n_cohorts
    o.policy_stats = server.policy_stats(cohorts)
    o.phases, o.timeline, o.t0 = log.totals(), log.steps or [], t0
    return o
