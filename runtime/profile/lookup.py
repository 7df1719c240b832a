"""A profile of *this* machine: found by fingerprint, or measured at first use and cached.

Where: `<cache root>/profiles/` first (runtime/machine.py cache_root; first-use profiles are
written there as `<slug>-<fingerprint>.json`), then the repo's `profiles/`. A profile matches
when it is measured, of this schema, its `device.fingerprint` is this machine's, it has the
model, and (for analysis.validate) its grids cover what the points read (`Need`). The committed
CPU profile has no fingerprint: it never matches, it predicts the machine it was measured on.

`simulator.run` only finds (`find`); `analysis.validate` finds or measures (`ensure`).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..machine import cache_root, this_fingerprint
from ..provenance import REPO
from .schema import SCHEMA_VERSION, ProfileError, bits_table, validate

REPO_PROFILES = REPO / "profiles"


@dataclass
class Need:
    """What a set of points reads from a model's tables: the largest batch (query rows), context
    and prefill tokens, the low-bit widths, and whether RAG's tables are needed."""
    batch: int = 1
    context: int = 1
    tokens: int = 1
    bits: set[int] = field(default_factory=set)
    rag: bool = False

    def merge(self, o: "Need") -> "Need":
        return Need(max(self.batch, o.batch), max(self.context, o.context), max(self.tokens, o.tokens),
                    self.bits | o.bits, self.rag or o.rag)

    def cover(self) -> dict:
        return {"batch": self.batch, "context": self.context, "tokens": self.tokens}

    def describe(self) -> str:
        return (f"batch <= {self.batch}, context <= {self.context}, prefill <= {self.tokens} tokens"
                + (f", bits {sorted(self.bits)}" if self.bits else "") + (", RAG" if self.rag else ""))


def need_of(cfg) -> Need:
    """The Need of one composed simulate config (analysis.validate's simulator half)."""
    w, p = cfg.workload, cfg.policy
    batch = int(w.batch) if w.arrival == "static" else int(min(w.n_requests, cfg.scheduler.max_batch))
    if p.name == "rag":
        batch = 1
    rows = 2 * batch if p.name == "specache" and p.get("prefetch") and p.get("k", 0) > 0 else batch
    bits = {int(p.bits)} if p.name in ("kivi", "specache") else set()
    return Need(rows, int(w.prompt_len) + int(w.gen_len), int(w.prompt_len), bits, p.name == "rag")


def coverage(prof: dict, model: str) -> Need | None:
    """What a profile's tables for `model` cover (None: it has no such model)."""
    m = prof["models"].get(model)
    if m is None:
        return None
    k = m["kernels"]
    last = lambda name, axis: int(k[name]["axes"][axis][-1]) if name in k and axis in k[name]["axes"] else 1  # noqa: E731
    bits = {b for b in (1, 2, 4, 8) if bits_table("decode_attention_kivi", b) in k}
    return Need(min(last("decode_layer", "batch"), last("decode_attention_full", "batch")),
                last("decode_attention_full", "context"), last("prefill_layer", "tokens"), bits,
                "selective_prefill" in k)


def covers(prof: dict, model: str, need: Need | None) -> bool:
    m = prof["models"].get(model)
    if m is None:
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
    return not need.rag or "selective_prefill" in k


def cache_dir(create: bool = False) -> Path:
    return cache_root(create) / "profiles"


def cached_path(device: torch.device) -> Path:
    from .measure import device_facts

    f = device_facts(device)
    d = cache_dir(create=True)
    d.mkdir(exist_ok=True)
    return d / f"{f['slug']}-{f['fingerprint']}.json"


def find(device: torch.device, model: str, need: Need | None = None, notes: list[str] | None = None) -> Path | None:
    """The first profile of this machine (cache, then repo) that has `model` and covers `need`.
    A cached file named after this fingerprint that is corrupt or of another schema is skipped,
    with a line in `notes` (the caller re-measures it)."""
    fp = this_fingerprint(device)
    dirs = [cache_dir(), REPO_PROFILES]
    for d in dirs:
        for path in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                prof = json.loads(path.read_text())
                if not isinstance(prof, dict) or prof.get("device", {}).get("fingerprint") != fp:
                    if d == dirs[0] and fp in path.name and notes is not None:
                        notes.append(f"{path} is not a profile of this machine's schema ({SCHEMA_VERSION}); re-measuring")
                    continue
                if prof.get("schema_version") != SCHEMA_VERSION:
                    if notes is not None:
                        notes.append(f"{path}: schema_version {prof.get('schema_version')!r}, this code writes "
                                     f"{SCHEMA_VERSION}; re-measuring")
                    continue
                validate(prof, path)
            except (OSError, json.JSONDecodeError, ProfileError) as e:
                if d == dirs[0] and notes is not None:
                    why = str(e).splitlines()[0] if isinstance(e, ProfileError) else f"{type(e).__name__}: {e}"
                    notes.append(f"cached profile {path} is corrupt ({why}); re-measuring")
                continue
            if covers(prof, model, need):
                return path
    return None


def ensure(device: torch.device, model: str, need: Need, prog: str = "analysis.validate", progress: bool = True,
           quick: bool = True, repeats: int = 5) -> Path:
    """find(), else measure a profile of this machine for `model` over grids covering `need`
    (quick grids extended, runtime.profile.measure.kernel_axes), write it atomically to the
    cache (other models already in that file are kept) and say so in one line."""
    from ..results import write_json_atomic
    from .__main__ import measured_profile

    notes: list[str] = []
    path = find(device, model, need, notes)
    for n in notes:
        print(f"{prog}: {n}", file=sys.stderr)
    if path is not None:
        return path
    out = cached_path(device)           # checks the cache folder is writable before measuring
    existing = None
    if out.is_file():
        try:
            existing = validate(json.loads(out.read_text()), out)
        except (OSError, json.JSONDecodeError, ProfileError):
            existing = None
        if existing is not None and (existing.get("schema_version") != SCHEMA_VERSION
                                     or existing["device"].get("fingerprint") != this_fingerprint(device)):
            existing = None
    had = coverage(existing, model) if existing is not None else None
    if had is not None:                 # what the cached tables covered stays covered (no ping-pong)
        need = need.merge(had)
    print(f"{prog}: no profile of this machine ({this_fingerprint(device)}) for model={model} covering "
          f"{need.describe()}; measuring one (quick grids)", file=sys.stderr)
    t = time.perf_counter()
    with torch.inference_mode():
        prof = measured_profile([model], quick, device, repeats, existing, cover=need.cover(),
                                bits=tuple(sorted(need.bits | {2})), rag=need.rag, progress=progress)
    prof["provenance"]["wall_s"] = round(time.perf_counter() - t, 1)
    prof["provenance"]["first_use"] = {"for": prog, "need": need.describe()}
    validate(prof, out)
    try:
        write_json_atomic(out, prof)
    except OSError as e:
        raise ConfigError(f"cache folder {out.parent} is not writable ({e.strerror}); set KVTESTBED_CACHE") from None
    print(f"{prog}: profiled this machine in {time.perf_counter() - t:.0f} s -> {out}", file=sys.stderr)
    return out
