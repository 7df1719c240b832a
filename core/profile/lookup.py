"""Find a profile of *this* machine by fingerprint (what the simulator needs; measuring one at
first use is runtime/profile/lookup.py `ensure`).

Where: `<cache root>/profiles/` first (core/machine.py cache_root; first-use profiles are
written there as `<slug>-<fingerprint>.json`), then the repo's `profiles/`. A profile matches
when it is measured, of this schema, its `device.fingerprint` is this machine's, it has the
model, and (for analysis.validate) its grids cover what the points read (`Need`). The committed
CPU profile has no fingerprint: it never matches, it predicts the machine it was measured on.

`simulator.run` only finds (`find`); `analysis.validate` finds or measures (`ensure`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.machine import cache_root, this_fingerprint
from core.policies import spec_of
from core.provenance import REPO
from core.profile.schema import SCHEMA_VERSION, ProfileError, bits_table, validate

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
    w, spec = cfg.workload, spec_of(cfg.policy, check=False)
    batch = int(w.batch) if w.arrival == "static" else int(min(w.n_requests, cfg.scheduler.max_batch))
    batch = min(batch, spec.requests_per_prefill() or batch)
    return Need(spec.query_rows(batch), int(w.prompt_len) + int(w.gen_len), int(w.prompt_len), spec.profile_bits(),
                spec.reads_rag_tables())


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
    # RAG recomputes up to ceil(r * N) + the question tokens: the m axis must reach the prompt
    return not need.rag or last("selective_prefill", "m") >= min(need.tokens, m["shape"]["max_seq_len"])


def cache_dir(create: bool = False) -> Path:
    return cache_root(create) / "profiles"


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
