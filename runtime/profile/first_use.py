"""A profile of *this* machine, found (core/profile/lookup.py `find`) or else measured at first
use, over grids covering what the points read, and cached (`ensure`, for analysis.validate;
simulator.run only finds). Why a first-use profile and its speed bracket: docs/profiles.md.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from core.machine import PROFILE_SPEED_DRIFT, device_facts, speed_moved, this_fingerprint
from core.profile.lookup import Need, cache_dir, coverage, find
from core.profile.schema import validate
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
    neighbour started or stopped), so it is measured once more; when that one moves too, or the
    index ends more than 20% below the fastest it read (the machine stayed slowed: a second
    bracket that starts slowed would not see it), it is used for this run only (a temporary
    file, one line says so) and nothing is cached. The measurement and the write hold the cache
    entry's lock (measure.entry_lock): a second ensure of the same entry waits, then finds the
    first's profile."""
    notes: list[str] = []
    path = find(device, model, need, notes)
    for n in notes:
        print(f"{prog}: {n}", file=sys.stderr)
    if path is not None:
        return path
    out = cached_path(device)           # checks the cache folder is writable before measuring
    unwritable = f"cache folder {out.parent} is not writable ({{why}}); set KVTESTBED_CACHE"
    with measure.entry_lock(out, prog, unwritable):
        path = find(device, model, need)            # measured by another process while this one waited
        if path is not None:
            print(f"{prog}: using {path}, profiled by another process meanwhile", file=sys.stderr)
            return path
        return _measure(device, model, need, out, prog, progress, quick, repeats, unwritable)


def _measure(device: torch.device, model: str, need: Need, out: Path, prog: str, progress: bool, quick: bool,
             repeats: int, unwritable: str) -> Path:
    """ensure's measurement, under the cache entry's lock: the speed-bracketed profile, merged
    into `out` (every other model's tables kept, those of a damaged file that validate alone
    included) or, when the speed index moved twice, a temporary file."""
    existing = measure.kept_models(out, this_fingerprint(device), prog)
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
    b = brackets[-1]
    fastest = max([brackets[0]["before"]] + [x["after"] for x in brackets])
    why = (f"the speed index moved again (x{b['after'] / b['before']:.2f}) during the second profile"
           if speed_moved(b["before"], b["after"]) else
           f"the machine stayed slowed (speed index x{b['after'] / fastest:.2f} of the {fastest:.0f} it reached)"
           if speed_moved(fastest, b["after"]) else None)
    if why is not None:                 # never cached: a profile of a machine slowed under it
        tmp = Path(tempfile.mkdtemp(prefix="kvtestbed-profile-")) / out.name
        write_json_atomic(tmp, prof)
        print(f"{prog}: {why}; using it for this run only, not cached: {tmp}", file=sys.stderr)
        return tmp
    measure.write_profile(out, prof, unwritable, prog)
    print(f"{prog}: profiled this machine in {time.perf_counter() - t:.0f} s -> {out}", file=sys.stderr)
    return out
