"""python -m runtime.serve: the runtime's own continuous batching, replaying a workload's arrivals.

    python -m runtime.serve                                            # static batch: what runtime.bench runs
    python -m runtime.serve workload=poisson workload.rate=2 workload.n_requests=8 \\
        workload.prompt_len=256 workload.gen_len=16
    python -m runtime.serve workload=trace workload.trace=my_trace.csv hardware.kv_budget_bytes=50000000

The real model serves the requests the simulator would (core/workload.py), in real time, under the
simulator's admission rules (core/admission.py, driven by both), and writes the simulator's results
schema, so analysis.validate can check the simulator's arrivals, admission and batching against
something real. Requests admitted together are prefilled into their own cache (a cohort); a decode
iteration is one forward over every cohort. Why cohorts, their limits and the metrics: the README's
"Continuous batching".

phases=true (default): every prefill iteration (its cohort's prefill, first-token read-back and
SpeCache's speculative pass) and every decode iteration runs under the lap timer
(runtime/phases.py); `phases` holds the mean step of each. timeline=true writes the Chrome trace
beside the result: the iterations with their phases, and each request as an async span.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from core.admission import Admission, Pool
from core.checks import check_config, check_shape
from core.feasibility import check_runtime_memory
from core.policies import ModelShape, load_plugin
from core.workload import Lengths, Request, open_arrivals

from . import model as model_lib
from core.config import register
from .engine import (PeakMemory, SamplingParams, generate, left_pad, policy_stats_of, prefill, resolve_device,
                     sample, speculate, sync)
from core.cli import hydra_entry, run_point
from core.errors import ConfigError
from .kv import KVCache, POLICIES, Step, make_cache, resolve_kv_dtype
from .model import Transformer
from core.provenance import provenance
from core.results import (key_value_table, latency_kv_rows, memory_stats_rows, phase_rows, pool_phases, results_folder,
                          serving_metrics, write_result)
from .phases import PhaseLog, chrome_trace, lap, make_timer
from .transfer import make_link

register()

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class ServedRequest(Request):
    """A simulator `Request` plus what the runtime needs and produces for it."""
    prompt: list[int] = field(default_factory=list, repr=False)
    tokens: list[int] = field(default_factory=list, repr=False)
    cohort: int = -1

    @property
    def finished(self) -> bool:
        return self.generated >= self.gen_len


# ----------------------------------------------------------------------------- cohorts

class Cohort:
    """Requests admitted together: one left-padded batch with its own KV cache."""

    def __init__(self, cid: int, reqs: list[ServedRequest], cache: KVCache, pad: torch.Tensor):
        self.id, self.reqs, self.cache, self.pad = cid, reqs, cache, pad
        self.nxt: torch.Tensor | None = None     # (B_c,) the token each row feeds next
        self.guess: torch.Tensor | None = None   # (B_c,) speculative guess of the one after

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.reqs)


@dataclass
class CohortStep:
    """The composite forward's step: what the model reads itself (RoPE positions), plus each
    cohort's own Step for its attention and its `advance`."""
    positions: torch.Tensor          # (B_total, n_new)
    n_new: int
    spec: bool
    parts: list[Step]


class _CohortLayer:
    """One layer of the composite cache: q/k/v rows split by cohort, each cohort's own attend."""

    def __init__(self, layers, bounds):
        self.layers, self.bounds = layers, bounds

    def attend(self, q, k, v, step: CohortStep):
        if len(self.layers) == 1:
            return self.layers[0].attend(q, k, v, step.parts[0])
        outs = [layer.attend(q[lo:hi], k[lo:hi], v[lo:hi], part)
                for layer, (lo, hi), part in zip(self.layers, self.bounds, step.parts)]
        return torch.cat(outs, dim=0)


class CohortCache:
    """The KVCache interface over several cohorts' caches, rows in cohort order."""

    def __init__(self, cohorts: list[Cohort]):
        self.caches = [c.cache for c in cohorts]
        bounds, lo = [], 0
        for c in cohorts:
            bounds.append((lo, lo + len(c.reqs)))
            lo += len(c.reqs)
        self.layers = [_CohortLayer([cache.layers[i] for cache in self.caches], bounds)
                       for i in range(len(self.caches[0].layers))]

    def advance(self, step: CohortStep) -> None:
        for cache, part in zip(self.caches, step.parts):
            cache.advance(part)


class Server:
    """The model side of the loop: prefill a cohort, decode every cohort in one forward."""

    def __init__(self, model: Transformer, policy, *, link=None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0):
        self.model, self.policy, self.link = model, policy, link
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator(device=model.device).manual_seed(seed) if temperature > 0 else None
        self.n_cohorts = 0
        self.guesses = self.hits = 0
        self.counters: dict[str, float] = {}     # policy counters of the cohorts dropped so far

    def prefill(self, reqs: list[ServedRequest]) -> Cohort:
        """Prefill the requests admitted together as one new cohort; sets its first tokens."""
        args, device = self.model.args, self.model.device
        tokens, pad = left_pad([r.prompt for r in reqs], args.pad_id, device)
        capacity = tokens.shape[1] + max(r.gen_len for r in reqs)
        cache = make_cache(self.policy, n_layers=args.n_layers, batch=len(reqs), n_kv_heads=args.n_kv_heads,
                           head_dim=args.head_dim, capacity=capacity + 1, device=device, link=self.link)
        c = Cohort(self.n_cohorts, reqs, cache, pad)
        self.n_cohorts += 1
        for r in reqs:
            r.cohort = c.id
        c.nxt = sample(prefill(self.model, cache, tokens, pad), self.temperature, self.top_p, self.gen)
        lap("lm_head")
        return c

    def speculate(self, c: Cohort) -> None:
        """SpeCache's first pre-decoding pass (as engine.generate), for a cohort that will decode."""
        if c.cache.speculative and not c.done:
            c.guess = speculate(self.model, c.cache, c.nxt, c.pad).argmax(-1)

    def decode(self, cohorts: list[Cohort]) -> None:
        """One decode step of every row of every cohort, in one model forward."""
        device, max_pos = self.model.device, self.model.args.max_seq_len - 1
        spec = cohorts[0].guess is not None
        if any((c.guess is not None) != spec for c in cohorts):
            raise RuntimeError("cohorts disagree on speculative decoding (serve bug)")
        n = 2 if spec else 1
        parts = []
        for c in cohorts:
            start = c.cache.len
            # rows of requests already done keep computing until their cohort ends; clamp their
            # positions into the RoPE table (their outputs are never used)
            pos = ((start - c.pad)[:, None] + torch.arange(n, device=device)).clamp(max=max_pos)
            parts.append(Step(start=start, n_new=n, pad=c.pad, positions=pos, spec=spec))
        nxt = torch.cat([c.nxt for c in cohorts])
        tokens = torch.stack([nxt, torch.cat([c.guess for c in cohorts])], dim=1) if spec else nxt[:, None]
        step = CohortStep(torch.cat([p.positions for p in parts]), n, spec, parts)
        out = self.model(tokens, CohortCache(cohorts), step)            # (B_total, n, V)
        new = sample(out[:, 0] if spec else out[:, -1], self.temperature, self.top_p, self.gen)
        guess = out[:, 1].argmax(-1) if spec else None
        lap("lm_head")
        if spec:
            live = torch.tensor([not r.finished for c in cohorts for r in c.reqs], device=device)
            old_guess = tokens[:, 1]
            self.guesses += int(live.sum())
            self.hits += int(((old_guess == new) & live).sum())
        lo = 0
        for c in cohorts:
            hi = lo + len(c.reqs)
            c.nxt = new[lo:hi]
            if spec:
                c.guess = guess[lo:hi]
            lo = hi

    def drop(self, c: Cohort) -> None:
        for key, val in c.cache.stats().items():
            self.counters[key] = self.counters.get(key, 0) + val

    def policy_stats(self, live: list[Cohort]) -> dict[str, float]:
        counters = dict(self.counters)
        for c in live:
            for key, val in c.cache.stats().items():
                counters[key] = counters.get(key, 0) + val
        return policy_stats_of(SimpleNamespace(stats=lambda: counters), self.guesses, self.hits)


# ----------------------------------------------------------------------------- arrivals

class Arrivals:
    """The workload's requests as they become visible: open (static / poisson / trace: all known
    up front) or closed (`users` clients, each sending its next request `think_s` after its last one
    completed, as the simulator's `Sim.user`). Prompt tokens are seeded random ids drawn in request
    creation order (a static batch with fixed lengths gets exactly runtime.bench's prompts)."""

    def __init__(self, w, args, check):
        self.w, self.check = w, check
        special = {args.bos_id, args.eos_id, args.pad_id}
        self.low = max(special) + 1 if max(special) + 1 < args.vocab_size else 0
        self.vocab = args.vocab_size
        self.g = torch.Generator().manual_seed(int(w.seed))
        self.heap: list[tuple[float, int, ServedRequest]] = []
        self.seq = 0
        self.closed = w.arrival == "closed"
        if self.closed:
            self.total = int(w.n_requests)
            self.made = 0
            self.lengths = Lengths(w, np.random.default_rng(w.seed))
            for _ in range(w.users):
                self._make(0.0)
        else:
            reqs = open_arrivals(w)
            self.total = len(reqs)
            for r in reqs:
                self._push(r)

    def _push(self, r: Request) -> None:
        self.check(r)
        s = ServedRequest(r.id, r.arrival_s, r.prompt_len, r.gen_len, reserved=r.reserved,
                           reserved_host=r.reserved_host)
        s.prompt = torch.randint(self.low, self.vocab, (s.prompt_len,), generator=self.g).tolist()
        heapq.heappush(self.heap, (s.arrival_s, self.seq, s))      # ties: creation order
        self.seq += 1

    def _make(self, t: float) -> None:
        if self.made < self.total:
            self._push(Request(self.made, t, self.lengths.prompt(), int(self.w.gen_len)))
            self.made += 1

    def due(self, now: float) -> list[ServedRequest]:
        out = []
        while self.heap and self.heap[0][0] <= now:
            out.append(heapq.heappop(self.heap)[2])
        return out

    def next_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def completed(self, r: ServedRequest, now: float) -> None:
        if self.closed:
            self._make(now + float(self.w.think_s))

    @property
    def exhausted(self) -> bool:
        return not self.heap and (not self.closed or self.made >= self.total)


# ----------------------------------------------------------------------------- the loop

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
    t0: float = 0.0                                          # perf_counter of the replay's clock 0


def kv_shape(model: Transformer, policy, device: torch.device) -> ModelShape:
    """The ModelShape of the model that runs (for the declaration's reserve_bytes)."""
    a = model.args
    return ModelShape(a.n_layers, a.n_kv_heads, a.head_dim, DTYPE_NAMES[resolve_kv_dtype(policy.kv_dtype, device)])


def serve(model: Transformer, cfg: DictConfig, *, link=None) -> Outcome:
    """Replay cfg.workload's arrivals through `model` under cfg.scheduler's rules and
    cfg.hardware.kv_budget_bytes; no warmup, nothing written."""
    w, s = cfg.workload, cfg.scheduler
    check_config(cfg, "runtime.serve")         # the same checks as runtime.bench and simulator.run
    load_plugin(cfg.policy, "kv")
    served = sorted(n for n, c in POLICIES.items() if c.serves)
    if not POLICIES[cfg.policy.name].serves:
        raise ConfigError(f"runtime.serve runs policy={'/'.join(served)}; policy={cfg.policy.name!r} "
                          "is not one (it has its own prefill: python -m runtime.bench)")
    a = model.args
    twin = check_shape(cfg, "runtime.serve", head_dim=a.head_dim, max_seq_len=a.max_seq_len, n_layers=a.n_layers)
    budget = cfg.hardware.get("kv_budget_bytes")       # null = unlimited (checked: never 0)
    capacity = math.inf if budget is None else int(budget)
    host = cfg.hardware.get("host_memory_bytes")       # host KV (offload, specache), as the simulator bounds it
    device = model.device
    check_runtime_memory(cfg, "runtime.serve", twin, model, device)   # before any prompt is drawn
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
    server = Server(model, cfg.policy, link=link, temperature=w.temperature, top_p=w.top_p, seed=w.seed)
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
                    r.generated, r.first_token_s = 1, now
                server.speculate(c)
                cohorts.append(c)
                running += new
                te = clock()
            o.prefill_iterations += 1
            o.prefill_s += te - ts
            log.add("prefill", rec, t0 + ts, t0 + te, requests=[r.id for r in new])
        else:
            with timer.step() as rec:
                server.decode(cohorts)
                ids = [c.nxt.tolist() for c in cohorts]
                sync(device)
                now = clock()
                for c, cids in zip(cohorts, ids):
                    for r, t in zip(c.reqs, cids):
                        if not r.finished:
                            r.tokens.append(t)
                            r.generated += 1
                            o.decode_tokens += 1
            o.decode_s += now - ts
            log.add("decode", rec, t0 + ts, t0 + now, batch=sum(len(c.reqs) for c in cohorts))
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


# ----------------------------------------------------------------------------- results

def summarize(o: Outcome, cfg: DictConfig) -> dict:
    """simulator.run.summarize's keys, from a measured replay, plus the measured extras."""
    reqs = o.requests
    m = serving_metrics(reqs, cfg.slo)
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
    check_config(cfg, "runtime.serve")
    device = resolve_device(cfg.hardware.device)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    model = model_lib.from_config(cfg.model, device)
    args = model.args
    link = make_link(cfg.hardware.link, device)
    try:
        if cfg.warmup:
            g = torch.Generator().manual_seed(0)
            warm = [torch.randint(3, args.vocab_size, (8,), generator=g).tolist() for _ in range(2)]
            generate(model, warm, SamplingParams(max_new_tokens=2), cfg.policy, link=link)
        out = serve(model, cfg, link=link)
    finally:
        link.close()

    w = cfg.workload
    resolved = OmegaConf.to_container(cfg, resolve=True)
    record = {
        **summarize(out, cfg),
        "model": cfg.model.name, "policy": cfg.policy.name, "hardware": cfg.hardware.name,
        "experiment": cfg.experiment, "scheduler": cfg.scheduler.name, "runner": "runtime.serve",
        "batch": w.batch, "prompt_len": w.prompt_len, "gen_len": w.gen_len,
        "n_params": model_lib.n_params(model), "weight_bytes": model_lib.weight_bytes(model),
        "config": resolved,
        "provenance": provenance(device),
    }
    digest = hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:8]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (f"{cfg.experiment or 'serve'}_{cfg.model.name}_{cfg.policy.name}_{w.arrival}_n{record['requests']}_"
            f"p{w.prompt_len}_g{w.gen_len}_{stamp}_{digest}.json")
    trace = None
    if cfg.get("timeline", False):     # iterations on the replay's clock; requests as async spans
        trace = chrome_trace(out.timeline, origin=out.t0, requests=record["per_request"],
                             name=f"runtime.serve {cfg.policy.name}")
    write_result(Path(cfg.results_dir) / "measured" / name, record, trace)
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
                       f"goodput {r['goodput_req_s']:.3g} req/s"),
        *latency_kv_rows(r),
        *memory_stats_rows(r),
        ("span, busy", f"{r['wall_s']:.2f} s, {r['util_compute']:.0%} in {r['iterations']} iterations"),
        *phase_rows(r),
        ("result", r["path"]),
        *([("timeline", r["timeline_path"])] if r.get("timeline_path") else []),
    ]
    return key_value_table(rows)


CSV_KEYS = ("throughput_tok_s", "decode_tok_s", "ttft_s", "ttft_s_p99", "tpot_s", "tpot_s_p99", "goodput_req_s",
            "kv_bytes_device", "kv_bytes_host", "kv_ratio_vs_fp16", "max_batch_reached", "peak_mem_bytes", "path")


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def task(cfg: DictConfig):
    """One run (or one point of a multirun: recorded in results/measured/sweeps/<sweep>.csv, failed or not)."""
    return run_point("runtime.serve", cfg, run, format_table, kind="measured", keys=CSV_KEYS,
                     objective="goodput_req_s")


main = hydra_entry("runtime.serve", "serve", task)


if __name__ == "__main__":
    main()
