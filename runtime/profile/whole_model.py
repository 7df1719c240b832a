"""Whole-model corrections to the lone-layer tables: decode steps and prefills of the *whole*
model (all layers, the real vocabulary), timed by the runtime's own phase timer
(runtime/phases.py), give `step_overhead`, `decode_layer`, and the in-model scale of
`lm_head_sample` and `prefill_layer`. A lone layer sits in a large CPU cache; in the model its
weights stream from DRAM behind everyone else's. Why: docs/profiles.md.
"""
from __future__ import annotations

import time
from types import SimpleNamespace as NS

import numpy as np
import torch

from core.profile.interp import curve
from core.profile.schema import table

from ..engine import decode_step, left_pad, prefill, sync
from ..kv import Step, make_cache, resolve_kv_dtype
from ..loaders import random_init
from ..model import Block, ModelArgs, Transformer
from ..phases import PhaseTimer, lap
from .timing import Timer, wall_times


def scaled(alone: dict, factors) -> dict:
    """A copy of the one-axis table `alone` with its p10/p50/p90 multiplied point by point."""
    out = dict(alone)
    for q in ("p10", "p50", "p90"):
        if q in alone:
            out[q] = [v * f for v, f in zip(alone[q], factors)]
    return out


def _decode_step_phases(a: ModelArgs, B: int, device, dtype, kv_dtype, repeats: int, ctx: int = 40,
                        m: Transformer | None = None) -> dict[str, float]:
    """Medians over decode steps of a random model of shape `a` (or `m`) with `ctx` tokens of
    context (40: a 32-token prefill; longer: K/V loaded straight into every layer, values
    irrelevant to the time), timed by the runtime's own phase timer (runtime/phases.py) exactly
    as the engine times a step: the model's laps (overhead, layers, lm_head), the greedy sample
    as `lm_head`, the token read back as `overhead`. Returns {"step", "overhead", "layer",
    "lm_head"} seconds (layer: all layers together)."""
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


def whole_depth(args: ModelArgs, device, dtype) -> int:
    """The deepest model of this shape that takes <= 1/4 of free memory (all of it, usually)."""
    import psutil

    with torch.device("meta"):
        per_layer_bytes = sum(p.numel() for p in Block(args).parameters()) * torch.finfo(dtype).bits // 8
    budget = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available) / 4
    return max(1, min(args.n_layers, int(budget // max(per_layer_bytes, 1)) - 2))


def whole_prefill(m: Transformer, T: int, ptimer: PhaseTimer):
    """A function that prefills one T-token prompt through the whole model `m` and returns its
    `layer` phase (all layers, seconds; the runtime's own phase timer), as whole_model_prefill times
    prefill_layer and the model probe (runtime/profile/speed.py) times it again."""
    args, device = m.args, m.device
    # random token ids, as runtime.bench's prompts (a prompt of one repeated id reads one
    # embedding row and ran ~4% faster here)
    ids = torch.randint(3, args.vocab_size, (T,), generator=torch.Generator().manual_seed(T)).tolist()
    tokens, pad = left_pad([ids], args.pad_id, device)

    def run() -> float:
        cache = make_cache(NS(name="full", kv_dtype="auto"), n_layers=args.n_layers, batch=1,
                           n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, capacity=T, device=device)
        with ptimer.step() as h:
            prefill(m, cache, tokens, pad)
            sync(device)
        return h.times.phases.get("layer", 0.0)
    return run


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
    toks = alone["axes"]["tokens"]
    base = [256] if quick else [64, 256, 1024, 2048]
    lengths = sorted(t for t in set(base) | {int(t) for t in tokens_at or ()} if t in toks)
    if not lengths:
        return alone
    depth = m.args.n_layers
    ptimer = PhaseTimer(device)
    ratios, reps = [], []
    for T in lengths:
        run = whole_prefill(m, T, ptimer)
        lone = alone_run(T)
        run(), lone()                                        # warm both
        w, a1 = [], []
        for i in range(max(timer.repeats, 5)):
            t0 = time.perf_counter()
            w.append(run())                                  # the layers' own seconds
            whole_s = time.perf_counter() - t0
            a1 += wall_times(lone, device, 1)                # the lone layer right after it
            if i >= 2 and whole_s * (i + 1) + sum(a1) > 8 * timer.budget_s:
                break
        reps.append(len(w))
        ratios.append(max(float(np.median(w)) / depth, 1e-9) / float(np.median(a1)))
    out = scaled(alone, curve(lengths, ratios, toks))        # flat past the ends
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
    out = scaled(alone, curve(at, ratios, axis))
    out["in_model"] = {"batch": at, "ratio_to_alone": [float(x) for x in ratios], "alone_p50": alone["p50"]}
    return out

