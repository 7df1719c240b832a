"""What `python -m runtime.profile` measures: device facts, transfers, kernels, memory for KV.

Every point is timed `repeats` times after `warmup` untimed runs and stored as p10/p50/p90
(`Timer`). Kernels are timed on random weights of the model's layer shapes (a kernel's time does
not depend on the values), through the runtime's own code (`runtime/model.py` blocks,
`runtime/kv/*` layers, `runtime/transfer.py`), so a profile describes what the runtime runs.
"""
from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace as NS
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from ..engine import sample, sync
from ..kv import Step, make_cache, resolve_kv_dtype
from ..kv.kivi import fold, pack, quant_params, quantize
from ..model import Block, ModelArgs, Transformer, random_init, rope_tables
from core.errors import ConfigError
from core.provenance import REPO
from ..transfer import EmulatedLink, gather_rows
from core.profile.interp import Grid, curve
from core.profile.schema import PROFILED_BITS, bits_table, c_compiler, current_code_path, table


@dataclass
class Timer:
    device: torch.device
    repeats: int = 5
    warmup: int = 2
    budget_s: float = 2.0          # per point: fewer repeats when one run is slow (not below 3)
    points: int = field(default=0)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        for _ in range(self.warmup):
            fn()
        sync(self.device)
        times = []
        for i in range(self.repeats):
            t = time.perf_counter()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - t)
            if i >= 2 and sum(times) > self.budget_s:
                break
        self.points += 1
        a = np.asarray(times)
        return float(np.percentile(a, 10)), float(np.median(a)), float(np.percentile(a, 90))


def grid(timer: Timer, axes: dict[str, list], fn: Callable[..., Callable[[], object]], progress=None,
         unit: str = "s") -> dict:
    """Time fn(*point)() at every point of the axes' product; a table in axis order."""
    names = list(axes)
    shape = [len(axes[n]) for n in names]
    p10, p50, p90 = (np.zeros(shape) for _ in range(3))
    for idx in np.ndindex(*shape):
        point = [axes[n][i] for n, i in zip(names, idx)]
        p10[idx], p50[idx], p90[idx] = timer(fn(*point))
        if progress is not None:
            progress.update(1)
    return table(axes, p50.tolist(), p10.tolist(), p90.tolist(), unit)


def grid_size(axes: dict[str, list]) -> int:
    return int(np.prod([len(v) for v in axes.values()]))


# ----------------------------------------------------------------------------- device facts

def device_facts(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts = {"name": p.name, "type": "cuda", "memory_bytes": int(p.total_memory),
                 "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
        facts["pcie"] = pcie_link(device.index or 0)
    else:
        import psutil

        from core.provenance import cpu_name

        facts = {"name": cpu_name(), "type": "cpu", "memory_bytes": int(psutil.virtual_memory().total),
                 "cores": os.cpu_count(), "machine": platform.machine()}
    facts["torch_threads"] = torch.get_num_threads()
    facts["slug"] = slug(facts["name"] if device.type == "cuda" else f"cpu-{facts['name']}-{os.cpu_count()}c")
    from ..machine import fingerprint, machine_facts

    facts["facts"] = machine_facts(device)
    facts["fingerprint"] = fingerprint(facts["facts"])
    return facts


def pcie_link(index: int) -> dict:
    """PCIe generation and width by pynvml, the *max* values: an idle link trains down."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        gen = pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)
        width = pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)
        cur = (pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h), pynvml.nvmlDeviceGetCurrPcieLinkWidth(h))
        # GB/s per lane after line coding: gen3 0.985, gen4 1.969, gen5 3.938
        per_lane = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}.get(gen)
        return {"gen": gen, "width": width, "current": {"gen": cur[0], "width": cur[1]},
                "theoretical_bytes_per_s": per_lane * width * 1e9 if per_lane else None, "source": "pynvml"}
    except Exception as e:  # no NVML (a container without it): say so, don't guess
        return {"gen": None, "width": None, "source": f"unavailable: {type(e).__name__}"}


def slug(name: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


# ----------------------------------------------------------------------------- transfers

def transfer_sizes(quick: bool) -> list[int]:
    top = 64 << 20 if quick else 1 << 30
    sizes, s = [], 4 << 10
    while s <= top:
        sizes.append(s)
        s *= 4 if quick else 2
    return sizes


def measure_transfers(timer: Timer, device: torch.device, quick: bool, progress=None, head_dim: int = 128,
                      dtype: torch.dtype = torch.float16) -> dict:
    """Bandwidth curves (bytes -> seconds) for both directions and memory kinds, row gathers,
    copy/compute overlap, and on CPU the emulated link's achieved rate and contention."""
    sizes = transfer_sizes(quick)
    out = {}
    cuda = device.type == "cuda"
    for direction in ("h2d", "d2h"):
        for mem in ("pinned", "pageable"):
            def point(n, direction=direction, mem=mem):
                host = torch.empty(n, dtype=torch.uint8, pin_memory=cuda and mem == "pinned")
                dev = torch.empty(n, dtype=torch.uint8, device=device)
                if direction == "h2d":
                    return lambda: dev.copy_(host, non_blocking=cuda and mem == "pinned")
                return lambda: host.copy_(dev, non_blocking=cuda and mem == "pinned")
            out[f"{direction}_{mem}"] = grid(timer, {"bytes": sizes}, point, progress)
    # gathered rows: k rows of head_dim x dtype out of N, index_select into staging + one copy
    n_rows = 1 << 16 if quick else 1 << 18
    rows = [16, 64, 256, 1024, 4096, 16384] + ([] if quick else [65536])
    store = torch.randn(1, 1, n_rows, head_dim).to(dtype)
    if cuda:
        store = store.pin_memory()

    def gpoint(k):
        idx = torch.randint(0, n_rows, (1, 1, k))
        stage = torch.empty(1, 1, k, head_dim, dtype=dtype, pin_memory=cuda)
        dst = torch.empty(1, 1, k, head_dim, dtype=dtype, device=device)
        return lambda: dst.copy_(gather_rows(store, idx, stage), non_blocking=cuda)
    out["gather"] = grid(timer, {"rows": rows}, gpoint, progress)
    out["gather"]["row_bytes"] = head_dim * torch.finfo(dtype).bits // 8
    if cuda:
        # policy.gather=device: one index_select kernel through the pinned store's zero-copy UVA
        # view, on the copy stream, straight into device memory (runtime/transfer.py CudaLink.gather)
        from ..transfer import CudaLink
        link = CudaLink(device)

        def gdpoint(k):
            idx = torch.randint(0, n_rows, (1, 1, k), device=device)
            dst = torch.empty(1, 1, k, head_dim, dtype=dtype, device=device)
            return lambda: link.gather(dst, store, idx)
        out["gather_device"] = grid(timer, {"rows": rows}, gdpoint, progress)
        out["gather_device"]["row_bytes"] = out["gather"]["row_bytes"]
    out["overlap"] = measure_overlap(timer, device, quick)
    if not cuda:
        out["emulated_link"] = measure_emulated_link(quick)
        out["notes"] = ("CPU: host and device are the same memory; h2d/d2h are memcpy curves and "
                        "pinned = pageable (no page-locking without CUDA)")
    if progress is not None:
        progress.update(2)
    return out


def _gemm(device, n=1024):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return lambda: a @ b


@contextlib.contextmanager
def busy(fn: Callable[[], object]):
    """Run fn in a loop on another thread for the duration of the block."""
    stop = threading.Event()

    def loop():
        with torch.inference_mode():     # per thread: the buffers are inference tensors
            while not stop.is_set():
                fn()
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def measure_overlap(timer: Timer, device: torch.device, quick: bool) -> dict:
    """How much a concurrent copy slows a GEMM, and the reverse (CUDA: copy stream vs compute
    stream; CPU: a copy thread vs the compute thread)."""
    gemm = _gemm(device, 512 if quick else 1024)
    n = (16 if quick else 64) << 20
    cuda = device.type == "cuda"
    host = torch.empty(n, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    copy = lambda: dev.copy_(host, non_blocking=cuda)  # noqa: E731
    t_gemm = timer(gemm)[1]
    t_copy = timer(copy)[1]
    if cuda:
        side = torch.cuda.Stream(device)

        def both():
            with torch.cuda.stream(side):
                copy()
            gemm()
        t_both = timer(both)[1]
        gemm_slowdown = max(t_both / max(t_gemm, t_copy), 1.0)
        copy_slowdown = gemm_slowdown
    else:
        with busy(copy):
            t_gemm_busy = timer(gemm)[1]
        with busy(gemm):
            t_copy_busy = timer(copy)[1]
        gemm_slowdown, copy_slowdown = t_gemm_busy / t_gemm, t_copy_busy / t_copy
    return {"gemm_s": t_gemm, "copy_s": t_copy, "copy_bytes": n,
            "gemm_slowdown_with_copy": gemm_slowdown, "copy_slowdown_with_gemm": copy_slowdown}


def measure_emulated_link(quick: bool) -> dict:
    """Achieved rate of the emulated link at several set rates (its bytes move at issue, on the
    caller's thread: their memcpy cost is the h2d curve; only completion follows the link)."""
    rates = [0.5, 1.0, 2.0, 4.0]
    n = (8 if quick else 32) << 20
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    achieved = []
    for gbps in rates:
        link = EmulatedLink(gbps, latency_us=10)
        try:
            t = time.perf_counter()
            for _ in range(3):
                link.copy(dst, src)
            link.copy(dst, src).wait()
            achieved.append(4 * n / (time.perf_counter() - t) / 1e9)
        finally:
            link.close()
    return {"set_gbps": rates, "achieved_gbps": achieved, "copy_bytes": n, "latency_us": 10}


# ----------------------------------------------------------------------------- kernels

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


def _kv(shape_b, args, ctx, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(shape_b, args.n_kv_heads, ctx, args.head_dim, generator=g).to(device=device, dtype=dtype)
    return k, k.clone()


def _layer_with_context(policy, args, B, ctx, dtype, device):
    cache = make_cache(policy, n_layers=1, batch=B, n_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                       capacity=ctx + 64, device=device)
    k, v = _kv(B, args, ctx, cache[0].dtype, device)
    step = Step(0, ctx, torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, ctx, dtype=torch.long, device=device))
    cache[0].load(k, v, step)
    cache.advance(step)
    return cache[0]


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
            layer = _layer_with_context(policy, args, B, ctx, dtype, device)
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
    whole = random_init(ModelArgs(**{**vars(args), "n_layers": _whole_depth(args, device, dtype)}), 0, dtype, device)
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


def measure_low_bit(args, timer, device, dtype, kv_dtype, axes, bits, attention, ctx_gr, progress) -> dict:
    """KIVI's decode attention, SpeCache's low-bit score + top-k and gather-and-replace, and
    quantize/pack, at one bit-width (the other knobs: KIVI_KNOBS)."""
    D, H, Hkv = args.head_dim, args.n_heads, args.n_kv_heads
    knobs = {**KIVI_KNOBS, "bits": bits}
    kivi = NS(name="kivi", kv_dtype=kv_dtype, **knobs)
    spec = NS(name="specache", kv_dtype=kv_dtype, k=64, prefetch=False, **knobs)
    name = lambda n: bits_table(n, bits)  # noqa: E731
    out = {name("decode_attention_kivi"): grid(timer, axes[name("decode_attention_kivi")], attention(kivi), progress)}

    def score_topk(B, ctx):
        layer = _layer_with_context(spec, args, B, ctx, dtype, device)
        qf = fold(torch.randn(B, H, 1, D, device=device, dtype=layer.dtype), Hkv)
        G = H // Hkv
        return lambda: layer.select(layer.lowbit_scores(qf), slice(0, 1), G, 1)
    out[name("score_topk")] = grid(timer, axes[name("score_topk")], score_topk, progress)

    def gather_replace(B, k):
        pol = NS(**{**vars(spec), "k": k})
        layer = _layer_with_context(pol, args, B, ctx_gr, dtype, device)
        q = torch.randn(B, H, 1, D, device=device, dtype=layer.dtype)
        qf = fold(q, Hkv)
        s_low = layer.lowbit_scores(qf)
        idx, valid = layer.select(s_low, slice(0, 1), H // Hkv, 1)
        step = Step(ctx_gr, 1, torch.zeros(B, dtype=torch.long, device=device),
                    torch.zeros(B, 1, dtype=torch.long, device=device))
        kv_new = torch.zeros(B, Hkv, 1, D, device=device, dtype=layer.dtype)
        return lambda: layer._mixed_attention(q, qf, s_low, kv_new, kv_new, step, layer.fetch(idx, valid).wait())
    out[name("gather_replace")] = grid(timer, axes[name("gather_replace")], gather_replace, progress)
    out[name("gather_replace")]["context"] = ctx_gr

    def quant(T):
        x = torch.randn(1, Hkv, T, D, device=device)
        return lambda: pack(quantize(x, *quant_params(x, -1, bits), bits), bits)
    out[name("quantize")] = grid(timer, axes[name("quantize")], quant, progress)
    for t in out.values():
        t["bits"] = bits
    return out


def measure_rag(args, timer, device, dtype, axes, block, cos, sin, full, progress) -> dict:
    import tempfile

    from safetensors.torch import load_file, save_file

    from ..model import apply_rope

    D, Hkv = args.head_dim, args.n_kv_heads
    out = {}

    def rerotate(T):
        k = torch.randn(1, Hkv, T, D, device=device, dtype=dtype)
        delta = torch.full((1, T), 1000, device=device)
        c, s_ = cos[delta][:, None], sin[delta][:, None]
        return lambda: apply_rope(k, c, s_)
    out["rope_rerotate"] = grid(timer, axes["rope_rerotate"], rerotate, progress)

    tmp = tempfile.TemporaryDirectory(prefix="kvtestbed-profile-")
    path = f"{tmp.name}/chunk.safetensors"

    def store(T):
        kv = {"k": torch.randn(1, Hkv, T, D, dtype=dtype).contiguous(), "v": torch.randn(1, Hkv, T, D, dtype=dtype)}
        return lambda: save_file(kv, path)

    def load(T):
        save_file({"k": torch.randn(1, Hkv, T, D, dtype=dtype), "v": torch.randn(1, Hkv, T, D, dtype=dtype)}, path)
        return lambda: {n: t.to(device) for n, t in load_file(path).items()}
    out["chunk_store"] = grid(timer, axes["chunk_store"], store, progress)
    out["chunk_load"] = grid(timer, axes["chunk_load"], load, progress)
    tmp.cleanup()

    def selective(m, N):
        if m >= N:
            m = N // 2
        layer_ctx = N - m

        def run():
            cache = make_cache(full, n_layers=1, batch=1, n_kv_heads=Hkv, head_dim=D, capacity=N, device=device)
            k, v = _kv(1, args, layer_ctx, cache[0].dtype, device)
            zero = torch.zeros(1, dtype=torch.long, device=device)
            cache[0].load(k, v, Step(0, layer_ctx, zero, torch.zeros(1, layer_ctx, dtype=torch.long, device=device)))
            x = torch.randn(1, m, args.dim, device=device, dtype=dtype)
            pos = torch.arange(layer_ctx, N, device=device)[None]
            block(x, cos[pos][:, :, None], sin[pos][:, :, None], cache[0], Step(layer_ctx, m, zero, pos))
        return run
    out["selective_prefill"] = grid(timer, axes["selective_prefill"], selective, progress)
    out["selective_prefill"]["note"] = ("m new tokens attending over N (the cache holds N - m reused tokens); "
                                        "includes loading the reused K/V into the layer cache")
    return out


def _decode_step_phases(a: ModelArgs, B: int, device, dtype, kv_dtype, repeats: int, ctx: int = 40,
                        m: Transformer | None = None) -> dict[str, float]:
    """Medians over decode steps of a random model of shape `a` (or `m`) with `ctx` tokens of
    context (40: a 32-token prefill; longer: K/V loaded straight into every layer, values
    irrelevant to the time), timed by the runtime's own phase timer (runtime/phases.py) exactly
    as the engine times a step: the model's laps (overhead, layers, lm_head), the greedy sample
    as `lm_head`, the token read back as `overhead`. Returns {"step", "overhead", "layer",
    "lm_head"} seconds (layer: all layers together)."""
    from ..engine import decode_step, left_pad, prefill
    from ..phases import PhaseTimer, lap

    m = m if m is not None else random_init(a, 0, dtype, device)
    tokens, pad = left_pad([[5] * 32] * B, a.pad_id, device)
    kv = None
    if ctx > 40:
        kv = torch.zeros(B, a.n_kv_heads, ctx, a.head_dim, dtype=resolve_kv_dtype(kv_dtype, device), device=device)
        zero = torch.zeros(B, dtype=torch.long, device=device)
        load_step = Step(0, ctx, zero, torch.arange(ctx, device=device)[None].expand(B, ctx))
    timer = PhaseTimer(device)
    samples: dict[str, list[float]] = {"step": [], "overhead": [], "layer": [], "lm_head": []}

    def run():
        cache = make_cache(NS(name="full", kv_dtype=kv_dtype), n_layers=a.n_layers, batch=B,
                           n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, capacity=max(ctx, 32) + 16, device=device)
        if kv is None:
            prefill(m, cache, tokens, pad)
        else:
            for layer in cache.layers:
                layer.load(kv, kv, load_step)
            cache.advance(load_step)
        tok = tokens[:, -1]
        for i in range(8):
            s = time.perf_counter()
            with timer.step() as h:
                tok = decode_step(m, cache, tok, pad).argmax(-1)
                lap("lm_head")              # greedy sampling, as the engine laps it
                tok.tolist()                # the engine reads every token back: part of a step
                sync(device)
            wall = time.perf_counter() - s
            if i == 0:
                continue                    # the first step after a prefill / load warms up
            samples["step"].append(wall)
            for k in ("overhead", "layer", "lm_head"):
                samples[k].append(h.times.phases.get(k, 0.0))
    for _ in range(max(repeats, 1)):
        run()
    return {k: float(np.median(v)) for k, v in samples.items()}


def _whole_depth(args: ModelArgs, device, dtype) -> int:
    """The deepest model of this shape that takes <= 1/4 of free memory (all of it, usually)."""
    import psutil

    with torch.device("meta"):
        per_layer_bytes = sum(p.numel() for p in Block(args).parameters()) * torch.finfo(dtype).bits // 8
    budget = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available) / 4
    return max(1, min(args.n_layers, int(budget // max(per_layer_bytes, 1)) - 2))


def whole_model_prefill(m: Transformer, timer: Timer, device, alone: dict, alone_run, quick: bool,
                        tokens_at=None) -> dict:
    """`prefill_layer` as a layer runs inside the whole model.

    The kernel grid times one Block alone. Inside the whole model each layer's weights and
    activations compete for the cache with every other layer's: on this project's CPU box a
    lone 135M layer sits in the 480 MiB L3 and runs measurably faster than the same layer in
    the 30-layer model (the decode_layer story again). Timing whole-model prefills at every
    grid point would take minutes at 8K, so the whole model is timed at a few lengths (256 on
    quick grids, 64 / 256 / 1024 / 2048 on full ones) and at `tokens_at`, the exact prompt
    lengths of a first-use profile's points, so the points' own prompts are timed as the model
    runs them; per layer = the whole model's `layer` phase / depth (the runtime's own phase
    timer, runtime/phases.py: the layers' laps, nothing subtracted), and the grid is scaled
    by the ratio whole/alone, read between those lengths by the rule every table is read by
    (core/profile/interp.py) and held flat past the ends. The lone layer is timed again beside
    the whole model, in alternation (`alone_run(T)` builds its run): a ratio of two timings
    taken minutes apart carries the machine's drift. At least 3 and up to max(repeats, 5)
    alternations per length, fewer past 8 x the timer's per-point budget (a 30-layer prefill of
    1K tokens is ~2 s on the 2-core box)."""
    from ..engine import left_pad, prefill
    from ..phases import PhaseTimer

    toks = alone["axes"]["tokens"]
    base = [256] if quick else [64, 256, 1024, 2048]
    lengths = sorted(t for t in set(base) | {int(t) for t in tokens_at or ()} if t in toks)
    if not lengths:
        return alone
    args, depth = m.args, m.args.n_layers
    ptimer = PhaseTimer(device)
    ratios, reps = [], []
    for T in lengths:
        # random token ids, as runtime.bench's prompts (a prompt of one repeated id reads one
        # embedding row and ran ~4% faster here)
        ids = torch.randint(3, m.args.vocab_size, (T,), generator=torch.Generator().manual_seed(T)).tolist()
        tokens, pad = left_pad([ids], m.args.pad_id, device)

        def run():
            cache = make_cache(NS(name="full", kv_dtype="auto"), n_layers=depth, batch=1, n_kv_heads=args.n_kv_heads,
                               head_dim=args.head_dim, capacity=T, device=device)
            with ptimer.step() as h:
                prefill(m, cache, tokens, pad)
                sync(device)
            return h.times.phases.get("layer", 0.0)
        lone = alone_run(T)
        run(), lone()                                        # warm both
        w, a1 = [], []
        for i in range(max(timer.repeats, 5)):
            t0 = time.perf_counter()
            w.append(run())                                  # the layers' own seconds
            whole_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            lone()
            sync(device)
            a1.append(time.perf_counter() - t0)
            if i >= 2 and whole_s * (i + 1) + sum(a1) > 8 * timer.budget_s:
                break
        reps.append(len(w))
        ratios.append(max(float(np.median(w)) / depth, 1e-9) / float(np.median(a1)))
    r = curve(lengths, ratios, toks)                         # flat past the ends
    out = dict(alone)
    for q in ("p10", "p50", "p90"):
        if q in alone:
            out[q] = [v * f for v, f in zip(alone[q], r)]
    out["whole_model"] = {"layers": depth, "tokens": lengths, "ratio_to_alone": [float(x) for x in ratios],
                          "alternations": reps, "alone_p50": alone["p50"]}
    return out


def measure_step_overhead(args: ModelArgs, m: Transformer, timer: Timer, device, dtype, kv_dtype, head: dict,
                          quick: bool = False, max_context: int | None = None, progress=None,
                          batches_at=None) -> tuple[dict, dict, dict]:
    """Three whole-model facts, from decode steps of the *whole* model (all layers, the real
    vocabulary) timed by the runtime's own phase timer (runtime/phases.py), so each table means
    what the runtime's phase of that name means:

    - `step_overhead` (batch): the `overhead` phase (embedding, RoPE tables, Python, launches,
      the token read back), the median over the batch's steps at every context;
    - `decode_layer` (batch x context): the `layer` phase / n_layers (one whole decode layer,
      kernels and the glue between them);
    - the `lm_head` phase (batch), returned as a third value {batch: seconds}: the caller
      rescales the lone `lm_head_sample` table to it (a lone head sits in a large CPU cache; in
      the model its weights stream from DRAM behind the layers').

    Small models fit in a large CPU cache (300-480 MiB of L3 on the project's VMs) and run up to
    ~40% faster per layer than the whole model, whose weights stream from DRAM; so the per-layer
    cost must come from the whole model. When the whole model would not fit in memory, the
    deepest model that takes <= 1/4 of it stands in (and the table says so). `m` is that model,
    random weights of `args`' shape.

    The context axis is there for the same reason: a lone layer's K/V sit in the cache too, so
    the attention tables (one layer, measured alone) grow far less with context than a layer
    of the whole model does, whose K/V come from DRAM behind everyone else's weights. Measured
    with the `full` policy; the simulator adds other policies' attention as their difference
    from `full` in the kernel tables.

    Batches: 1, 4 (or the first two), the largest when a quick grid was extended to cover it,
    and `batches_at` (a first-use profile's exact batches and query rows: the points' own)."""
    depth = m.args.n_layers
    contexts = [c for c in ([40, 2048] if quick else [40, 512, 2048, 4096, 8128]) if c + 16 <= args.max_seq_len]
    if max_context and min(max_context, args.max_seq_len - 64) > contexts[-1]:   # a covering grid (kernel_axes' `cover`)
        contexts.append(min(max_context, args.max_seq_len - 64))
    res, layer, head_in = {}, {}, {}
    head_b = head["axes"]["batch"]
    # at least two points to interpolate, and the largest batch when the grid was extended to
    # cover it (quick grids are [1, 4]; a covering grid ends at the points' largest)
    exact = {int(b) for b in batches_at or ()}
    use = [B for B in head_b if B in (1, 4) or B in head_b[:2] or (quick and B == head_b[-1]) or B in exact]
    if progress is not None:          # these steps count on the bar too (whole-model steps are the slow ones)
        progress.total += len(use) * len(contexts)
        progress.set_description("profile whole-model steps")
    # the points are measured in rounds (every point once per round, A B C A B C), not one
    # point's repeats back to back: this VM's speed wanders +-20% within seconds, and a point
    # timed in one burst would carry whichever moment it fell in
    runs: dict[tuple[int, int], list[dict]] = {}
    rounds = max(timer.repeats, 3)
    for r in range(rounds):
        for B in (b for b in head_b if b in use):
            for ctx in contexts:
                runs.setdefault((B, ctx), []).append(
                    _decode_step_phases(m.args, B, device, dtype, kv_dtype, 1, ctx=ctx, m=m))
                if progress is not None:
                    progress.update(1 / rounds)
    for (B, ctx), rs in runs.items():
        layer[B, ctx] = float(np.median([x["layer"] for x in rs])) / depth
    for B in {b for b, _ in runs}:
        rs = [x for (b, _), v in runs.items() if b == B for x in v]
        res[B], head_in[B] = float(np.median([x["overhead"] for x in rs])), float(np.median([x["lm_head"] for x in rs]))
    batches = sorted(res)
    lay = table({"batch": batches, "context": contexts}, [[layer[b, c] for c in contexts] for b in batches])
    lay["whole_model_layers"] = depth
    lay["measured_by"] = "runtime phase timer: the layer phase / n_layers of whole-model decode steps"
    over = table({"batch": batches}, [res[b] for b in batches])
    over["measured_by"] = "runtime phase timer: the overhead phase of whole-model decode steps"
    return over, lay, head_in


def in_model_lowbit(out: dict, m: Transformer, args: ModelArgs, device, kv_dtype: str, timer: Timer,
                    contexts_at=None, progress=None) -> None:
    """SpeCache's decode terms as the engine runs them, inside the whole model: `kivi` and
    `specache` (k = 64, prefetch, the 2-bit KIVI_KNOBS) generate a few tokens on the whole model
    (engine.generate, phases on), alternated in rounds, at the largest static context of the
    points (else 1K). Two facts go into the 2-bit tables:

    - `score_topk`: the `score` phase per layer over the table's value at the same (query rows,
      context); the whole table is scaled by that ratio (`in_model`): the lone-layer table sits
      in the CPU cache, and the engine's pass also picks the exact top-k for the recall count;
    - `gather_replace.in_model`: the replace part per layer, (specache layer phase - kivi layer
      phase) / layers minus the extra query row's GEMMs (decode_layer at 40 tokens, rows 2 vs 1),
      and the `fetch` and `back` phases per layer with the bytes they moved: simulator/costs.py
      shifts its replace table to the first and adds to the gather / host write what the lone
      transfer tables miss (Python and bookkeeping around each copy)."""
    from ..engine import SamplingParams, generate

    depth = m.args.n_layers
    ctx = max([int(c) for c in contexts_at or ()] or [1056])
    ctx = min(ctx, args.max_seq_len - 32)
    ids = torch.randint(3, args.vocab_size, (ctx - 16,), generator=torch.Generator().manual_seed(ctx)).tolist()
    knobs = dict(KIVI_KNOBS)
    pols = {"kivi": NS(name="kivi", kv_dtype=kv_dtype, **knobs),
            "specache": NS(name="specache", kv_dtype=kv_dtype, k=64, prefetch=True, gather="host", **knobs)}
    params = SamplingParams(max_new_tokens=17, ignore_eos=True)
    got: dict[str, list[dict]] = {n: [] for n in pols}
    for _ in range(max(min(timer.repeats, 3), 2)):           # rounds: kivi, specache, kivi, ...
        for name, pol in pols.items():
            d = generate(m, [ids], params, pol, phases=True).phases.get("decode") or {}
            if d.get("steps"):
                got[name].append({p: v / d["steps"] for p, v in d["phases"].items()})
            if progress is not None:
                progress.set_description("profile low-bit steps in the whole model")
    if not all(got.values()):
        return
    med = {n: {p: float(np.median([r.get(p, 0.0) for r in rs])) for p in ("layer", "score", "fetch", "back")}
           for n, rs in got.items()}
    grid_of = lambda t: Grid([t["axes"][a] for a in t["axes"]], t["p50"])  # noqa: E731
    rows = 2                                                  # the real token and the guess
    sc = out[bits_table("score_topk", 2)]
    lone = grid_of(sc).read([rows, ctx])
    score = med["specache"]["score"] / depth
    if lone > 0 and score > 0:
        r = score / lone
        for q in ("p10", "p50", "p90"):
            if q in sc:
                sc[q] = (np.asarray(sc[q], dtype=float) * r).tolist()
        sc["in_model"] = {"rows": rows, "context": ctx, "score_s": score, "ratio_to_alone": r}
    dl = out["decode_layer"]
    c0 = [row[0] for row in dl["p50"]]
    extra_row = Grid([dl["axes"]["batch"]], c0).read([rows]) - Grid([dl["axes"]["batch"]], c0).read([1])
    replace = (med["specache"]["layer"] - med["kivi"]["layer"]) / depth - extra_row
    elem = torch.finfo(resolve_kv_dtype(kv_dtype, device)).bits // 8
    kv_row = args.n_kv_heads * args.head_dim * elem
    out[bits_table("gather_replace", 2)]["in_model"] = {
        "rows": rows, "k": 64, "context": ctx, "replace_s": max(replace, 0.0),
        # the fetch (top-k rows gathered + copied, here without an emulated link) and the new
        # token's rows written to the host store, per layer, with the bytes they moved
        "fetch_s": med["specache"]["fetch"] / depth, "fetch_bytes": 2 * 64 * kv_row,
        "back_s": med["specache"]["back"] / depth, "back_bytes": 2 * kv_row,
        "kivi_layer_s": med["kivi"]["layer"] / depth, "specache_layer_s": med["specache"]["layer"] / depth}


def lm_head_in_model(alone: dict, in_model: dict[int, float]) -> dict:
    """The lone `lm_head_sample` table scaled to the `lm_head` phase measured inside the whole
    model at some batches: the ratio in-model / alone at those batches, read between them by
    the rule every table is read by (core/profile/interp.py `curve`, flat past the ends)."""
    axis = alone["axes"]["batch"]
    at = [b for b in sorted(in_model) if b in axis]
    if not at:
        return alone
    lone = {b: alone["p50"][axis.index(b)] for b in at}
    ratios = [in_model[b] / lone[b] if lone[b] > 0 else 1.0 for b in at]
    r = curve(at, ratios, axis)
    out = dict(alone)
    for q in ("p10", "p50", "p90"):
        if q in alone:
            out[q] = [v * f for v, f in zip(alone[q], r)]
    out["in_model"] = {"batch": at, "ratio_to_alone": [float(x) for x in ratios], "alone_p50": alone["p50"]}
    return out


# ----------------------------------------------------------------------------- memory for KV

def measure_memory(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> dict:
    """Memory left for KV after the whole model's weights, the activation peak of a prefill
    (measured on the first layers and scaled by nothing: activations do not grow with depth)
    and the runtime's own overhead. Not total x 0.9."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free0, total = torch.cuda.mem_get_info(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        small = ModelArgs(**{**vars(args), "n_layers": 1})
        m = random_init(small, 0, dtype, device)
        per_layer = sum(p.numel() * p.element_size() for p in m.layers.parameters())
        other = sum(p.numel() * p.element_size() for p in m.parameters()) - per_layer
        weights = other + per_layer * args.n_layers
        T = min(2048, args.max_seq_len)
        _prefill_once(m, T, device)
        act_peak = torch.cuda.max_memory_allocated(device) - base - (other + per_layer)
        runtime_overhead = total - free0 - base    # CUDA context, cuBLAS workspaces, allocator slack
        del m
        torch.cuda.empty_cache()
        avail = total - runtime_overhead - base - weights - act_peak
        return {"total_bytes": int(total), "weights_bytes": int(weights), "activation_peak_bytes": int(act_peak),
                "runtime_overhead_bytes": int(runtime_overhead), "kv_available_bytes": int(max(avail, 0)),
                "activation_probe_tokens": T}
    import psutil

    from ..engine import PeakMemory, cpu_peak_rss

    with torch.device("meta"):
        meta = Transformer(args)
    weights = sum(p.numel() for p in meta.parameters()) * torch.finfo(dtype).bits // 8
    small = ModelArgs(**{**vars(args), "n_layers": 1})
    m = random_init(small, 0, dtype, device)
    T = min(2048, args.max_seq_len)
    rss0 = cpu_peak_rss()
    with PeakMemory(device) as pm:
        _prefill_once(m, T, device)
    act_peak = max(pm.peak - rss0, 0)
    vm = psutil.virtual_memory()
    avail = vm.available - weights - act_peak
    return {"total_bytes": int(vm.total), "available_now_bytes": int(vm.available), "weights_bytes": int(weights),
            "activation_peak_bytes": int(act_peak), "kv_available_bytes": int(max(avail, 0)),
            "activation_probe_tokens": T}


def _prefill_once(m, T, device):
    from ..engine import left_pad, prefill

    tokens, pad = left_pad([[5] * T], m.args.pad_id, device)
    cache = make_cache(NS(name="full", kv_dtype="auto"), n_layers=m.args.n_layers, batch=1,
                       n_kv_heads=m.args.n_kv_heads, head_dim=m.args.head_dim, capacity=T, device=device)
    prefill(m, cache, tokens, pad)
    sync(device)
