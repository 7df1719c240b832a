"""Tokenizers for the runtime, built with the `tokenizers` library (no hand-written BPE).

From a GGUF file: a byte-level BPE assembled from `tokenizer.ggml.tokens` / `.merges`, with the
pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre` (SmolLM: single digits split
off, then GPT-2 byte-level splitting). From a HF folder: its `tokenizer.json`.
Chat templates (jinja) come from the file and are rendered with jinja2, as transformers does.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from core.errors import ConfigError

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_id: int | None, eos_id: int, chat_template: str | None,
                 add_bos: bool = False):
        self.tok = tok
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] + ids) if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ConfigError("this model has no chat template; run without --chat")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        tmpl = env.from_string(self.chat_template)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.token(self.bos_id), eos_token=self.token(self.eos_id))

    def token(self, i: int | None) -> str:
        return "" if i is None else (self.tok.id_to_token(i) or "")


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's smollm rule: `\p{N}` (each digit alone), then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, gpt2, default)")


def from_gguf(path: str | Path) -> Tokenizer:
    from .loaders import read_gguf, shipped_gguf_path

    path = Path(path) if path is not None else shipped_gguf_path()
    reader = read_gguf(path)
    f = reader.fields

    def get(key, default=None):
        return f[key].contents() if key in f else default

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"{path}: tokenizer model {kind!r} is not supported; GGUF byte-level BPE ('gpt2') is")
    tokens = get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    types = get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>, <|endoftext|>, ...) must match whole, never be split by BPE
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(specials)
    return Tokenizer(tok, bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id", 2),
                     chat_template=get("tokenizer.chat_template"), add_bos=bool(get("tokenizer.ggml.add_bos_token", False)))


def from_hf(folder: str | Path) -> Tokenizer:
    import json

    from .loaders import need_file

    folder = Path(folder)
    tok = HFTokenizer.from_file(str(need_file(folder, "tokenizer.json")))
    cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
    mcfg = json.loads((folder / "config.json").read_text())
    eos = mcfg.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) else eos
    return Tokenizer(tok, bos_id=mcfg.get("bos_token_id"), eos_id=eos, chat_template=cfg.get("chat_template"),
                     add_bos=bool(cfg.get("add_bos_token", False)))
