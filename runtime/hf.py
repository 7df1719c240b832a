"""The project's KV policies inside a user's own transformers model (`model.generate()`).

    import runtime.hf                       # registers attn_implementation="kvtestbed"
    from runtime.hf import kvtestbed_cache
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kvtestbed")
    out = model.generate(**inputs, cache=kvtestbed_cache("specache", model.config, k=64, bits=2))

One `transformers.Cache` subclass per policy, holding this project's `KVCache` (runtime/kv/). With
attn_implementation="kvtestbed" the registered attention hands the new tokens' q, k, v to the
layer's `LayerKV.attend` (nothing dequantized wholesale); any other attention gets a dequantized
copy from `Cache.update` (full and kivi only). No speculative pre-decoding inside generate().
What is supported and why: the README's "Use the policies from transformers".
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from core.errors import ConfigError
from core.policies import defaults, spec_of
from .kv import KV_DTYPES, KVCache, Step, make_cache, policy_spec
from .kv.kivi import unpack_float

try:   # without transformers (or with one too old to have these) the classes below still define,
    from transformers.cache_utils import Cache as _Cache   # and constructing one raises a ConfigError
    from transformers.cache_utils import CacheLayerMixin as _LayerBase   # naming the install
except ImportError:
    _Cache = _LayerBase = object

ATTN_NAME = "kvtestbed"
# what tests/test_hf.py runs against; transformers' Cache / attention-interface API changed within
# 4.x and again in 5.x, so other versions are refused rather than half-working
TRANSFORMERS_RANGE = (">=5.24", "<6")
# model types whose attention modules hand post-RoPE q, k, v (GQA, repeat_kv order) to the
# attention interface with scaling 1/sqrt(head_dim); each one is covered by a tiny random model in
# tests/test_hf.py (logits of our `full` policy == transformers' DynamicCache, kivi == its dense fallback)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FALLBACK_POLICIES = ("full", "kivi")


# ----------------------------------------------------------------------------- checks

def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        raise ConfigError("runtime.hf needs transformers: pip install -e '.[dev]' "
                          f"(tested range transformers{','.join(TRANSFORMERS_RANGE)})") from None
    return transformers.__version__


def check_transformers_version() -> str:
    """transformers' version, or a ConfigError naming the tested range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    v = transformers_version()
    if Version(Version(v).base_version) not in SpecifierSet(",".join(TRANSFORMERS_RANGE)):   # 5.30.0.dev0 counts as 5.30.0
        raise ConfigError(f"transformers {v} is outside the tested range {','.join(TRANSFORMERS_RANGE)} "
                          f"(pinned in pyproject.toml's dev extra); install one inside it: "
                          f"pip install 'transformers{','.join(TRANSFORMERS_RANGE)}'")
    return v


def check_config(config) -> None:
    """Refuse architectures whose attention the policies do not reproduce, naming what is supported."""
    if not hasattr(config, "model_type"):
        raise ConfigError(f"kvtestbed_cache takes the model's config (model.config), got {type(config).__name__}")
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {mt!r} is not supported by the kvtestbed KV policies; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family: RoPE, grouped-query attention, "
                          "full causal softmax attention)")
    sw = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and sw is not None:
        raise ConfigError(f"{mt} config has sliding_window={sw}: sliding-window attention is not supported by the "
                          "KV policies (they keep every token); use a checkpoint without it or set sliding_window=None")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConfigError(f"{mt} config has layer_types {sorted(kinds)}; only full_attention layers are supported")
    for attr in ("attn_logit_softcapping", "query_pre_attn_scalar"):
        if getattr(config, attr, None) is not None:
            raise ConfigError(f"{mt} config sets {attr}={getattr(config, attr)}; the KV policies compute plain "
                              "softmax(q k^T / sqrt(head_dim)) attention")


def _head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def _defaults(policy: str) -> dict:
    """Knob defaults of a policy: its declaration's (core/policies/), one source."""
    out = defaults(policy)
    out["kv_dtype"] = None       # None = the dtype of the model's K/V (decided on the first update)
    if policy == "specache":
        out["prefetch"] = False  # speculative pre-decoding needs the engine's loop (module docstring)
    return out


def _check_knobs(policy: str, knobs: dict, head_dim: int) -> dict:
    known = _defaults(policy)
    extra = sorted(set(knobs) - set(known))
    if extra:
        raise ConfigError(f"kvtestbed_cache({policy!r}): unknown knob(s) {extra}; {policy} takes "
                          f"{', '.join(sorted(known)) or 'no knobs'}")
    out = {**known, **knobs}
    for key in ("bits", "group_size", "residual", "k"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int)):
            raise ConfigError(f"kvtestbed_cache({policy!r}): {key}={out[key]!r} must be an integer")
    if out["kv_dtype"] is not None and out["kv_dtype"] not in KV_DTYPES:
        raise ConfigError(f"kvtestbed_cache({policy!r}): kv_dtype={out['kv_dtype']!r}; use None (the model's) "
                          f"or one of {', '.join(KV_DTYPES)}")
    try:
        spec_of(policy_spec(policy, **{k: v for k, v in out.items() if k != "kv_dtype"}), head_dim)
    except ConfigError as e:
        raise ConfigError(f"kvtestbed_cache({policy!r}): " + str(e).replace("policy.", "")) from None
    if policy == "specache":
        if out["prefetch"]:
            raise ConfigError("kvtestbed_cache('specache'): prefetch=True (speculative pre-decoding) is not available "
                              "inside transformers' generate(): it needs two tokens per forward (the real one and a "
                              "guess of the next) and an extra first pass, and generate() feeds one. Use "
                              "prefetch=False (exact top-k, the default here) or this project's runtime "
                              "(python -m runtime.bench policy=specache)")
    return out


# ----------------------------------------------------------------------------- model=hf folders

# what `runtime.model.load_hf` reads into this project's own model (no q/k/v biases, no q/k norms)
RUNTIME_HF_MODEL_TYPES = ("llama", "mistral")
_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def check_hf_folder(path, *, tokenizer: bool = False) -> Path:
    """`model=hf model.path=...` (runtime.bench) / `--model hf --model-path` (runtime.evals): a
    local transformers folder with config.json + *.safetensors (+ tokenizer.json for evals).
    Never a hub download: a hub id gets an error saying so."""
    import json

    if not path:
        raise ConfigError("model.path is required for model=hf: a local transformers model folder "
                          "(config.json + *.safetensors); nothing is downloaded from the hub")
    folder = Path(str(path)).expanduser()
    if not folder.exists():
        hint = (" -- it looks like a hub id; download it yourself (e.g. `huggingface-cli download "
                f"{path} --local-dir DIR`) and pass the folder" if "/" in str(path) and not str(path).startswith(("/", ".", "~"))
                else "")
        raise ConfigError(f"model.path={path}: no such folder{hint}; this project never downloads weights")
    if not folder.is_dir():
        raise ConfigError(f"model.path={path} is a file; model=hf takes a transformers model folder "
                          "(for a .gguf file use model=smollm2 model.path=FILE)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"model.path={path}: no config.json; point it at a local transformers model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"{cfg_path}: not readable JSON ({e})") from None
    mt = cfg.get("model_type")
    if mt not in RUNTIME_HF_MODEL_TYPES:
        raise ConfigError(f"{cfg_path}: model_type {mt!r} is not supported by this runtime's model; supported: "
                          f"{', '.join(RUNTIME_HF_MODEL_TYPES)} (transformers' own model with "
                          f"kvtestbed_cache() also runs {', '.join(t for t in SUPPORTED_MODEL_TYPES if t not in RUNTIME_HF_MODEL_TYPES)})")
    missing = [k for k in _HF_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"{cfg_path}: lacks {', '.join(missing)}; not a complete transformers model config")
    if not any(folder.glob("*.safetensors")):
        bins = [p.name for p in folder.glob("*.bin")]
        raise ConfigError(f"model.path={path}: no *.safetensors files" + (
            f" (found {', '.join(bins[:3])}: convert them, e.g. model.save_pretrained(dir, safe_serialization=True))"
            if bins else ""))
    if tokenizer and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"model.path={path}: no tokenizer.json (evals need the model's tokenizer; "
                          "tokenizer.save_pretrained(dir) writes it)")
    return folder


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
        self.head_dim = _head_dim(text)
        self.knobs = _check_knobs(self.policy_name, knobs, self.head_dim)
        self.link, self.capacity_hint = link, capacity
        self.kv: KVCache | None = None
        self._step: Step | None = None
        self.pad: torch.Tensor | None = None
        super().__init__(layers=[KVTestbedLayer(self, i) for i in range(self.n_layers)])
        if not self.uses_attention_interface() and self.policy_name not in FALLBACK_POLICIES:
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
            f"only {', '.join(FALLBACK_POLICIES)} have the (slow) Cache.update fallback")

    # -- building our cache

    def _build(self, key_states: torch.Tensor, n_new: int) -> None:
        kn = dict(self.knobs)
        if kn["kv_dtype"] is None:
            names = {v: k for k, v in KV_DTYPES.items()}
            kn["kv_dtype"] = names.get(key_states.dtype, "auto")
        policy = policy_spec(self.policy_name, **kn)
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
            if key_states.shape[0] != self.batch:
                raise ConfigError(f"kvtestbed cache was built for batch {self.batch}, got "
                                  f"{key_states.shape[0]}; use one cache per generate() call")
            self._step = self._new_step(key_states, pad)
        elif self._step is None:
            raise ConfigError(f"kvtestbed cache: layer {index} ran before layer 0 in this forward pass")
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
        if self.policy_name not in FALLBACK_POLICIES:
            self._refuse_fallback()
        step = self._layer_step(index, key_states, _pad_from_positions(key_states, kwargs, self))
        layer = self.kv.layers[index]
        # `load` appends at step.start for these two policies (FullKV writes columns
        # [start, end), KiviKV appends to its residual and quantizes what overflows)
        layer.load(key_states.to(layer.dtype), value_states.to(layer.dtype), step)
        self._finish_layer(index, step)
        if step.is_prefill:      # prefill attends in full precision, as `LayerKV.attend` does
            return key_states, value_states
        k, v = _dense_kv(layer, self.policy_name, step.end)
        return k.to(key_states.dtype), v.to(value_states.dtype)

    # -- bookkeeping transformers and users read

    def reset(self) -> None:
        self.kv, self._step, self.pad = None, None, None

    def nbytes(self) -> tuple[int, int]:
        """(device bytes, host bytes) of the K/V held, as `runtime.bench` reports them."""
        return self.kv.nbytes() if self.kv is not None else (0, 0)

    def stats(self) -> dict[str, float]:
        from .engine import policy_stats_of

        return policy_stats_of(self.kv, 0, 0) if self.kv is not None else {}

    def __repr__(self):
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items() if v is not None)
        return f"{type(self).__name__}({self.policy_name}{', ' + knobs if knobs else ''})"


class KVTestbedFullCache(KVTestbedCache):
    """`full`: a preallocated buffer written in place (DynamicCache concatenates every step)."""
    policy_name = "full"


class KVTestbedOffloadCache(KVTestbedCache):
    """`offload`: every layer's K/V in host memory, two device slots, layer i+1 fetched during layer i."""
    policy_name = "offload"


class KVTestbedKiviCache(KVTestbedCache):
    """`kivi`: packed low-bit K/V attended in place (no dequantized copy on the attention path)."""
    policy_name = "kivi"


class KVTestbedSpeCache(KVTestbedCache):
    """`specache`: low-bit K/V on the device, 16-bit on the host, exact top-k fetch per layer and step."""
    policy_name = "specache"


CACHE_CLASSES = {"full": KVTestbedFullCache, "offload": KVTestbedOffloadCache, "kivi": KVTestbedKiviCache,
                 "specache": KVTestbedSpeCache}


def kvtestbed_cache(policy: str, config, **knobs) -> KVTestbedCache:
    """A transformers Cache running this project's KV policy `policy` (full | offload | kivi |
    specache) for a model with `config`, with the policy's knobs (defaults: conf/policy/*.yaml;
    `kv_dtype` defaults to the model's dtype; `specache` has prefetch=False, see the module docstring).
    Pass `link=` (runtime.transfer) to emulate a host link on CPU, `capacity=` to preallocate."""
    if policy not in CACHE_CLASSES:
        raise ConfigError(f"kvtestbed_cache: policy {policy!r} is not known; choose one of "
                          f"{', '.join(sorted(CACHE_CLASSES))} (policy=rag is a prefill technique, not a decode cache)")
    register()
    return CACHE_CLASSES[policy](config, **knobs)


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


def _dense_kv(layer, policy: str, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback's dense K/V of columns [0, end): what `sdpa`/`eager` attention needs.

    kivi: codes -> floats with the policy's own `unpack_float`, times scale plus zero per group;
    then the full-precision residual. This is the wholesale dequantization the attention path avoids.
    """
    if policy == "full":
        return layer.k[:, :, :end], layer.v[:, :, :end]
    B, H = layer.k_res.shape[:2]
    D, G, cg = layer.D, layer.G, layer.cg
    kq, vq = layer.kq, layer.vq
    codes = unpack_float(layer.k_codes[:, :, :kq], layer.bits, layer.dtype).view(B, H, kq // G, G, D)
    k = codes * layer.k_scale[:, :, : kq // G, None] + layer.k_zero[:, :, : kq // G, None]
    codes = unpack_float(layer.v_codes[:, :, :vq], layer.bits, layer.dtype).view(B, H, vq, D // cg, cg)
    v = codes * layer.v_scale[:, :, :vq, :, None] + layer.v_zero[:, :, :vq, :, None]
    k = torch.cat([k.reshape(B, H, kq, D), layer.k_res], dim=2)
    v = torch.cat([v.reshape(B, H, vq, D), layer.v_res], dim=2)
    return k, v


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
    if tag is None:
        raise ConfigError(f"attn_implementation={ATTN_NAME!r} needs a kvtestbed cache: pass "
                          "cache=kvtestbed_cache(policy, model.config, ...) to generate() / forward(), "
                          "with use_cache=True")
    cache, index = tag
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
