"""The profile file: a versioned JSON schema, validated on load, written atomically.

    {
      "schema_version": 1,
      "device":     {"name", "type" (cpu|cuda), "memory_bytes", "slug", "fingerprint" (measured,
                     runtime/machine.py), "facts" (what the fingerprint is made of)},
      "speed_index": {"index", "gemm_s", "memcpy_s", "attention_s", ...}   (measured profiles)
      "provenance": {"kind" (measured|roofline), "host", "torch", "cuda", "time", "git_revision",
                     "command", "repeats", "warmup", "sources" (roofline)},
      "transfers":  {name: table}      h2d_pinned, h2d_pageable, d2h_pinned, d2h_pageable,
                                       gather (by rows), overlap, emulated_link ...
      "models":     {model: {"shape": ModelArgs fields, "policy_knobs": {...},
                             "memory": {"kv_available_bytes", ...},
                             "kernels": {name: table}}}
    }

A *table* is one measured (or derived) function on a grid, the form simulator/costs.py
interpolates: {"axes": {"tokens": [..]} or {"batch": [..], "context": [..]}, "unit": "s" or
"bytes_per_s", "p50": values (nested lists in axis order), "p10": ..., "p90": ...}.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

SCHEMA_VERSION = 2            # 2: device.fingerprint / device.facts, speed_index, low-bit tables per bit-width
KINDS = ("measured", "roofline")
TRANSFERS = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "gather")
# the low-bit kernels are measured per bit-width: 2-bit under the plain name (as in schema 1),
# 1- and 4-bit as `<name>_<bits>bit` (bits_table); a measured profile without a policy's table
# for its bits is refused by the simulator, naming the re-profile command
BITS_KERNELS = ("decode_attention_kivi", "score_topk", "gather_replace", "quantize")
PROFILED_BITS = (1, 2, 4)
KERNELS = ("prefill_layer", "decode_attention_full", "decode_attention_kivi", "score_topk", "gather_replace",
           "quantize", "projections", "mlp", "lm_head_sample", "step_overhead", "decode_layer")


def bits_table(name: str, bits: int) -> str:
    """The kernel table of a low-bit kernel at `bits` (2-bit keeps the plain name)."""
    return name if name not in BITS_KERNELS or int(bits) == 2 else f"{name}_{int(bits)}bit"


class ProfileError(ConfigError):
    """A profile file that is missing, truncated, from a newer schema or missing a field."""


def table(axes: dict[str, list], p50, p10=None, p90=None, unit: str = "s") -> dict:
    return {"axes": axes, "unit": unit, "p50": p50, "p10": p10 if p10 is not None else p50,
            "p90": p90 if p90 is not None else p50}


def _shape_of(values, depth: int) -> list[int]:
    dims = []
    v = values
    for _ in range(depth):
        if not isinstance(v, list):
            return dims
        dims.append(len(v))
        v = v[0] if v else None
    return dims


def validate_table(t, where: str, path) -> None:
    if not isinstance(t, dict):
        raise ProfileError(f"{path}: {where} is not a table (expected an object with axes and p50)")
    for key in ("axes", "unit", "p50", "p10", "p90"):
        if key not in t:
            raise ProfileError(f"{path}: {where} lacks '{key}'")
    axes = t["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ProfileError(f"{path}: {where}.axes must name at least one axis")
    want = [len(v) for v in axes.values()]
    for key in ("p50", "p10", "p90"):
        got = _shape_of(t[key], len(want))
        if got != want:
            raise ProfileError(f"{path}: {where}.{key} has shape {got}, axes {list(axes)} say {want}")


def validate(prof: dict, path) -> dict:
    """Raise ProfileError naming the first missing or malformed field; return prof."""
    if not isinstance(prof, dict):
        raise ProfileError(f"{path}: not a profile (top level is not an object)")
    ver = prof.get("schema_version")
    if ver is None:
        raise ProfileError(f"{path}: missing 'schema_version'")
    if not isinstance(ver, int) or ver > SCHEMA_VERSION:
        raise ProfileError(f"{path}: schema_version {ver!r} is newer than this code reads ({SCHEMA_VERSION}); "
                           "update kvtestbed or re-profile")
    for key in ("device", "provenance", "transfers", "models"):
        if key not in prof:
            raise ProfileError(f"{path}: missing '{key}'")
    for key in ("name", "type", "memory_bytes"):
        if key not in prof["device"]:
            raise ProfileError(f"{path}: missing 'device.{key}'")
    kind = prof["provenance"].get("kind")
    if kind not in KINDS:
        raise ProfileError(f"{path}: provenance.kind={kind!r}; expected one of {', '.join(KINDS)}")
    if ver >= 2 and kind == "measured":
        for key in ("fingerprint", "facts"):
            if key not in prof["device"]:
                raise ProfileError(f"{path}: missing 'device.{key}'; re-profile")
        si = prof.get("speed_index")
        if not isinstance(si, dict) or not isinstance(si.get("index"), (int, float)) or not si["index"] > 0:
            raise ProfileError(f"{path}: missing or malformed 'speed_index.index'; "
                               "re-profile (python -m runtime.profile --speed-index re-measures it alone)")
    for name in TRANSFERS:
        if name not in prof["transfers"]:
            raise ProfileError(f"{path}: missing 'transfers.{name}'")
    for name, t in prof["transfers"].items():
        if isinstance(t, dict) and "axes" in t:
            validate_table(t, f"transfers.{name}", path)
    if not prof["models"]:
        raise ProfileError(f"{path}: 'models' is empty; run python -m runtime.profile --model NAME")
    for model, m in prof["models"].items():
        for key in ("shape", "kernels", "memory"):
            if key not in m:
                raise ProfileError(f"{path}: missing 'models.{model}.{key}'")
        for name in KERNELS:
            if name not in m["kernels"]:
                raise ProfileError(f"{path}: missing 'models.{model}.kernels.{name}'")
        for name, t in m["kernels"].items():
            if isinstance(t, dict) and "axes" in t:
                validate_table(t, f"models.{model}.kernels.{name}", path)
        if "kv_available_bytes" not in m["memory"]:
            raise ProfileError(f"{path}: missing 'models.{model}.memory.kv_available_bytes'")
    return prof


def load(path: str | Path) -> dict:
    """Read and validate a profile; every problem is one line naming the field and the file."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile; run python -m runtime.profile, or pick one in profiles/")
    try:
        prof = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); truncated? re-profile") from None
    return validate(prof, path)
