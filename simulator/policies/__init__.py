"""The simulator twins, one module per policy (the names of runtime/kv/): each is its policy's
declaration (core/policies/) plus its per-step operation graphs. `TWINS` finds
`simulator/policies/<name>.py` by its name; a twin class is also this package's attribute of its
capitalised name (`simulator.policies.Kivi`), imported on first use (docs/simulator.md)."""
from .base import ENGINES, TWINS, Op, Twin, beside, make_policy, twin


def __getattr__(attr: str):
    """`Full`, `Kivi`, ...: the twin of policy `attr.lower()`, found by name."""
    if attr[:1].isupper() and attr.lower() in TWINS:
        return TWINS[attr.lower()]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["ENGINES", "TWINS", "Op", "Twin", "beside", "make_policy", "twin"]
