"""Find a profile of *this* machine by fingerprint (what the simulator needs; measuring one at
first use is runtime/profile/first_use.py `ensure`).

Where: `<cache root>/profiles/` first (core/machine.py cache_root; first-use profiles are
written there as `<slug>-<fingerprint>.json`), then the repo's `profiles/`. A profile matches
when it is measured, of this schema, its `device.fingerprint` is this machine's, it has the
model, its kernel tables were timed on the code paths the runtime takes now (fused low-bit CPU
kernels, torch, CUDA: core/profile/schema.py current_code_path), and (for analysis.validate)
its grids cover what the points read (`Need`: the largest values, and the static points' exact
prompt lengths, batches and contexts as grid points). The committed CPU profile has no
fingerprint: it never matches, it predicts the machine it was measured on.

`simulator.run` only finds (`point_profile`: at the thread count its point describes, not the one
a launcher gave its worker; a multirun's parent resolves every point once, `hand_off`);
`analysis.validate` finds or measures (`ensure`).
docs/profiles.md says how profiles are found and when one is re-measured.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.machine import cache_root, fingerprint, machine_facts, resolve_device, this_fingerprint
from core.policies import spec_of
from core.provenance import REPO
from core.profile.schema import (SCHEMA_VERSION, ProfileError, bits_table, current_code_path, read,
                                 recorded_code_path, tables_of, validate)

REPO_PROFILES = REPO / "profiles"


@dataclass
class Need:
    """What a set of points reads from a model's tables: the largest batch (query rows), context
    and prefill tokens, the low-bit widths, whether RAG's tables are needed, and the exact values
    the static points read (`at_batch`: batch sizes and query rows; `at_context`: prompt + new
    tokens; `at_tokens`: prompt lengths). A first-use profile puts the exact values on its grids
    (runtime/profile/grids.py kernel_axes), so a point's own prompt length is timed, not read
    between two grid points; `covers` reuses a cached profile only when they are grid points."""
    batch: int = 1
    context: int = 1
    tokens: int = 1
    bits: set[int] = field(default_factory=set)
    rag: bool = False
    at_batch: set[int] = field(default_factory=set)
    at_context: set[int] = field(default_factory=set)
    at_tokens: set[int] = field(default_factory=set)

    def merge(self, o: "Need") -> "Need":
        return Need(max(self.batch, o.batch), max(self.context, o.context), max(self.tokens, o.tokens),
                    self.bits | o.bits, self.rag or o.rag, self.at_batch | o.at_batch,
                    self.at_context | o.at_context, self.at_tokens | o.at_tokens)

    def cover(self) -> dict:
        """kernel_axes' `cover`: the largest value each axis must reach, and (`at`) the exact
        values it must hold."""
        return {"batch": self.batch, "context": self.context, "tokens": self.tokens,
                "at": {"batch": sorted(self.at_batch), "context": sorted(self.at_context),
                       "tokens": sorted(self.at_tokens)}}

    def describe(self) -> str:
        at = "; ".join(f"{k} at {', '.join(map(str, sorted(v)))}" for k, v in
                       (("batch", self.at_batch), ("context", self.at_context), ("prefill", self.at_tokens)) if v)
        return (f"batch <= {self.batch}, context <= {self.context}, prefill <= {self.tokens} tokens"
                + (f", bits {sorted(self.bits)}" if self.bits else "") + (", RAG" if self.rag else "")
                + (f" ({at})" if at else ""))


def need_of(cfg) -> Need:
    """The Need of one composed simulate config (analysis.validate's simulator half). A static
    batch reads its own batch (and query rows), prompt length and context exactly; open
    arrivals batch and decode at whatever the scheduler makes of them: maxima only."""
    w, spec = cfg.workload, spec_of(cfg.policy, check=False)
    batch = int(w.batch) if w.arrival == "static" else int(min(w.n_requests, cfg.scheduler.max_batch))
    batch = min(batch, spec.requests_per_prefill() or batch)
    prompt, context = int(w.prompt_len), int(w.prompt_len) + int(w.gen_len)
    n = Need(spec.query_rows(batch), context, prompt, spec.profile_bits(), spec.reads_rag_tables())
    if w.arrival == "static":
        n.at_batch, n.at_context, n.at_tokens = {batch, spec.query_rows(batch)}, {context}, {prompt}
    return n


def _grid(k: dict, name: str, axis: str) -> list:
    return list(k[name]["axes"].get(axis, [])) if name in k and "axes" in k[name] else []


# the tables whose grids must hold a Need's exact values (kernel_axes puts them there), and those
# of the low-bit tables at the bits a Need reads (EXACT_IN_LOWBIT). decode_layer's contexts are
# whole-model steps, 1-3 s a point on the 2-core box: maxima only (read by the rule between
# them; a decode layer is linear in its context), its batches exact.
EXACT_IN = {"tokens": ("prefill_layer",), "batch": ("decode_layer", "decode_attention_full", "lm_head_sample"),
            "context": ("decode_attention_full",)}
EXACT_IN_LOWBIT = {"tokens": ("quantize",), "batch": ("decode_attention_kivi",), "context": ("decode_attention_kivi",)}


def coverage(prof: dict, model: str) -> Need | None:
    """What a profile's tables for `model` cover (None: it has no such model); its exact values
    are those a first-use profile was measured for (`models.<model>.first_use_at`, kept when it
    is re-measured for more)."""
    m = prof["models"].get(model)
    if m is None:
        return None
    k = m["kernels"]
    last = lambda name, axis: int(k[name]["axes"][axis][-1]) if name in k and axis in k[name]["axes"] else 1  # noqa: E731
    bits = {b for b in (1, 2, 4, 8) if bits_table("decode_attention_kivi", b) in k}
    at = m.get("first_use_at") or {}
    return Need(min(last("decode_layer", "batch"), last("decode_attention_full", "batch")),
                last("decode_attention_full", "context"), last("prefill_layer", "tokens"), bits,
                "selective_prefill" in k, {int(v) for v in at.get("batch", ())},
                {int(v) for v in at.get("context", ())}, {int(v) for v in at.get("tokens", ())})


def covers(prof: dict, model: str, need: Need | None, code_path=current_code_path) -> bool:
    """Whether `prof`'s tables for `model` serve `need`: they were timed on the code paths the
    runtime takes now (`code_path(device type, table)`, core/profile/schema.py
    current_code_path; a table without one reads as `torch`), reach its maxima, hold its exact
    values as grid points (EXACT_IN), and have its bit-widths (and RAG tables)."""
    m = prof["models"].get(model)
    if m is None:
        return False
    if not same_code_paths(prof, model, code_path):
        return False
    if need is None:
        return True
    k = m["kernels"]
    last = lambda name, axis: k[name]["axes"][axis][-1] if name in k and axis in k[name]["axes"] else -1  # noqa: E731
    if last("decode_layer", "batch") < need.batch or last("decode_layer", "context") < min(need.context, m["shape"]["max_seq_len"] - 64):
        return False
    if last("decode_attention_full", "batch") < need.batch or last("decode_attention_full", "context") < need.context:
        return False
    if last("prefill_layer", "tokens") < need.tokens or last("lm_head_sample", "batch") < need.batch:
        return False
    if any(bits_table("decode_attention_kivi", b) not in k for b in need.bits):
        return False
    at = {"batch": need.at_batch, "context": need.at_context, "tokens": need.at_tokens}
    for axis, names in EXACT_IN.items():
        want = {v for v in at[axis] if v <= m["shape"]["max_seq_len"]}     # kernel_axes' limit
        for name in names + tuple(bits_table(n, b) for n in EXACT_IN_LOWBIT[axis] for b in need.bits):
            if not want <= set(int(v) for v in _grid(k, name, axis)):
                return False
    # RAG recomputes up to ceil(r * N) + the question tokens: the m axis must reach the prompt
    return not need.rag or last("selective_prefill", "m") >= min(need.tokens, m["shape"]["max_seq_len"])


def same_code_paths(prof: dict, model: str, code_path=current_code_path) -> bool:
    """Every kernel table of `model` was timed on the path the runtime takes now for it
    (`code_path(device type, table)`); a table without `code_path` (schema < 3) reads as `torch`."""
    return not other_code_paths(prof, model, code_path)


def other_code_paths(prof: dict, model: str, code_path=current_code_path) -> list[str]:
    """'<table> <timed>, now <path>' for each kernel table of `model` timed on another path."""
    dev = prof.get("device", {}).get("type", "cpu")
    out = []
    for name, t in tables_of(prof["models"][model]["kernels"]):
        if recorded_code_path(t) != code_path(dev, name):
            out.append(f"{name} {recorded_code_path(t)}, now {code_path(dev, name)}")
    return out


def cache_dir(create: bool = False) -> Path:
    return cache_root(create) / "profiles"


def find(device: torch.device, model: str, need: Need | None = None, notes: list[str] | None = None,
         damaged: list[tuple[Path, str]] | None = None, threads: int | None = None) -> Path | None:
    """The first profile of this machine (cache, then repo) that has `model` and covers `need`.
    A cached file of this machine (its name or its `device.fingerprint` says so) that cannot be
    read, is of another schema or fails validation is skipped: one line in `notes` (the caller,
    first_use.ensure, re-measures it), and (path, why) in `damaged` (simulator.run refuses rather
    than predict from another machine's profile). Nothing here raises on a file's content.
    `threads`: the torch thread count the profile must have been measured with (part of the
    fingerprint; a simulation passes its point's, `point_threads`); None = this process's."""
    fp = this_fingerprint(device) if threads is None else fingerprint_at(device, threads)
    dirs = [cache_dir(), REPO_PROFILES]
    for d in dirs:
        for path in sorted(d.glob("*.json")) if d.is_dir() else []:
            cached = d == dirs[0]
            try:
                prof = read(path)
                dev = prof.get("device") if isinstance(prof, dict) else None
                if not isinstance(dev, dict) or dev.get("fingerprint") != fp:
                    if cached and fp in path.name:
                        raise ProfileError(f"{path}: named after this machine ({fp}) but "
                                           + ("not a profile (top level is not an object)" if not isinstance(prof, dict)
                                              else f"its device is {'null' if dev is None else 'not an object'}"
                                              if not isinstance(dev, dict) else
                                              f"its device.fingerprint is {dev.get('fingerprint')!r}"))
                    continue
                if prof.get("schema_version") != SCHEMA_VERSION:
                    raise ProfileError(f"{path}: schema_version {prof.get('schema_version')!r}, this code writes "
                                       f"{SCHEMA_VERSION}")
                validate(prof, path)
            except ProfileError as e:
                if cached:
                    why = str(e).splitlines()[0]
                    if notes is not None:
                        notes.append(f"cached profile of this machine is corrupt or stale ({why}); re-measuring")
                    if damaged is not None:
                        damaged.append((path, why))
                continue
            if model in prof["models"] and not same_code_paths(prof, model, current_code_path):
                if cached and notes is not None:
                    other = other_code_paths(prof, model)
                    notes.append(f"{path}: {len(other)} {model} table(s) timed on another code path than the runtime "
                                 f"takes now ({'; '.join(other[:3])}{'; ...' if len(other) > 3 else ''}); re-measuring")
                continue
            if covers(prof, model, need):
                return path
    return None


# ----------------------------------------------------------------------------- a point's threads; a sweep's hand-off

@functools.cache
def default_threads() -> int:
    """torch's default intra-op thread count on this machine: its physical cores within this
    process's CPU affinity (what `python -m runtime.profile` runs with when neither OMP_NUM_THREADS
    nor MKL_NUM_THREADS is set), whatever a launcher set for this worker process."""
    physical = machine_facts(torch.device("cpu")).get("physical_cores") or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    return max(1, min(int(physical), allowed))


def point_threads(threads) -> int:
    """The thread count a simulation point describes: hardware.threads, else `default_threads`."""
    return int(threads) if threads else default_threads()


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint_at(device: torch.device, threads: int) -> str:
    """This machine's fingerprint as a process with `threads` torch threads has it."""
    device = torch.device(device)
    key = (device.type, device.index, int(threads))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint({**machine_facts(device), "torch_threads": int(threads)})
    return _FINGERPRINTS[key]


# A multirun's parent resolves each point's profile once and hands the answers to its workers in
# this variable (JSON {point_key: path or null}); a worker's launcher may start it with one torch
# thread, on another machine, or without the parent's environment (Ray): then it looks up itself.
HANDOFF_ENV = "KVTESTBED_SWEEP_PROFILES"


def point_key(device: str, model: str, threads: int) -> str:
    return f"{device}|{model}|{int(threads)}|{cache_dir()}"


def hand_off(points) -> dict:
    """The parent of a multirun: `points` = (hardware.device, model, hardware.threads) of every point
    that looks its profile up; each distinct one resolved once (`find` at the point's thread count)
    and handed to the workers in HANDOFF_ENV. A point whose cached profile is damaged is not handed
    down (its worker refuses it). No points (a single run): the variable is cleared."""
    out: dict[str, str | None] = {}
    for device, model, threads in points:
        t = point_threads(threads)
        key = point_key(str(device), str(model), t)
        if key in out:
            continue
        damaged: list = []
        found = find(resolve_device(str(device)), str(model), damaged=damaged, threads=t)
        if found is not None or not damaged:
            out[key] = str(Path(found).resolve()) if found is not None else None
    if out:
        os.environ[HANDOFF_ENV] = json.dumps(out, sort_keys=True)
    else:
        os.environ.pop(HANDOFF_ENV, None)
    return out


def point_profile(device: str, model: str, threads=None, damaged: list | None = None) -> tuple[Path | None, int, str]:
    """(profile of this machine or None, the thread count looked up, where the answer came from:
    `sweep` = the multirun's parent, `lookup` = here) for a simulation point on hardware.device
    `device`: the parent's answer when one was handed down (and its file is still there), else
    `find` at the point's thread count (hardware.threads, else `default_threads`), never this
    process's own."""
    t = point_threads(threads)
    got = handed_down(device, model, t)
    if got is not None and (got[0] is None or got[0].is_file()):
        return got[0], t, "sweep"
    return find(resolve_device(str(device)), str(model), damaged=damaged, threads=t), t, "lookup"


def handed_down(device: str, model: str, threads=None) -> tuple[Path | None] | None:
    """(the profile a multirun's parent resolved for this point, or None for none,) or None when
    it handed nothing down for it."""
    try:
        handed = json.loads(os.environ.get(HANDOFF_ENV) or "{}")
    except ValueError:
        return None
    key = point_key(str(device), str(model), point_threads(threads))
    if not isinstance(handed, dict) or key not in handed:
        return None
    return (Path(str(handed[key])) if handed[key] else None,)
