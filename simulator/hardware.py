"""SimPy hardware: a compute stream, H2D and D2H copy engines, device memory for KV.

A step's operation graph (policies.py) runs in one of two fidelities that must agree:

- *detailed*: every op is a SimPy process that waits for its dependencies' events, then holds
  its engine (a `simpy.Resource(capacity=1)`) for its duration. Engines are in-order streams:
  an op requests its engine only after the op issued before it on that engine has requested
  (SimPy grants a Resource in request order), as a CUDA stream runs kernels in issue order.
- *fast*: the same graph as a recurrence in issue order,
  start = max(end of its dependencies, end of the previous op on its engine), cached by the
  caller per (policy, phase, batch, context bucket).

Both return the step's makespan and each engine's busy seconds (for utilisation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from .policies import ENGINES, Op


@dataclass
class StepTime:
    seconds: float
    busy: dict[str, float] = field(default_factory=dict)


def solve(ops: list[Op]) -> StepTime:
    """The fast fidelity: the in-order-stream recurrence over the graph."""
    end: dict[str, float] = {}
    free = dict.fromkeys(ENGINES, 0.0)
    busy = dict.fromkeys(ENGINES, 0.0)
    for op in ops:
        start = max([free[op.engine], *(end[d] for d in op.deps)])
        end[op.name] = free[op.engine] = start + op.seconds
        busy[op.engine] += op.seconds
    return StepTime(max(end.values(), default=0.0), busy)


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

    def run_step(self, ops: list[Op]):
        """The detailed fidelity: a SimPy process per op; returns (as the process value) the
        step's StepTime."""
        env = self.env
        t0 = env.now
        done = {op.name: env.event() for op in ops}
        issued: dict[str, simpy.Event] = {}
        last_on: dict[str, simpy.Event] = {}
        busy = dict.fromkeys(ENGINES, 0.0)

        def run(op: Op, after: simpy.Event | None, mine: simpy.Event):
            deps = [done[d] for d in op.deps]
            if deps:
                yield env.all_of(deps)
            if after is not None and not after.triggered:
                yield after                         # in-order stream: the op issued before asks first
            with self.engines[op.engine].request() as req:
                mine.succeed()
                yield req
                yield env.timeout(op.seconds)
            busy[op.engine] += op.seconds
            done[op.name].succeed()

        for op in ops:
            mine = env.event()
            env.process(run(op, last_on.get(op.engine), mine))
            last_on[op.engine] = issued[op.name] = mine
        yield env.all_of(list(done.values()))
        for k, v in busy.items():
            self.busy[k] += v
        return StepTime(env.now - t0, busy)


def detailed(ops: list[Op]) -> StepTime:
    """Run one graph alone in a fresh environment (for tests and the speed benchmark)."""
    env = simpy.Environment()
    hw = Hardware(env, 1)
    p = env.process(hw.run_step(ops))
    env.run()
    return p.value
