"""A profile of *this* machine, found (core/profile/lookup.py `find`) or else measured at first
use, over grids covering what the points read, and cached (`ensure`, for analysis.validate;
simulator.run only finds). Why a first-use profile and its speed bracket: docs/profiles.md.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.machine import PROFILE_SPEED_DRIFT, device_facts, speed_moved, this_fingerprint
from core.profile.lookup import Need, cache_dir, coverage, find
from core.profile.schema import SCHEMA_VERSION, ProfileError, validate
from core.results import write_json_atomic

from . import measure
from .grids import model_args
from .speed import speed_index


def cached_path(device: torch.device) -> Path:
    """This machine's file in the user's profile cache (the folder is created)."""
    f = device_facts(device)
    d = cache_dir(create=True)
    d.mkdir(exist_ok=True)
    return d / f"{f['slug']}-{f['fingerprint']}.json"


def speed_now(device: torch.device, shape: dict) -> float:
    """This machine's speed index now (speed.py), after an untimed probe: the first probe of a
    process reads ~20% slow (lazy initialisation), as much as the bracket allows."""
    speed_index(device, shape, reps=3)
    return float(speed_index(device, shape)["index"])


def ensure(device: torch.device, model: str, need: Need, prog: str = "analysis.validate", progress: bool = True,
           quick: bool = True, repeats: int = 5) -> Path:
    """find(), else measure a profile of this machine for `model` over grids covering `need`
    (quick grids extended, the points' exact values inserted: runtime/profile/grids.py kernel_axes),
    write it atomically to the cache (other models already in that file are kept) and say so in
    one line.

    The measurement is bracketed by the speed index (speed.py; the profile's own, taken at its
    end, is the bracket's after): when after / before moved by more than
    PROFILE_SPEED_DRIFT (20%, either way), the machine changed speed while it was measured (a
    neighbour started or stopped), so it is measured once more; when that one moves too it is
    used for this run only (a temporary file, one line says so) and nothing is cached."""
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
    args = model_args(model)
    shape = {**vars(args), "head_dim": args.head_dim}
    t = time.perf_counter()
    before = speed_now(device, shape)
    brackets = []
    for attempt in (1, 2):
        with torch.inference_mode():
            prof = measure.measured_profile([model], quick, device, repeats, existing, cover=need.cover(),
                                            bits=tuple(sorted(need.bits | {2})), rag=need.rag, progress=progress)
        after = float((prof.get("speed_index") or {}).get("index") or speed_now(device, shape))
        brackets.append({"before": before, "after": after, "after_over_before": after / before if before else None})
        if not speed_moved(before, after):
            break
        if attempt == 1:
            print(f"{prog}: this machine's speed index moved x{after / before:.2f} while it was profiled "
                  f"({before:.0f} -> {after:.0f}; more than {PROFILE_SPEED_DRIFT:.0%}): measuring it again",
                  file=sys.stderr)
        before = after                  # the second bracket starts where the first ended
    prof["provenance"]["wall_s"] = round(time.perf_counter() - t, 1)
    prof["provenance"]["first_use"] = {"for": prog, "need": need.describe(), "speed_brackets": brackets}
    prof["models"][model]["first_use_at"] = need.cover()["at"]      # coverage() keeps them on a re-measure
    validate(prof, out)
    if speed_moved(brackets[-1]["before"], brackets[-1]["after"]):
        tmp = Path(tempfile.mkdtemp(prefix="kvtestbed-profile-")) / out.name
        write_json_atomic(tmp, prof)
        b = brackets[-1]
        print(f"{prog}: the speed index moved again (x{b['after'] / b['before']:.2f}) during the second profile; "
              f"using it for this run only, not cached: {tmp}", file=sys.stderr)
        return tmp
    measure.write_profile(out, prof, f"cache folder {out.parent} is not writable ({{why}}); set KVTESTBED_CACHE")
    print(f"{prog}: profiled this machine in {time.perf_counter() - t:.0f} s -> {out}", file=sys.stderr)
    return out
