"""The project's KV policies inside a user's own transformers model (`model.generate()`).

    import runtime.hf                       # registers attn_implementation="kvtestbed"
    from runtime.hf import kvtestbed_cache
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvtestbed")
    out = model.generate(**inputs, cache=kvtestbed_cache("specache", model.config, k=64, bits=2))

One `transformers.Cache` subclass per policy, holding this project's `KVCache` (runtime/kv/). With
attn_implementation="kvtestbed" the registered attention hands the new tokens' q, k, v to the
layer's `LayerKV.attend` (nothing dequantized wholesale); any other attention gets a dequantized
copy from `Cache.update` (full and kivi only). No speculative pre-decoding inside generate().
On first use the cache is checked against the model it runs in (layers, KV heads, head_dim:
`hf_checks.check_model_matches`); a cache made from another model's config is one ConfigError.
Which policies have a Cache, and with which defaults, is each declaration's (`hf_cache`,
`hf_fallback`, `hf_defaults`); what is accepted is runtime/hf_checks.py. What is supported and
why: docs/policies.md, "Use the policies from transformers".
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

from core.errors import ConfigError
from core.policies import SPECS

from .hf_checks import (SUPPORTED_MODEL_TYPES, TRANSFORMERS_RANGE, check_config, check_hf_folder,  # noqa: F401
                        check_knobs, check_model_matches, check_transformers_version, head_dim_of, knob_defaults,
                        transformers_version)
from .kv import KV_DTYPES, POLICIES, KVCache, Step, make_cache

try:   # without transformers (or with one too old to have these) the classes below still define,
    from transformers.cache_utils import Cache as _Cache   # and constructing one raises a ConfigError
    from transformers.cache_utils import CacheLayerMixin as _LayerBase   # naming the install
except ImportError:
    _Cache = _LayerBase = object

ATTN_NAME = "kvtestbed"
_defaults = knob_defaults          # the name tests/test_hf.py reads


# ----------------------------------------------------------------------------- the Cache

class KVTestbedLayer(_LayerBase):
    """transformers' per-layer view of one of our `LayerKV`s (they live in the parent's KVCache)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, parent, index: int):
        super().__init__()
        self.parent, self.index = parent, index

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.parent._update(self.index, key_states, value_states, kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.parent.kv.len if self.parent.kv is not None else 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.parent.reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ConfigError("kvtestbed caches cannot be cropped (a low-bit group cannot give tokens back); "
                              "assisted / speculative decoding in generate() is not supported")

    def reorder_cache(self, beam_idx) -> None:
        raise ConfigError("kvtestbed caches do not support beam search (num_beams > 1); use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ConfigError("kvtestbed caches do not support num_return_sequences / beams > 1")

    def batch_select_indices(self, indices) -> None:
        raise ConfigError("kvtestbed caches do not support selecting batch rows")

    def offload(self):
        pass

    def prefetch(self):
        pass


class KVTestbedCache(_Cache):
    """A transformers `Cache` whose layers are this project's `LayerKV`s (built on the first
    update, when batch, device and dtype are known). See the module docstring."""

    policy_name = "full"

    def __init__(self, config, *, link=None, capacity: int | None = None, **knobs):
        check_transformers_version()
        check_config(config)
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ConfigError(f"kvtestbed_cache: capacity={capacity!r} must be a positive number of tokens (or None)")
        text = config.get_text_config(decoder=True)
        self.config = config
        self.n_layers = text.num_hidden_layers
        self.n_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = head_dim_of(text)
        # the declaration, built and checked once; kv_dtype None = the model's, resolved at _build
        self.knobs, self.spec = check_knobs(self.policy_name, knobs, self.head_dim)
        self.link, self.capacity_hint = link, capacity
        self.kv: KVCache | None = None
        self._step: Step | None = None
        self._last = -1                 # the last layer index stored in the current forward pass
        self.pad: torch.Tensor | None = None
        super().__init__(layers=[KVTestbedLayer(self, i) for i in range(self.n_layers)])
        if not self.uses_attention_interface() and not self.spec.hf_fallback:
            self._refuse_fallback()

    # -- which path

    def uses_attention_interface(self) -> bool:
        return getattr(self.config, "_attn_implementation", None) == ATTN_NAME

    def _refuse_fallback(self):
        raise ConfigError(
            f"policy {self.policy_name!r} needs attn_implementation={ATTN_NAME!r} (the model has "
            f"{getattr(self.config, '_attn_implementation', None)!r}): it works on the query, which "
            "Cache.update never sees. `import runtime.hf`, then load the model with "
            f"attn_implementation={ATTN_NAME!r} or call model.set_attn_implementation({ATTN_NAME!r}); "
            f"only {', '.join(n for n in sorted(SPECS) if SPECS[n].hf_fallback)} have the (slow) Cache.update fallback")

    # -- building our cache

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < self.n_layers:     # a deeper model than the config it was made from
            check_model_matches(self, layers=layer_idx + 1 if layer_idx >= 0 else None)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _build(self, key_states: torch.Tensor, n_new: int) -> None:
        check_model_matches(self, kv_heads=key_states.shape[1], head_dim=key_states.shape[-1])
        kv_dtype = self.knobs["kv_dtype"]
        if kv_dtype is None:
            names = {v: k for k, v in KV_DTYPES.items()}
            kv_dtype = names.get(key_states.dtype, "auto")
        policy = replace(self.spec, kv_dtype=kv_dtype)     # checked in __init__; kv_dtype is one of KV_DTYPES
        B, dev = key_states.shape[0], key_states.device
        if self.link is None:
            from .transfer import make_link

            self.link = make_link(None, dev)
        cap = self.capacity_hint or n_new + 256   # every policy grows its buffers past this
        self.kv = make_cache(policy, n_layers=self.n_layers, batch=B, n_kv_heads=self.n_kv_heads,
                             head_dim=self.head_dim, capacity=cap, device=dev, link=self.link)
        self.policy, self.batch = policy, B

    def _new_step(self, key_states: torch.Tensor, pad: torch.Tensor | None) -> Step:
        B, _, n_new, _ = key_states.shape
        start = self.kv.len
        if start == 0:
            self.pad = pad if pad is not None else torch.zeros(B, dtype=torch.long, device=key_states.device)
        cols = start + torch.arange(n_new, device=key_states.device)
        positions = (cols[None, :] - self.pad[:, None]).clamp(min=0)
        return Step(start=start, n_new=n_new, pad=self.pad, positions=positions)

    def _layer_step(self, index: int, key_states: torch.Tensor, pad: torch.Tensor | None) -> Step:
        if self.kv is None:
            if index != 0:
                raise ConfigError("kvtestbed cache: the first update must come from layer 0")
            self._build(key_states, key_states.shape[2])
        if index == 0:
            if self._step is not None:            # the last pass ended before the config's last layer
                check_model_matches(self, layers=self._last + 1)
            if key_states.shape[0] != self.batch:
                raise ConfigError(f"kvtestbed cache was built for batch {self.batch}, got "
                                  f"{key_states.shape[0]}; use one cache per generate() call")
            self._step = self._new_step(key_states, pad)
        elif self._step is None:
            raise ConfigError(f"kvtestbed cache: layer {index} ran before layer 0 in this forward pass")
        self._last = index
        return self._step

    def _finish_layer(self, index: int, step: Step) -> None:
        if index == self.n_layers - 1:
            self.kv.advance(step)
            self._step = None

    # -- the attention-interface path

    def attend(self, index: int, q, k, v, pad: torch.Tensor | None) -> torch.Tensor:
        """Store k, v of the new tokens in layer `index` and return attention (B, H, T, D)."""
        step = self._layer_step(index, k, pad)
        o = self.kv.layers[index].attend(q, k, v, step)
        self._finish_layer(index, step)
        return o

    # -- Cache.update

    def _update(self, index: int, key_states, value_states, kwargs):
        if self.uses_attention_interface():
            # stored by the attention function, which also has the query
            key_states._kvtestbed = (self, index)
            return key_states, value_states
        if not self.spec.hf_fallback:
            self._refuse_fallback()
        key_states._kvtestbed_fallback = self      # a kvtestbed attention then names the config mix-up
        step = self._layer_step(index, key_states, _pad_from_positions(key_states, kwargs, self))
        layer = self.kv.layers[index]
        # `load` appends at step.start for these two policies (FullKV writes columns
        # [start, end), KiviKV appends to its residual and quantizes what overflows)
        layer.load(key_states.to(layer.dtype), value_states.to(layer.dtype), step)
        self._finish_layer(index, step)
        if step.is_prefill:      # prefill attends in full precision, as `LayerKV.attend` does
            return key_states, value_states
        k, v = layer.dense_kv(step.end)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    # -- bookkeeping transformers and users read

    def reset(self) -> None:
        self.kv, self._step, self.pad, self._last = None, None, None, -1

    def nbytes(self) -> tuple[int, int]:
        """(device bytes, host bytes) of the K/V held, as `runtime.bench` reports them."""
        return self.kv.nbytes() if self.kv is not None else (0, 0)

    def stats(self) -> dict[str, float]:
        from .engine import policy_stats_of

        return policy_stats_of(self.kv, 0, 0) if self.kv is not None else {}

    def __repr__(self):
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items() if v is not None)
        return f"{type(self).__name__}({self.policy_name}{', ' + knobs if knobs else ''})"


_CLASSES: dict[str, type] = {}


def cache_class(policy: str) -> type:
    """The transformers Cache class of a policy (KVTestbed<Name>Cache), made from its declaration
    on first use; ConfigError for a name without one (`hf_cache` empty: rag, a prefill technique)."""
    having = sorted(n for n in SPECS if SPECS[n].hf_cache)
    if policy not in having:
        raise ConfigError(f"kvtestbed_cache: policy {policy!r} is not known; choose one of "
                          f"{', '.join(having)} (policy=rag is a prefill technique, not a decode cache)")
    if policy not in _CLASSES:
        kv = POLICIES[policy]                 # the runtime cache it holds: its docstring's first line
        doc = f"`{policy}`: " + (kv.__doc__ or sys.modules[kv.__module__].__doc__).strip().splitlines()[0]
        _CLASSES[policy] = type(f"KVTestbed{policy.capitalize()}Cache", (KVTestbedCache,),
                                {"policy_name": policy, "__doc__": doc, "__module__": __name__})
    return _CLASSES[policy]


def kvtestbed_cache(policy: str, config, **knobs) -> KVTestbedCache:
    """A transformers Cache running this project's KV policy `policy` (full | offload | kivi |
    specache: the declarations with `hf_cache`) for a model with `config`, with the policy's knobs
    (defaults: the declaration's and its `hf_defaults`, e.g. specache's prefetch=False; `kv_dtype`
    defaults to the model's dtype).
    Pass `link=` (runtime.transfer) to emulate a host link on CPU, `capacity=` to preallocate."""
    cls = cache_class(policy)
    register()
    return cls(config, **knobs)


# ----------------------------------------------------------------------------- helpers

def _pad_from_positions(key_states: torch.Tensor, kwargs: dict, cache) -> torch.Tensor | None:
    """Left-pad counts for the fallback path from the position ids transformers passes along
    (generate() numbers each row's real tokens 0..n-1 after its pads). Only read at prefill."""
    if cache.kv is not None and cache.kv.len > 0:
        return None
    inner = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
    pos = inner.get("position_ids") if isinstance(inner, dict) else None
    if pos is None or pos.dim() != 2:
        return None
    T = key_states.shape[2]
    pos = pos.expand(key_states.shape[0], -1)
    return (T - 1 - pos[:, -1]).clamp(min=0).to(torch.long)


def _pad_from_mask(mask: torch.Tensor | None, B: int, kv_len: int) -> torch.Tensor | None:
    """Left-pad counts (B,) from a 2D padding mask (True = real token); ConfigError for any
    other shape (right padding, holes, 4D masks)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ConfigError(f"attn_implementation={ATTN_NAME!r} takes a 2D padding mask (batch, tokens); got a "
                          f"{mask.dim()}D mask. Custom 4D masks are not supported by the KV policies")
    if mask.shape != (B, kv_len):
        raise ConfigError(f"attention_mask has shape {tuple(mask.shape)}, expected ({B}, {kv_len}) "
                          "(cached + new tokens)")
    mask = mask.bool()
    pad = (~mask).long().cumprod(dim=1).sum(dim=1)                 # leading pad columns
    cols = torch.arange(kv_len, device=mask.device)
    if not torch.equal(mask, cols[None, :] >= pad[:, None]):
        raise ConfigError("attention_mask is not left padding (pads must all come before a row's tokens); "
                          "use tokenizer.padding_side='left' -- right padding and holes are not supported")
    return pad


# ----------------------------------------------------------------------------- attention interface

def kvtestbed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as attn_implementation="kvtestbed": routes q, k, v of the
    new tokens to the module's layer of the kvtestbed cache. Returns ((B, T, H, D), None)."""
    tag = getattr(key, "_kvtestbed", None)
    other = getattr(key, "_kvtestbed_fallback", None)
    if tag is None and other is not None:
        raise ConfigError(f"kvtestbed_cache({other.policy_name!r}, config) was made from a config whose attention "
                          f"is {getattr(other.config, '_attn_implementation', None)!r}, not this model's "
                          f"{ATTN_NAME!r}; make it from the model's own config: "
                          f"kvtestbed_cache({other.policy_name!r}, model.config)")
    if tag is None:
        raise ConfigError(f"attn_implementation={ATTN_NAME!r} needs a kvtestbed cache: pass "
                          "cache=kvtestbed_cache(policy, model.config, ...) to generate() / forward(), "
                          "with use_cache=True")
    cache, index = tag
    if cache.kv is None and index == 0:        # first use: the model's depth against the cache's config
        text = module.config
        text = text.get_text_config(decoder=True) if hasattr(text, "get_text_config") else text
        check_model_matches(cache, layers=getattr(text, "num_hidden_layers", None))
    D = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, D ** -0.5, rel_tol=1e-6):
        raise ConfigError(f"attention scaling {scaling} != 1/sqrt(head_dim={D}); the KV policies compute "
                          "softmax(q k^T / sqrt(head_dim))")
    if module.training and dropout:
        raise ConfigError("kvtestbed attention is inference-only (dropout in training mode)")
    B = query.shape[0]
    start = cache.kv.len if cache.kv is not None else 0
    pad = _pad_from_mask(attention_mask, B, start + key.shape[2]) if index == 0 else None
    if pad is not None and start > 0 and cache.pad is not None and not torch.equal(pad, cache.pad):
        raise ConfigError("attention_mask changed the left padding of a cached row; keep each row's mask as "
                          "generate() builds it (pads first, then ones)")
    o = cache.attend(index, query, key, value, pad)
    return o.transpose(1, 2).contiguous(), None


def kvtestbed_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """The mask "function" for attn_implementation="kvtestbed": the 2D padding mask itself (or
    None). Our policies build their own causal masks from the left-pad counts (`Step.mask`)."""
    return attention_mask


_REGISTERED = False


def register() -> None:
    """Register attn_implementation="kvtestbed" with transformers' attention and mask interfaces."""
    global _REGISTERED
    if _REGISTERED:
        return
    check_transformers_version()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kvtestbed_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvtestbed_mask)
    _REGISTERED = True


try:  # `import runtime.hf` is enough to make attn_implementation="kvtestbed" loadable
    register()
except (ConfigError, ImportError):
    pass
