"""Continuous batching on the simulated hardware: one SimPy event per serving iteration.

Each iteration is either one prefill of the requests just admitted or one decode step of every
running request; which requests are admitted, and which iteration comes next, is
core/admission.py (shared with runtime.serve), over `Hardware.kv` / `Hardware.host`. A request
larger than the whole memory is an error, not a wait forever.

Where the time goes (`phases`): every iteration's StepTime carries its phases and layer parts
(simulator/hardware.py's critical-path attribution); `Sim.stages` sums them per stage (prefill,
decode) with the steps' seconds, and `StageSum.record()` is core/phases.py's stage record (means
per step). `timeline`: every iteration's start, length and stage, and its ops' start and end for
the first TIMELINE_OP_ITERATIONS iterations (simulator/run.py writes them as a Chrome trace).

Batching (`batching`, core/admission.py BATCHINGS): `cohorts`, as runtime.serve runs it: the
requests one prefill admits are a cohort, left-padded to its longest prompt; a decode step
computes every row of every live cohort (a finished request's row too, until its cohort is
done) over the cohort's padded context, and attends once per cohort per layer (the twin's
`cohort_attention`); `ragged`: one attention over the running requests' own contexts, a
finished request leaving at once (a paged-attention server).

Token times, cheaply: every running request gets a token at each decode iteration's end, so the
run keeps one float per decode iteration (`decode_ends`) and each request the index of its first
decode iteration; `token_times` turns them into core/per_request.py's TokenTimes (per-request
ITL and the pooled gaps) after the run. `timeseries`: one row per scheduler event (`series`).
docs/simulator.md describes the serving loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import simpy

from core.admission import ORDERS, Admission, check_scheduler  # noqa: F401  (simulator.scheduler.ORDERS, as before)
from core.errors import ConfigError
from core.per_request import TokenTimes
from core.phases import PHASES, STAGES, add_totals, empty_totals, stage_record
from core.values import number
from core.workload import Lengths, Request, open_arrivals

from .costs import Costs, ModelShape
from .hardware import Hardware, StepTime, solve
from .policies import Twin
from .policies.base import per_cohort

FIDELITIES = ("fast", "detailed")
# timeline=true: the first this many iterations carry their ops (each an event per engine); later
# ones only the iteration itself, so a 10k-request run writes megabytes, not gigabytes
TIMELINE_OP_ITERATIONS = 2000


@dataclass
class Cohort:
    """The requests one prefill admitted (batching=cohorts): `padded` their longest prompt, `steps`
    the decode steps they have taken together (the cohort's KV columns: padded + steps)."""
    reqs: list[Request]
    padded: int
    steps: int = 0

    def context(self) -> int:
        """Columns a decode step attends over: the padded prompt, the steps so far, the new token."""
        return self.padded + self.steps + 1


@dataclass
class StageSum:
    """The phases, layer parts and seconds of one stage's steps, summed (core/phases.py totals)."""
    totals: dict = field(default_factory=empty_totals)
    parts_known: bool = True          # False once a step with layer time had no parts (no tables)

    def add(self, st: StepTime) -> None:
        add_totals(self.totals, 1, st.seconds, st.phases, st.parts or {})
        if not st.parts and st.phases.get("layer", 0.0) > 0:
            self.parts_known = False

    def record(self) -> dict:
        """core/phases.py stage_record: mean seconds per step of each phase and part."""
        t = self.totals
        return stage_record(t["phases"], t["step_s"], t["steps"], t["parts"] if self.parts_known and t["parts"] else None)


@dataclass
class Sim:
    costs: Costs
    shape: ModelShape
    policy: Twin
    kv_capacity: int
    max_batch: int = 256
    order: str = "prefill_first"
    fidelity: str = "fast"
    ctx_bucket: int = 16
    batching: str = "cohorts"           # core/admission.py BATCHINGS
    max_seq_len: int | None = None
    host_capacity: int | None = None    # hardware.host_memory_bytes: host KV admission (None: unlimited)
    phases: bool = True                 # attribute each step's time to phases (core/phases.py): `stages`
    timeline: bool = False              # keep each iteration (and its first iterations' ops): `steps`
    timeseries: bool = False            # keep (t, batch, queue, kv device, kv host, busy) per event: `series`
    # results
    done: list[Request] = field(default_factory=list)
    max_batch_reached: int = 0
    iterations: int = 0
    kv_peak: tuple[int, int, int] = (0, 0, 0)      # (device, host, tokens) at the largest holding
    stages: dict[str, StageSum] = field(default_factory=lambda: {s: StageSum() for s in STAGES})
    # timeline: (stage, start_s, seconds, batch, ops or None) per iteration; ops = StepTime.ops
    steps: list[tuple] = field(default_factory=list)
    decode_ends: list[float] = field(default_factory=list)   # the end of every decode iteration
    first_decode: dict[int, int] = field(default_factory=dict)   # request id -> its first decode iteration
    series: list[tuple] = field(default_factory=list)       # timeseries: core/per_request.py TIMESERIES_COLUMNS
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        check_scheduler(self.max_batch, self.order, self.batching)
        if self.fidelity not in FIDELITIES:
            raise ConfigError(f"fidelity={self.fidelity!r} is not known; choose one of: {', '.join(FIDELITIES)}")
        number(self.ctx_bucket, "scheduler.ctx_bucket", ge=1)
        self.costs.need(*self.policy.tables())
        self.env = simpy.Environment()
        self.hw = Hardware(self.env, self.kv_capacity, self.host_capacity)
        self.admission = Admission(self.max_batch, self.order, self.hw.kv, self.hw.host)
        self.waiting = self.admission.waiting
        self.wake = self.env.event()
        self.open = 0                 # arrival processes still sending
        self.bar = None               # run(progress=True): the tqdm bar of completed requests

    # -- requests in

    def submit(self, r: Request) -> None:
        if self.max_seq_len and r.prompt_len + r.gen_len > self.max_seq_len:
            raise ConfigError(f"request {r.id}: prompt_len + gen_len = {r.prompt_len + r.gen_len} exceeds the model's "
                              f"context of {self.max_seq_len}; lower workload.prompt_len or workload.gen_len")
        r.reserved = self.policy.reserve_bytes(r.prompt_len + r.gen_len, self.shape)
        if r.reserved > self.kv_capacity:
            raise ConfigError(f"request {r.id} needs {r.reserved} bytes of KV ({r.prompt_len} + {r.gen_len} tokens, "
                              f"policy={self.policy.name}) but the device holds {self.kv_capacity} for KV; "
                              "shorten it or pick a smaller policy / larger hardware")
        r.reserved_host = self.policy.reserve_host_bytes(r.prompt_len + r.gen_len, self.shape)
        if self.host_capacity is not None and r.reserved_host > self.host_capacity:
            raise ConfigError(f"request {r.id} needs {r.reserved_host} bytes of host KV ({r.prompt_len} + {r.gen_len} "
                              f"tokens, policy={self.policy.name}) but hardware.host_memory_bytes={self.host_capacity}; "
                              "raise it or shorten the request")
        self.admission.arrive(r)
        if not self.wake.triggered:
            self.wake.succeed()

    def feed(self, requests: list[Request]):
        """Open arrivals: submit each request at its time."""
        self.open += 1
        for r in requests:
            if r.arrival_s > self.env.now:
                yield self.env.timeout(r.arrival_s - self.env.now)
            self.submit(r)
        self.open -= 1
        self._poke()

    def user(self, uid: int, think_s: float, make):
        """A closed-loop user: send, wait for completion, think, repeat while `make` gives one."""
        self.open += 1
        while (r := make(self.env.now)) is not None:
            r.finished = self.env.event()
            self.submit(r)
            yield r.finished
            if think_s:
                yield self.env.timeout(think_s)
        self.open -= 1
        self._poke()

    def _poke(self):
        if not self.wake.triggered:
            self.wake.succeed()

    # -- the serving loop

    def serve(self):
        running: list[Request] = []
        cohorts: list[Cohort] = []          # batching=cohorts: the live ones, in admission order
        while True:
            new = self.admission.admit(len(running))
            for r in new:
                r.admitted_s = self.env.now
            if not running and not new:
                if self.timeseries:
                    self.series.append((self.env.now, 0, len(self.waiting), 0, 0, 0))
                if not self.waiting and self.open == 0:
                    return
                self.wake = self.env.event()
                yield self.wake
                continue
            if self.timeseries:
                self._sample(running, new)
            if self.admission.prefill_next(new, len(running)):
                yield from self._step("prefill", [r.prompt_len for r in new])
                first = len(self.decode_ends)
                for r in new:
                    r.first_token_s, r.generated = self.env.now, 1
                    self.first_decode[r.id] = first
                running += new
                if self.batching == "cohorts":
                    cohorts.append(Cohort(new, max(r.prompt_len for r in new)))
            else:
                if cohorts:         # every row of every live cohort, each cohort at its padded context
                    parts = tuple((len(c.reqs), c.context()) for c in cohorts)
                    rows = sum(n for n, _ in parts)
                    ctx = sum(n * x for n, x in parts) / rows
                else:               # ragged: the running requests at their own contexts
                    parts, rows = (), len(running)
                    ctx = sum(r.prompt_len + r.generated for r in running) / rows
                yield from self._step("decode", rows, ctx, parts)
                self.decode_ends.append(self.env.now)
                for c in cohorts:
                    c.steps += 1
                for r in running:
                    r.generated += 1
            self.max_batch_reached = max(self.max_batch_reached, len(running))
            self._account(running, cohorts)
            finished = [r for r in running if r.generated >= r.gen_len]
            for r in finished:
                running.remove(r)
                r.done_s = self.env.now
                self.done.append(r)
                if self.bar is not None:
                    self.bar.update(1)
                for ev in self.admission.release(r):
                    yield ev
                if hasattr(r, "finished"):
                    r.finished.succeed()
            if cohorts and finished:          # a cohort goes when its last request is done
                cohorts[:] = [c for c in cohorts if any(r.generated < r.gen_len for r in c.reqs)]

    def _step(self, stage: str, *args):
        self.iterations += 1
        key, build, batch = self._graph(stage, *args)
        trace = self.timeline and len(self.steps) < TIMELINE_OP_ITERATIONS
        t0 = self.env.now
        if self.fidelity == "detailed":
            st = yield self.env.process(self.hw.run_step(self._checked(build()), self.phases, trace))
        else:
            st = self._solved(key, build)
            for k, v in st.busy.items():
                self.hw.busy[k] += v
            yield self.env.timeout(st.seconds)
        if self.phases:
            self.stages[stage].add(st)
        if self.timeline:
            self.steps.append((stage, t0, st.seconds, batch, st.ops if trace else None))

    def step_seconds(self, stage: str, *args) -> float:
        """What one iteration costs, outside a run: ("prefill", prompts) or ("decode", rows,
        mean context, ((rows, context), ...) per cohort), priced as the serving loop prices it
        (analysis/steps.py prices each measured iteration so)."""
        return self._solved(*self._graph(stage, *args)[:2]).seconds

    def _solved(self, key, build) -> StepTime:
        """The fast fidelity's step: the graph solved once per key (simulator/hardware.py solve)."""
        st = self._cache.get(key)
        if st is None:
            st = self._cache[key] = solve(self._checked(build()), self.phases, self.timeline)
        return st

    def _graph(self, stage: str, *args):
        """(cache key, graph builder, batch) of one iteration."""
        if stage == "decode":
            b, ctx, parts = args
            ctx = math.ceil(ctx / self.ctx_bucket) * self.ctx_bucket
            # several cohorts: their attention calls, each at its own bucketed context (one cohort,
            # or ragged batching's none, is the batch itself: the plain graph)
            parts = parts if len(parts) > 1 else None
            if parts:
                parts = tuple(sorted((n, math.ceil(x / self.ctx_bucket) * self.ctx_bucket) for n, x in parts))
            key = ("decode", b, ctx, parts)

            def build():
                ops = self.policy.decode_graph(self.costs, self.shape, b, ctx)
                return per_cohort(ops, self.policy.cohort_attention(self.costs, b, ctx, parts)) if parts else ops
            batch = b
        else:
            key, build = ("prefill", tuple(args[0])), lambda: self.policy.prefill_graph(self.costs, self.shape, args[0])
            batch = len(args[0])
        return key, build, batch

    def _checked(self, ops):
        """A graph whose ops all have a phase of core/phases.py (a plugin twin's free op name is
        refused here, naming it, rather than as an unknown phase at the end of the run)."""
        if self.phases:
            bad = [op.name for op in ops if op.phase not in PHASES]
            if bad:
                raise ConfigError(f"policy={self.policy.name}: op {bad[0]!r} of its step graph has no phase of "
                                  f"core/phases.py PHASES ({', '.join(PHASES)}); name it <phase><layer> or pass "
                                  "Op(phase=...)")
        return ops

    def _sample(self, running: list[Request], new: list[Request]) -> None:
        """timeseries: the state as an iteration starts (requests admitted and not done, the queue,
        the KV they hold, busy)."""
        tokens = [r.prompt_len + r.generated - 1 for r in running if r.generated]
        dev, host = self.policy.kv_bytes(tokens, self.shape) if tokens else (0, 0)
        self.series.append((self.env.now, len(running) + len(new), len(self.waiting), dev, host, 1))

    def token_times(self, reqs: list[Request]) -> TokenTimes:
        """The token times of `reqs` (served requests, in that order): the first at its prefill's
        end, the others at the ends of the decode iterations that follow it."""
        first = np.fromiter((r.first_token_s for r in reqs), dtype=float, count=len(reqs))
        start = np.fromiter((self.first_decode[r.id] for r in reqs), dtype=np.int64, count=len(reqs))
        count = np.fromiter((r.gen_len - 1 for r in reqs), dtype=np.int64, count=len(reqs))
        return TokenTimes(first, start, count, np.asarray(self.decode_ends, dtype=float))

    def _account(self, running: list[Request], cohorts: list[Cohort] | None = None) -> None:
        """KV held after this iteration (the newest token is not stored yet), kept at its peak; in
        cohorts every row of a live cohort holds its prompt and the cohort's steps, a finished
        request's row too (runtime.serve's caches keep writing it until the cohort is done)."""
        if cohorts:
            tokens = [r.prompt_len + c.steps for c in cohorts for r in c.reqs]
        else:
            tokens = [r.prompt_len + r.generated - 1 for r in running]
        if sum(tokens) > self.kv_peak[2]:
            dev, host = self.policy.kv_bytes(tokens, self.shape)
            self.kv_peak = (dev, host, sum(tokens))

    # -- running a workload

    def run(self, w, progress: bool = False) -> list[Request]:
        """Serve workload `w`; `progress`: a tqdm bar of completed requests, shown once a run has
        taken a second (short runs print nothing)."""
        from tqdm.auto import tqdm

        total = None
        if w.arrival == "closed":
            made = [0]

            def make(now):
                if made[0] >= w.n_requests:
                    return None
                made[0] += 1
                return Request(made[0] - 1, now, *lengths.pair())

            lengths = Lengths(w, np.random.default_rng(w.seed))
            for u in range(w.users):
                self.env.process(self.user(u, w.think_s, make))
            total = int(w.n_requests)
        else:
            arrivals = open_arrivals(w)
            total = len(arrivals)
            self.env.process(self.feed(arrivals))
        self.env.process(self.serve())
        self.bar = tqdm(total=total, desc="simulating", unit="req", delay=1.0, disable=not progress, leave=False)
        try:
            self.env.run()
        finally:
            self.bar.close()
            self.bar = None
        stuck = len(self.waiting)
        if stuck:
            raise RuntimeError(f"{stuck} requests never ran (simulator bug: the loop ended with work left)")
        return sorted(self.done, key=lambda r: r.id)
