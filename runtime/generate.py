"""python -m runtime.generate "prompt": text from the shipped model, streamed as it decodes.

    python -m runtime.generate "The capital of France is"
    python -m runtime.generate --chat "Write a haiku about the sea."
    python -m runtime.generate --temperature 0.7 --max-new-tokens 200 --chat "Tell me a story."
    python -m runtime.generate --model /path/to/hf_folder "Hello"

argparse rather than Hydra: a prompt is an argument, not a config.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .engine import SamplingParams, generate, resolve_device
from core.errors import ConfigError, cli_errors
from core.policies import spec_of
from .loaders import load_gguf, load_hf, weight_dtype
from .tokenizer import from_gguf, from_hf


def load(model: str | None, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer) from a GGUF file, a HF folder, or None = the shipped SmolLM2."""
    wd = weight_dtype(dtype, device)
    if model is None or model.endswith(".gguf"):
        return load_gguf(model, wd, device), from_gguf(model)
    if Path(model).is_dir():
        return load_hf(model, wd, device), from_hf(model)
    raise ConfigError(f"--model {model}: expected a .gguf file or a transformers model folder")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="runtime.generate", description="Generate text with the runtime's model.")
    ap.add_argument("prompt", help="the prompt text (the user message with --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("--system", default=None, help="system message with --chat")
    ap.add_argument("--model", default=None, help="a .gguf file or HF folder (default: the shipped SmolLM2)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="full", help="KV policy (runtime/kv/)")
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)

    with cli_errors("runtime.generate"):
        # every argument checked before the model loads (seconds) and before the prompt is echoed
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                top_p=a.top_p, seed=a.seed)
        spec = spec_of({"name": a.policy, "kv_dtype": a.kv_dtype})   # the declaration, checked once
        device = resolve_device(a.device)
        model, tok = load(a.model, device)
        text = a.prompt
        if a.chat:
            msgs = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": text}]
            text = tok.apply_chat_template(msgs)
        ids = tok.encode(text)
        if len(ids) + params.max_new_tokens > model.args.max_seq_len:
            raise ConfigError(f"prompt ({len(ids)} tokens) + --max-new-tokens {params.max_new_tokens} exceeds the "
                              f"model's context of {model.args.max_seq_len}; shorten the prompt or lower --max-new-tokens")

        if not a.chat:
            print(a.prompt, end="", flush=True)
        out: list[int] = []
        shown = ""

        def stream(step_tokens, active):
            # decode the whole output each time: byte-level BPE pieces are not always whole chars
            nonlocal shown
            if step_tokens[0] != tok.eos_id:
                out.append(step_tokens[0])
            now = tok.decode(out)
            if now.startswith(shown):
                print(now[len(shown):], end="", flush=True)
                shown = now

        t = time.perf_counter()
        r = generate(model, [ids], params, spec, on_token=stream)
        dt = time.perf_counter() - t
        req = r.requests[0]
        print(flush=True)
        print(f"[{len(ids)} prompt tokens, {len(req.tokens)} new, TTFT {req.ttft_s * 1e3:.0f} ms, "
              f"{r.decode_tok_s:.1f} tok/s decode, {dt:.1f} s]", file=sys.stderr)


if __name__ == "__main__":
    main()
