"""Where a step's time goes: the phase names both halves report, and the one `phases` schema.

One declaration, read by the runtime (runtime/phases.py times them), the simulator (each op of a
twin's step graph carries one of these phases; simulator/hardware.py attributes the step's
critical path to them) and analysis.validate (puts them side by side).

Stages: a `prefill` step (the prompt pass, up to the first token) and a `decode` step (one token
per running request).

Phases (summed over layers), the names of the simulator's op graphs:

    overhead   per step, outside the layers and the LM head: embedding, RoPE tables, Python,
               the engine loop, reading the token back
    layer      a decoder layer's own compute (split into PARTS below)
    score      SpeCache: low-bit scores of the query against the quantized keys + the top-k
    select     RAG: choosing which chunk tokens to recompute (the selector)
    fetch      K/V coming *to* the device that compute waits for: offload's layer fetch,
               SpeCache's top-k gather and copy (on a link: the wait for it)
    back       K/V going back to the host during decode (the new token's rows)
    store      K/V written during prefill beyond the plain cache write: offload's / SpeCache's
               host store, KIVI's quantize-and-pack
    load       RAG: reused chunk K/V loaded into the cache (placing them)
    rerotate   RAG: re-rotating reused keys to their new positions
    lm_head    final norm, vocabulary projection and sampling

Parts of `layer` (PARTS), the finer split both halves report when a miss needs it:

    projections  the q/k/v and output projections (+ RoPE)
    attention    the policy's attention over the cache (minus any named phase above)
    mlp          the SwiGLU MLP
    other        norms, residual adds and glue between them

A stage's record (`phases.<stage>` in a result JSON):

    {"steps": n, "step_s": mean seconds of one step,
     "phases": {<phase>: {"s": mean seconds per step, "share": s / step_s}, ...,
                "unaccounted": {"s": step_s - sum(phases), "share": ...}},
     "parts": {<part>: {"s": ..., "share": ... (of the step)}}}

Only phases that occurred are listed (a phase absent = 0 s). The measured record's
`unaccounted` is the step's wall time minus its timed phases; the predicted one is 0 by
construction (the critical path is fully attributed).
"""
from __future__ import annotations

import math
import re

STAGES = ("prefill", "decode")
PHASES = ("overhead", "layer", "score", "select", "fetch", "back", "store", "load", "rerotate", "lm_head")
PARTS = ("projections", "attention", "mlp", "other")
UNACCOUNTED = "unaccounted"

_TRAILING = re.compile(r"\d+(_next)?$")


def phase_of(op_name: str) -> str:
    """The phase of a simulator op named `<phase><layer>` (`layer3`, `fetch0_next`, `store12`),
    or a plain phase name; anything else (e.g. `load_features`) by its prefix before `_`."""
    base = _TRAILING.sub("", op_name)
    if base in PHASES:
        return base
    head = base.split("_", 1)[0]
    if head in PHASES:
        return head
    raise ValueError(f"op {op_name!r} maps to no phase of core/phases.py PHASES {PHASES}")


def stage_record(totals: dict[str, float], step_s_total: float, steps: int,
                 parts: dict[str, float] | None = None) -> dict:
    """A stage's `phases` record from totals over `steps` steps: `totals` {phase: seconds summed
    over steps}, `step_s_total` the steps' wall seconds summed, `parts` {part: seconds summed}."""
    if steps <= 0:
        return {"steps": 0, "step_s": math.nan, "phases": {}, "parts": {}}
    step = step_s_total / steps
    share = (lambda s: s / step) if step > 0 else (lambda s: math.nan)
    unknown = set(totals) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; declared: {PHASES}")
    ph = {p: totals[p] / steps for p in PHASES if p in totals}
    out = {p: {"s": v, "share": share(v)} for p, v in ph.items()}
    un = step - sum(ph.values())
    out[UNACCOUNTED] = {"s": un, "share": share(un)}
    prt = {}
    for p in PARTS:
        if parts and p in parts:
            v = parts[p] / steps
            prt[p] = {"s": v, "share": share(v)}
    return {"steps": int(steps), "step_s": step, "phases": out, "parts": prt}


def empty_totals() -> dict:
    """A stage's running totals: {"steps", "step_s" (wall seconds summed), "phases", "parts"
    ({name: seconds summed over steps})}, the input of `stage_record`."""
    return {"steps": 0, "step_s": 0.0, "phases": {}, "parts": {}}


def add_totals(acc: dict, steps: int, step_s: float, phases: dict, parts: dict) -> dict:
    """Add steps (their count, wall seconds and per-name seconds) into a stage's totals."""
    acc["steps"] += steps
    acc["step_s"] += step_s
    for key, new in (("phases", phases), ("parts", parts)):
        for p, s in new.items():
            acc[key][p] = acc[key].get(p, 0.0) + s
    return acc


def phases_csv(csv):
    """`<experiment>.phases.csv` beside a validation CSV `<experiment>.csv` (a pathlib.Path)."""
    return csv.with_name(csv.stem + ".phases.csv")


def columns(record: dict | None, side: str) -> dict[str, float]:
    """Flat CSV columns of a result's `phases` (None / {} -> no columns): `<side>_phase_<stage>_<p>_s`
    for every phase, `unaccounted` and part, plus `<side>_phase_<stage>_step_s`. `side` is
    `measured` or `predicted`."""
    out: dict[str, float] = {}
    for stage in STAGES:
        st = (record or {}).get(stage) or {}
        if not st:
            continue
        out[f"{side}_phase_{stage}_step_s"] = float(st.get("step_s", math.nan))
        for p, v in (st.get("phases") or {}).items():
            out[f"{side}_phase_{stage}_{p}_s"] = float(v["s"])
        for p, v in (st.get("parts") or {}).items():
            out[f"{side}_phase_{stage}_part_{p}_s"] = float(v["s"])
    return out
