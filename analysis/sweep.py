"""python -m analysis.sweep experiment=sweep_k_bits_r: simulator grids over k x bits x r.

    python -m analysis.sweep experiment=sweep_k_bits_r
    python -m analysis.sweep experiment=sweep_k_bits_r "sweep.base=['model=smollm2','hardware=cpu']"

An experiment (conf/experiment/sweep_*.yaml) lists grids: overrides shared by a grid and axes
whose cartesian product are its points. Every point is one `simulator.run` configuration
(composed from conf/simulate.yaml, so every key is checked by the same schema), predicted from
the profile; a failing point is a row with its error. Quality is not simulated: where the
measured evals (evals_dir, default results/reference/evals) hold the same knobs, their accuracy
is joined in: passkey accuracy for (policy, k, bits), and RAG exact match for (selector, r) when a
RAG eval has been run. The table goes to results/sweep/<experiment>.csv; analysis/sweep.ipynb
draws it. Every point is also merged, as it finishes, into results/sweep/<experiment>.points.csv
(under a lock, with its config hash): a rerun skips the points whose hash is there and ok
(resume=false redoes them). Why a sweep is simulator-only, and resume: docs/simulator.md.

For ad-hoc sweeps of one policy, Hydra's multirun does the same one point per job:
`python -m simulator.run -m policy=specache policy.k=0,16,64,256 policy.bits=1,2,4`.

This module builds the grid, runs the points and writes the table; the parts: sweep_join.py
(measured quality), paper.py (paper reproductions), sweep_plots.py (figures, Pareto front).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from core.errors import ConfigError, cli_errors
from core.policies import spec_of
from core.sweeps import merge_reads, parse_reads, reads_text, stretched_line

from .compose import argv_or_help, compose_config, describe, file_sha256
from .paper import (PAPER, format_verdicts, paper_label, paper_table, prefill_detail,  # noqa: F401
                    step_detail, verdicts)
from .sweep_join import (EVALS, check_evals_dir, join_quality, passkey_quality,  # noqa: F401
                         rag_quality)
from .sweep_plots import pareto, plot_heatmaps, plot_paper, plot_pareto, plot_rag  # noqa: F401
from .table import merge_rows, write_csv_atomic

ROOT = Path(__file__).resolve().parents[1]
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
    resume: bool = True     # skip points whose config hash is in <experiment>.points.csv with status ok


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


def compose_point(overrides: list[str], results_dir: str) -> DictConfig:
    return compose_config("simulate", [*overrides, f"results_dir={results_dir}"])


def point_hash(grid: str, overrides: list[str], cfg: DictConfig | None) -> str:
    """What says "the same point" on resume: the grid and the composed config (less where results
    go and how they are shown) and the sha256 of the profile it reads; a point that does not
    compose hashes its overrides."""
    from simulator.run import profile_path

    if cfg is None:
        what: Any = {"grid": grid, "overrides": overrides}
    else:
        c = OmegaConf.to_container(cfg, resolve=True)
        for key in ("results_dir", "progress", "experiment", "phases", "timeline"):
            c.pop(key, None)
        try:
            sha = file_sha256(profile_path(cfg.hardware, cfg.model.name))
        except Exception:           # no profile: the point fails when run, and is rerun next time
            sha = ""
        what = {"grid": grid, "config": c, "profile_sha256": sha}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_point(grid: str, overrides: list[str], results_dir: str, paper: str | None = None,
              cfg: DictConfig | None = None) -> dict:
    """One point's row (`cfg`: the point already composed by compose_point)."""
    from simulator.run import simulate

    row: dict[str, Any] = {"grid": grid, "overrides": " ".join(overrides), "status": "ok"}
    try:
        cfg = cfg if cfg is not None else compose_point(overrides, results_dir)
        p = cfg.policy
        row.update(describe(cfg))
        row.update({"hardware": cfg.hardware.name,
                    "k": math.nan if (k := spec_of(p, check=False).topk_rows()) is None else k,
                    "bits": p.get("bits", math.nan), "prefetch": p.get("prefetch", math.nan),
                    "selector": p.get("selector", ""), "recompute_ratio": p.get("recompute_ratio", math.nan),
                    "draft_layers": p.get("draft_layers", math.nan) if str(p.get("selector")).startswith("draft")
                    else math.nan})
        rec = simulate(cfg)
        row.update({m: rec.get(m, math.nan) for m in METRICS})
        row["extrapolated"] = " ".join(rec.get("extrapolated", []))
        row["extrapolated_reads"] = reads_text(rec.get("extrapolated_reads") or {})    # how far (core/sweeps.py)
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
    store = points_path(cfg)
    done = load_points(store) if cfg.get("resume", True) else {}
    rows: dict[str, dict] = {}
    for g, ov in tqdm(pts, desc=f"sweep {cfg.experiment}", unit="point", disable=not cfg.progress):
        try:
            composed = compose_point(ov, cfg.results_dir)
        except Exception:               # recorded by run_point
            composed = None
        h = point_hash(g, ov, composed)
        if h in rows:
            continue                    # the same point twice in one grid
        prev = done.get(h)
        if prev is not None and prev.get("status") == "ok":
            rows[h] = prev
            continue
        rows[h] = {**run_point(g, ov, cfg.results_dir, paper, composed), "config_hash": h}
        merge_rows(store, {h: rows[h]}, key="config_hash", exact=True)      # a stopped sweep keeps it
    df = pd.DataFrame(list(rows.values()))
    if paper:
        df = paper_table(df, paper)
        write_csv_atomic(df, csv_path(cfg))
        plot_paper(df, paper, csv_path(cfg).with_suffix(".png"))
        return df
    df = join_quality(df, pk, rq)
    write_csv_atomic(df, csv_path(cfg))
    return df


def csv_path(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / "sweep" / f"{cfg.experiment or 'sweep'}.csv"


def points_path(cfg: DictConfig) -> Path:
    """Every point's row as it finished, keyed by config_hash: what a rerun resumes from."""
    return Path(cfg.results_dir) / "sweep" / f"{cfg.experiment or 'sweep'}.points.csv"


def load_points(path: Path) -> dict[str, dict]:
    """{config_hash: row} of a points table ({} when there is none)."""
    from .table import read_rows

    return read_rows(path, key="config_hash", exact=True) if path.exists() else {}


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
    argv = argv_or_help(argv, __doc__)
    if argv is None:
        return
    with cli_errors("analysis.sweep", resume="run the same command again: resume=true skips the finished points"):
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
    stretched = ok[(ok["extrapolated"].fillna("").astype(str) != "") | (ok["extrapolated_reads"].fillna("").astype(str)
                                                                       != "")] if "extrapolated_reads" in ok else ok.iloc[:0]
    if len(stretched):         # what was read beyond a profile's grid, how far (its farthest over the points)
        print(stretched_line(merge_reads(parse_reads(t) for t in stretched.get("extrapolated_reads", [])),
                             {t for x in stretched["extrapolated"].fillna("") for t in str(x).split()},
                             points=f"{len(stretched)} of {len(df)} points"))
    if cfg.sweep.get("paper"):                 # per headline figure: ours, the paper's, inside or not, and why
        print(format_verdicts(verdicts(df, cfg.sweep.paper), cfg.sweep.paper))
    print(f"\n{csv_path(cfg)}  ({len(ok)} ok, {len(df) - len(ok)} failed)")


if __name__ == "__main__":
    main()
