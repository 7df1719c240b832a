"""What `python -m runtime.profile` measures, put together into one profile of this machine:
the device (core/machine.py), transfers (transfers.py), per model its kernel tables
(kernels.py, on the grids of grids.py) and memory for KV (memory.py), and the speed index
(speed.py). Every point is timed `repeats` times after `warmup` untimed runs and stored as
p10/p50/p90 (timing.py). The file's layout: core/profile/schema.py; why: docs/profiles.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.machine import device_facts
from core.profile.schema import PROFILED_BITS, SCHEMA_VERSION, recorded_code_path
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


def write_profile(out: Path, prof: dict, unwritable: str) -> None:
    """Write `prof` to `out` atomically (an interrupted write leaves the old file as it was);
    `unwritable` ({why}: the OS's reason) is the one-line ConfigError when it cannot be written."""
    try:
        write_json_atomic(out, prof)
    except OSError as e:
        raise ConfigError(unwritable.format(why=e.strerror)) from None
