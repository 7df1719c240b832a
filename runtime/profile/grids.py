"""What a profile measures for a model: its layer shapes (`model_args`, from conf/model/) and
the grid of every kernel table (`kernel_axes`), quick or full, extended to cover what a
first-use profile's points read. Why these grids: docs/profiles.md.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from core.errors import ConfigError
from core.profile.schema import PROFILED_BITS, bits_table
from core.provenance import REPO

from ..model import ModelArgs

MODELS_DIR = REPO / "conf" / "model"


def model_args(name: str) -> ModelArgs:
    """A model's layer shapes from conf/model/<name>.yaml (the shipped GGUF's are ModelArgs' defaults)."""
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.yaml") if p.stem != "hf")
        raise ConfigError(f"--model {name}: unknown; known: {', '.join(known)}")
    cfg = OmegaConf.load(path)
    if cfg.get("source") == "gguf":
        return ModelArgs()          # SmolLM2-135M's shape (tests check it against the GGUF)
    if cfg.get("source") != "random":
        raise ConfigError(f"--model {name}: profiling needs a shape (a random-init model or the shipped GGUF)")
    args = dict(cfg.args)
    if cfg.get("full_n_layers"):
        args["n_layers"] = cfg.full_n_layers     # per-layer tables do not care; memory for KV does
    return ModelArgs.from_dict(args)


# the low-bit knobs the kivi / specache tables are timed with (bits: per table)
KIVI_KNOBS = dict(bits=2, group_size=64, residual=64, one_bit_rule="specache")


def covering(grid: list[int], need: int | None, more: list[int]) -> list[int]:
    """`grid`, extended from `more` (ascending) until its last value is >= need."""
    out = list(grid)
    for v in more:
        if need is None or out[-1] >= need:
            break
        if v > out[-1]:
            out.append(v)
    return out


def with_exact(grid: list[int], values, limit: int) -> list[int]:
    """`grid` with the exact `values` (<= limit) inserted: sorted, de-duplicated."""
    return sorted(set(grid) | {int(v) for v in values or () if 0 < int(v) <= limit})


def kernel_axes(args: ModelArgs, quick: bool, device: torch.device, cover: dict | None = None,
                bits: tuple[int, ...] = PROFILED_BITS, rag: bool = True) -> dict[str, dict[str, list]]:
    """The grids of every kernel table. `cover` (core/profile/lookup.py Need.cover():
    {"batch", "context", "tokens"}: the largest each axis must reach, and "at": the exact values
    the points read; analysis.validate's first-use profile) extends the (quick) grids
    geometrically until they cover the largest, so nothing the points read is extrapolated, and
    inserts the exact values (a point's prompt length into the token grids, its batch and query
    rows into the batch grids, its context into the decode-attention grids), so a point's own
    prompt is timed, not read between two grid points. Values, not density: the first-use
    profile stays a minute or so on the 2-core box."""
    ctx_max = args.max_seq_len
    cover = cover or {}
    at = cover.get("at") or {}
    bits = tuple(sorted(set(bits) | {2}))        # the 2-bit tables are the schema's required ones
    tokens = [t for t in covering([16, 64, 256, 1024] if quick else [16, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
                                  cover.get("tokens"), [2048, 4096, 8192, 16384]) if t <= ctx_max]
    tokens = with_exact(tokens, at.get("tokens"), ctx_max)
    base_contexts = [c for c in covering([256, 1024, 2048] if quick else [256, 512, 1024, 2048, 4096, 8192],
                                         cover.get("context"), [4096, 8192, 16384]) if c <= ctx_max]
    contexts = with_exact(base_contexts, at.get("context"), ctx_max)
    batches = covering([1, 4] if quick else ([1, 2, 4, 8, 16] if device.type == "cpu" else [1, 4, 16, 64]),
                       cover.get("batch"), [8, 16, 32, 64, 128, 256])
    batches = with_exact(batches, at.get("batch"), 1 << 30)
    low = {}
    for b in bits:
        low[bits_table("decode_attention_kivi", b)] = {"batch": batches, "context": contexts}
        low[bits_table("score_topk", b)] = {"batch": batches, "context": contexts}
        low[bits_table("gather_replace", b)] = {"batch": batches, "k": [16, 64, 256] if quick else [16, 64, 128, 256, 512]}
        low[bits_table("quantize", b)] = {"tokens": tokens}
    rag_axes = {
        # RAG chunk reuse (per layer): re-rotating reused keys, a chunk's K/V to and from disk,
        # and selective prefill: m recomputed tokens attending over a context of N
        "rope_rerotate": {"tokens": tokens},
        "chunk_store": {"tokens": [t for t in (128, 512, 2048) if t <= ctx_max]},
        "chunk_load": {"tokens": [t for t in (128, 512, 2048) if t <= ctx_max]},
        # m (recomputed tokens) reaches ceil(r * N) + the question: it follows the prompt length
        "selective_prefill": {"m": [m for m in covering([16, 64, 256] if quick else [16, 64, 128, 256, 512, 1024],
                                                        cover.get("tokens"), [1024, 2048, 4096, 8192, 16384])
                                    if m <= ctx_max],
                              "context": [c for c in base_contexts if c >= 1024] or base_contexts[-1:]},
    }
    return {
        "prefill_layer": {"tokens": tokens},
        "decode_attention_full": {"batch": batches, "context": contexts},
        **low,
        "projections": {"tokens": sorted(set(tokens) | set(batches))},   # prefill tokens and decode batches
        "mlp": {"tokens": sorted(set(tokens) | set(batches))},
        "lm_head_sample": {"batch": batches},
        **(rag_axes if rag else {}),
    }
