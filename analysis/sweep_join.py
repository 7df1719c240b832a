"""Measured quality joined into a simulator sweep: the sweep predicts speed and memory, the evals
(runtime.evals) measured accuracy on the same knobs. Passkey accuracy joins on (policy, k, bits,
prefetch), RAG exact match on (selector, r, draft_layers).

    results/reference/evals/passkey.csv       the committed passkey eval (the default evals_dir)
    results/reference/evals/rag/rag.csv       the committed RAG eval

Policy names in an eval table (`specache-k64-b2`) are parsed back into those knobs by the evals'
short-name grammar (runtime/evals/specs.py); the declaration says which knobs a label carries.
Which evals exist and how they were run: docs/evals.md.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ConfigError
from core.policies import SPECS, spec_of
from runtime.evals.specs import parse_spec

ROOT = Path(__file__).resolve().parents[1]
EVALS = ROOT / "results" / "reference" / "evals"

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
        try:
            p = parse_spec(r.policy)
        except ConfigError:
            continue                # not a short policy name (a table of another grammar)
        decl = SPECS[p.name]
        if set(p.given) - set(decl.label_knobs):
            continue                # other group sizes / residuals are not on the sweep's axes
        k = spec_of(p, check=False).topk_rows()
        rows.append({"policy": p.name, "k": math.nan if k is None else k,
                     "bits": p.bits if "bits" in decl.label_knobs else math.nan,
                     "prefetch": p.prefetch if "prefetch" in decl.label_knobs else math.nan,
                     "passkey_accuracy": r.accuracy, "passkey_length": r.length})
    return pd.DataFrame(rows)


def rag_quality(evals_dir: str | Path) -> pd.DataFrame | None:
    """RAG exact match per (selector, r, draft_layers) over all hop counts, from the RAG eval's
    table `<evals_dir>/rag/rag.csv` (`python -m runtime.evals rag --out <evals_dir>/rag`), if one has
    been run. EPIC's fixed prefixes are left out: their r is not on the sweep's axis."""
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
