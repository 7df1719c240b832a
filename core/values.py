"""Values, not only types: the one rule for a number read from a config, a trace or a profile
(finite, whole where it counts, within its bounds), as one ConfigError line naming the field."""
from __future__ import annotations

import math
from typing import Any

from core.errors import ConfigError


def number(v: Any, key: str, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
           integer: bool = False, null: str | None = None) -> float | None:
    """`v` as a checked number: finite, an integer where asked, within the bounds. `null` says
    what null means for this field (None: null is not allowed)."""
    unset = f" (or null: {null})" if null else ""
    if v is None:
        if null:
            return None
        raise ConfigError(f"{key} is null; give a number")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}={v!r} is not a number; give one{unset}")
    if not math.isfinite(v):
        raise ConfigError(f"{key}={v} is not a finite number; give a finite value{unset}")
    if integer and v != int(v):
        raise ConfigError(f"{key}={v} must be a whole number{unset}")
    bad = out_of_bounds(v, gt=gt, ge=ge, le=le)
    if bad:
        raise ConfigError(f"{key}={v} {bad}{unset}")
    return v


def out_of_bounds(v: float, *, gt: float | None = None, ge: float | None = None, le: float | None = None) -> str | None:
    """The first bound `v` breaks, as the words of its error ("must be > 0"); None within them."""
    if gt is not None and not v > gt:
        return f"must be > {gt:g}"
    if ge is not None and not v >= ge:
        return f"must be >= {ge:g}"
    if le is not None and not v <= le:
        return f"must be <= {le:g}"
    return None


def finite(v: Any) -> bool:
    """A real number (not bool) that is neither NaN nor infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
