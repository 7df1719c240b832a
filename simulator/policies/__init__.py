"""The simulator twins, one module per policy (the names of runtime/kv/): each is its policy's
declaration (core/policies/) plus its per-step operation graphs."""
from . import full, kivi, offload, rag, specache  # noqa: F401  (each enters itself in TWINS)
from .base import ENGINES, TWINS, Op, Twin, beside, make_policy, twin
from .full import Full
from .kivi import Kivi
from .offload import Offload
from .rag import Rag
from .specache import Specache

__all__ = ["ENGINES", "TWINS", "Full", "Kivi", "Offload", "Op", "Rag", "Specache", "Twin", "beside",
           "make_policy", "twin"]
