"""One declaration per KV policy: its knobs and defaults (the Hydra schema of
conf/policy/<name>.yaml), its checks and its device/host KV byte formulas. The runtime cache
(runtime/kv/<name>.py) and the simulator twin (simulator/policies/<name>.py) both read it."""
from . import full, kivi, offload, rag, specache  # noqa: F401  (each declares itself)
from .base import KV_ELEMENT_BYTES, SPECS, ModelShape, PolicyConfig, declare, defaults, kv_dtype_name, knobs_of, load_plugin, spec_of

__all__ = ["KV_ELEMENT_BYTES", "SPECS", "ModelShape", "PolicyConfig", "declare", "defaults", "knobs_of", "kv_dtype_name",
           "load_plugin", "spec_of"]
