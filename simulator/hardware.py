"""SimPy hardware: a compute stream, H2D and D2H copy engines, device memory for KV.

A step's operation graph (simulator/policies/) runs in one of two fidelities that must agree:

- *detailed*: every op is a SimPy process that waits for its dependencies' events, then holds
  its engine (a `simpy.Resource(capacity=1)`) for its duration. Engines are in-order streams:
  an op requests its engine only after the op issued before it on that engine has requested
  (SimPy grants a Resource in request order), as a CUDA stream runs kernels in issue order.
- *fast*: the same graph as a recurrence in issue order,
  start = max(end of its dependencies, end of the previous op on its engine), cached by the
  caller per (policy, stage, batch, context bucket).

Both return the step's makespan and each engine's busy seconds (for utilisation), and both
attribute the makespan to the ops' phases (core/phases.py) the same way (`attribute_path`): the
compute engine's busy time goes to the phases of the ops it ran; its idle time (a stall) goes to
the op on the step's critical path at that moment (the copy compute waits for). The critical path
is walked back from the op that ends last: each op's predecessor is whichever of its
dependencies / the op before it on its engine determined its start (ties: the one on its own
engine). So a copy hidden behind compute contributes 0, one that stalls compute exactly its
stall, and the phases sum to the makespan. A `layer` op's PARTS are attributed with it.
docs/simulator.md says why steps are costed this way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from .policies import ENGINES, Op


COMPUTE = ENGINES[0]
# ends within TIE x makespan of each other are a tie when choosing an op's predecessor on the
# critical path: the detailed fidelity's SimPy clock is absolute (its times carry the rounding
# of the whole run's clock), the fast one's starts at 0; both must take the same path
TIE = 1e-7


@dataclass
class StepTime:
    seconds: float
    busy: dict[str, float] = field(default_factory=dict)
    # {phase: seconds of this step's makespan}, summing to `seconds` (attribute=True); every phase
    # in the graph is listed, a copy hidden behind compute with 0
    phases: dict[str, float] = field(default_factory=dict)
    # {part: seconds} of the `layer` phase ({} where the profile has no part tables)
    parts: dict[str, float] = field(default_factory=dict)
    # trace=True: ((name, engine, phase, start, end), ...) in issue order, seconds from the step's start
    ops: tuple | None = None


def solve(ops: list[Op], attribute: bool = True, trace: bool = False) -> StepTime:
    """The fast fidelity: the in-order-stream recurrence over the graph. `attribute`: the
    phases (and parts) of the makespan; `trace`: each op's start and end."""
    end: dict[str, float] = {}
    free = dict.fromkeys(ENGINES, 0.0)
    busy = dict.fromkeys(ENGINES, 0.0)
    t0: list[float] = []
    t1: list[float] = []
    for op in ops:
        start = max([free[op.engine], *(end[d] for d in op.deps)])
        end[op.name] = free[op.engine] = start + op.seconds
        busy[op.engine] += op.seconds
        t0.append(start)
        t1.append(end[op.name])
    st = StepTime(max(end.values(), default=0.0), busy)
    return _finish(st, ops, t0, t1, attribute, trace)


def _finish(st: StepTime, ops: list[Op], t0: list[float], t1: list[float], attribute: bool, trace: bool) -> StepTime:
    if attribute:
        st.phases, st.parts = attribute_path(ops, t0, t1, st.seconds)
    if trace:
        st.ops = tuple((op.name, op.engine, op.phase or op.name, a, b) for op, a, b in zip(ops, t0, t1))
    return st


def critical_path(ops: list[Op], start: list[float], end: list[float], makespan: float) -> list[int]:
    """Indices of the ops on the critical path, in time order (see the module's docstring)."""
    if not ops:
        return []
    tol = TIE * makespan
    index = {op.name: j for j, op in enumerate(ops)}
    before: list[int | None] = []
    last: dict[str, int] = {}
    for j, op in enumerate(ops):
        before.append(last.get(op.engine))
        last[op.engine] = j
    top = max(end)
    ending = [j for j in range(len(ops)) if end[j] >= top - tol]
    j: int | None = next((k for k in reversed(ending) if ops[k].engine == COMPUTE), ending[-1])
    path = []
    while j is not None:
        path.append(j)
        cands = ([before[j]] if before[j] is not None else []) + [index[d] for d in ops[j].deps]
        if not cands:
            break
        best = max(end[k] for k in cands)
        j = next(k for k in cands if end[k] >= best - tol)
    path.reverse()
    return path


def attribute_path(ops: list[Op], start: list[float], end: list[float], makespan: float
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """(phases, parts) of a step whose ops ran from start[j] to end[j] (seconds from the step's
    start): compute's busy time to its ops' phases, its idle time to the critical path's op at that
    moment. An op without a phase (a hand-built graph's free name) is attributed under its name."""
    blame = [0.0] * len(ops)
    path = critical_path(ops, start, end, makespan)
    if path:
        # the path's ops tile [0, makespan]: op path[k] holds [start of path[k], start of path[k+1]]
        bounds = [0.0]
        for k in path[1:]:
            bounds.append(min(max(start[k], bounds[-1]), makespan))
        bounds.append(makespan)
        # compute's idle stretches, in time order (an in-order stream runs its ops in issue order)
        gaps, t = [], 0.0
        for j, op in enumerate(ops):
            if op.engine == COMPUTE:
                if start[j] > t:
                    gaps.append((t, start[j]))
                t = max(t, end[j])
        if makespan > t:
            gaps.append((t, makespan))
        k = 0
        for g0, g1 in gaps:
            while k < len(path) and bounds[k + 1] <= g0:
                k += 1
            m = k
            while m < len(path) and bounds[m] < g1:
                blame[path[m]] += min(g1, bounds[m + 1]) - max(g0, bounds[m])
                m += 1
    phases: dict[str, float] = {}
    parts: dict[str, float] = {}
    partless = False
    for j, op in enumerate(ops):
        s = (op.seconds if op.engine == COMPUTE else 0.0) + blame[j]
        key = op.phase or op.name
        phases[key] = phases.get(key, 0.0) + s
        if s <= 0 or op.phase != "layer":
            continue
        if not op.parts:
            partless = True
            continue
        f = s / op.seconds if op.seconds > 0 else 0.0
        for p, v in op.parts:
            parts[p] = parts.get(p, 0.0) + v * f
    return phases, ({} if partless else parts)


class Hardware:
    """The contended hardware of one simulated device."""

    def __init__(self, env: simpy.Environment, kv_capacity_bytes: int, host_capacity_bytes: int | None = None):
        self.env = env
        self.engines = {name: simpy.Resource(env, capacity=1) for name in ENGINES}
        # KV admission: a request's whole KV is taken at admission and given back at completion
        self.kv = simpy.Container(env, capacity=kv_capacity_bytes, init=kv_capacity_bytes)
        # host memory for KV (hardware.host_memory_bytes), taken and given back the same way; None: unlimited
        self.host = None if host_capacity_bytes is None else \
            simpy.Container(env, capacity=host_capacity_bytes, init=host_capacity_bytes)
        self.busy = dict.fromkeys(ENGINES, 0.0)

    def run_step(self, ops: list[Op], attribute: bool = True, trace: bool = False):
        """The detailed fidelity: a SimPy process per op; returns (as the process value) the
        step's StepTime (with `attribute`: its phases, from the times the ops ran; `trace`:
        each op's start and end)."""
        env = self.env
        t0 = env.now
        done = {op.name: env.event() for op in ops}
        issued: dict[str, simpy.Event] = {}
        last_on: dict[str, simpy.Event] = {}
        busy = dict.fromkeys(ENGINES, 0.0)
        began = [0.0] * len(ops)
        ended = [0.0] * len(ops)

        def run(j: int, op: Op, after: simpy.Event | None, mine: simpy.Event):
            deps = [done[d] for d in op.deps]
            if deps:
                yield env.all_of(deps)
            if after is not None and not after.triggered:
                yield after                         # in-order stream: the op issued before asks first
            with self.engines[op.engine].request() as req:
                mine.succeed()
                yield req
                began[j] = env.now - t0
                yield env.timeout(op.seconds)
            ended[j] = env.now - t0
            busy[op.engine] += op.seconds
            done[op.name].succeed()

        for j, op in enumerate(ops):
            mine = env.event()
            env.process(run(j, op, last_on.get(op.engine), mine))
            last_on[op.engine] = issued[op.name] = mine
        yield env.all_of(list(done.values()))
        for k, v in busy.items():
            self.busy[k] += v
        return _finish(StepTime(env.now - t0, busy), ops, began, ended, attribute, trace)


def detailed(ops: list[Op], attribute: bool = True, trace: bool = False) -> StepTime:
    """Run one graph alone in a fresh environment (for tests and the speed benchmark)."""
    env = simpy.Environment()
    hw = Hardware(env, 1)
    p = env.process(hw.run_step(ops, attribute, trace))
    env.run()
    return p.value
