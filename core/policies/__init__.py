"""One declaration per KV policy: its knobs and defaults (the Hydra schema of
conf/policy/<name>.yaml), its checks and its device/host KV byte formulas. The runtime cache
(runtime/kv/<name>.py) and the simulator twin (simulator/policies/<name>.py) both read it.
`SPECS` finds `core/policies/<name>.py` by its name (registry.py); docs/policies.md says how to
add one."""
from .base import KV_ELEMENT_BYTES, SPECS, ModelShape, PolicyConfig, declare, defaults, kv_dtype_name, knobs_of, load_plugin, spec_of
from .registry import Registry

__all__ = ["KV_ELEMENT_BYTES", "SPECS", "ModelShape", "PolicyConfig", "Registry", "declare", "defaults", "knobs_of",
           "kv_dtype_name", "load_plugin", "spec_of"]
