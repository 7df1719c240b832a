"""Where a runtime step's time goes: a lap timer in core/phases.py's names.

    timer = PhaseTimer(device, spans=timeline)       # one per run
    with timer.step() as rec:                         # the engine: one prefill or decode step
        ...                                           # model.py / runtime/kv/*.py: phases.lap("mlp")
    log.add("decode", rec, ts, t_now)                 # rec.phases, rec.parts: seconds of this step

`lap(name)` attributes the time since the previous lap (or the step's start) to `name`, a phase of
core.phases.PHASES or a part of core.phases.PARTS. The laps tile the step: whatever runs between
two laps (Python glue included) belongs to the second one, and the step's last lap (`overhead`,
taken when the step's context closes) ends it. `layer` is never lapped itself: it is the sum of
the parts (projections + attention + mlp + other), so the two always agree.

The laps are module functions reading a module-level current timer (set by `PhaseTimer.step` for
the duration of one step), so the model and the KV policies time themselves without a timer in
their signatures; with no step open, `lap` is one global read and returns.

Clocks: on CPU `time.perf_counter` (torch's CPU ops run to completion on the calling thread, so
the host clock is the op's time). On CUDA each lap records a `torch.cuda.Event(enable_timing=True)`
on the current stream, and the events are resolved (`elapsed_time`) once, when the step closes,
after the engine's own synchronisation: no host sync and no profiler in the loop; a lap's seconds
are then the GPU stream's progress between two laps.

With `spans=True` (the `timeline` switch) a step also keeps every lap as (name, start, end), the
model's layer groups, and the emulated link's copies (runtime/transfer.py), for `chrome_trace`.
What the phases mean and how to read them: docs/validation.md.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from core.phases import PARTS, PHASES, add_totals, empty_totals

_PARTS = frozenset(PARTS)
_KNOWN = frozenset(PHASES) | _PARTS
_now = time.perf_counter

_current: "PhaseTimer | None" = None    # the timer of the step in progress, if any


# ----------------------------------------------------------------------------- what the code calls

def lap(name: str) -> None:
    """The time since the previous lap goes to `name` (a phase or a part); no-op outside a step."""
    t = _current
    if t is not None:
        t.lap(name)


def mark() -> int:
    """Where a group of laps starts (for `group`); 0 when no step is open or spans are off."""
    t = _current
    return t.n_laps if t is not None and t.spans else 0


def group(name: str, since: int) -> None:
    """The laps from `since` (a `mark()`) to now form one span `name` on the timeline (a layer)."""
    t = _current
    if t is not None and t.spans:
        t.groups.append((name, since, t.n_laps))


def copy_span(start: float, end: float, nbytes: int) -> None:
    """A link copy occupying [start, end] (perf_counter seconds), for the timeline's h2d / d2h
    tracks. Its direction is the phase of the lap that closes the interval it was issued in
    (`fetch` -> h2d, `back` / `store` -> d2h)."""
    t = _current
    if t is not None and t.spans:
        t.copies.append((start, end, nbytes, t.n_laps))


def active() -> bool:
    return _current is not None


@contextmanager
def suspended():
    """No laps inside (a nested model run, e.g. a RAG selector's draft layers, stays in the lap
    that closes after it instead of being taken for the step's own layers)."""
    global _current
    prev, _current = _current, None
    try:
        yield
    finally:
        _current = prev


# ----------------------------------------------------------------------------- the timer

@dataclass
class StepTimes:
    """One step's laps, summed: phases (with `layer` = sum of parts) and parts, in seconds."""
    phases: dict[str, float]
    parts: dict[str, float]
    t0: float                                  # the timer's own window, perf_counter seconds
    t1: float
    laps: list = field(default_factory=list)    # spans: (name, start, end)
    groups: list = field(default_factory=list)  # spans: (name, start, end) of a layer's laps
    copies: list = field(default_factory=list)  # spans: (track, start, end, bytes)

    @property
    def timed_s(self) -> float:
        return sum(self.phases.values())


class PhaseTimer:
    """Laps of one run's steps on `device` (CPU: perf_counter; CUDA: events)."""

    enabled = True

    def __init__(self, device: torch.device | str | None = None, *, spans: bool = False):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.spans = bool(spans)
        self._pool: list = []                  # CUDA events, reused across steps
        self._reset()

    def _reset(self) -> None:
        self.acc: dict[str, float] = {}
        self.n_laps = 0
        self.groups: list = []
        self.copies: list = []
        self._laps: list = []                  # CPU + spans: (name, t0, t1); CUDA: (name, event)

    def _event(self):
        ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))    # the model's stream (the link has its own)
        return ev

    def lap(self, name: str) -> None:
        if self.cuda:
            self._laps.append((name, self._event()))
            self.n_laps += 1
            return
        now = _now()
        self.acc[name] = self.acc.get(name, 0.0) + (now - self._t)
        if self.spans:
            self._laps.append((name, self._t, now))
            self.n_laps += 1
        self._t = now

    @contextmanager
    def step(self):
        """Open a step: the laps inside are this timer's; on a normal exit the last lap
        (`overhead`) closes it and the yielded holder's `.times` is the step's StepTimes."""
        global _current
        holder = _Holder()
        prev = _current
        self._reset()
        self._t = self._t0 = _now()
        self._ev0 = self._event() if self.cuda else None
        _current = self
        try:
            yield holder
            self.lap("overhead")
            holder.times = self._resolve()
        finally:
            _current = prev

    def _resolve(self) -> StepTimes:
        t_end = _now()
        if self.cuda:
            laps = self._resolve_cuda()
            acc: dict[str, float] = {}
            for name, a, b in laps:
                acc[name] = acc.get(name, 0.0) + (b - a)
        else:
            laps, acc = self._laps, self.acc
        unknown = set(acc) - _KNOWN
        if unknown:
            raise ValueError(f"laps {sorted(unknown)} are neither phases {PHASES} nor parts {PARTS} (core/phases.py)")
        parts = {p: s for p, s in acc.items() if p in _PARTS}
        phases = {p: s for p, s in acc.items() if p not in _PARTS}
        if parts:
            phases["layer"] = phases.get("layer", 0.0) + sum(parts.values())
        out = StepTimes(phases, parts, self._t0, t_end)
        if self.spans:
            out.laps = list(laps)
            out.groups = [(name, laps[lo][1], laps[hi - 1][2]) for name, lo, hi in self.groups if hi > lo]
            out.copies = [(_track(laps[i][0] if i < len(laps) else ""), a, b, n) for a, b, n, i in self.copies]
        return out

    def _resolve_cuda(self) -> list[tuple[str, float, float]]:
        """Event times -> (name, start, end) on the host clock, from the step's first event
        (recorded after the previous step's sync, so GPU and host agree there)."""
        last = self._laps[-1][1]
        last.synchronize()                      # the engine has synced; this returns at once
        out, prev, t = [], self._ev0, self._t0
        for name, ev in self._laps:
            dt = prev.elapsed_time(ev) / 1e3
            out.append((name, t, t + dt))
            t += dt
            prev = ev
        self._pool += [self._ev0] + [ev for _, ev in self._laps]
        return out


class NullTimer:
    """phases=false: a step that times nothing (its holder's `.times` stays None)."""

    enabled = False
    spans = False

    @contextmanager
    def step(self):
        yield _Holder()


class _Holder:
    times: StepTimes | None = None


def make_timer(device, phases: bool = True, timeline: bool = False):
    """The timer a run's switches ask for: PhaseTimer (keeping spans for a timeline), or NullTimer
    when `phases` is off (no laps at all; a timeline then shows the steps without their phases)."""
    return PhaseTimer(device, spans=timeline) if phases else NullTimer()


def _track(phase: str) -> str:
    return "h2d" if phase in ("fetch", "load") else "d2h" if phase in ("back", "store") else "link"


# ----------------------------------------------------------------------------- per-stage totals

def add_times(stage: dict, times: StepTimes, wall_s: float, *, new_step: bool = True) -> None:
    """Add one step's laps to a stage's totals ({"steps", "step_s", "phases", "parts"}, seconds
    summed over steps; `step_s` the steps' wall seconds). new_step=False: more of the same step
    (RAG's pipeline before the engine's part of its prefill)."""
    add_totals(stage, int(new_step), wall_s, times.phases, times.parts)


class PhaseLog:
    """A run's phase totals per stage (the `phases` of a BatchResult) and, with a timeline, every
    step's window and laps."""

    def __init__(self, timeline: bool = False):
        self.stages: dict[str, dict] = {}
        self.steps: list[dict] | None = [] if timeline else None

    def add(self, stage: str, holder, t0: float, t1: float, **args) -> None:
        """Step [t0, t1] (the engine's clock) of `stage`, timed in `holder.times` (None: untimed)."""
        times = getattr(holder, "times", holder)
        if times is not None:
            add_times(self.stages.setdefault(stage, empty_totals()), times, t1 - t0)
        if self.steps is not None:
            self.steps.append({"stage": stage, "t0": t0, "t1": t1, "times": times, "args": args})

    def totals(self) -> dict:
        return {st: {**v, "phases": dict(v["phases"]), "parts": dict(v["parts"])} for st, v in self.stages.items()}


# ----------------------------------------------------------------------------- the timeline

TRACKS = {"compute": 1, "h2d": 2, "d2h": 3, "link": 4}
PID = 1


def _us(t: float, origin: float) -> float:
    return round((t - origin) * 1e6, 3)


def chrome_trace(steps: list[dict], *, origin: float | None = None, requests: list[dict] | None = None,
                 name: str = "kvtestbed runtime") -> dict:
    """A Chrome trace-event JSON ({"traceEvents": [...], "displayTimeUnit": "ms"}) of a run.

    steps: PhaseLog.steps (perf_counter seconds). Each step is a complete event ("ph": "X") on
    the `compute` track, its layer groups and laps nested inside it (clamped to the step's window:
    the timer's own clock reads sit a few microseconds inside or outside the engine's), and the
    emulated link's copies on the `h2d` / `d2h` tracks. requests: [{"id", "arrival_s", "done_s",
    and optional "admitted_s", "first_token_s"}] in seconds on the same clock minus `origin`: an
    async span ("b"/"e", id = request id) each, with instants ("n") where admitted and at its first
    token. origin: the time shown as 0 (default: the first step's start)."""
    if origin is None:
        origin = steps[0]["t0"] if steps else 0.0
    ev: list[dict] = [{"name": "process_name", "ph": "M", "pid": PID, "args": {"name": name}}]
    used = {"compute"} | {c[0] for s in steps if s["times"] is not None for c in s["times"].copies}
    for track, tid in TRACKS.items():
        if track in used:
            ev.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": track}})
            ev.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
    counts: dict[str, int] = {}
    for s in steps:
        stage, t0, t1, times = s["stage"], s["t0"], s["t1"], s["times"]
        i = counts[stage] = counts.get(stage, -1) + 1
        args = {"stage": stage, "step": i, "wall_ms": round((t1 - t0) * 1e3, 4), **s.get("args", {})}
        if times is not None:
            args["phases_ms"] = {p: round(v * 1e3, 4) for p, v in times.phases.items()}
            args["unaccounted_ms"] = round((t1 - t0 - times.timed_s) * 1e3, 4)
        ev.append({"name": f"{stage} {i}", "cat": "step", "ph": "X", "pid": PID, "tid": TRACKS["compute"],
                   "ts": _us(t0, origin), "dur": round((t1 - t0) * 1e6, 3), "args": args})
        if times is None:                      # phases=false: the step alone
            continue
        spans = [(n, a, b, "layer") for n, a, b in times.groups] + \
                [(n, a, b, "part" if n in _PARTS else "phase") for n, a, b in times.laps]
        for n, a, b, cat in spans:
            a, b = max(a, t0), min(b, t1)
            if b > a:
                ev.append({"name": n, "cat": cat, "ph": "X", "pid": PID, "tid": TRACKS["compute"],
                           "ts": _us(a, origin), "dur": round((b - a) * 1e6, 3)})
        for track, a, b, nbytes in times.copies:
            ev.append({"name": f"copy {nbytes} B", "cat": "copy", "ph": "X", "pid": PID, "tid": TRACKS[track],
                       "ts": _us(a, origin), "dur": round((b - a) * 1e6, 3), "args": {"bytes": nbytes}})
    for r in requests or []:
        rid = int(r["id"])
        base = {"cat": "request", "name": f"request {rid}", "id": rid, "pid": PID}
        ev.append({**base, "ph": "b", "ts": _us(r["arrival_s"], 0.0),
                   "args": {k: r[k] for k in ("prompt_len", "gen_len") if k in r}})
        for key, label in (("admitted_s", "admitted"), ("first_token_s", "first token")):
            if r.get(key) is not None and not math.isnan(r[key]):
                ev.append({**base, "ph": "n", "name": label, "ts": _us(r[key], 0.0)})
        ev.append({**base, "ph": "e", "ts": _us(r["done_s"], 0.0)})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}
