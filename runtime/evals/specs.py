"""Short policy names for the command line, e.g. `kivi2` or `specache-k64-b2-g32-noprefetch`.

Grammar (dash-separated, order of the options free):

    full | offload
    kivi<bits>                [-g<group_size>] [-r<residual>]
    specache-k<k>-b<bits>     [-g<group_size>] [-r<residual>] [-noprefetch]

bits, group_size, residual and one_bit_rule as declared in core/policies/kivi.py; prefetch on.
A spec becomes the policy config the engine reads (`.name`, `.kv_dtype`, the policy's knobs).
Parsing never asks whether the policy is implemented: `make_cache` does that per grid point,
so a grid naming a policy that is not written yet records an error for it and goes on.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

from core.errors import ConfigError
from core.policies import defaults
from core.policies.kivi import BITS

DEFAULTS = {k: v for k, v in defaults("kivi").items() if k in ("group_size", "residual", "one_bit_rule")}
_OPT = re.compile(r"^(?:(k|b|g|r)(\d+)|(noprefetch))$")
GRAMMAR = ("full | offload | kivi<bits>[-g<N>][-r<N>] | specache-k<k>-b<bits>[-g<N>][-r<N>][-noprefetch] "
           f"(bits in {BITS})")


def parse_spec(spec: str, kv_dtype: str = "auto") -> SimpleNamespace:
    """A policy config from a short name; ConfigError naming the grammar if it does not parse."""
    head, *opts = spec.split("-")
    if head in ("full", "offload") and not opts:
        return SimpleNamespace(name=head, kv_dtype=kv_dtype, spec=spec)
    m = re.fullmatch(r"(kivi)(\d+)|(specache)", head)
    if not m:
        raise ConfigError(f"policy spec {spec!r} does not parse; use {GRAMMAR}")
    name = m.group(1) or m.group(3)
    knobs: dict = {}
    if name == "kivi":
        knobs["b"] = int(m.group(2))
    for opt in opts:
        o = _OPT.match(opt)
        key = (o.group(1) or o.group(3)) if o else None
        if key is None or key in knobs or (key in ("k", "noprefetch") and name != "specache"):
            raise ConfigError(f"policy spec {spec!r}: option {opt!r} is not valid or repeated; use {GRAMMAR}")
        knobs[key] = True if key == "noprefetch" else int(o.group(2))
    if name == "specache" and ("k" not in knobs or "b" not in knobs):
        raise ConfigError(f"policy spec {spec!r} needs both -k<k> and -b<bits>; e.g. specache-k64-b2")
    if knobs["b"] not in BITS:
        raise ConfigError(f"policy spec {spec!r}: bits={knobs['b']} must be one of {BITS}")
    cfg = SimpleNamespace(name=name, kv_dtype=kv_dtype, spec=spec, bits=knobs["b"],
                          group_size=knobs.get("g", DEFAULTS["group_size"]),
                          residual=knobs.get("r", DEFAULTS["residual"]), one_bit_rule=DEFAULTS["one_bit_rule"])
    if name == "specache":
        cfg.k = knobs["k"]
        cfg.prefetch = not knobs.get("noprefetch", False)
    return cfg


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
