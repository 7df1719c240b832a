"""Tables (CSV) and figures (PNG, seaborn) from the JSON lines of `runtime.evals`: passkey and
ppl here, rag's from rag/report.py, one <task>.csv and <task>.png per task with results.

Every statistic is paired with `full` on the samples both completed: McNemar for retrieval,
bootstrap intervals of per-sample differences for log-probs and NLL (`stats.py`; docs/evals.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from core.errors import ConfigError
from .rag.report import rag_figure, rag_table
from .run import ResultLog
from .stats import mcnemar_exact, paired_delta, perplexity, perplexity_ratio
from .tables import by_policy, ci_columns, paired, plotting, save

STAT_KEYS = ("guess_accuracy", "topk_recall")


def load(path: Path) -> pd.DataFrame:
    """One row per (sample, policy): its last result line, or its last error if it never succeeded."""
    recs = ResultLog(path).records()
    if not recs:
        return pd.DataFrame()
    df = pd.DataFrame(recs)
    if "error" not in df:
        df["error"] = None
    df["ok"] = df["error"].isna()
    for col in ("correct", "digit_logprob", "nll_mean", "seconds"):   # absent when every point failed
        if col not in df:
            df[col] = math.nan
    df = df.sort_values("ok", kind="stable").drop_duplicates(["sample_id", "policy"], keep="last").sort_index()
    for key in STAT_KEYS:
        df[key] = [(s or {}).get(key, math.nan) if isinstance(s, dict) else math.nan
                   for s in df.get("policy_stats", [None] * len(df))]
    return df


def passkey_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for length, dl in df.groupby("length"):
        base = dl[dl.policy == "full"]
        for pol, g, ok in by_policy(dl):
            pair = paired(g, base, ["correct", "digit_logprob"])
            mc = mcnemar_exact(list(pair.correct_full), list(pair.correct)) if len(pair) else None
            rows.append({"task": "passkey", "length": length, "policy": pol, "n": len(ok),
                         "errors": int((~g.ok).sum()), "accuracy": ok.correct.mean() if len(ok) else math.nan,
                         "n_paired": len(pair), "only_full": mc.only_full if mc else None,
                         "only_policy": mc.only_policy if mc else None,
                         "mcnemar_p": mc.p if mc else math.nan,
                         **ci_columns("digit_lp_delta", paired_delta(pair.digit_logprob, pair.digit_logprob_full)),
                         "digit_logprob": ok.digit_logprob.mean() if len(ok) else math.nan,
                         **{k: ok[k].mean() for k in STAT_KEYS},
                         "seconds": ok.seconds.mean() if len(ok) else math.nan,
                         "error": g.error.dropna().iloc[-1] if (~g.ok).any() else None})
    return pd.DataFrame(rows)


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (context, last), dc in df.groupby(["context", "last"]):
        base = dc[dc.policy == "full"]
        for pol, g, ok in by_policy(dc):
            pair = paired(g, base, ["nll_mean"])
            rows.append({"task": "ppl", "context": context, "last": last, "policy": pol, "n": len(ok),
                         "errors": int((~g.ok).sum()), **ci_columns("ppl", perplexity(ok.nll_mean)),
                         "n_paired": len(pair), **ci_columns("ppl_ratio", perplexity_ratio(pair.nll_mean, pair.nll_mean_full)),
                         **{k: ok[k].mean() for k in STAT_KEYS},
                         "seconds": ok.seconds.mean() if len(ok) else math.nan,
                         "error": g.error.dropna().iloc[-1] if (~g.ok).any() else None})
    return pd.DataFrame(rows)


def _errorbars(ax, table: pd.DataFrame, x: str, y: str, hue: str | None) -> None:
    """Bootstrap-interval error bars drawn onto a seaborn pointplot's own points."""
    groups = [(None, table)] if hue is None else list(table.groupby(hue, sort=False))
    xs = list(dict.fromkeys(table[x]))
    for _, g in groups:
        pos = [xs.index(v) for v in g[x]]
        ax.errorbar(pos, g[y], yerr=[g[y] - g[f"{y}_lo"], g[f"{y}_hi"] - g[y]], fmt="none",
                    ecolor="gray", capsize=3, lw=1)


def passkey_figure(table: pd.DataFrame, path: Path) -> None:
    plt, sns = plotting()
    t = table[table.n > 0].copy()
    t["length"] = t["length"].astype(str)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.45 * t.policy.nunique() + 3), 8), sharex=True)
    sns.barplot(t, x="policy", y="accuracy", hue="length", ax=axes[0])
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("passkey retrieval (greedy, exact 5 digits)")
    sns.pointplot(t, x="policy", y="digit_lp_delta", hue="length", dodge=False, linestyle="none", ax=axes[1])
    _errorbars(axes[1], t, "policy", "digit_lp_delta", "length")
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("digit log-prob - full (nats, 95% CI)")
    axes[1].tick_params(axis="x", rotation=75)
    save(fig, path)


def ppl_figure(table: pd.DataFrame, path: Path) -> None:
    plt, sns = plotting()
    t = table[table.n_paired > 0].copy()
    t["context"] = t["context"].astype(str)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * t.policy.nunique() + 3), 4.5))
    sns.pointplot(t, x="policy", y="ppl_ratio", hue="context", dodge=False, linestyle="none", ax=ax)
    _errorbars(ax, t, "policy", "ppl_ratio", "context")
    ax.axhline(1, color="black", lw=0.8)
    ax.set_ylabel("perplexity / full's (95% CI)")
    ax.set_title("teacher-forced perplexity vs full")
    ax.tick_params(axis="x", rotation=75)
    save(fig, path)


# each task's (table, figure); rag's live with the rest of its task in rag/report.py
TASKS = {"passkey": (passkey_table, passkey_figure), "ppl": (ppl_table, ppl_figure),
         "rag": (rag_table, rag_figure)}


def report(out: Path) -> dict[str, pd.DataFrame]:
    """Write <out>/<task>.csv and <out>/<task>.png for each task with results; returns the tables."""
    out = Path(out)
    tables = {}
    for task, (make_table, make_figure) in TASKS.items():
        path = out / f"{task}.jsonl"
        if not path.exists():
            continue
        df = load(path)
        if df.empty:
            continue
        table = make_table(df)
        table.to_csv(out / f"{task}.csv", index=False)
        if (table.n > 0).any():
            make_figure(table, out / f"{task}.png")
        tables[task] = table
    if not tables:
        raise ConfigError(f"no results in {out} (expected passkey.jsonl or ppl.jsonl); run a task first")
    return tables
