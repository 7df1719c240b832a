"""Short policy names for the command line, e.g. `kivi2` or `specache-k64-b2-g32-noprefetch`.

Grammar (dash-separated, order of the options free):

    full | offload
    kivi<bits>                [-g<group_size>] [-r<residual>]
    specache-k<k>-b<bits>     [-g<group_size>] [-r<residual>] [-noprefetch]

Each policy's short form is its declaration's (core/policies/<name>.py: `short_form`, the knob
its digits give, its option letters and flags); the other knobs keep their declared defaults.
A spec becomes the policy config the engine reads (`.name`, `.kv_dtype`, the policy's knobs).
Parsing never asks whether the policy is implemented: `make_cache` does that per grid point,
so a grid naming a policy that is not written yet records an error for it and goes on.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

from core.errors import ConfigError
from core.policies import SPECS, defaults
from core.policies.kivi import BITS

FORMS = {name: SPECS[name] for name in sorted(SPECS) if SPECS[name].short_form is not None}   # those with a short form
GRAMMAR = " | ".join(d.short_form or d.name for d in FORMS.values()) + f" (bits in {BITS})"
_OPT = re.compile(r"^([a-z]+?)(\d+)$")


def parse_spec(spec: str, kv_dtype: str = "auto") -> SimpleNamespace:
    """A policy config from a short name; ConfigError naming the grammar if it does not parse."""
    head, *opts = spec.split("-")
    m = re.fullmatch(r"([a-z_]+?)(\d*)", head)
    decl = FORMS.get(m.group(1)) if m else None
    if decl is None or bool(m.group(2)) != bool(decl.short_head):
        raise ConfigError(f"policy spec {spec!r} does not parse; use {GRAMMAR}")
    given: dict = {}                                  # option letter (or flag) -> value
    for opt in opts:
        o = _OPT.match(opt)
        key = o.group(1) if o and o.group(1) in decl.short_options else opt if opt in decl.short_flags else None
        if key is None or key in given:
            raise ConfigError(f"policy spec {spec!r}: option {opt!r} is not valid or repeated; use {GRAMMAR}")
        given[key] = decl.short_flags[key][1] if key in decl.short_flags else int(o.group(2))
    missing = [k for k in decl.short_required if k not in given]
    if missing:
        raise ConfigError(f"policy spec {spec!r} needs {' and '.join(f'-{k}<{decl.short_options[k]}>' for k in missing)}; "
                          f"use {decl.short_form or decl.name}")
    knobs = {k: v for k, v in defaults(decl.name).items() if k != "kv_dtype"}
    if decl.short_head:
        knobs[decl.short_head] = int(m.group(2))
    for key, v in given.items():
        knobs[decl.short_flags[key][0] if key in decl.short_flags else decl.short_options[key]] = v
    if "bits" in knobs and knobs["bits"] not in BITS:
        raise ConfigError(f"policy spec {spec!r}: bits={knobs['bits']} must be one of {BITS}")
    named = ((decl.short_head,) if decl.short_head else ()) + tuple(
        decl.short_flags[key][0] if key in decl.short_flags else decl.short_options[key] for key in given)
    # `given`: the knobs the spec sets (the rest keep their defaults); not a knob, make_cache ignores it
    return SimpleNamespace(name=decl.name, kv_dtype=kv_dtype, spec=spec, given=named, **knobs)


def default_grid() -> list[str]:
    """The default grid: full, offload, KIVI 1/2/4-bit, SpeCache k in {0, 16, 64, 256} x 1/2 bits
    x group 32/64 x prefetch on/off (37 policies)."""
    grid = ["full", "offload", "kivi1", "kivi2", "kivi4"]
    for k in (0, 16, 64, 256):
        for b in (1, 2):
            for g in (32, 64):
                for tail in ("", "-noprefetch"):
                    grid.append(f"specache-k{k}-b{b}-g{g}{tail}")
    return grid


PRESETS = {
    "default": default_grid,
    "small": lambda: ["full", "kivi2", "kivi4", "specache-k64-b2", "specache-k64-b1"],
}


def expand(specs: list[str]) -> list[str]:
    """Presets (`default`, `small`) expanded in place, duplicates dropped, `full` first: every
    paired statistic is against `full`, so it must be in every grid."""
    out: list[str] = ["full"]
    for s in specs:
        for name in (PRESETS[s]() if s in PRESETS else [s]):
            parse_spec(name)
            if name not in out:
                out.append(name)
    return out
