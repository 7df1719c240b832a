"""The sweep figures, drawn from a sweep CSV (analysis.sweep): SpeCache heatmaps over k x bits,
RAG TTFT over the recompute ratio, the Pareto front of device KV vs measured quality vs predicted
throughput, and a paper reproduction beside the paper's own numbers. analysis/sweep.ipynb draws
the first three; analysis.sweep writes the last beside a paper's CSV. How to read them:
docs/simulator.md.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .paper import PAPER
from .plots import plain_log_ticks, pyplot, save


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
    plt, sns = pyplot()
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
    return save(fig, out)


def plot_rag(df: pd.DataFrame, out: str | Path | None = None):
    """RAG: predicted TTFT over r per selector (and measured exact match where evaluated)."""
    plt, sns = pyplot()
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
    return save(fig, out)


def plot_pareto(df: pd.DataFrame, out: str | Path | None = None, quality: str = "passkey_accuracy"):
    """Device KV (x fp16, lower is better) vs measured quality, point size the predicted
    throughput; the points on the Pareto front of all three are joined and labelled. (Throughput alone would crown the fewest
    bits: fewer bits read fewer bytes, and on a measured profile the KIVI tables are 2-bit only.)"""
    plt, sns = pyplot()
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
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("device KV / fp16 (log; lower is better)")
    ax.set_ylabel(quality.replace("_", " ") + " (measured, 135M)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    return save(fig, out)


def plot_paper(df: pd.DataFrame, paper: str, out: str | Path):
    plt, sns = pyplot()
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
    return save(fig, out)
