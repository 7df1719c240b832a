"""The RAG eval's report: per (hops, point) EM and F1 with bootstrap intervals, McNemar and the
paired F1 delta against `full`, recall of the oracle's set, TTFT; and its figure (EM against r
and against recall).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..stats import bootstrap_mean, mcnemar_exact, paired_delta
from ..tables import by_policy, ci_columns, paired, plotting, save
from .run import TASK


def _int0(x) -> int:
    return 0 if x is None or (isinstance(x, float) and math.isnan(x)) else int(x)


def rag_table(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("em", "f1", "ttft_s", "chosen", "recall_vs_oracle"):
        if col not in df:
            df[col] = math.nan
    if "sink_tokens" not in df:
        df["sink_tokens"] = 0
    rows = []
    groups = [("all", df)] + [(str(h), g) for h, g in df.groupby("hops")]
    for hops, dh in groups:
        base = dh[(dh.policy == "full") & dh.ok]
        full_ttft = base.ttft_s.mean() if len(base) else math.nan
        for pol, g, ok in by_policy(dh):
            pair = paired(g, dh[dh.policy == "full"], ["em", "f1"])
            mc = mcnemar_exact(list(pair.em_full.astype(bool)), list(pair.em.astype(bool))) if len(pair) else None
            first = g.iloc[0]
            D = first.get("draft_layers")
            prefix = first.get("epic_prefix")
            rows.append({"task": TASK, "hops": hops, "policy": pol, "selector": first.selector, "r": first.r,
                         "epic_prefix": None if prefix is None or (isinstance(prefix, float) and math.isnan(prefix))
                         else int(prefix),
                         "draft_layers": None if D is None or (isinstance(D, float) and math.isnan(D)) else int(D),
                         "sink_tokens": _int0(first.get("sink_tokens")),
                         "n": len(ok), "errors": int((~g.ok).sum()),
                         **ci_columns("em", bootstrap_mean(ok.em.astype(float))),
                         **ci_columns("f1", bootstrap_mean(ok.f1.astype(float))),
                         "n_paired": len(pair), "only_full": mc.only_full if mc else None,
                         "only_policy": mc.only_policy if mc else None, "mcnemar_p": mc.p if mc else math.nan,
                         **ci_columns("f1_delta", paired_delta(pair.f1, pair.f1_full)),
                         **ci_columns("recall_vs_oracle", bootstrap_mean(ok.recall_vs_oracle.astype(float))),
                         "chosen": ok.chosen.mean() if len(ok) else math.nan,
                         "ttft_s": ok.ttft_s.mean() if len(ok) else math.nan,
                         "speedup_vs_full": full_ttft / ok.ttft_s.mean() if len(ok) else math.nan,
                         "error": g.error.dropna().iloc[-1] if (~g.ok).any() else None})
    return pd.DataFrame(rows)


def _curve(sel, d, e, sink) -> str:
    name = f"{sel} D={int(d)}" if sel.startswith("draft") and d == d and d else \
        (f"epic{int(e)} (fixed)" if e == e and e is not None else sel)
    return name + (f" s{int(sink)}" if sink == sink and sink else "")


def rag_figure(table: pd.DataFrame, path: Path) -> None:
    """Left: EM vs r per selector (each draft variant: one line per D; sink-token points their
    own lines); full (r=1) and reuse (r=0) as reference lines, since they ignore r; a grid with a
    single r gets EM per selector, sorted, instead. Right: EM vs
    recall of oracle_dev's set, one point per (selector, D, r), marker size by r."""
    plt, sns = plotting()
    t = table[(table.n > 0) & (table.hops == "all")].copy()
    t["curve"] = [_curve(s, d, e, k) for s, d, e, k in zip(t.selector, t.draft_layers.fillna(0), t.epic_prefix,
                                                           t.get("sink_tokens", pd.Series(0, index=t.index)).fillna(0))]
    t["variant"] = [c.split(" D=")[0] for c in t.curve]
    curves = t[~t.selector.isin(["full", "reuse"])]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    ax = axes[0]
    single = bool(len(curves)) and curves.r.nunique() == 1
    if single:
        # one budget (e.g. the larger grid at r = 0.15 only): EM per selector, sorted, with its
        # interval; a line over a single x would stack every point on top of the others
        g = curves.sort_values("em")
        ax.errorbar(g.em, range(len(g)), xerr=[g.em - g.em_lo, g.em_hi - g.em], fmt="o", capsize=2, lw=1, ms=4)
        ax.set_yticks(range(len(g)), list(g.curve), fontsize=8)
        ax.set_xlabel(f"EM (95% CI) at r = {float(g.r.iloc[0]):g}")
        ax.set_xlim(-0.05, 1.05)
    elif len(curves):
        styles = {c: ("-" if " D=" not in c else {"3": "--", "5": "-", "10": ":"}.get(c.split(" D=")[1].split()[0], "-."))
                  for c in curves.curve.unique()}
        palette = dict(zip(sorted(curves.variant.unique()), sns.color_palette("tab20", curves.variant.nunique())))
        for c, g in curves.groupby("curve", sort=False):
            g = g.sort_values("r")
            ax.errorbar(g.r, g.em, yerr=[g.em - g.em_lo, g.em_hi - g.em], fmt="o", ls=styles[c], capsize=2, lw=1,
                        ms=3, color=palette[g.variant.iloc[0]], label=c)
    for sel, style in (("full", "-"), ("reuse", "--")):     # they ignore r: reference lines
        row = t[t.selector == sel]
        if len(row):
            (ax.axvline if single else ax.axhline)(float(row.em.iloc[0]), color="black", ls=style, lw=1,
                                                   label=f"{sel} ({row.em.iloc[0]:.2f})")
    if not single:
        ax.set_xlabel("recompute ratio r")
        ax.set_ylabel("EM (95% CI)")
        ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7 if single else 6, ncol=1 if single else 2)
    ax = axes[1]
    pts = curves[curves.recall_vs_oracle.notna()] if "recall_vs_oracle" in curves else curves.iloc[:0]
    if len(pts):
        sns.scatterplot(pts, x="recall_vs_oracle", y="em", hue="variant", size="r", sizes=(20, 120), ax=ax)
    for sel, style in (("full", "-"), ("reuse", "--")):
        row = t[t.selector == sel]
        if len(row):
            ax.axhline(float(row.em.iloc[0]), color="black", ls=style, lw=1)
    ax.set_xlabel("recall of oracle_dev's top-r set")
    ax.set_ylabel("EM")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6)
    n = int(t.n.max()) if len(t) else 0
    fig.suptitle(f"synthetic multi-document QA: EM vs r and vs recall of the oracle's choice (n={n} per point)")
    save(fig, path)
