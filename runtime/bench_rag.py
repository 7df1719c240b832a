"""`python -m runtime.bench policy=rag`: the bench glue of the RAG pipeline (runtime/rag/). The
prompt is cut into chunks of `chunk_len` and a `question_len`-token question, the store is warmed
untimed, TTFT = rag_prefill + the first token, then decoding under a plain full-precision cache.
runtime.bench calls `rag_runs` for policy=rag; importing this module changes nothing. The method:
docs/rag.md."""
from __future__ import annotations

import time
from dataclasses import replace

from core.errors import ConfigError

from .engine import BatchResult, PeakMemory, SamplingParams, generate, sync
from .kv import policy_spec
from .model import Transformer
from .phases import StepTimes, add_times, make_timer
from .rag.store import DEFAULT_MAX_BYTES
from .rag import (ChunkStore, RagResult, check_policy, load_draft, oracle_set, placed_kv, rag_prefill, recall,
                  split_prompt)


def target_tokenizer(model_cfg):
    """The target's tokenizer from its model config (for a separate draft's alignment); None for a
    random model (its ids mean nothing)."""
    from .tokenizer import from_gguf, from_hf

    source = getattr(model_cfg, "source", "random")
    if source == "gguf":
        return from_gguf(getattr(model_cfg, "path", None))
    if source == "hf" and getattr(model_cfg, "path", None):
        return from_hf(model_cfg.path)
    return None


def bench_rag(model: Transformer, cfg, prompt: list[int], params: SamplingParams, *, link=None,
              tokenizer=None, spec=None) -> list[BatchResult]:
    """`python -m runtime.bench policy=rag`: one request per timed run, the engine's results.

    The prompt is cut by `split_prompt` (chunks of policy.chunk_len, a policy.question_len-token
    question), the chunk store is warmed untimed (host memory; with store=disk also the persistent
    store's files under <cache root>/chunks, which every timed repeat reads back), then each repeat times
    rag_prefill and decodes gen_len tokens from its Prefilled under a plain full-precision cache
    (`engine.generate(prefilled=...)`). TTFT = rag_prefill + loading its K/V + the first token.
    policy_stats: the selection (n_ctx, budget, chosen, recomputed), the phases' seconds, and
    recall_vs_oracle (oracle_dev's set: one full prefill after the timed repeats, untimed).

    Phases (cfg.phases): rag_prefill runs under the lap timer and joins the engine's prefill step:
    placing the reused K/V -> `load`, re-rotating their keys -> `rerotate`, the selector ->
    `select`, the selective recompute -> `layer` (its parts) and `lm_head`."""
    p, w = (cfg.policy if spec is None else spec), cfg.workload     # spec: the run's checked declaration
    timing = {"phases": bool(getattr(cfg, "phases", True)), "timeline": bool(getattr(cfg, "timeline", False))}
    if w.batch != 1:
        raise ConfigError(f"workload.batch={w.batch}: policy=rag runs one request at a time in runtime.bench "
                          "(set workload.batch=1; the simulator twin batches RAG prefills)")
    check_policy(p, model)
    chunks, question = split_prompt(prompt, int(p.chunk_len), int(p.question_len))
    draft = None
    if p.selector == "draft" and p.draft_model is not None:
        draft = load_draft(p.draft_model, model, tokenizer if tokenizer is not None else target_tokenizer(cfg.model))
    decode_policy = policy_spec("full", p.kv_dtype)
    on_disk = getattr(p, "store", "warm") == "disk"
    # store=disk: the persistent chunk store (<cache root>/chunks, core.machine.cache_root: KVTESTBED_CACHE >
    # XDG_CACHE_HOME > ~/.cache), its stale/corrupt-entry checks and its size cap (policy.store_max_bytes,
    # least recently used evicted); cleared by python -m runtime.cache --clear chunks
    store = ChunkStore(model, kv_dtype=p.kv_dtype, disk=on_disk,
                       max_bytes=getattr(p, "store_max_bytes", DEFAULT_MAX_BYTES))
    for c in chunks:                                      # fill the store, untimed
        store.get(c)
    if cfg.warmup:                                        # allocator, kernels: a tiny rag prompt, untimed
        small = [c[:8] for c in chunks[:2]]
        pre = rag_prefill(model, small, question[:8], p, store, draft=draft)
        generate(model, pre.prefilled.prompts, SamplingParams(max_new_tokens=2), decode_policy,
                 link=link, prefilled=pre.prefilled)
    runs = []
    timer = make_timer(model.device, **timing)
    for _ in range(cfg.repeats):
        if on_disk:              # store=disk: every chunk is read back from its file (the OS may cache it)
            store.mem.clear()
        with PeakMemory(model.device) as mem:
            sync(model.device)
            t0 = time.perf_counter()
            with timer.step() as rec:
                res = rag_prefill(model, chunks, question, p, store, draft=draft)
                sync(model.device)
                rag_s = time.perf_counter() - t0
        run = generate(model, [prompt], params, decode_policy, link=link, prefilled=res.prefilled,
                       progress=bool(getattr(cfg, "progress", False)), **timing)
        runs.append(_with_rag_phases(_shifted(run, rag_s, mem.peak, res), rec.times, t0, rag_s))
    runs[-1].policy_stats.update({f"store_{k}": v for k, v in store.stats.items()})
    n_ctx, budget = res.info["n_ctx"], res.info["budget"]
    oracle = oracle_set(model, list(prompt), placed_kv(model, store, chunks), n_ctx, budget)
    runs[-1].policy_stats["recall_vs_oracle"] = recall(res.chosen, oracle)
    return runs


def _shifted(run: BatchResult, rag_s: float, rag_peak: int, res: RagResult) -> BatchResult:
    """generate() timed from the loaded prefill: move its clock back to rag_prefill's start."""
    reqs = [replace(r, ttft_s=r.ttft_s + rag_s) for r in run.requests]
    info = res.info
    stats = {**run.policy_stats, "n_ctx": info["n_ctx"], "budget": info["budget"], "chosen": len(res.chosen),
             "recomputed": len(res.recomputed), "question_len": len(res.recomputed) - len(res.chosen),
             "rag_prefill_s": rag_s, **info["time"]}
    if "draft_layers" in info:
        stats["draft_layers"] = info["draft_layers"]
    if "sinks" in info:
        stats["sink_tokens"], stats["sinks"] = info["sink_tokens"], info["sinks"]
    return replace(run, requests=reqs, wall_s=run.wall_s + rag_s, prefill_s=run.prefill_s + rag_s,
                   peak_mem_bytes=max(run.peak_mem_bytes, rag_peak), policy_stats=stats)


def _with_rag_phases(run: BatchResult, times: StepTimes | None, t0: float, rag_s: float) -> BatchResult:
    """rag_prefill's laps folded into the run's prefill step (one step: the pipeline, then the
    engine loading its K/V and sampling the first token), and onto its timeline."""
    if times is None:
        return run
    if "prefill" in run.phases:
        add_times(run.phases["prefill"], times, rag_s, new_step=False)
    if run.timeline:                   # timeline=true: rag_prefill's span before the engine's steps
        run.timeline.insert(0, {"stage": "prefill", "t0": t0, "t1": t0 + rag_s, "times": times,
                                "args": {"rag": "rag_prefill (the engine's load + first token follow)"}})
    return run


def rag_runs(model: Transformer, cfg, prompts: list[list[int]], params: SamplingParams, link,
             spec=None) -> list[BatchResult]:
    """runtime.bench's timed runs for policy=rag (the signature of a policy's `bench` hook): the
    first prompt of the batch (workload.batch must be 1), through `bench_rag`."""
    return bench_rag(model, cfg, prompts[0], params, link=link, spec=spec)
