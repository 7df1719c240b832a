"""Paper reproductions in a sweep (conf/experiment/paper_*.yaml, `sweep.paper: specache | rag`):
the decode step at the batch a run reached (its seconds, the engine bounding it and the op that
dominates that engine, what bounded the batch), one request's prefill, and the table of ratios
against the `full` baseline at the same prompt length, with the papers' own numbers to compare.

What each paper claims and how the simulator's setting differs: docs/simulator.md.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from omegaconf import DictConfig


def _seconds_by_kind(ops, pattern: str, engine: str | None = None) -> dict[str, float]:
    """Seconds per op kind (the op's name less the layer number `pattern` matches), over the ops
    of one engine (all when None)."""
    kinds: dict[str, float] = {}
    for op in ops:
        if engine is None or op.engine == engine:
            kind = re.sub(pattern, "", op.name)
            kinds[kind] = kinds.get(kind, 0.0) + op.seconds
    return kinds


def step_detail(cfg: DictConfig, rec: dict) -> dict:
    """The decode step at the batch the run reached and its mid-generation context: seconds,
    tokens/s, each engine's busy time, the engine that bounds it and the op that dominates
    that engine; and what bounded the batch (device memory, host memory, scheduler.max_batch, or
    the requests there were)."""
    from simulator.hardware import solve
    from simulator.run import build_sim

    sim, _ = build_sim(cfg)
    w = cfg.workload
    B = max(int(rec["max_batch_reached"]), 1)
    ctx = w.prompt_len + w.gen_len / 2
    ops = sim.policy.decode_graph(sim.costs, sim.shape, B, ctx)
    st = solve(ops)
    engine = max(st.busy, key=st.busy.get)
    kinds = _seconds_by_kind(ops, r"\d+(_next)?$", engine)
    n = w.prompt_len + w.gen_len
    dev = sim.policy.reserve_bytes(n, sim.shape)
    host = sim.policy.reserve_host_bytes(n, sim.shape)
    limits = {"device_memory": sim.kv_capacity // max(dev, 1),
              "host_memory": (sim.host_capacity // host) if (sim.host_capacity is not None and host) else math.inf,
              "max_batch": sim.max_batch, "requests": w.batch if w.arrival == "static" else w.n_requests}
    return {"decode_step_s": st.seconds, "decode_tok_s": B / st.seconds, "bound_engine": engine,
            "bound_op": max(kinds, key=kinds.get), **{f"busy_{k}_s": v for k, v in st.busy.items()},
            "batch_limit": min(limits, key=lambda k: limits[k]), "kv_available_bytes": sim.kv_capacity,
            "host_kv_per_request_bytes": host, "device_kv_per_request_bytes": dev}


def prefill_detail(cfg: DictConfig) -> dict:
    """One request's prefill (what TTFT is): seconds and the op kind that takes most of it."""
    from simulator.hardware import solve
    from simulator.run import build_sim

    sim, _ = build_sim(cfg)
    ops = sim.policy.prefill_graph(sim.costs, sim.shape, [cfg.workload.prompt_len])
    kinds = _seconds_by_kind(ops, r"\d+$")
    kinds = {("recompute" if k == "layer" else k): v for k, v in kinds.items()}
    tot = sum(kinds.values())
    return {"prefill_s": solve(ops).seconds, "prefill_bound_op": max(kinds, key=kinds.get),
            "prefill_ops": " ".join(f"{k}={v / tot:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))}


# the papers' headline numbers, shown beside the simulator's (never fitted to)
PAPER = {"specache": {"batch_vs_full": 12.0, "throughput_vs_full": 4.6,
                      "source": "SpeCache (ICML 2025): RTX A6000, Mistral-7B-Instruct-v0.2, batch maximised"},
         "rag": {"ttft_vs_full": (2.17, 3.95), "throughput_vs_full": (2.7, 5.2),
                 "source": "SpecCache (ACL 2026): draft-guided recompute vs full recompute"}}


def paper_label(r) -> str:
    if r.policy_name == "specache":
        return (f"specache-k{int(r.k)}-{int(r.bits)}b" + ("" if str(r.prefetch).lower() == "true" else "-noprefetch")
                + f"-{r.gather}")
    if r.policy_name == "kivi":
        return f"kivi-{int(r.bits)}b"
    if r.policy_name == "rag":
        if r.selector == "full":
            return "full-recompute"
        return f"{r.selector}-r{r.recompute_ratio:g}" + (f"-{r.draft_model}" if r.draft_model else "")
    return r.policy_name


def paper_table(df: pd.DataFrame, paper: str) -> pd.DataFrame:
    """`policy` becomes the configuration's label; ratios are against the `full` row (full
    16-bit cache; RAG: full recompute) at the same prompt length."""
    df = df.rename(columns={"policy": "policy_name"})
    df["policy"] = [paper_label(r) if r.status == "ok" else "" for r in df.itertuples()]
    ok = df.status == "ok"
    base = "full" if paper == "specache" else "full-recompute"
    df["throughput_vs_full"] = np.nan
    df["batch_vs_full"] = np.nan
    if paper == "rag":
        df["ttft_vs_full"] = np.nan
    for _, g in df[ok].groupby(["prompt_len"] + (["batch"] if paper == "rag" else [])):
        f = g[g.policy == base]
        if not len(f):
            continue
        f = f.iloc[0]
        idx = g.index
        if paper == "specache":
            df.loc[idx, "throughput_vs_full"] = g.decode_tok_s / f.decode_tok_s
        else:
            df.loc[idx, "throughput_vs_full"] = g.throughput_tok_s / f.throughput_tok_s
            df.loc[idx, "ttft_vs_full"] = f.ttft_s / g.ttft_s
        df.loc[idx, "batch_vs_full"] = g.max_batch_reached / f.max_batch_reached
    first = ["prompt_len", "policy", "max_batch_reached", "decode_tok_s", "throughput_vs_full", "batch_vs_full",
             *(["batch", "ttft_s", "ttft_vs_full", "throughput_tok_s", "prefill_ops"] if paper == "rag" else []),
             "bound_engine", "bound_op", "batch_limit"]
    return df[first + [c for c in df.columns if c not in first]]
