"""Batched prefill and decode with any KV policy, and the measurements a serving engineer reads.

A static batch of B requests with their own prompt lengths is left-padded into one (B, T)
tensor: every row then writes its next token at the same cache column, and a row's real
tokens sit at RoPE positions 0..n-1 whatever its padding. Pad columns are masked out of
attention and excluded from any KV policy's statistics (see `runtime.kv.base.Step`).

Timing: TTFT of a request is from the start of the batch's prefill to its first token; its
TPOT is (time of last token - time of first) / (tokens - 1); decode tokens/s counts the tokens
the decode steps produced over their time; throughput counts every output token over the
whole wall time (the serving figure, prefill included). Peak memory is CUDA's
max_memory_allocated, or on CPU the process's peak RSS (VmHWM, reset at the start).

Phases (runtime/phases.py): the prefill step (t0 to its first token read back) and every decode
step (exactly each `steps` window) run under the lap timer; the model and the KV policies lap
their parts, sampling laps `lm_head`, the read-back and bookkeeping close the step as `overhead`.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.values import number
from core.machine import resolve_device  # noqa: F401  (runtime.engine.resolve_device, as before)

from .kv import KVCache, Step, lowbit_cpu, make_cache, policy_spec
from .model import Transformer
from .phases import PhaseLog, lap, make_timer


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    ignore_eos: bool = False      # benchmarks: always produce max_new_tokens
    seed: int = 0

    def __post_init__(self):
        number(self.max_new_tokens, "max_new_tokens", ge=1, integer=True)
        number(self.temperature, "temperature")                    # NaN / inf: one line, not a sampling crash
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        number(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class RequestResult:
    prompt_len: int
    tokens: list[int]
    ttft_s: float
    tpot_s: float | None           # None for a single-token output
    finished_by_eos: bool = False


@dataclass
class BatchResult:
    requests: list[RequestResult]
    wall_s: float
    prefill_s: float
    decode_s: float
    decode_tokens: int
    peak_mem_bytes: int
    kv_bytes_device: int
    kv_bytes_host: int
    kv_bytes_fp16: int
    steps: list[float] = field(default_factory=list)  # seconds of each decode step
    policy_stats: dict[str, float] = field(default_factory=dict)  # e.g. SpeCache guess accuracy, top-k recall
    # per stage (prefill, decode): {"steps": n, "step_s": wall seconds summed, "phases": {phase: s summed},
    # "parts": {part: s summed}} (runtime/phases.py); {} with phases=False
    phases: dict[str, dict] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)    # timeline=True: each step's window and laps

    @property
    def output_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    @property
    def throughput_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_tokens > 0 else math.nan

    @property
    def kv_ratio_vs_fp16(self) -> float:
        return self.kv_bytes_device / self.kv_bytes_fp16 if self.kv_bytes_fp16 else math.nan


# ----------------------------------------------------------------------------- devices and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a region: CUDA allocator peak, or the CPU process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak is lifetime
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = cpu_peak_rss()
        return False


def cpu_peak_rss() -> int:
    """The process's peak RSS: VmHWM of /proc/self/status (Linux), else getrusage's."""
    try:
        hwm = re.search(r"^VmHWM:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        hwm = None
    if hwm:
        return int(hwm.group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- prefill / decode

def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> tokens (B, T) left-padded with pad_id, pad (B,) number of pad columns."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Run the whole (left-padded) prompt; returns the last position's logits (B, V)."""
    B, T = tokens.shape
    cols = torch.arange(T, device=tokens.device)
    positions = (cols[None, :] - pad[:, None]).clamp(min=0)        # (B, T)
    step = Step(start=0, n_new=T, pad=pad, positions=positions)
    return model(tokens, cache, step, last_only=True)[:, -1]


def decode_step(model: Transformer, cache: KVCache, token: torch.Tensor, pad: torch.Tensor,
                guess: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row at column cache.len; returns logits (B, V).

    With `guess` (speculative pre-decoding), the guessed next token rides along at the next
    position: it attends to the cache and to `token`, is never stored, and its logits are
    returned too: (B, 2, V).
    """
    start = cache.len
    if guess is None:
        step = Step(start=start, n_new=1, pad=pad, positions=(start - pad)[:, None])
        return model(token[:, None], cache, step)[:, -1]
    pos = (start - pad)[:, None] + torch.arange(2, device=pad.device)   # (B, 2)
    step = Step(start=start, n_new=2, pad=pad, positions=pos, spec=True)
    return model(torch.stack([token, guess], dim=1), cache, step)


def speculate(model: Transformer, cache: KVCache, token: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """A pass that stores nothing: `token` attends to the cache as it is (SpeCache's first
    pre-decoding from the low-bit cache alone). Returns its logits (B, V)."""
    start = cache.len
    step = Step(start=start, n_new=1, pad=pad, positions=(start - pad)[:, None], spec=True)
    return model(token[:, None], cache, step)[:, -1]


def next_tokens(model: Transformer, cache: KVCache, token: torch.Tensor, pad: torch.Tensor, guess: torch.Tensor | None,
                params: SamplingParams, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step: the sampled tokens (B,) and, when `guess` rode along (speculative
    pre-decoding), the greedy guess of the step after (B,), else None."""
    if guess is None:
        out = sample(decode_step(model, cache, token, pad), params.temperature, params.top_p, gen), None
    else:
        both = decode_step(model, cache, token, pad, guess=guess)                  # (B, 2, V)
        out = sample(both[:, 0], params.temperature, params.top_p, gen), both[:, 1].argmax(-1)
    lap("lm_head")
    return out


@dataclass
class Prefilled:
    """One full-precision prefill, to be shared by several policies (quality evals)."""

    prompts: list[list[int]]
    pad: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]   # per layer: k, v (B, H_kv, T, D)
    logits: torch.Tensor                          # (B, V) of the last prompt position


def prefill_once(model: Transformer, prompts: list[list[int]], kv_dtype: str = "auto") -> Prefilled:
    """Prefill `prompts` once; `generate(..., prefilled=...)` then starts any policy from it.
    Exact: every policy's prefill is full-precision attention over the prompt (LayerKV.attend)."""
    args, device = model.args, model.device
    tokens, pad = left_pad(prompts, args.pad_id, device)
    cache = make_cache(policy_spec("full", kv_dtype), n_layers=args.n_layers, batch=len(prompts),
                       n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, capacity=tokens.shape[1], device=device)
    logits = prefill(model, cache, tokens, pad)
    T = tokens.shape[1]
    kv = [(layer.k[:, :, :T].clone(), layer.v[:, :, :T].clone()) for layer in cache.layers]
    return Prefilled(prompts=[list(p) for p in prompts], pad=pad, kv=kv, logits=logits)


def load_prefilled(cache: KVCache, pre: Prefilled) -> torch.Tensor:
    T = pre.kv[0][0].shape[2]
    cols = torch.arange(T, device=pre.pad.device)
    step = Step(start=0, n_new=T, pad=pre.pad, positions=(cols[None, :] - pre.pad[:, None]).clamp(min=0))
    for layer, (k, v) in zip(cache.layers, pre.kv):
        layer.load(k.to(layer.dtype), v.to(layer.dtype), step)
    cache.advance(step)
    return pre.logits


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy at temperature 0; else softmax(logits / T),
    restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        keep = (p_sorted.cumsum(-1) - p_sorted) < top_p             # always keeps the top token
        p_sorted = p_sorted * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, policy,
             *, link=None, prefilled: Prefilled | None = None, progress: bool = False,
             on_token: Callable[[list[int], list[bool]], None] | None = None,
             phases: bool = True, timeline: bool = False) -> BatchResult:
    """Generate for a static batch under `policy`: the checked declaration (core/checks.py), or
    a config with .name, .kv_dtype and the knobs, built and checked by make_cache.

    link: the host<->device copy engine for policies that keep K/V on the host (transfer.py).
    prefilled: start from a shared prefill of the same prompts (`prefill_once`); TTFT then
    measures only sampling the first token.
    on_token(tokens, active) is called after every step with the token of each row and
    whether that row is still generating (for streaming).

    A cache with `speculative` set (SpeCache with prefetch) runs speculative pre-decoding: one
    storing-nothing pass of the first token, then every step carries the real token and a greedy
    guess of the next one; the guess's attention picks the next step's top-k rows to prefetch.

    phases: time each step's phases (BatchResult.phases); timeline: keep each step's laps too
    (BatchResult.timeline, for runtime.phases.chrome_trace).
    """
    args, device = model.args, model.device
    if not prompts:
        raise ConfigError("batch is empty; give at least one prompt (workload.batch >= 1)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(p) + params.max_new_tokens > args.max_seq_len:
            raise ConfigError(f"prompt {i} has {len(p)} tokens + {params.max_new_tokens} new > the model's "
                              f"context of {args.max_seq_len}; shorten the prompt or generate fewer tokens")
    B = len(prompts)
    tokens, pad = left_pad(prompts, args.pad_id, device)
    capacity = tokens.shape[1] + params.max_new_tokens
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.temperature > 0 else None

    out: list[list[int]] = [[] for _ in range(B)]
    t_tok: list[list[float]] = [[] for _ in range(B)]
    active = [True] * B
    eos_hit = [False] * B
    step_times: list[float] = []
    timer, log = make_timer(device, phases, timeline), PhaseLog(timeline)

    with PeakMemory(device) as mem:
        cache = make_cache(policy, n_layers=args.n_layers, batch=B, n_kv_heads=args.n_kv_heads,
                           head_dim=args.head_dim, capacity=capacity + 1, device=device, link=link)
        if prefilled is not None and prefilled.prompts != [list(p) for p in prompts]:
            raise ValueError("prefilled was computed for other prompts")
        prepare_cache(model, cache)      # kernels built on first use are built now, before the clock
        sync(device)
        t0 = time.perf_counter()
        with timer.step() as rec:
            if prefilled is None:
                logits = prefill(model, cache, tokens, pad)
            else:
                logits = load_prefilled(cache, prefilled)
                lap("load")                       # the shared prefill's K/V placed into this cache
            nxt = sample(logits, params.temperature, params.top_p, gen)
            lap("lm_head")
            t_first = _record(nxt, out, t_tok, active, eos_hit, params, args.eos_id, device)
        log.add("prefill", rec, t0, t_first)
        if on_token:
            on_token(nxt.tolist(), list(active))
        bar = tqdm(total=params.max_new_tokens - 1, desc=f"decode B={B}", unit="step",
                   delay=2.0, disable=not progress, leave=False)
        decode_tokens = 0
        guess = None
        guesses = hits = 0
        if cache.speculative and params.max_new_tokens > 1:
            guess = speculate(model, cache, nxt, pad).argmax(-1)
        for _ in range(params.max_new_tokens - 1):
            if not any(active):
                break
            ts = time.perf_counter()
            with timer.step() as rec:
                nxt, guess_next = next_tokens(model, cache, nxt, pad, guess, params, gen)
                if guess is not None:
                    live = torch.tensor(active, device=device)
                    guesses += int(live.sum())
                    hits += int(((guess == nxt) & live).sum())
                guess = guess_next
                decode_tokens += sum(active)
                t_now = _record(nxt, out, t_tok, active, eos_hit, params, args.eos_id, device)
            step_times.append(t_now - ts)
            log.add("decode", rec, ts, t_now)
            if on_token:
                on_token(nxt.tolist(), list(active))
            bar.update(1)
        bar.close()
        t_end = time.perf_counter()
        kv_dev, kv_host = cache.nbytes()
        kv_fp16 = cache.fp16_bytes(args.n_kv_heads, args.head_dim)
        stats = policy_stats_of(cache, guesses, hits)

    reqs = []
    for b in range(B):
        ts = t_tok[b]
        tpot = (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None
        reqs.append(RequestResult(prompt_len=len(prompts[b]), tokens=out[b], ttft_s=ts[0] - t0,
                                  tpot_s=tpot, finished_by_eos=eos_hit[b]))
    return BatchResult(requests=reqs, wall_s=t_end - t0, prefill_s=t_first - t0, decode_s=t_end - t_first,
                       decode_tokens=decode_tokens, peak_mem_bytes=mem.peak, kv_bytes_device=kv_dev,
                       kv_bytes_host=kv_host, kv_bytes_fp16=kv_fp16, steps=step_times, policy_stats=stats,
                       phases=log.totals(), timeline=log.steps or [])


def prepare_cache(model: Transformer, cache: KVCache) -> None:
    """Build what `cache`'s decode steps would otherwise build lazily in a timed step: the fused
    low-bit CPU kernels (runtime/kv/lowbit_cpu.py) for the query rows a step carries per KV head
    (the GQA group; twice that with a speculative guess)."""
    group = model.args.n_heads // model.args.n_kv_heads
    lowbit_cpu.prepare(cache, [group, 2 * group] if cache.speculative else [group])


def policy_stats_of(cache: KVCache, guesses: int, hits: int) -> dict[str, float]:
    """Counters summed over layers, turned into rates where a policy reports hit/total pairs."""
    raw = cache.stats()
    out: dict[str, float] = {}
    for key, val in raw.items():
        if key.endswith("_hits") and key[:-5] + "_total" in raw:
            total = raw[key[:-5] + "_total"]
            if total:
                out[key[:-5]] = val / total
        elif not key.endswith("_total"):
            out[key] = val
    if guesses:
        out["guess_accuracy"] = hits / guesses
    return out


def _record(nxt, out, t_tok, active, eos_hit, params, eos_id, device) -> float:
    """Append each active row's new token and its time; retire rows that produced EOS."""
    ids = nxt.tolist()   # forces the step to finish (a sync on CUDA)
    sync(device)
    now = time.perf_counter()
    for b, t in enumerate(ids):
        if not active[b]:
            continue
        out[b].append(t)
        t_tok[b].append(now)
        if t == eos_id and not params.ignore_eos:
            active[b] = False
            eos_hit[b] = True
        elif len(out[b]) >= params.max_new_tokens:
            active[b] = False
    return now
