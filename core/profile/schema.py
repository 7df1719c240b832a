"""The profile file: a versioned JSON schema, validated on load, written atomically.

    {
      "schema_version": 1,
      "device":     {"name", "type" (cpu|cuda), "memory_bytes", "slug", "fingerprint" (measured,
                     core/machine.py), "facts" (what the fingerprint is made of)},
      "speed_index": {"index", "gemm_s", "memcpy_s", "attention_s", ...}   (measured profiles)
      "provenance": {"kind" (measured|roofline), "host", "torch", "cuda", "time", "git_revision",
                     "command", "repeats", "warmup", "sources" (roofline)},
      "transfers":  {name: table}      h2d_pinned, h2d_pageable, d2h_pinned, d2h_pageable,
                                       gather (by rows), overlap, emulated_link ...
      "models":     {model: {"shape": ModelArgs fields, "policy_knobs": {...},
                             "memory": {"kv_available_bytes", ...},
                             "kernels": {name: table}}}
    }

A *table* is one measured (or derived) function on a grid, the form simulator/tables.py
interpolates (core/profile/interp.py): {"axes": {"tokens": [..]} or {"batch": [..], "context":
[..]}, "unit": "s" or "bytes_per_s", "p50": values (nested lists in axis order), "p10": ...,
"p90": ...}. Schema 3: every kernel table of a measured profile also says which code path it
timed, `code_path` (CODE_PATHS):
- `fused_cpu`: the fused low-bit CPU kernels (runtime/kv/lowbit_cpu.py), which the low-bit
  attention tables (FUSED_TABLES, every bit-width) run on a CPU with a C compiler unless
  KVTESTBED_LOWBIT_KERNEL=0;
- `torch`: plain torch on the CPU (every other table there, and the low-bit ones on the torch
  path); a table of an older schema, which does not say, reads as `torch`;
- `cuda`: a CUDA device.
`current_code_path` is the rule the runtime follows; the simulator refuses (schema 3) or warns
about (older) a table timed on another path than the runtime's now, and a first-use lookup
re-measures such a profile (core/profile/lookup.py covers). docs/profiles.md describes the files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import ConfigError, check_file
from ..policies.base import KV_ELEMENT_BYTES
from ..values import finite, out_of_bounds

SCHEMA_VERSION = 3            # 2: device.fingerprint / device.facts, speed_index, low-bit tables per bit-width;
#                               3: code_path per kernel table
KINDS = ("measured", "roofline")
TRANSFERS = ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "gather")
# the low-bit kernels are measured per bit-width: 2-bit under the plain name (as in schema 1),
# 1- and 4-bit as `<name>_<bits>bit` (bits_table); a measured profile without a policy's table
# for its bits is refused by the simulator, naming the re-profile command
BITS_KERNELS = ("decode_attention_kivi", "score_topk", "gather_replace", "quantize")
PROFILED_BITS = (1, 2, 4)
# the shape fields the simulator reads (simulator/run.py requested_shape, core/profile/analytic.py)
SHAPE_FIELDS = ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len")
KERNELS = ("prefill_layer", "decode_attention_full", "decode_attention_kivi", "score_topk", "gather_replace",
           "quantize", "projections", "mlp", "lm_head_sample", "step_overhead", "decode_layer")


# which code a kernel table timed (schema 3); the low-bit attention tables that run through the
# fused CPU kernels (runtime/kv/lowbit_cpu.py) when they are on; `quantize` packs in torch always
CODE_PATHS = ("fused_cpu", "torch", "cuda")
FUSED_TABLES = ("decode_attention_kivi", "score_topk", "gather_replace")
LOWBIT_KERNEL_ENV = "KVTESTBED_LOWBIT_KERNEL"      # 0 / false / no / off: the torch path everywhere


def lowbit_kernel_enabled() -> bool:
    """The env switch of the fused low-bit CPU kernels (on unless KVTESTBED_LOWBIT_KERNEL=0)."""
    return os.environ.get(LOWBIT_KERNEL_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def c_compiler() -> str | None:
    """The compiler the fused kernels are built with ($CC, else cc, else gcc); None: there is none
    (runtime/kv/lowbit_cpu.py then keeps the torch path)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def current_code_path(device_type: str, table: str, kernels_available: bool | None = None) -> str:
    """The code path the runtime takes now for kernel table `table` (any bit-width suffix) on a
    device of `device_type`: `cuda` on CUDA; on a CPU `fused_cpu` for FUSED_TABLES when the
    kernels are enabled (lowbit_kernel_enabled) and available (`kernels_available`; None: a C
    compiler is found), else `torch`."""
    if device_type == "cuda":
        return "cuda"
    base = re.sub(r"_\d+bit$", "", table)
    if base in FUSED_TABLES and lowbit_kernel_enabled():
        if kernels_available if kernels_available is not None else c_compiler() is not None:
            return "fused_cpu"
    return "torch"


def recorded_code_path(t: dict) -> str:
    """The code path a table says it timed; `torch` where it does not say (schema < 3)."""
    return t.get("code_path") or "torch"


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


def _leaves(values, depth: int):
    """The numbers of a nested list `depth` deep (shape checked separately)."""
    if depth == 0:
        yield values
        return
    for v in values if isinstance(values, list) else [values]:
        yield from _leaves(v, depth - 1)


def _misshapen(values, want: list[int], at: str = "") -> str | None:
    """Where a nested list first departs from the shape `want` (every row, not only the first:
    a ragged row or a number in place of a row), as '[i][j] holds N items, the axes say M'; else None."""
    if not want:
        return None if not isinstance(values, list) else f"{at} is a list where a number belongs"
    if not isinstance(values, list):
        return f"{at or ' itself'} is {values!r} where a row of {want[0]} belongs"
    if len(values) != want[0]:
        return f"{at or ' itself'} holds {len(values)} items, the axes say {want[0]}"
    for i, v in enumerate(values):
        bad = _misshapen(v, want[1:], f"{at}[{i}]")
        if bad:
            return bad
    return None


def _num(v, where: str, path, *, gt: float | None = None, ge: float | None = None) -> float:
    """A profile number: finite (JSON's NaN / Infinity refused), within its bound."""
    if not finite(v):
        raise ProfileError(f"{path}: {where}={v!r} is not a finite number; re-profile or fix the file")
    bad = out_of_bounds(v, gt=gt, ge=ge)
    if bad:
        raise ProfileError(f"{path}: {where}={v!r} {bad}; re-profile or fix the file")
    return v


def validate_table(t, where: str, path) -> None:
    """A table's axes (positive, strictly increasing: they are read on a log scale) and its
    values (finite, >= 0: times and rates are never negative), each shaped as its axes say."""
    if not isinstance(t, dict):
        raise ProfileError(f"{path}: {where} is not a table (expected an object with axes and p50)")
    for key in ("axes", "unit", "p50", "p10", "p90"):
        if key not in t:
            raise ProfileError(f"{path}: {where} lacks '{key}'")
    axes = t["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ProfileError(f"{path}: {where}.axes must name at least one axis")
    for name, ax in axes.items():
        if not isinstance(ax, list) or not ax:
            raise ProfileError(f"{path}: {where}.axes.{name} must be a non-empty list of numbers")
        for i, v in enumerate(ax):
            _num(v, f"{where}.axes.{name}[{i}]", path, gt=0)
        bad = next((i for i in range(1, len(ax)) if not ax[i] > ax[i - 1]), None)
        if bad is not None:
            raise ProfileError(f"{path}: {where}.axes.{name} must be strictly increasing ({ax[bad - 1]!r} then "
                               f"{ax[bad]!r} at [{bad}]); re-profile or fix the file")
    want = [len(v) for v in axes.values()]
    for key in ("p50", "p10", "p90"):
        got = _shape_of(t[key], len(want))
        if got != want:
            raise ProfileError(f"{path}: {where}.{key} has shape {got}, axes {list(axes)} say {want}")
        bad = _misshapen(t[key], want)
        if bad:
            raise ProfileError(f"{path}: {where}.{key}{bad.strip()}; re-profile or fix the file")
        for v in _leaves(t[key], len(want)):
            _num(v, f"{where}.{key} value", path, ge=0)
    for key in ("row_bytes", "context"):
        if t.get(key) is not None:
            _num(t[key], f"{where}.{key}", path, gt=0)


def _whole(v, where: str, path) -> None:
    if not finite(v) or v != int(v) or v < 1:
        raise ProfileError(f"{path}: {where}={v!r} must be a whole number >= 1; re-profile or fix the file")


def is_table(t) -> bool:
    """A table, not another entry of its group (`transfers.overlap`, notes)."""
    return isinstance(t, dict) and "axes" in t


def tables_of(group: dict) -> list[tuple[str, dict]]:
    """The (name, table) pairs of a group of tables (`transfers`, a model's `kernels`)."""
    return [(name, t) for name, t in group.items() if is_table(t)]


def _require(d: dict, keys, where: str, path, fix: str = "") -> None:
    """Each of `keys` in `d`, else one line naming the first missing one as `where`<key>."""
    for key in keys:
        if key not in d:
            raise ProfileError(f"{path}: missing '{where}{key}'{fix}")


def _is_table(t, where: str, path) -> None:
    if not is_table(t):
        raise ProfileError(f"{path}: {where} is not a table (expected an object with axes and p50)")


def _object(d: dict, key: str, where: str, path) -> dict:
    """d[key] as an object, else one line naming `where`<key> (null, a list, a number...)."""
    v = d[key]
    if not isinstance(v, dict):
        raise ProfileError(f"{path}: '{where}{key}' is {type(v).__name__ if v is not None else 'null'}, "
                           "not an object; re-profile")
    return v


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
    _require(prof, ("device", "provenance", "transfers", "models"), "", path)
    for key in ("device", "provenance", "transfers", "models"):
        _object(prof, key, "", path)
    _require(prof["device"], ("name", "type", "memory_bytes"), "device.", path)
    kind = prof["provenance"].get("kind")
    if kind not in KINDS:
        raise ProfileError(f"{path}: provenance.kind={kind!r}; expected one of {', '.join(KINDS)}")
    if ver >= 2 and kind == "measured":
        _require(prof["device"], ("fingerprint", "facts"), "device.", path, "; re-profile")
        si = prof.get("speed_index")
        if not isinstance(si, dict) or not finite(si.get("index")) or not si["index"] > 0:
            raise ProfileError(f"{path}: missing or malformed 'speed_index.index'; "
                               "re-profile (python -m runtime.profile --speed-index re-measures it alone)")
    for name in TRANSFERS:
        _require(prof["transfers"], (name,), "transfers.", path)
        _is_table(prof["transfers"][name], f"transfers.{name}", path)
    for name, t in tables_of(prof["transfers"]):
        validate_table(t, f"transfers.{name}", path)
    if not prof["models"]:
        raise ProfileError(f"{path}: 'models' is empty; run python -m runtime.profile --model NAME")
    for model, m in prof["models"].items():
        validate_model_entry(model, m, ver, kind, path)
    validate_numbers(prof, kind, path)
    return prof


def validate_model_entry(model: str, m, ver: int, kind: str, path) -> None:
    """One entry of `models` (of a file of schema `ver` and provenance `kind`): its shape, kernel
    tables (each with its code path from schema 3 on), memory. A re-measure keeps the entries of
    a damaged file that pass this alone (`usable_models`)."""
    if not isinstance(m, dict):
        raise ProfileError(f"{path}: 'models.{model}' is not an object; re-profile (python -m runtime.profile "
                           f"--model {model})")
    _require(m, ("shape", "kernels", "memory"), f"models.{model}.", path)
    _object(m, "kernels", f"models.{model}.", path)
    _require(m["kernels"], KERNELS, f"models.{model}.kernels.", path)
    for name, t in tables_of(m["kernels"]):
        validate_table(t, f"models.{model}.kernels.{name}", path)
        cp = t.get("code_path")
        if cp is None and ver >= 3 and kind == "measured":
            raise ProfileError(f"{path}: models.{model}.kernels.{name} lacks 'code_path' (schema 3: one of "
                               f"{', '.join(CODE_PATHS)}); re-profile (python -m runtime.profile --model {model})")
        if cp is not None and cp not in CODE_PATHS:
            raise ProfileError(f"{path}: models.{model}.kernels.{name}.code_path={cp!r}; expected one of "
                               f"{', '.join(CODE_PATHS)}")
    _object(m, "memory", f"models.{model}.", path)
    if "kv_available_bytes" not in m["memory"]:
        raise ProfileError(f"{path}: missing 'models.{model}.memory.kv_available_bytes'")
    validate_model(model, m, path)


def usable_models(prof, path, fingerprint: str | None) -> tuple[dict, dict[str, str]]:
    """The `models` entries of a possibly damaged measured profile of this schema and of machine
    `fingerprint` that validate alone ({name: entry}), and why each other one does not
    ({name: one line}). A file of another machine or schema, or without a readable `models`,
    keeps nothing."""
    if not isinstance(prof, dict) or prof.get("schema_version") != SCHEMA_VERSION:
        return {}, {}
    dev, prov, models = prof.get("device"), prof.get("provenance"), prof.get("models")
    if not isinstance(dev, dict) or dev.get("fingerprint") != fingerprint or fingerprint is None:
        return {}, {}
    if not isinstance(prov, dict) or prov.get("kind") != "measured" or not isinstance(models, dict):
        return {}, {}
    keep, why = {}, {}
    for name, m in models.items():
        try:
            validate_model_entry(name, m, SCHEMA_VERSION, "measured", path)
        except ProfileError as e:
            why[name] = str(e).splitlines()[0]
            continue
        keep[name] = m
    return keep, why


def validate_model(model: str, m: dict, path) -> None:
    """The fields of a model the simulator reads: its shape, its KV dtype, its memory."""
    where = f"models.{model}"
    if not isinstance(m["shape"], dict):
        raise ProfileError(f"{path}: {where}.shape is not an object")
    for key in SHAPE_FIELDS:
        if key not in m["shape"]:
            raise ProfileError(f"{path}: missing '{where}.shape.{key}'; re-profile (python -m runtime.profile --model {model})")
        _whole(m["shape"][key], f"{where}.shape.{key}", path)
    if m["shape"].get("head_dim") is not None:
        _whole(m["shape"]["head_dim"], f"{where}.shape.head_dim", path)
    if "kv_dtype" not in m:
        raise ProfileError(f"{path}: missing '{where}.kv_dtype' (the KV element type its tables were measured with, "
                           f"one of {', '.join(KV_ELEMENT_BYTES)}); add it or re-profile")
    if m["kv_dtype"] not in KV_ELEMENT_BYTES:
        raise ProfileError(f"{path}: {where}.kv_dtype={m['kv_dtype']!r} is not one of {', '.join(KV_ELEMENT_BYTES)}")
    if not isinstance(m["memory"], dict):
        raise ProfileError(f"{path}: {where}.memory is not an object")
    for key, v in m["memory"].items():
        if key.endswith("_bytes") or key == "kv_available_bytes":
            if v is not None:
                _num(v, f"{where}.memory.{key}", path, ge=0)
    if not isinstance(m["kernels"], dict):
        raise ProfileError(f"{path}: {where}.kernels is not an object")
    for name in KERNELS:
        _is_table(m["kernels"][name], f"{where}.kernels.{name}", path)


ROOFLINE_ASSUMPTIONS = ("compute_efficiency", "memory_efficiency", "pcie_efficiency", "pageable_factor",
                        "pcie_latency_s", "launch_s", "step_overhead_s", "layer_glue_s", "host_gather_bytes_per_s",
                        "device_gather_link_factor", "runtime_overhead_bytes", "disk_bytes_per_s", "activation_tokens")


def validate_numbers(prof: dict, kind: str, path) -> None:
    """The scalars the simulator reads outside tables: device memory, overlap slowdown, speed
    index, and (roofline) the peaks and assumptions its formulas take."""
    d = prof["device"]
    if d.get("type") not in ("cpu", "cuda"):
        raise ProfileError(f"{path}: device.type={d.get('type')!r}; expected cpu or cuda")
    if d.get("memory_bytes") is not None:
        _num(d["memory_bytes"], "device.memory_bytes", path, gt=0)
    o = prof["transfers"].get("overlap")
    if isinstance(o, dict) and "gemm_slowdown_with_copy" in o:
        _num(o["gemm_slowdown_with_copy"], "transfers.overlap.gemm_slowdown_with_copy", path, gt=0)
    si = prof.get("speed_index")
    if isinstance(si, dict) and "index" in si:
        _num(si["index"], "speed_index.index", path, gt=0)
    if kind == "roofline":
        for key in ("peak_flops", "hbm_bytes_per_s"):
            _num(d.get(key), f"device.{key}", path, gt=0)
        _num((d.get("pcie") or {}).get("theoretical_bytes_per_s"), "device.pcie.theoretical_bytes_per_s", path, gt=0)
        a = prof["provenance"].get("assumptions")
        if not isinstance(a, dict):
            raise ProfileError(f"{path}: missing 'provenance.assumptions' (the roofline's efficiencies); re-derive it "
                               "with python -m runtime.profile --roofline NAME")
        for key in ROOFLINE_ASSUMPTIONS:
            if key not in a:
                raise ProfileError(f"{path}: missing 'provenance.assumptions.{key}'; re-derive it with "
                                   "python -m runtime.profile --roofline NAME")
            _num(a[key], f"provenance.assumptions.{key}", path,
                 **({"ge": 0} if key in ("pcie_latency_s", "launch_s", "step_overhead_s", "layer_glue_s",
                                         "runtime_overhead_bytes") else {"gt": 0}))


def read(path: str | Path):
    """A file's JSON (any shape: `validate` checks it); every problem reading it (missing, not
    UTF-8 text, not JSON, truncated) is one ProfileError line naming the file."""
    path = Path(path)
    check_file(path, str(path), "give a profile JSON file (profiles/*.json)",
               "no such profile; run python -m runtime.profile, or pick one in profiles/", ProfileError)
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise ProfileError(f"{path}: cannot be read as a profile ({type(e).__name__}); re-profile") from None
    if not text.strip():
        raise ProfileError(f"{path}: is empty; re-profile")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); truncated? re-profile") from None
    except (ValueError, RecursionError) as e:
        raise ProfileError(f"{path}: cannot be read as a profile ({type(e).__name__}); re-profile") from None


def load(path: str | Path) -> dict:
    """Read and validate a profile; every problem is one line naming the field and the file."""
    return validate(read(path), Path(path))
