"""python -m runtime.evals {passkey, ppl, rag, report}: the command line; `runtime/evals/__init__.py`
has the tour, docs/evals.md the method.

argparse rather than Hydra: a grid here is a list of policy specs and sample counts, and its
results are one resumable folder, not one JSON per config point.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..engine import resolve_device
from core.checks import check_threads
from core.errors import ConfigError, cli_errors
from core.values import number
from ..loaders import load_gguf, random_init
from ..model import ModelArgs
from . import data
from . import rag
from .report import report
from .run import passkey_task, ppl_task, run_grid
from .specs import GRAMMAR, PRESETS, expand

PROG = "runtime.evals"
# the tiny random model: seconds per grid, retrieval at chance; for smoke runs and tests
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=8192,
                 rope_base=10000.0)


def load_model(name: str, device: torch.device, path: Path | None = None):
    """(model, tokenizer): `smollm2` = the shipped GGUF and its tokenizer; `tiny` = random
    weights with a byte tokenizer (the shipped tokenizer's ids would not fit its vocab); `hf` =
    a local transformers folder at `path` (config.json, *.safetensors, tokenizer.json)."""
    if path is not None and name != "hf":
        raise ConfigError(f"--model-path is for --model hf (got --model {name})")
    if name == "tiny":
        return random_init(ModelArgs(**TINY_ARGS), seed=0, device=device), data.ByteTokenizer()
    if name == "hf":
        from ..hf import check_hf_folder
        from ..loaders import load_hf
        from ..tokenizer import from_hf

        folder = check_hf_folder(path, tokenizer=True)
        return load_hf(folder, torch.float32, device), from_hf(folder)
    from ..tokenizer import from_gguf

    return load_gguf(None, torch.float32, device), from_gguf(None)


def _model_name(a: argparse.Namespace) -> str:
    """The name results are recorded (and resumed) under; `hf:<folder>` for a local folder."""
    return f"hf:{Path(a.model_path).expanduser().resolve()}" if a.model == "hf" and a.model_path else a.model


def _common(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--policies", nargs="+", default=["default"], metavar="SPEC",
                   help=f"policy specs: {GRAMMAR}; or presets {', '.join(PRESETS)} (default: the "
                        "37-policy grid). `full` is always added: statistics are paired against it")
    p.add_argument("--model", choices=["smollm2", "tiny", "hf"], default="smollm2")
    p.add_argument("--model-path", type=Path, default=None,
                   help="--model hf: a local transformers folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--seed", type=int, default=0, help="data seed (samples are pure functions of it)")
    p.add_argument("--kv-dtype", default="auto", help="dtype of the shared prefill and of every policy's cache")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("results/evals") / task,
                   help="results folder; rerunning into it resumes")
    p.add_argument("--no-progress", action="store_true")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Quality of KV policies against full: passkey "
                                 "retrieval and teacher-forced perplexity, paired statistics.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval at several lengths and depths")
    pk.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 3072])
    pk.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    pk.add_argument("--n", type=int, default=4, help="samples per (length, depth)")
    pk.add_argument("--format", choices=data.FORMATS, default="plain",
                    help="plain completion or the model's chat template (both retrieve 20/20 at 1K on SmolLM2)")
    pk.add_argument("--max-new-tokens", type=int, default=8)
    _common(pk, "passkey")
    pp = sub.add_parser("ppl", help="teacher-forced perplexity of the last tokens of long texts")
    pp.add_argument("--context", type=int, default=2048, help="tokens per sample")
    pp.add_argument("--last", type=int, default=512, help="tokens scored, after a prefill of the rest")
    pp.add_argument("--n", type=int, default=8, help="samples")
    _common(pp, "ppl")
    rg = sub.add_parser("rag", help="synthetic multi-document QA under policy=rag selectors (runtime/evals/rag/)")
    rg.add_argument("--n", type=int, default=8, help="samples per hop count")
    rg.add_argument("--chunks", type=int, default=8)
    rg.add_argument("--chunk-len", type=int, default=512)
    rg.add_argument("--hops", nargs="+", type=int, default=[1, 2])
    rg.add_argument("--r", nargs="+", type=float, default=[0, 0.05, 0.15, 0.3, 1])
    rg.add_argument("--selectors", nargs="+", default=["full", "reuse", "random", "epic", "cacheblend", "draft"],
                    help="full reuse random epic cacheblend draft draft_dev draft_rel draft_attn oracle_dev "
                         "oracle_norm; also epic<n>: EPIC's fixed n first tokens per chunk (epic8 epic16 epic32)")
    rg.add_argument("--sink-tokens", nargs="+", type=int, default=[0],
                    help="policy.sink_tokens values: each n > 0 adds <point>-s<n> for random, cacheblend, draft*, oracle_*")
    rg.add_argument("--shard", default=None, metavar="K/N",
                    help="only the questions whose index %% N == K (run N processes on one --out at once)")
    rg.add_argument("--draft-layers", nargs="+", type=int, default=[3, 5, 10])
    rg.add_argument("--draft-model", default=None, help="a separate draft for the draft points (GGUF file or "
                    "transformers folder; its first --draft-layers layers; tokens aligned by character offsets)")
    rg.add_argument("--max-new-tokens", type=int, default=10)
    _common(rg, "rag")
    rp = sub.add_parser("report", help="CSV tables and PNG figures from a results folder")
    rp.add_argument("--out", type=Path, required=True)
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    with cli_errors(PROG, resume="run the same command again: it resumes from --out"):
        if a.cmd == "rag":
            run_rag_cmd(a)
        elif a.cmd != "report":
            run(a)
        tables = report(a.out)
        for task, table in tables.items():
            print(f"{a.out / task}.csv")
            print(table.drop(columns=["error"]).to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def check_args(a: argparse.Namespace) -> None:
    """The numbers every eval reads, checked before the model loads: whole, finite, in range;
    and --out takes files (a file there, or an unwritable folder, is one line, not a traceback)."""
    from core.results import check_writable

    check_writable(a.out, "--out")
    number(a.n, "--n", ge=1, integer=True)
    number(a.seed, "--seed", ge=0, integer=True)          # a SeedSequence entry: never negative
    check_threads(a.threads, "--threads")
    for key in ("lengths", "hops", "draft_layers", "sink_tokens"):
        for v in getattr(a, key, None) or []:
            number(v, f"--{key.replace('_', '-')}", ge=0 if key == "sink_tokens" else 1, integer=True)
    for key in ("max_new_tokens", "chunks", "chunk_len", "context", "last"):
        if getattr(a, key, None) is not None:
            number(getattr(a, key), f"--{key.replace('_', '-')}", ge=1, integer=True)
    for key in ("depths", "r"):
        for v in getattr(a, key, None) or []:
            number(v, f"--{key}", ge=0, le=1)


def _load(a: argparse.Namespace):
    """(model, tokenizer) of --model on --device, with --threads set first."""
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    return load_model(a.model, device, a.model_path)


def run(a: argparse.Namespace) -> None:
    check_args(a)
    specs = expand(a.policies)
    t0 = time.perf_counter()
    model, tok = _load(a)
    if a.cmd == "passkey":
        too_long = [L for L in a.lengths if L + a.max_new_tokens > model.args.max_seq_len]
        if too_long:
            raise ConfigError(f"--lengths {too_long} + {a.max_new_tokens} new tokens exceed the model's context "
                              f"of {model.args.max_seq_len}")
        samples = data.passkey_samples(tok, a.lengths, a.depths, a.n, a.seed, a.format)
        task = passkey_task(tok, a.max_new_tokens)
        meta = {"lengths": a.lengths, "depths": a.depths, "n": a.n, "format": a.format, "seed": a.seed}
    else:
        if not 0 < a.last < a.context <= model.args.max_seq_len:
            raise ConfigError(f"need 0 < --last ({a.last}) < --context ({a.context}) <= the model's context "
                              f"({model.args.max_seq_len})")
        samples = data.text_samples(tok, a.context, a.n, a.seed)
        task = ppl_task(a.last)
        meta = {"context": a.context, "last": a.last, "n": a.n, "seed": a.seed,
                "corpus": "pydoc_data.topics (CPython documentation)"}
    path = run_grid(model, task, samples, specs, a.out, model_name=_model_name(a), kv_dtype=a.kv_dtype,
                    progress=not a.no_progress, meta=meta)
    print(f"{path} ({time.perf_counter() - t0:.0f} s)")


def run_rag_cmd(a: argparse.Namespace) -> None:
    check_args(a)
    pts = rag.points(a.selectors, a.r, a.draft_layers, a.chunk_len, a.draft_model, a.sink_tokens)
    shard = rag.parse_shard(a.shard)
    t0 = time.perf_counter()
    model, tok = _load(a)
    if "draft" in a.selectors and a.draft_model:
        from ..rag import load_draft

        depth = load_draft(a.draft_model, model, tok).model.args.n_layers
    else:
        depth = model.args.n_layers
    drafts = any(s.startswith("draft") for s in a.selectors)
    bad_d = [D for D in a.draft_layers if drafts and not 1 <= D <= depth]
    if bad_d:
        raise ConfigError(f"--draft-layers {bad_d} must be in [1, {depth}] (the draft's layers)")
    samples = rag.rag_samples(tok, a.n, a.seed, a.chunk_len, a.chunks, tuple(a.hops))
    meta = {"n": a.n, "chunks": a.chunks, "chunk_len": a.chunk_len, "hops": a.hops, "seed": a.seed,
            "max_new_tokens": a.max_new_tokens, "sink_tokens": a.sink_tokens,
            **({"draft_model": a.draft_model} if a.draft_model else {})}
    path = rag.run_rag(model, tok, samples, pts, a.out, model_name=_model_name(a), kv_dtype=a.kv_dtype,
                       max_new_tokens=a.max_new_tokens, progress=not a.no_progress, meta=meta, seed=a.seed,
                       shard=shard)
    print(f"{path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
