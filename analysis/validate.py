"""python -m analysis.validate experiment=validate_cpu: predicted vs measured on the same configs.

    python -m analysis.validate experiment=validate_quick        # the README's 5-minute check
    python -m analysis.validate experiment=validate_cpu           # >= 24 points, both splits
    python -m analysis.validate experiment=validate_cpu only=[full_b1_p1k]   # some points
    python -m analysis.validate experiment=validate_cpu halves=simulator     # re-predict only

An experiment (conf/experiment/validate_*.yaml) lists points: an id, a split and Hydra
overrides. Each point is composed twice from the same overrides, once as the runtime sees it
(`bench` for static batches, `serve` for open arrivals) and once as the simulator does
(`simulate`); the model, policy, workload and hardware sections must come out identical, or the
point is refused with the differing keys named. The runtime half runs the real model here, the
simulator half predicts from the committed profile; the two records are joined into
`results/validation/<experiment>.csv` (one row per point, `status` ok or the error) with the
signed relative errors (predicted - measured) / measured, and a fidelity figure is saved beside it.

Splits are by regime, not at random: the `heldout` points (batch 4, 4K context, a link speed
never used for calibration, Poisson arrivals) are not looked at while the simulator is fixed.
A failing point is recorded and the rest still run; a rerun skips points already measured with
the same configuration (`resume=false` to redo them).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from runtime.config import register
from runtime.errors import ConfigError, cli_errors

register()          # the base_* schemas every group option starts from

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SPLITS = ("calibration", "heldout")
HALVES = ("both", "runtime", "simulator")
SECTIONS = ("model", "policy", "workload", "hardware")        # must agree between the halves
METRICS = ("throughput_tok_s", "ttft_s", "tpot_s", "decode_tok_s", "kv_bytes_device")
HEADLINE = ("throughput_tok_s", "ttft_s", "tpot_s")


@dataclass
class ValidationSpec:
    base: list[str] = field(default_factory=list)     # overrides every point starts from
    points: list[Any] = field(default_factory=list)   # {id, split, overrides, [runtime], [simulator]}


@dataclass
class ValidateConfig:
    experiment: Optional[str] = None
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    only: Optional[list[str]] = None    # point ids to run (default: all)
    overrides: list[str] = field(default_factory=list)   # appended to every point, both halves
                                        # (e.g. [hardware.profile=PATH] for a GPU measured elsewhere)
    halves: str = "both"                # both | runtime | simulator (the other half from the CSV)
    resume: bool = True                 # skip points this machine already measured with the same config
    results_dir: str = "results"
    progress: bool = True
    figure: bool = True


ConfigStore.instance().store(name="base_validate", node=ValidateConfig)


# ----------------------------------------------------------------------------- composing a point

@dataclass
class Point:
    id: str
    split: str
    overrides: list[str]
    runtime: list[str]            # overrides for the runtime half only (e.g. repeats)
    simulator: list[str]          # ... the simulator half only (e.g. fidelity)


def points_of(cfg: DictConfig) -> list[Point]:
    spec = cfg.validation
    if not spec.points:
        raise ConfigError("validation.points is empty; pick an experiment that lists points, "
                          "e.g. experiment=validate_quick (conf/experiment/validate_*.yaml)")
    out, seen = [], set()
    for i, p in enumerate(spec.points):
        if "id" not in p or "split" not in p:
            raise ConfigError(f"validation.points[{i}] needs an `id` and a `split` ({' | '.join(SPLITS)})")
        if p.split not in SPLITS:
            raise ConfigError(f"validation.points[{i}] ({p.id}): split={p.split!r}; use one of {', '.join(SPLITS)}")
        if p.id in seen:
            raise ConfigError(f"validation.points: id {p.id!r} is used twice; ids name rows of the CSV")
        seen.add(p.id)
        out.append(Point(str(p.id), str(p.split), [*spec.base, *p.get("overrides", []), *cfg.get("overrides", [])],
                         list(p.get("runtime", [])), list(p.get("simulator", []))))
    if cfg.only:
        unknown = set(cfg.only) - seen
        if unknown:
            raise ConfigError(f"only={sorted(unknown)}: no such point ids in experiment {cfg.experiment}")
        out = [p for p in out if p.id in set(cfg.only)]
    return out


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml with Hydra overrides; a bad override is one ConfigError line (the
    halves of a point are composed in-process, so Hydra's own CLI error handling is not there)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0]
        experiments = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
        hint = (f"; experiments: {', '.join(experiments)}" if "experiment" in first else "")
        raise ConfigError(f"{name} config: {first}{hint}") from None


def runtime_entry(cfg: DictConfig) -> str:
    """Static batches (and RAG requests) go through runtime.bench, open arrivals through runtime.serve."""
    return "bench" if cfg.workload.arrival == "static" or cfg.policy.name == "rag" else "serve"


def compose_halves(p: Point, experiment: str | None, results_dir: str) -> tuple[DictConfig, DictConfig, str]:
    common = [*p.overrides, f"results_dir={results_dir}"]
    sim_cfg = compose_config("simulate", common + p.simulator)
    entry = runtime_entry(sim_cfg)
    run_cfg = compose_config(entry, common + p.runtime + ["progress=false"])
    for c in (run_cfg, sim_cfg):        # the records name the validation experiment and point
        c.experiment = f"{experiment or 'validate'}-{p.id}"
    return run_cfg, sim_cfg, entry


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def differing_keys(a: DictConfig, b: DictConfig) -> list[str]:
    """Keys of the shared sections whose values differ between the two halves (a key only one
    half has is that half's own business: e.g. the scheduler, which runtime.bench lacks)."""
    fa = flatten({s: OmegaConf.to_container(a[s], resolve=True) for s in SECTIONS if s in a})
    fb = flatten({s: OmegaConf.to_container(b[s], resolve=True) for s in SECTIONS if s in b})
    return sorted(k for k in fa.keys() & fb.keys() if fa[k] != fb[k])


def config_hash(run_cfg: DictConfig, sim_cfg: DictConfig) -> str:
    both = {"runtime": OmegaConf.to_container(run_cfg, resolve=True), "simulator": OmegaConf.to_container(sim_cfg, resolve=True)}
    for half in both.values():
        for key in ("results_dir", "progress", "experiment"):
            half.pop(key, None)
        half["hardware"].pop("profile", None)   # where the profile lies (GPU box vs here) is not the config
    return hashlib.sha1(json.dumps(both, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the two halves

def measure(entry: str, cfg: DictConfig) -> dict:
    if entry == "bench":
        from runtime.bench import run
    else:
        from runtime.serve import run
    return run(cfg)


def predict(cfg: DictConfig) -> dict:
    from simulator.run import simulate

    return simulate(cfg)


def decode_tok_s(rec: dict) -> float:
    """Decode throughput; the simulator's record has none for a static batch, so it is derived
    as the runtime defines it: tokens after the first / time after the first token."""
    if rec.get("decode_tok_s") is not None:
        return float(rec["decode_tok_s"])
    b, g = rec.get("batch"), rec.get("gen_len")
    wall, ttft = rec.get("wall_s"), rec.get("ttft_s")
    if rec.get("requests") == b and None not in (b, g, wall, ttft) and wall > ttft and g > 1:
        return b * (g - 1) / (wall - ttft)
    return math.nan


def describe(cfg: DictConfig) -> dict:
    """The columns that say what a point is (for grouping in the notebook)."""
    p, w, h = cfg.policy, cfg.workload, cfg.hardware
    knobs = {"kivi": lambda: f"{p.bits}b", "specache": lambda: f"k{p.k}-{p.bits}b" + ("" if p.prefetch else "-noprefetch"),
             "rag": lambda: f"{p.selector}-r{p.recompute_ratio:g}" + (f"-D{p.draft_layers}" if p.selector == "draft" else "")}
    label = p.name + ("-" + knobs[p.name]() if p.name in knobs else "")
    return {"policy": p.name, "label": label, "model": cfg.model.name, "batch": w.batch, "prompt_len": w.prompt_len,
            "gen_len": w.gen_len, "arrival": w.arrival, "rate": w.rate if w.arrival == "poisson" else math.nan,
            "n_requests": w.n_requests if w.arrival != "static" else w.batch,
            "link_gbps": h.link.gbps if h.link.gbps else math.nan}


def rel_err(pred: float, meas: float) -> float:
    if pred is None or meas is None or not np.isfinite(pred) or not np.isfinite(meas) or meas == 0:
        return math.nan
    return (pred - meas) / meas


def run_point(p: Point, cfg: DictConfig, previous: dict | None) -> dict:
    row: dict[str, Any] = {"id": p.id, "split": p.split, "status": "ok"}
    t0 = time.perf_counter()
    try:
        run_cfg, sim_cfg, entry = compose_halves(p, cfg.experiment, cfg.results_dir)
        row.update(describe(sim_cfg))
        row["runtime_entry"] = entry
        row["config_hash"] = h = config_hash(run_cfg, sim_cfg)
        diff = differing_keys(run_cfg, sim_cfg)
        if diff:
            raise ConfigError("the halves' configs differ in " + ", ".join(diff) +
                              "; give these keys in the point's `overrides`, not in `runtime`/`simulator`")
        if cfg.resume and previous and previous.get("status") == "ok" and previous.get("config_hash") == h \
                and previous.get("host") == platform.node() and cfg.halves == "both":
            return previous
        if cfg.halves in ("both", "runtime"):
            t = time.perf_counter()
            meas = measure(entry, run_cfg)
            row["runtime_wall_s"] = time.perf_counter() - t
            row["measured_path"] = meas["path"]
            row["host"] = platform.node()           # a resumed row must have been measured here
            for m in METRICS:
                row[f"measured_{m}"] = decode_tok_s(meas) if m == "decode_tok_s" else meas.get(m, math.nan)
        else:
            if not previous or previous.get("config_hash") != h or previous.get("status") != "ok":
                raise ConfigError(f"halves=simulator needs a measured row for {p.id} with the same config; "
                                  "run halves=both first")
            for k, v in previous.items():
                if k.startswith("measured_") or k in ("runtime_wall_s", "host"):
                    row[k] = v
        if cfg.halves in ("both", "simulator"):
            t = time.perf_counter()
            pred = predict(sim_cfg)
            row["sim_wall_s"] = time.perf_counter() - t
            row["simulated_path"] = pred["path"]
            for m in METRICS:
                row[f"predicted_{m}"] = decode_tok_s(pred) if m == "decode_tok_s" else pred.get(m, math.nan)
        for m in METRICS:
            row[f"{m}_rel_err"] = rel_err(row.get(f"predicted_{m}"), row.get(f"measured_{m}"))
    except Exception as e:          # recorded, and the sweep goes on
        row["status"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
    row["point_wall_s"] = time.perf_counter() - t0
    return row


# ----------------------------------------------------------------------------- results

def csv_path(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / "validation" / f"{cfg.experiment or 'validate'}.csv"


def write_csv_atomic(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            df.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> pd.DataFrame:
    """A validation CSV, with the absolute errors the summaries use."""
    df = pd.read_csv(path)
    for m in METRICS:
        if f"{m}_rel_err" in df:
            df[f"{m}_abs_err"] = df[f"{m}_rel_err"].abs()
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Median, p90 and worst |relative error| per split and metric, over the ok points."""
    ok = df[df.status == "ok"]
    rows = []
    for split in SPLITS:
        part = ok[ok.split == split]
        for m in HEADLINE:
            e = part[f"{m}_rel_err"].abs().dropna() if f"{m}_rel_err" in part else pd.Series(dtype=float)
            worst = part.loc[e.idxmax(), "id"] if len(e) else ""
            rows.append({"split": split, "metric": m, "points": len(e),
                         "median": e.median() if len(e) else math.nan,
                         "p90": e.quantile(0.9) if len(e) else math.nan,
                         "worst": e.max() if len(e) else math.nan, "worst_point": worst})
    return pd.DataFrame(rows)


def format_summary(df: pd.DataFrame) -> str:
    s = summary(df)
    lines = [f"{'split':<12} {'metric':<17} {'points':>6} {'median':>8} {'p90':>8} {'worst':>8}  worst point"]
    for r in s.itertuples():
        pct = lambda v: f"{100 * v:7.1f}%" if np.isfinite(v) else "      -"
        lines.append(f"{r.split:<12} {r.metric:<17} {r.points:>6} {pct(r.median)} {pct(r.p90)} {pct(r.worst)}  {r.worst_point}")
    failed = df[df.status != "ok"]
    for r in failed.itertuples():
        lines.append(f"FAILED {r.id}: {r.status}")
    return "\n".join(lines)


def format_points(df: pd.DataFrame) -> str:
    lines = [f"{'point':<28} {'split':<11} {'TTFT meas/pred ms':>20} {'TPOT meas/pred ms':>19} {'tok/s meas/pred':>17}"]
    for r in df[df.status == "ok"].itertuples():
        f = lambda a, b, k=1e3: f"{a * k:8.1f} /{b * k:8.1f}"
        lines.append(f"{r.id:<28} {r.split:<11} {f(r.measured_ttft_s, r.predicted_ttft_s):>20} "
                     f"{f(r.measured_tpot_s, r.predicted_tpot_s):>19} "
                     f"{f(r.measured_throughput_tok_s, r.predicted_throughput_tok_s, 1):>17}")
    return "\n".join(lines)


def plot_fidelity(df: pd.DataFrame, out: str | Path) -> Path:
    """Predicted vs measured (log-log, y = x and +-10 % bands), one panel per headline metric."""
    plt, sns = _plt()
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    import matplotlib

    ok = df[df.status == "ok"]
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 4.6))
    units = {"throughput_tok_s": ("tok/s", 1), "ttft_s": ("ms", 1e3), "tpot_s": ("ms", 1e3)}
    for ax, m in zip(axes, HEADLINE):
        unit, k = units[m]
        d = ok.assign(measured=ok[f"measured_{m}"] * k, predicted=ok[f"predicted_{m}"] * k).dropna(subset=["measured", "predicted"])
        if len(d):
            sns.scatterplot(data=d, x="measured", y="predicted", hue="policy", style="split", s=60, ax=ax,
                            legend=(ax is axes[-1]))
            lo, hi = d[["measured", "predicted"]].min().min() * 0.8, d[["measured", "predicted"]].max().max() * 1.25
            xs = np.geomspace(lo, hi, 50)
            ax.plot(xs, xs, color="black", lw=1)
            ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, lw=0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):            # plain numbers, no crowded minor labels
                axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(m)
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
    if ax.get_legend():
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("simulator vs runtime (y = x; band: +-10 %)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def plot_errors(df: pd.DataFrame, out: str | Path | None = None):
    """Signed relative error per point, by policy (rows: headline metrics; colour: split)."""
    plt, sns = _plt()
    ok = df[df.status == "ok"]
    long = ok.melt(id_vars=["id", "policy", "split"], value_vars=[f"{m}_rel_err" for m in HEADLINE],
                   var_name="metric", value_name="rel_err")
    long["metric"] = long.metric.str.removesuffix("_rel_err")
    long["rel_err_pct"] = 100 * long.rel_err
    g = sns.catplot(data=long, x="policy", y="rel_err_pct", hue="split", col="metric", kind="strip",
                    dodge=True, height=3.6, aspect=1.2, s=55, hue_order=list(SPLITS))
    for ax in g.axes.flat:
        ax.axhline(0, color="black", lw=1)
        ax.axhspan(-10, 10, color="grey", alpha=0.15, lw=0)
        ax.set_ylabel("(predicted - measured) / measured, %")
        ax.tick_params(axis="x", rotation=30)
    if out:
        g.savefig(out, dpi=120, bbox_inches="tight")
    return g


def plot_engine_time(df: pd.DataFrame, out: str | Path | None = None):
    """Wall time of each half per point: what the simulator saves over running the model."""
    plt, sns = _plt()
    ok = df[df.status == "ok"].dropna(subset=["runtime_wall_s", "sim_wall_s"])
    long = ok.melt(id_vars=["id"], value_vars=["runtime_wall_s", "sim_wall_s"], var_name="engine", value_name="seconds")
    long["engine"] = long.engine.map({"runtime_wall_s": "runtime (measured)", "sim_wall_s": "simulator (predicted)"})
    fig, ax = plt.subplots(figsize=(9, 0.28 * max(len(ok), 4) + 1))
    sns.barplot(data=long, y="id", x="seconds", hue="engine", ax=ax)
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds (log)")
    ax.set_ylabel("")
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def validate(cfg: DictConfig) -> pd.DataFrame:
    if cfg.halves not in HALVES:
        raise ConfigError(f"halves={cfg.halves!r}; use one of {', '.join(HALVES)}")
    points = points_of(cfg)
    path = csv_path(cfg)
    old = {r["id"]: r for r in load(path).to_dict("records")} if path.exists() else {}
    rows = dict(old)
    order = [q.id for q in points_of(OmegaConf.merge(cfg, {"only": None}))]   # the CSV keeps the file's order
    bar = tqdm(points, desc=f"validate {cfg.experiment}", unit="point", disable=not cfg.progress)
    for p in bar:
        bar.set_postfix_str(p.id)
        row = run_point(p, cfg, old.get(p.id))
        rows[p.id] = {k: v for k, v in row.items() if not k.endswith("_abs_err")}
        df = pd.DataFrame([rows[i] for i in order if i in rows])
        write_csv_atomic(df, path)             # after every point: a crash loses one point at most
    df = load(path)
    if cfg.figure and (df.status == "ok").any():
        plot_fidelity(df, path.with_suffix(".png"))
    return df


def main(argv: list[str] | None = None) -> None:
    """Hydra-style overrides on the command line (`experiment=validate_cpu only=[a,b]`); the
    halves are composed per point with Hydra's compose API, so no Hydra app wraps this one."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    with cli_errors("analysis.validate"):
        cfg = compose_config("validate", argv)
        df = validate(cfg)
    path = csv_path(cfg)
    print(format_points(df))
    print()
    print(format_summary(df))
    print(f"\n{path}" + (f"\n{path.with_suffix('.png')}" if cfg.figure and (df.status == 'ok').any() else ""))


if __name__ == "__main__":
    main()
