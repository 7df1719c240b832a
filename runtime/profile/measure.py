"""What `python -m runtime.profile` measures, put together into one profile of this machine:
the device (core/machine.py), transfers (transfers.py), per model its kernel tables
(kernels.py, on the grids of grids.py) and memory for KV (memory.py), and the speed index
(speed.py). Every point is timed `repeats` times after `warmup` untimed runs and stored as
p10/p50/p90 (timing.py). The file's layout: core/profile/schema.py; why: docs/profiles.md.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.machine import cache_root, device_facts
from core.profile.schema import (PROFILED_BITS, SCHEMA_VERSION, ProfileError, read, recorded_code_path,
                                 usable_models, validate)
from core.provenance import provenance
from core.results import write_json_atomic

from ..loaders import weight_dtype
from . import grids, kernels, memory, transfers
from .grids import KIVI_KNOBS
from .speed import speed_index
from .timing import Timer, grid_size


def measured_profile(models: list[str], quick: bool, device: torch.device, repeats: int, out_existing: dict | None,
                     cover: dict | None = None, bits=PROFILED_BITS, rag: bool = True, progress: bool = True) -> dict:
    """A measured profile of this machine. `cover`, `bits`, `rag`: see grids.kernel_axes
    (analysis.validate's first-use profile measures only what its points read). The tables of
    other models in `out_existing` (a profile of this machine) are kept."""
    timer = Timer(device, repeats=repeats, warmup=2, budget_s=0.5 if quick else 3.0)
    dtype = weight_dtype("auto", device)
    shapes = {m: grids.model_args(m) for m in models}
    n_points = len(transfers.transfer_sizes(quick)) * 4 + (6 if quick else 7) + 2
    all_axes = {}
    for name, args in shapes.items():
        all_axes[name] = grids.kernel_axes(args, quick, device, cover, tuple(bits), rag)
        n_points += sum(grid_size(a) for a in all_axes[name].values())
    bar = tqdm(total=n_points, desc="profile", unit="pt", file=sys.stderr, disable=not progress)
    with torch.inference_mode():
        head_dim = max(a.head_dim for a in shapes.values())
        measured_transfers = transfers.measure_transfers(
            timer, device, quick, bar, head_dim=head_dim, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        prof_models = dict(out_existing["models"]) if out_existing else {}
        for kept in prof_models.values():         # an older schema's tables: read as `torch` (schema.py)
            for t in kept.get("kernels", {}).values():
                if isinstance(t, dict) and "axes" in t:
                    t.setdefault("code_path", recorded_code_path(t))
        for name, args in shapes.items():
            bar.set_description(f"profile {name}")
            tables = kernels.measure_kernels(args, timer, device, dtype, "auto", quick, bar, all_axes[name], cover)
            model_grids = tables.pop("grids")
            prof_models[name] = {
                "shape": {**vars(args), "head_dim": args.head_dim},
                "weight_dtype": str(dtype).replace("torch.", ""),
                "kv_dtype": str(torch.float32 if device.type == "cpu" else torch.float16).replace("torch.", ""),
                "policy_knobs": {"kivi": KIVI_KNOBS, "specache": {**KIVI_KNOBS, "k": 64},
                                 "bits_profiled": sorted(set(bits) | {2})},
                "grids": model_grids,
                "kernels": tables,
                "memory": memory.measure_memory(args, device, dtype),
                "quick": quick,
            }
    bar.close()
    facts = device_facts(device)
    model0 = shapes[models[0]]
    speed = speed_index(device, {**vars(model0), "head_dim": model0.head_dim})
    prov = provenance(device)
    prov.update({"repeats": repeats, "warmup": timer.warmup, "spread": "p10/p50/p90 per point",
                 "warmup_policy": f"{timer.warmup} untimed run(s) per point, then up to {repeats} timed "
                                  f"(fewer when a point exceeds {timer.budget_s} s)",
                 "quick": quick, "points": timer.points})
    return {"schema_version": SCHEMA_VERSION, "device": facts, "provenance": prov, "speed_index": speed,
            "transfers": measured_transfers, "models": prof_models}


def kept_models(path: Path, fingerprint: str, prog: str) -> dict | None:
    """What a re-measure keeps of the profile at `path` (this machine's, of this schema): an
    `out_existing` for measured_profile holding the entries of `models` that validate alone
    (core/profile/schema.py usable_models), even when another entry or the file's transfers are
    damaged; one line per entry dropped. None: nothing to keep (no file, another machine's or
    schema's, unreadable)."""
    if not path.is_file():
        return None
    try:
        prof = read(path)
    except ProfileError:
        return None
    keep, why = usable_models(prof, path, fingerprint)
    for name, line in why.items():
        print(f"{prog}: models.{name} of {path} is dropped ({line})", file=sys.stderr)
    return {"models": keep} if keep else None


def write_profile(out: Path, prof: dict, unwritable: str, prog: str = "runtime.profile") -> None:
    """Write `prof` to `out` atomically (an interrupted write leaves the old file as it was);
    `unwritable` ({why}: the OS's reason) is the one-line ConfigError when it cannot be written.
    A measured profile with a fingerprint keeps the models the file holds now that it does not
    measure (written there since it was read: a merge, not a replace)."""
    fp = prof.get("device", {}).get("fingerprint")
    if fp and prof.get("provenance", {}).get("kind") == "measured":
        now = kept_models(out, fp, prog)
        for name, m in (now or {"models": {}})["models"].items():
            prof["models"].setdefault(name, m)
    validate(prof, out)
    try:
        write_json_atomic(out, prof)
    except OSError as e:
        raise ConfigError(unwritable.format(why=e.strerror)) from None


@contextmanager
def entry_lock(out: Path, prog: str, unwritable: str):
    """Hold the lock of one profile file (`<cache root>/locks/<name>-<digest of its path>.lock`;
    released by the OS if the holder dies) while it is measured and written: a second writer
    says so in one line and waits (then re-reads what the first wrote)."""
    import hashlib

    from filelock import FileLock, Timeout

    digest = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]
    try:
        folder = cache_root() / "locks"
        folder.mkdir(exist_ok=True)
        lock = FileLock(str(folder / f"{out.name}-{digest}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"{prog}: another process is profiling into {out}; waiting for it", file=sys.stderr)
            lock.acquire()
    except OSError as e:
        raise ConfigError(unwritable.format(why=e.strerror or e)) from None
    try:
        yield
    finally:
        lock.release()
