"""What the transformers adapter (runtime/hf.py) accepts: the transformers version, the model
configs whose attention the policies reproduce, a policy's knobs given as keywords (the rules
are the declaration's, core/policies/), and `model=hf` folders for this runtime's own model
(docs/policies.md, "Use the policies from transformers")."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from core.errors import ConfigError
from core.policies import KV_ELEMENT_BYTES, SPECS, PolicyConfig, defaults, spec_of

# what tests/test_hf.py runs against; transformers' Cache / attention-interface API changed within
# 4.x and again in 5.x, so other versions are refused rather than half-working
TRANSFORMERS_RANGE = (">=5.24", "<6")
# model types whose attention modules hand post-RoPE q, k, v (GQA, repeat_kv order) to the
# attention interface with scaling 1/sqrt(head_dim); each one is covered by a tiny random model in
# tests/test_hf.py (logits of our `full` policy == transformers' DynamicCache, kivi == its dense fallback)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


def check_model_matches(cache, *, layers: int | None = None, kv_heads: int | None = None,
                        head_dim: int | None = None) -> None:
    """On first use: the model a kvtestbed cache runs in has the layers, KV heads and head_dim of
    the config it was made from (what is None was not seen); else one ConfigError naming both."""
    want = (cache.n_layers, cache.n_kv_heads, cache.head_dim)
    got = (layers, kv_heads, head_dim)
    if all(g is None or g == w for g, w in zip(got, want)):
        return
    show = lambda t: " x ".join(f"{'?' if v is None else v} {n}" for v, n in    # noqa: E731
                                zip(t, ("layers", "KV heads", "head_dim")))
    raise ConfigError(f"kvtestbed_cache({cache.policy_name!r}, config) was made for {show(want)}, but the "
                      f"model it runs in has {show(got)}; make it from the model's own config: "
                      f"kvtestbed_cache({cache.policy_name!r}, model.config)")


def head_dim_of(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def knob_defaults(policy: str) -> dict:
    """A policy's knobs and their defaults in transformers: its declaration's (core/policies/),
    with the declaration's `hf_defaults` on top; kv_dtype None = the dtype of the model's K/V."""
    return {**defaults(policy), **SPECS[policy].hf_defaults, "kv_dtype": None}


def check_knobs(policy: str, knobs: dict, head_dim: int) -> tuple[dict, PolicyConfig]:
    """kvtestbed_cache's knobs: (every knob with its value, the policy's checked declaration,
    kv_dtype `auto` where None). The rules are the declaration's; here only what a keyword call
    adds: unknown names, integer knobs given as other types, kv_dtype None."""
    known = knob_defaults(policy)
    extra = sorted(set(knobs) - set(known))
    if extra:
        raise ConfigError(f"kvtestbed_cache({policy!r}): unknown knob(s) {extra}; {policy} takes "
                          f"{', '.join(sorted(known)) or 'no knobs'}")
    out = {**known, **knobs}
    for f in fields(SPECS[policy]):              # Hydra types a config's knobs; keywords are not
        v = out.get(f.name)
        if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"kvtestbed_cache({policy!r}): {f.name}={out[f.name]!r} must be an integer")
    if out["kv_dtype"] is not None and out["kv_dtype"] not in KV_ELEMENT_BYTES:
        raise ConfigError(f"kvtestbed_cache({policy!r}): kv_dtype={out['kv_dtype']!r}; use None (the model's) "
                          f"or one of {', '.join(KV_ELEMENT_BYTES)}")
    try:
        spec = spec_of({**out, "name": policy, "kv_dtype": out["kv_dtype"] or "auto"}, head_dim)
    except ConfigError as e:
        raise ConfigError(f"kvtestbed_cache({policy!r}): " + str(e).replace("policy.", "")) from None
    spec.hf_check()
    return out, spec


# ----------------------------------------------------------------------------- model=hf folders

# what `runtime.loaders.load_hf` reads into this project's own model (no q/k/v biases, no q/k norms)
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
