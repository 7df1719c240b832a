"""The sweep figures, drawn from a sweep CSV (analysis.sweep): SpeCache heatmaps over k x bits,
RAG TTFT over the recompute ratio, the Pareto front of device KV vs measured quality vs predicted
throughput, and a paper reproduction beside the paper's own numbers. analysis/sweep.ipynb draws
the first three; analysis.sweep writes the last beside a paper's CSV. How to read them:
docs/simulator.md.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .paper import PAPER, TOLERANCE, band
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


def rag_em_intervals(df: pd.DataFrame, evals_dir: str | Path | None = None) -> pd.DataFrame:
    """The sweep's RAG rows with `rag_em_lo` / `rag_em_hi`: the RAG eval's own bootstrap interval
    of exact match (`<evals_dir>/rag/rag.csv` em_lo / em_hi, all hop counts), joined on
    (selector, r, draft_layers) as sweep_join joins `rag_em`; NaN where the eval has no row."""
    from .sweep_join import EVALS

    out = df.copy()
    if "rag_em_lo" in out and "rag_em_hi" in out:
        return out
    out["rag_em_lo"], out["rag_em_hi"] = float("nan"), float("nan")
    path = Path(evals_dir or EVALS) / "rag" / "rag.csv"
    if "rag_em" not in out or not path.exists():
        return out
    q = pd.read_csv(path)
    q = q[(q.hops.astype(str) == "all") & q.error.isna() & q.epic_prefix.isna()]
    if "sink_tokens" in q:
        q = q[q.sink_tokens.fillna(0) == 0]
    for i, r in out[out.rag_em.notna()].iterrows():
        m = q[(q.selector == r.selector) & ((q.r - r.recompute_ratio).abs() < 1e-9)]
        if r.selector == "draft":
            m = m[m.draft_layers == r.draft_layers]
        if len(m):
            out.loc[i, ["rag_em_lo", "rag_em_hi"]] = m[["em_lo", "em_hi"]].iloc[0].to_numpy(float)
    return out


def plot_rag(df: pd.DataFrame, out: str | Path | None = None, evals_dir: str | Path | None = None):
    """RAG: predicted TTFT over r per selector and, where the RAG eval was run, its measured exact
    match with the eval's 95% interval (bars; selectors dodged apart; full recompute and reuse as
    shaded bands): differences inside the intervals are not differences."""
    plt, sns = pyplot()
    d = df[(df.status == "ok") & (df.policy == "rag") & df.selector.isin(["draft", "cacheblend", "epic", "random"])]
    has_em = "rag_em" in d and d.rag_em.notna().any()
    if has_em:                                   # joined on the eval's knobs before the labels change
        d = rag_em_intervals(d, evals_dir)
    d = d.assign(selector=[s + (f" D={int(D)}" if s == "draft" else "") for s, D in zip(d.selector, d.draft_layers)])
    fig, axes = plt.subplots(1, 2 if has_em else 1, figsize=(13 if has_em else 6.5, 4.4), squeeze=False)
    ax = axes[0][0]
    sns.lineplot(data=d.assign(ttft_ms=d.ttft_s * 1e3), x="recompute_ratio", y="ttft_ms", hue="selector",
                 style="selector", markers=True, dashes=False, ax=ax)
    ax.set_ylabel("predicted TTFT (ms)")
    ax.set_xlabel("recompute ratio r")
    ax.set_title(f"TTFT, simulator: {d.model.iloc[0] if len(d) else ''} on {d.hardware.iloc[0] if len(d) else ''}",
                 fontsize=9)
    ends = df[(df.status == "ok") & df.selector.isin(["full", "reuse"])]
    for r in ends.itertuples():                  # the two ends as reference lines
        ax.axhline(r.ttft_s * 1e3, ls=":", color="grey")
        ax.annotate(f"{r.selector} (r = {r.recompute_ratio:g})", (0.01, r.ttft_s * 1e3),
                    xycoords=("axes fraction", "data"), fontsize=8, color="grey", va="bottom")
    ax.legend(fontsize=7, title="selector", title_fontsize=7)
    if has_em:
        ax = axes[0][1]
        e = d.dropna(subset=["rag_em"])
        palette = dict(zip(d.selector.unique(), sns.color_palette(n_colors=d.selector.nunique())))
        groups = list(e.groupby("selector"))
        width = 0.012
        for j, (sel, g) in enumerate(groups):
            g = g.sort_values("recompute_ratio")
            x = g.recompute_ratio + (j - (len(groups) - 1) / 2) * width
            ax.errorbar(x, g.rag_em, yerr=[g.rag_em - g.rag_em_lo, g.rag_em_hi - g.rag_em], fmt="o-", capsize=2,
                        lw=1, ms=4, color=palette.get(sel), label=sel)
        for r in rag_em_intervals(ends, evals_dir).dropna(subset=["rag_em"]).itertuples():
            ax.axhline(r.rag_em, ls=":", color="grey")
            if r.rag_em_lo == r.rag_em_lo:
                ax.axhspan(r.rag_em_lo, r.rag_em_hi, color="grey", alpha=0.08)
            ax.annotate(f"{r.selector} (r = {r.recompute_ratio:g})", (0.01, r.rag_em), xycoords=("axes fraction", "data"),
                        fontsize=8, color="grey", va="bottom")
        n = int(e.rag_n.max()) if "rag_n" in e and e.rag_n.notna().any() else None
        ax.set_ylabel("exact match (measured, shipped 135M)")
        ax.set_xlabel("recompute ratio r (points dodged apart)")
        ax.set_title("exact match with 95% bootstrap intervals" + (f" ({n} questions)" if n else ""), fontsize=9)
        ax.legend(fontsize=7, title="selector", title_fontsize=7)
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


def _label_ends(ax, lines, gap: float = 0.045) -> None:
    """Each line's label at its right end, in its colour (direct labels: no legend to decode).
    Lines ending at the same point share one label; labels closer than `gap` (a fraction of the
    y range) are pushed apart."""
    merged: dict = {}
    for x, y, text, color in lines:
        key = (x, round(float(y), 2))
        if key in merged:
            merged[key][2].append(text)
        else:
            merged[key] = [x, float(y), [text], color]
    items = sorted(merged.values(), key=lambda m: m[1])
    lo, hi = ax.get_ylim()
    step, placed = gap * (hi - lo), []
    for x, y, texts, color in items:
        ty = max(y, placed[-1] + step) if placed else y
        placed.append(ty)
        ax.annotate(" / ".join(texts), (x, y), xytext=(x, ty), textcoords="data", fontsize=7, color=color,
                    va="center", ha="left", annotation_clip=False)


def _paper_band(ax, value, label: str) -> None:
    lo, hi = band(value)
    ax.axhspan(lo, hi, color="green", alpha=0.10, lw=0)
    if not isinstance(value, (tuple, list)):
        ax.axhline(value, color="green", ls="--", lw=1)
    ax.annotate(label, (0.01, hi), xycoords=("axes fraction", "data"), fontsize=7, color="darkgreen",
                va="bottom")


def plot_specache_paper(df: pd.DataFrame, out: str | Path | None = None):
    """SpeCache against its paper, one panel per cache family so every line can be told apart:
    the batch reached (left, one line per family x bits: prefetch and gather do not change it),
    then decode tok/s per KIVI and per SpeCache (k, gather), a line per bits x prefetch (colour
    = bits, dashes = prefetch), each labelled at its end; the paper's number with its +-20% band."""
    plt, _ = pyplot()
    d = df[(df.status == "ok") & (df.policy != "full")].copy()
    ref = PAPER["specache"]
    d["family"] = [("KIVI" if p == "kivi" else f"SpeCache k={int(k)}") for p, k in zip(d.policy_name, d.k.fillna(0))]
    colours = {2: "tab:blue", 1: "tab:orange", 4: "tab:green"}
    panels = [("KIVI", None)] + [(f"SpeCache k={int(k)}", g) for k in sorted(d.k.dropna().unique()) if k > 0
                                 for g in ("host", "device")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True)
    axes = axes.ravel()
    top = max(d.batch_vs_full.max(), d.throughput_vs_full.max(), band(ref["batch_vs_full"])[1]) * 1.05
    for ax in axes:                  # scales first: the end labels are spaced in these limits
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(d.prompt_len.unique()))
        plain_log_ticks(ax.xaxis)
        ax.set_xlim(d.prompt_len.min() / 1.2, d.prompt_len.max() * 3.2)     # room for the labels at the ends
        ax.set_ylim(0, top)
    ax = axes[0]
    ends = []
    for (fam, bits), g in d.groupby(["family", "bits"]):
        g = g.groupby("prompt_len").batch_vs_full.max()
        ls = {"KIVI": ":", }.get(fam, "-" if "16" in fam else "--")
        ax.plot(g.index, g.values, marker="o", ms=3, ls=ls, color=colours.get(int(bits), "grey"))
        ends.append((g.index[-1] * 1.08, g.values[-1], f"{fam} {int(bits)}-bit", colours.get(int(bits), "grey")))
    _label_ends(ax, ends)
    _paper_band(ax, ref["batch_vs_full"], f"paper: up to {ref['batch_vs_full']:g}x (band +-{TOLERANCE:.0%})")
    ax.set_title("batch reached / 16-bit cache's")
    ax.set_ylabel("x the 16-bit cache's batch")
    for ax, (fam, gather) in zip(axes[1:], panels):
        sel = d[d.family == fam] if gather is None else d[(d.family == fam) & (d.gather == gather)]
        ends = []
        for (bits, pf), g in sel.groupby(["bits", sel.prefetch.map(lambda v: str(v).lower())]):
            g = g.sort_values("prompt_len")
            c = colours.get(int(bits), "grey")
            ls = "--" if pf == "false" else "-"
            ax.plot(g.prompt_len, g.throughput_vs_full, marker="o", ms=3, color=c, ls=ls)
            name = f"{int(bits)}-bit" + ("" if gather is None else (" no prefetch" if pf == "false" else " prefetch"))
            ends.append((g.prompt_len.iloc[-1] * 1.08, g.throughput_vs_full.iloc[-1], name, c))
        _label_ends(ax, ends)
        _paper_band(ax, ref["throughput_vs_full"], f"paper: {ref['throughput_vs_full']:g}x")
        ax.set_title(f"decode tok/s: {fam}" + ("" if gather is None else f", {gather} gather"))
        ax.set_ylabel("x the 16-bit cache's decode tok/s")
    for ax in axes:
        ax.axhline(1, color="grey", ls=":", lw=0.8)
    for ax in axes[3:]:
        ax.set_xlabel("prompt length (tokens)")
    fig.suptitle(f"{ref['source']}\nsimulator (analytic roofline): {d.model.iloc[0] if len(d) else ''} on "
                 f"{d.hardware.iloc[0] if len(d) else ''}, {int(d.batch.max()) if len(d) else ''} requests offered, "
                 "batch = what memory admits; solid: prefetch, dashed: no prefetch", fontsize=9)
    return save(fig, out)


def plot_rag_paper(df: pd.DataFrame, out: str | Path | None = None):
    """SpecCache RAG against its paper: TTFT (one request) and throughput (the largest batch)
    over the recompute ratio r, full recompute's divided by each selector's, with the paper's
    range shaded."""
    plt, sns = pyplot()
    ref = PAPER["rag"]
    d = df[(df.status == "ok") & (df.policy != "full-recompute") & (df.selector != "reuse")]
    d = d.assign(selector_label=[f"draft model {dm}" if dm else (f"draft = target's first {int(D)} layers"
                                                                  if sel == "draft" else sel)
                                 for sel, dm, D in zip(d.selector, d.draft_model.fillna(""), d.draft_layers)])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, col, title, rows in ((axes[0], "ttft_vs_full", "TTFT, 1 request", d[d.batch == d.batch.min()]),
                                 (axes[1], "throughput_vs_full", f"throughput, {int(d.batch.max())} requests",
                                  d[d.batch == d.batch.max()])):
        sns.barplot(data=rows, x="recompute_ratio", y=col, hue="selector_label", ax=ax)
        for cont in ax.containers:
            ax.bar_label(cont, fmt="%.2f", fontsize=7)
        lo, hi = band(ref[col])
        ax.axhspan(lo, hi, color="green", alpha=0.12, label=f"paper {lo:g}-{hi:g}x")
        ax.axhline(1, color="grey", ls=":", lw=0.8)
        ax.set_title(f"{title}: full recompute's / this (higher is better)")
        ax.set_xlabel("recompute ratio r (share of reused tokens recomputed)")
        ax.set_ylabel("x full recompute" + (" (TTFT lower)" if col == "ttft_vs_full" else " (tok/s higher)"))
        ax.legend(fontsize=7, loc="upper right")
    reuse = df[(df.status == "ok") & (df.selector == "reuse")]
    note = (f"; reuse without recompute (r = 0): {reuse.ttft_vs_full.min():.1f}x TTFT" if len(reuse) else "")
    fig.suptitle(f"{ref['source']}\nsimulator (analytic roofline): {d.model.iloc[0] if len(d) else ''} on "
                 f"{d.hardware.iloc[0] if len(d) else ''}{note}", fontsize=9)
    return save(fig, out)


def plot_paper(df: pd.DataFrame, paper: str, out: str | Path | None = None):
    """The paper reproduction's figure (analysis.sweep writes it beside the paper's CSV)."""
    return plot_specache_paper(df, out) if paper == "specache" else plot_rag_paper(df, out)
