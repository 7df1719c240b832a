"""python -m analysis.sweep experiment=sweep_k_bits_r: simulator grids over k x bits x r.

    python -m analysis.sweep experiment=sweep_k_bits_r
    python -m analysis.sweep experiment=sweep_k_bits_r "sweep.base=['model=smollm2','hardware=cpu']"

An experiment (conf/experiment/sweep_*.yaml) lists grids: overrides shared by a grid and axes
whose cartesian product are its points. Every point is one `simulator.run` configuration
(composed from conf/simulate.yaml, so every key is checked by the same schema), predicted from
the profile; a failing point is a row with its error. Quality is not simulated: where the
measured evals (analysis/evals/*.csv) hold the same knobs, their accuracy is joined in:
passkey accuracy for (policy, k, bits), and RAG exact match for (selector, r) when a RAG eval
has been run. The table goes to results/sweep/<experiment>.csv; analysis/sweep.ipynb draws it.

For ad-hoc sweeps of one policy, Hydra's multirun does the same one point per job:
`python -m simulator.run -m policy=specache policy.k=0,16,64,256 policy.bits=1,2,4`.
"""
from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from tqdm import tqdm

from core.errors import ConfigError, cli_errors

from .validate import compose_config, describe, write_csv_atomic

ROOT = Path(__file__).resolve().parents[1]
EVALS = ROOT / "analysis" / "evals"
METRICS = ("throughput_tok_s", "ttft_s", "tpot_s", "kv_bytes_device", "kv_bytes_host", "kv_ratio_vs_fp16")


@dataclass
class SweepSpec:
    base: list[str] = field(default_factory=list)
    grids: list[Any] = field(default_factory=list)     # {name, overrides, axes: {key: [values]}}
    # a paper reproduction (conf/experiment/paper_*.yaml): `specache` or `rag` adds the decode-step
    # columns (decode_tok_s at the batch reached, the engine and op bounding it, what bounded the
    # batch) and the ratios against the `full` rows at the same prompt length; null: a plain sweep
    paper: Optional[str] = None


@dataclass
class SweepConfig:
    experiment: Optional[str] = None
    sweep: SweepSpec = field(default_factory=SweepSpec)
    results_dir: str = "results"
    evals_dir: str = str(EVALS)
    progress: bool = True


ConfigStore.instance().store(name="base_sweep", node=SweepConfig)


def points(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """(grid name, overrides) of every point, grids in order, axes varying last-fastest."""
    if not cfg.sweep.grids:
        raise ConfigError("sweep.grids is empty; pick an experiment that lists grids, e.g. experiment=sweep_k_bits_r")
    out = []
    for i, g in enumerate(cfg.sweep.grids):
        if "name" not in g or "axes" not in g or not g.axes:
            raise ConfigError(f"sweep.grids[{i}] needs a `name` and non-empty `axes` ({{key: [values]}})")
        keys = list(g.axes)
        for k in keys:
            values = g.axes[k]
            if isinstance(values, str) or not hasattr(values, "__len__") or not len(values):
                raise ConfigError(f"sweep.grids[{i}].axes.{k}={values!r}: an axis is a non-empty list of values "
                                  f"({k}: [v1, v2, ...])")
        for combo in itertools.product(*(list(g.axes[k]) for k in keys)):
            ov = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in zip(keys, combo)]
            out.append((str(g.name), [*cfg.sweep.base, *g.get("overrides", []), *ov]))
    return out


def step_detail(cfg: DictConfig, rec: dict) -> dict:
    """The decode step at the batch the run reached and its mid-generation context: seconds,
    tokens/s, each engine's busy time, the engine that bounds it and the op that dominates
    that engine; and what bounded the batch (device memory, host memory, scheduler.max_batch, or
    the requests there were)."""
    import re as _re

    from simulator.hardware import solve
    from simulator.run import build_sim

    sim, _ = build_sim(cfg)
    w = cfg.workload
    B = max(int(rec["max_batch_reached"]), 1)
    ctx = w.prompt_len + w.gen_len / 2
    ops = sim.policy.decode_graph(sim.costs, sim.shape, B, ctx)
    st = solve(ops)
    engine = max(st.busy, key=st.busy.get)
    kinds: dict[str, float] = {}
    for op in ops:
        if op.engine == engine:
            kind = _re.sub(r"\d+(_next)?$", "", op.name)
            kinds[kind] = kinds.get(kind, 0.0) + op.seconds
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
    import re as _re

    from simulator.hardware import solve
    from simulator.run import build_sim

    sim, _ = build_sim(cfg)
    ops = sim.policy.prefill_graph(sim.costs, sim.shape, [cfg.workload.prompt_len])
    kinds: dict[str, float] = {}
    for op in ops:
        kind = _re.sub(r"\d+$", "", op.name)
        kinds[kind] = kinds.get(kind, 0.0) + op.seconds
    kinds = {("recompute" if k == "layer" else k): v for k, v in kinds.items()}
    tot = sum(kinds.values())
    return {"prefill_s": solve(ops).seconds, "prefill_bound_op": max(kinds, key=kinds.get),
            "prefill_ops": " ".join(f"{k}={v / tot:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))}


def run_point(grid: str, overrides: list[str], results_dir: str, paper: str | None = None) -> dict:
    from simulator.run import simulate

    row: dict[str, Any] = {"grid": grid, "overrides": " ".join(overrides), "status": "ok"}
    try:
        cfg = compose_config("simulate", [*overrides, f"results_dir={results_dir}"])
        p = cfg.policy
        row.update(describe(cfg))
        row.update({"hardware": cfg.hardware.name,
                    "k": p.get("k", math.nan) if p.name == "specache" else (0 if p.name == "kivi" else math.nan),
                    "bits": p.get("bits", math.nan), "prefetch": p.get("prefetch", math.nan),
                    "selector": p.get("selector", ""), "recompute_ratio": p.get("recompute_ratio", math.nan),
                    "draft_layers": p.get("draft_layers", math.nan) if str(p.get("selector")).startswith("draft")
                    else math.nan})
        rec = simulate(cfg)
        row.update({m: rec.get(m, math.nan) for m in METRICS})
        row["extrapolated"] = " ".join(rec.get("extrapolated", []))
        if paper:
            row.update({"gather": p.get("gather", ""), "draft_model": p.get("draft_model") or "",
                        "max_batch_reached": rec["max_batch_reached"], "requests": rec["requests"],
                        "wall_s": rec["wall_s"]})
            row.update(step_detail(cfg, rec))
            if paper == "rag":
                row.update(prefill_detail(cfg))
    except Exception as e:          # recorded; the sweep goes on
        row["status"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
    return row


# ----------------------------------------------------------------------------- measured quality

SPEC = re.compile(r"^(?P<name>specache|kivi)(?:-k(?P<k>\d+))?-?b?(?P<bits>\d)(?P<rest>.*)$")


def _evals_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A measured-evals CSV, read whole or refused in one line (empty, binary, columns missing)."""
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path} is not a readable evals table ({type(e).__name__}); rerun python -m "
                          "runtime.evals, or set evals_dir to another folder") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{path} lacks column {missing[0]}; rerun python -m runtime.evals, or set evals_dir "
                          "to another folder")
    return df


def check_evals_dir(evals_dir) -> Path:
    """evals_dir is a folder (its tables may be missing: then no quality is joined)."""
    p = Path(str(evals_dir))
    if not p.is_dir():
        raise ConfigError(f"evals_dir={p} is {'a file' if p.exists() else 'not there'}; give the folder of the "
                          f"measured evals (default {EVALS})")
    return p


def passkey_quality(evals_dir: str | Path) -> pd.DataFrame:
    """Passkey accuracy at the longest evaluated length, per (policy, k, bits, prefetch), for
    the default group size and residual (the sweep's knobs)."""
    path = Path(evals_dir) / "passkey.csv"
    if not path.exists():
        return pd.DataFrame(columns=["policy", "k", "bits", "prefetch", "passkey_accuracy", "passkey_length"])
    df = _evals_table(path, ("policy", "length", "accuracy"))
    df = df[(df.get("error").isna() if "error" in df else True) & (df.length == df.length.max())]
    rows = []
    for r in df.itertuples():
        if r.policy in ("full", "offload"):
            rows.append({"policy": r.policy, "k": math.nan, "bits": math.nan, "prefetch": math.nan,
                         "passkey_accuracy": r.accuracy, "passkey_length": r.length})
            continue
        m = SPEC.match(r.policy)
        if not m or re.search(r"-(g|r)\d", m["rest"]):
            continue                # other group sizes / residuals are not on the sweep's axes
        k = int(m["k"]) if m["name"] == "specache" else 0
        rows.append({"policy": m["name"], "k": k, "bits": int(m["bits"]),
                     "prefetch": (False if "noprefetch" in m["rest"] else True) if m["name"] == "specache" else math.nan,
                     "passkey_accuracy": r.accuracy, "passkey_length": r.length})
    return pd.DataFrame(rows)


def rag_quality(evals_dir: str | Path) -> pd.DataFrame | None:
    """RAG exact match per (selector, r, draft_layers) over all hop counts, from the RAG eval's
    table (`python -m runtime.evals rag --out analysis/evals/rag`), if one has been run. EPIC's
    fixed prefixes are left out: their r is not on the sweep's axis."""
    path = Path(evals_dir) / "rag" / "rag.csv"
    if not path.exists():
        return None
    df = _evals_table(path, ("hops", "error", "epic_prefix", "selector", "r", "draft_layers", "em", "n"))
    df = df[(df.hops.astype(str) == "all") & df.error.isna() & df.epic_prefix.isna()]
    if "sink_tokens" in df:                  # sink-token points (`-s<n>`) are not on the sweep's axes
        df = df[df.sink_tokens.fillna(0) == 0]
    q = df[["selector", "r", "draft_layers", "em", "n"]].rename(
        columns={"r": "recompute_ratio", "em": "rag_em", "n": "rag_n"})
    return q


def join_quality(df: pd.DataFrame, pk: pd.DataFrame, rq: pd.DataFrame | None) -> pd.DataFrame:
    """The sweep's rows with measured quality joined in: pk from `passkey_quality`, rq from
    `rag_quality` (None: no RAG table)."""
    out = df.copy()
    out["passkey_accuracy"] = np.nan
    for i, r in out.iterrows():
        if r.status != "ok":
            continue
        # specache with k = 0 runs exactly kivi (runtime/kv/specache.py): kivi's accuracy is its own
        m = pk[pk.policy == ("kivi" if r.policy == "specache" and r.k == 0 else r.policy)]
        if r.policy in ("kivi", "specache"):
            m = m[(m.bits == r.bits) & (m.k == r.k)]
            if r.policy == "specache" and r.k > 0 and len(m):
                m = m[m.prefetch == r.prefetch]
        if len(m):
            out.at[i, "passkey_accuracy"] = float(m.passkey_accuracy.iloc[0])
    if rq is not None and {"selector", "recompute_ratio", "draft_layers"} <= set(out.columns):
        full = rq[rq.selector == "full"]
        rq = rq[rq.selector != "full"]
        out = out.merge(rq, on=["selector", "recompute_ratio", "draft_layers"], how="left")
        if len(full):                        # full recompute is full at any r
            is_full = out.selector == "full"
            out.loc[is_full, "rag_em"] = float(full.rag_em.iloc[0])
            out.loc[is_full, "rag_n"] = float(full.rag_n.iloc[0])
    return out


def pareto(df: pd.DataFrame, *maximize: str) -> pd.DataFrame:
    """The rows no other row beats on every column of `maximize` (higher is better on each;
    pass a negated column for lower-is-better)."""
    d = df.dropna(subset=list(maximize))
    v = d[list(maximize)].to_numpy(float)
    keep = [i for i in range(len(v))
            if not any((v[j] >= v[i]).all() and (v[j] > v[i]).any() for j in range(len(v)) if j != i)]
    return d.iloc[keep]


def plot_heatmaps(df: pd.DataFrame, out: str | Path | None = None, prefetch: bool = True):
    """SpeCache over k x bits: throughput, device KV (x fp16) and measured passkey accuracy."""
    from .validate import _plt

    plt, sns = _plt()
    d = df[(df.status == "ok") & (df.policy == "specache")]
    d = d[d.prefetch.astype(str).str.lower() == str(prefetch).lower()]
    panels = [("throughput_tok_s", "throughput (tok/s)", "viridis"),
              ("kv_ratio_vs_fp16", "device KV / fp16", "magma_r"),
              ("passkey_accuracy", "passkey accuracy (measured, 135M)", "RdYlGn")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (col, title, cmap) in zip(axes, panels):
        t = d.pivot_table(index="bits", columns="k", values=col, aggfunc="first")
        t.index, t.columns = t.index.astype(int), t.columns.astype(int)
        sns.heatmap(t, annot=True, fmt=".3g", cmap=cmap, ax=ax, cbar=False,
                    mask=t.isna(), **({"vmin": 0, "vmax": 1} if col == "passkey_accuracy" else {}))
        ax.set_title(title)
    fig.suptitle(f"SpeCache (prefetch={prefetch}): {d.model.iloc[0] if len(d) else ''} on "
                 f"{d.hardware.iloc[0] if len(d) else ''}, batch {d.batch.iloc[0] if len(d) else ''}, "
                 f"{d.prompt_len.iloc[0] if len(d) else ''} tokens (k = 0: KIVI)")
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def plot_rag(df: pd.DataFrame, out: str | Path | None = None):
    """RAG: predicted TTFT over r per selector (and measured exact match where evaluated)."""
    from .validate import _plt

    plt, sns = _plt()
    d = df[(df.status == "ok") & (df.policy == "rag") & df.selector.isin(["draft", "cacheblend", "epic", "random"])]
    d = d.assign(selector=[s + (f" D={int(D)}" if s == "draft" else "") for s, D in zip(d.selector, d.draft_layers)])
    has_em = "rag_em" in d and d.rag_em.notna().any()
    fig, axes = plt.subplots(1, 2 if has_em else 1, figsize=(11 if has_em else 6, 3.8), squeeze=False)
    sns.lineplot(data=d.assign(ttft_ms=d.ttft_s * 1e3), x="recompute_ratio", y="ttft_ms", hue="selector",
                 marker="o", ax=axes[0][0])
    axes[0][0].set_ylabel("predicted TTFT (ms)")
    ends = df[(df.status == "ok") & df.selector.isin(["full", "reuse"])]
    for r in ends.itertuples():                  # the two ends as reference lines
        axes[0][0].axhline(r.ttft_s * 1e3, ls=":", color="grey")
        axes[0][0].annotate(r.selector, (0.3, r.ttft_s * 1e3), fontsize=8, color="grey")
    if has_em:
        sns.lineplot(data=d, x="recompute_ratio", y="rag_em", hue="selector", marker="o", ax=axes[0][1], legend=False)
        for r in ends.dropna(subset=["rag_em"]).itertuples():
            axes[0][1].axhline(r.rag_em, ls=":", color="grey")
            axes[0][1].annotate(r.selector, (0.3, r.rag_em), fontsize=8, color="grey")
        axes[0][1].set_ylabel("exact match (measured, 135M, 4 x 256)")
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def plot_pareto(df: pd.DataFrame, out: str | Path | None = None, quality: str = "passkey_accuracy"):
    """Device KV (x fp16, lower is better) vs measured quality, point size the predicted
    throughput; the points on the Pareto front of all three are joined and labelled. (Throughput alone would crown the fewest
    bits: fewer bits read fewer bytes, and on a measured profile the KIVI tables are 2-bit only.)"""
    import matplotlib.ticker as ticker

    from .validate import _plt

    plt, sns = _plt()
    d = df[(df.status == "ok")].dropna(subset=[quality, "kv_ratio_vs_fp16"])
    front = pareto(d.assign(kv_saving=-d.kv_ratio_vs_fp16), "kv_saving", quality, "throughput_tok_s")
    front = front.sort_values("kv_ratio_vs_fp16")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    sns.scatterplot(data=d, x="kv_ratio_vs_fp16", y=quality, hue="policy", size="throughput_tok_s",
                    sizes=(30, 220), ax=ax)
    ax.plot(front.kv_ratio_vs_fp16, front[quality], color="black", lw=1, ls="--",
            label="Pareto front (KV, accuracy, throughput)")
    for r in front.itertuples():
        ax.annotate(r.label, (r.kv_ratio_vs_fp16, getattr(r, quality)), fontsize=7, xytext=(3, -10),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("device KV / fp16 (log; lower is better)")
    ax.set_ylabel(quality.replace("_", " ") + " (measured, 135M)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def sweep(cfg: DictConfig) -> pd.DataFrame:
    from core.results import results_folder

    results_folder(cfg.results_dir, "sweep")     # before the points, not after them (the CSV is written last)
    check_evals_dir(cfg.evals_dir)
    # read once, before the points: a corrupt table is refused before any work, not after it
    pk, rq = passkey_quality(cfg.evals_dir), rag_quality(cfg.evals_dir)
    pts = points(cfg)
    paper = cfg.sweep.get("paper")
    if paper not in (None, "specache", "rag"):
        raise ConfigError(f"sweep.paper={paper!r} is not known; use specache, rag or null")
    rows = [run_point(g, ov, cfg.results_dir, paper)
            for g, ov in tqdm(pts, desc=f"sweep {cfg.experiment}", unit="point", disable=not cfg.progress)]
    df = pd.DataFrame(rows)
    if paper:
        df = paper_table(df, paper)
        write_csv_atomic(df, csv_path(cfg))
        plot_paper(df, paper, csv_path(cfg).with_suffix(".png"))
        return df
    df = join_quality(df, pk, rq)
    write_csv_atomic(df, csv_path(cfg))
    return df


# ----------------------------------------------------------------------------- paper reproductions

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


def plot_paper(df: pd.DataFrame, paper: str, out: str | Path):
    from .validate import _plt

    plt, sns = _plt()
    d = df[df.status == "ok"]
    ref = PAPER[paper]
    if paper == "specache":
        d = d[d.policy != "full"]
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
        for ax, col, paper_v, title in ((axes[0], "batch_vs_full", ref["batch_vs_full"], "batch reached / full's"),
                                        (axes[1], "throughput_vs_full", ref["throughput_vs_full"],
                                         "decode tok/s at that batch / full's")):
            sns.lineplot(data=d, x="prompt_len", y=col, hue="policy", marker="o", ax=ax, legend=ax is axes[1])
            ax.axhline(paper_v, color="black", ls="--", lw=1)
            ax.annotate(f"paper: {paper_v:g}x", (d.prompt_len.min(), paper_v), fontsize=8, xytext=(2, 3),
                        textcoords="offset points")
            ax.axhline(1, color="grey", ls=":", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(title)
        axes[1].legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=7)
    else:
        d = d[d.policy != "full-recompute"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        d = d.assign(selector_label=[f"{sel} ({dm})" if dm else (f"{sel} (target's first {int(D)} layers)"
                                                                  if sel == "draft" else sel)
                                     for sel, dm, D in zip(d.selector, d.draft_model.fillna(""), d.draft_layers)])
        for ax, col, rng, title, rows in ((axes[0], "ttft_vs_full", ref["ttft_vs_full"], "TTFT: full recompute / this (1 request)",
                                           d[d.batch == d.batch.min()]),
                                          (axes[1], "throughput_vs_full", ref["throughput_vs_full"],
                                           f"throughput / full recompute's ({d.batch.max()} requests)", d[d.batch == d.batch.max()])):
            sns.barplot(data=rows, x="recompute_ratio", y=col, hue="selector_label", ax=ax)
            ax.axhspan(*rng, color="green", alpha=0.12, label=f"paper {rng[0]:g}-{rng[1]:g}x")
            ax.axhline(1, color="grey", ls=":", lw=0.8)
            ax.set_title(title)
            ax.legend(fontsize=7)
    fig.suptitle(f"{ref['source']} -- simulator (analytic roofline), {d.model.iloc[0] if len(d) else ''} on "
                 f"{d.hardware.iloc[0] if len(d) else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def csv_path(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / "sweep" / f"{cfg.experiment or 'sweep'}.csv"


def check_sweep_experiment(argv: list[str]) -> None:
    """experiment=X names a sweep (conf/experiment/X.yaml sets `sweep:`), not a run's experiment
    (smoke, decode_2k, ... set model / workload, which a sweep has no key for)."""
    folder = ROOT / "conf" / "experiment"
    sweeps = sorted(p.stem for p in folder.glob("*.yaml") if re.search(r"^sweep:", p.read_text(), re.M))
    for a in argv:
        key, _, name = a.lstrip("+").partition("=")
        if key == "experiment" and (folder / f"{name}.yaml").is_file() and name not in sweeps:
            raise ConfigError(f"experiment={name} is not a sweep (it sets a run's config, not sweep.grids); "
                              f"choose one of {', '.join(sweeps)}, or run it with python -m simulator.run "
                              f"experiment={name}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    with cli_errors("analysis.sweep"):
        check_sweep_experiment(argv)
        cfg = compose_config("sweep", argv)
        df = sweep(cfg)
    ok = df[df.status == "ok"]
    cols = ["label", "throughput_tok_s", "tpot_s", "ttft_s", "kv_ratio_vs_fp16", "passkey_accuracy"]
    if cfg.sweep.get("paper") == "specache":
        cols = ["prompt_len", "policy", "max_batch_reached", "decode_tok_s", "throughput_vs_full", "batch_vs_full",
                "bound_engine", "bound_op", "batch_limit"]
    elif cfg.sweep.get("paper") == "rag":
        cols = ["prompt_len", "policy", "batch", "ttft_s", "ttft_vs_full", "throughput_tok_s", "throughput_vs_full",
                "max_batch_reached", "bound_engine", "prefill_ops"]
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        if len(ok):
            print(ok.reindex(columns=cols).to_string(index=False))
    for r in df[df.status != "ok"].itertuples():
        print(f"FAILED {r.overrides}: {r.status}")
    print(f"\n{csv_path(cfg)}  ({len(ok)} ok, {len(df) - len(ok)} failed)")


if __name__ == "__main__":
    main()
