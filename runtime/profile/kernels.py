"""A model's kernel tables: every table of its grids (grids.py), timed on random weights of its
layer shapes through the runtime's own code (runtime/model.py blocks, runtime/kv/* layers), so
a profile describes what the runtime runs. The lone-layer tables are timed here; the low-bit,
RAG and whole-model ones in lowbit.py, rag_tables.py and whole_model.py. Why lone layers and
whole-model corrections: docs/profiles.md.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import torch

from core.profile.schema import PROFILED_BITS, bits_table, c_compiler, current_code_path

from ..engine import sample
from ..kv import Step, make_cache
from ..loaders import random_init
from ..model import Block, ModelArgs, rope_tables
from .cache_fill import layer_with_context
from .grids import kernel_axes
from .lowbit import in_model_lowbit, measure_low_bit
from .rag_tables import measure_rag
from .timing import Timer, grid
from .whole_model import lm_head_in_model, measure_step_overhead, whole_depth, whole_model_prefill


def measure_kernels(args: ModelArgs, timer: Timer, device: torch.device, dtype: torch.dtype, kv_dtype: str,
                    quick: bool, progress=None, axes: dict | None = None, cover: dict | None = None) -> dict:
    """Every table of `axes` (default kernel_axes(args, quick, device, cover)); the low-bit
    kernels once per bit-width present there (`<name>_<bits>bit`, 2-bit under the plain name).
    `cover`'s exact values ("at") are also where the whole model is timed: decode steps at its
    batches, prefills at its prompt lengths. Every table records the code path it timed
    (`code_path`, code_path_now)."""
    axes = axes or kernel_axes(args, quick, device, cover)
    at = (cover or {}).get("at") or {}
    D, H, Hkv = args.head_dim, args.n_heads, args.n_kv_heads
    block = Block(args).to(device=device, dtype=dtype).eval().requires_grad_(False)
    cos, sin = rope_tables(D, args.max_seq_len, args.rope_base)
    cos, sin = cos.to(device), sin.to(device)
    full = NS(name="full", kv_dtype=kv_dtype)
    out = {}

    def prefill(T):
        x = torch.randn(1, T, args.dim, device=device, dtype=dtype)
        pos = torch.arange(T, device=device)[None]
        c, s = cos[pos][:, :, None], sin[pos][:, :, None]   # (1, T, 1, D/2): Block's token-major layout
        zero = torch.zeros(1, dtype=torch.long, device=device)

        def run():
            cache = make_cache(full, n_layers=1, batch=1, n_kv_heads=Hkv, head_dim=D, capacity=T, device=device)
            with torch.inference_mode():
                block(x, c, s, cache[0], Step(0, T, zero, pos))
        return run
    out["prefill_layer"] = grid(timer, axes["prefill_layer"], prefill, progress)

    def attention(policy):
        def point(B, ctx):
            layer = layer_with_context(policy, args, B, ctx, dtype, device)
            q = torch.randn(B, H, 1, D, device=device, dtype=dtype)
            k = torch.randn(B, Hkv, 1, D, device=device, dtype=dtype)
            pad = torch.zeros(B, dtype=torch.long, device=device)
            pos = torch.zeros(B, 1, dtype=torch.long, device=device)
            # each run appends one token: the context drifts by repeats + warmup (<= 7) tokens
            return lambda: layer.decode(q, k, k, Step(layer.len, 1, pad, pos))
        return point
    out["decode_attention_full"] = grid(timer, axes["decode_attention_full"], attention(full), progress)
    ctx_gr = min(2048, args.max_seq_len - 64)
    for bits in PROFILED_BITS:
        if bits_table("decode_attention_kivi", bits) not in axes:
            continue
        out.update(measure_low_bit(args, timer, device, dtype, kv_dtype, axes, bits, attention, ctx_gr, progress))

    attn = block.attention

    def projections(T):
        x = torch.randn(1, T, args.dim, device=device, dtype=dtype)
        o = torch.randn(1, T, H * D, device=device, dtype=dtype)
        return lambda: (attn.wqkv(x), attn.wo(o))
    out["projections"] = grid(timer, axes["projections"], projections, progress)

    def mlp(T):
        x = torch.randn(1, T, args.dim, device=device, dtype=dtype)
        return lambda: block.feed_forward(x)
    out["mlp"] = grid(timer, axes["mlp"], mlp, progress)

    head = torch.nn.Linear(args.dim, args.vocab_size, bias=False).to(device=device, dtype=dtype).requires_grad_(False)

    def lm_head(B):
        x = torch.randn(B, args.dim, device=device, dtype=dtype)
        return lambda: sample(head(x).float(), 0.0, 1.0, None)
    out["lm_head_sample"] = grid(timer, axes["lm_head_sample"], lm_head, progress)
    # a whole decode layer at ~40 tokens of context (kernels + the Python glue between them:
    # norms, RoPE, reshapes, residual adds); with the attention tables' growth over context it
    # gives a layer's decode step without summing kernels that miss the glue
    # one whole model (or the deepest that fits) serves both whole-model measurements
    whole = random_init(ModelArgs(**{**vars(args), "n_layers": whole_depth(args, device, dtype)}), 0, dtype, device)
    out["step_overhead"], out["decode_layer"], head_in = measure_step_overhead(
        args, whole, timer, device, dtype, kv_dtype, out["lm_head_sample"], quick,
        axes["decode_attention_full"]["context"][-1], progress, batches_at=at.get("batch"))
    out["lm_head_sample"] = lm_head_in_model(out["lm_head_sample"], head_in)
    out["prefill_layer"] = whole_model_prefill(whole, timer, device, out["prefill_layer"], prefill, quick,
                                               tokens_at=at.get("tokens"))
    if bits_table("score_topk", 2) in out:
        in_model_lowbit(out, whole, args, device, kv_dtype, timer, at.get("context"), progress)
    del whole
    if "rope_rerotate" in axes:
        out.update(measure_rag(args, timer, device, dtype, axes, block, cos, sin, full, progress))
    for name, t in out.items():
        if isinstance(t, dict) and "axes" in t:
            t["code_path"] = code_path_now(device, name)
    out["grids"] = {k: v for k, v in axes.items()}
    return out


def code_path_now(device: torch.device, table: str) -> str:
    """The code path the runtime takes now for kernel table `table` on `device`, by core's rule
    (core/profile/schema.py current_code_path) with what only the runtime knows: whether the
    fused low-bit kernels could be built here (a failed build keeps the torch path)."""
    from ..kv import lowbit_cpu

    available = c_compiler() is not None and getattr(lowbit_cpu, "_failed", None) is None
    return current_code_path(device.type, table, available)
