"""A profile of *this* machine, found (core/profile/lookup.py) or measured at first use and cached.

`simulator.run` only finds (`find`); `analysis.validate` finds or measures (`ensure`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from core.errors import ConfigError
from core.machine import this_fingerprint
from core.profile.lookup import (REPO_PROFILES, Need, cache_dir, coverage, covers, find,  # noqa: F401
                                 need_of)
from core.profile.schema import SCHEMA_VERSION, ProfileError, validate


def cached_path(device: torch.device) -> Path:
    from .measure import device_facts

    f = device_facts(device)
    d = cache_dir(create=True)
    d.mkdir(exist_ok=True)
    return d / f"{f['slug']}-{f['fingerprint']}.json"


def ensure(device: torch.device, model: str, need: Need, prog: str = "analysis.validate", progress: bool = True,
           quick: bool = True, repeats: int = 5) -> Path:
    """find(), else measure a profile of this machine for `model` over grids covering `need`
    (quick grids extended, runtime.profile.measure.kernel_axes), write it atomically to the
    cache (other models already in that file are kept) and say so in one line."""
    from core.results import write_json_atomic
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
