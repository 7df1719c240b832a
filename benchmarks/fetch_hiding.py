"""Where SpeCache's prefetch stops hiding the fetch behind compute as k grows (the
k/N <~ rho x link/memory bandwidth bound of the design).

    python benchmarks/fetch_hiding.py                      # prints the table, saves results/figures/fetch_hiding.png
    python benchmarks/fetch_hiding.py --out results/reference/figures/fetch_hiding.png --tol 0.05   # the committed one

For each profile (the committed CPU profile with smollm2 at 2048 context; the roofline H100 SXM
and A6000 profiles with llama7b_shape, all 32 layers, at 4096 context), batch 1 and 16, and k on
a log grid 0, 1, 2, 4 ... 4096 (clamped by the twin to the quantized keys), one decode step of
the `specache` twin (roofline profiles: the analytic costs of core/profile/analytic.py for the
shape; the CPU profile's tables stop at batch 4, so its batch-16 rows are read past the grid and
say so) (bits 2, group 64, residual 64) is solved with the fast fidelity
(simulator.hardware.solve over simulator.policies' op graph), three ways:

- prefetch: the speculative token's rows fetched beside the next layer's compute (the default);
- no prefetch: score -> fetch -> attend, the fetch on the critical path;
- fetch removed: the prefetch graph with every gather costing 0 s (the compute alone: twice
  the query rows and the replace cost, no copy).

Printed per case: the k=0 step (plain kivi), the first k where the prefetch step exceeds the
k=0 step by more than --tol, the first k where it exceeds the fetch-removed step by more than
--tol (the fetch is no longer hidden), and beside them the design's bound
k/N <~ rho * link / memory bandwidth, i.e. k* = rho * (link / mem) * N, with
rho = (bits + 2 * 8 * e / group) / (8 * e) the low-bit size ratio against the e-byte K/V (for
16-bit K/V: (bits + 32/group)/16), `link` the profile's large pinned H2D copy bandwidth (and, as
the twin actually costs the fetch, the `gather` table's bandwidth) and `mem` the bandwidth the
profile's decode_attention_full table implies (bytes of K/V read per extra context token over
the seconds it adds, at the largest grid contexts).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.costs import Costs, ModelShape  # noqa: E402
from simulator.hardware import solve  # noqa: E402
from simulator.policies import Kivi, Specache  # noqa: E402

CASES = [  # (label, profile, model, context)
    ("CPU (2-core Xeon, measured)", "profiles/cpu-intel-r-xeon-r-processor-2c.json", "smollm2", 2048),
    ("H100 SXM (roofline)", "profiles/roofline-h100-sxm.json", "llama7b_shape", 4096),
    ("A6000 (roofline)", "profiles/roofline-a6000.json", "llama7b_shape", 4096),
]
K_GRID = [0] + [2 ** i for i in range(13)]          # 0, 1, 2, 4 ... 4096
BATCHES = (1, 16)


class NoFetch:
    """A Costs view whose gathers (the H2D fetch of k rows) cost nothing; all else delegated."""

    def __init__(self, costs: Costs):
        self._c = costs

    def __getattr__(self, name):
        return getattr(self._c, name)

    def gather(self, nbytes: float, mode: str = "host") -> float:
        return 0.0


def shape_of(costs: Costs, n_layers: int | None = None) -> ModelShape:
    s = costs.shape
    head_dim = s.get("head_dim") or s["dim"] // s["n_heads"]
    return ModelShape(int(n_layers or s["n_layers"]), int(s["n_kv_heads"]), int(head_dim), costs.kv_dtype_auto)


@dataclass
class Point:
    k: int
    k_eff: int
    prefetch: float        # step seconds
    no_prefetch: float
    no_fetch: float
    fetch: float           # seconds of the per-layer fetch (the gather), for reference


def step_times(costs: Costs, shape: ModelShape, batch: int, ctx: int, ks=K_GRID, bits: int = 2,
               group_size: int = 64, residual: int = 64) -> tuple[float, list[Point]]:
    """(the k=0 step = kivi's, one Point per k): fast-fidelity step seconds of the specache twin."""
    base = solve(Kivi(bits=bits, group_size=group_size, residual=residual).decode_graph(costs, shape, batch, ctx)).seconds
    free = NoFetch(costs)
    out = []
    for k in ks:
        pol = dict(k=k, bits=bits, group_size=group_size, residual=residual)
        on, off = Specache(prefetch=True, **pol), Specache(prefetch=False, **pol)
        ke = on.k_eff(ctx)
        out.append(Point(k, ke,
                         float(solve(on.decode_graph(costs, shape, batch, ctx)).seconds),
                         float(solve(off.decode_graph(costs, shape, batch, ctx)).seconds),
                         float(solve(on.decode_graph(free, shape, batch, ctx)).seconds),
                         costs.gather(2 * batch * ke * shape.kv_row) if k else 0.0))
    return float(base), out


def first_k(points: list[Point], ref, tol: float) -> int | None:
    """First k whose prefetch step exceeds ref (a number, or a function of the Point) by > tol."""
    for p in points:
        r = ref(p) if callable(ref) else ref
        if p.k > 0 and p.prefetch > (1 + tol) * r:
            return p.k
    return None


def hidden_up_to(points: list[Point], tol: float) -> int | None:
    """Largest k (> 0) whose prefetch step is within tol of the same step with the fetch removed,
    with every smaller k also within it: the region where the fetch is hidden."""
    last = None
    for p in points:
        if p.k == 0:
            continue
        if p.prefetch > (1 + tol) * p.no_fetch:
            break
        last = p.k
    return last


def rho(bits: int, group_size: int, kv_elem: int) -> float:
    """Low-bit bytes per element (codes + a scale and a zero per group, in the K/V dtype) over the
    full-precision element: (bits + 32/group)/16 for 16-bit K/V."""
    return (bits + 2 * 8 * kv_elem / group_size) / (8 * kv_elem)


def link_bandwidth(costs: Costs) -> tuple[float, float]:
    """(pinned H2D bandwidth over the table's last segment, the gather table's over its last)."""
    t = costs.table("h2d_pinned")
    b = (2 ** 29, 2 ** 30)          # the tables' last segment (roofline: the formula at the same sizes)
    h2d = (b[1] - b[0]) / (t(b[1]) - t(b[0]))
    n = (16384 * 256, 65536 * 256)  # gathered bytes: the gather table's last segment
    gather = (n[1] - n[0]) / (costs.gather(n[1]) - costs.gather(n[0]))
    return float(h2d), float(gather)


def memory_bandwidth(costs: Costs, shape: ModelShape, batch: int = 1) -> float:
    """Bytes of K/V read per extra context token over the seconds decode_attention_full adds,
    between the table's two largest contexts, at `batch`."""
    t = costs.table("decode_attention_full")
    ctx = t.axes[1] if hasattr(t, "axes") else (4096, 8192)     # roofline: any two contexts
    dt = t(batch, ctx[-1]) - t(batch, ctx[-2])
    return batch * 2 * shape.kv_row * (ctx[-1] - ctx[-2]) / dt


def k_layer(costs: Costs, shape: ModelShape, batch: int, ctx: int, points: list[Point], gather: float) -> float:
    """The twin's own bound: the k whose per-layer gather (2 x batch x k rows at the gather
    bandwidth) equals one layer's compute with the fetch removed at k = 1 (weights and glue
    included, which the attention-only design bound leaves out)."""
    p1 = next(p for p in points if p.k == 1)
    layer = (p1.no_fetch - costs.table("step_overhead")(batch)) / shape.n_layers
    return layer * gather / (2 * batch * shape.kv_row)


def run(tol: float = 0.05, ks=K_GRID, batches=BATCHES, cases=CASES, bits: int = 2, group_size: int = 64):
    rows, summary = [], []
    for label, path, model, ctx in cases:
        # the CPU profile's decode tables stop at batch 4: batch 16 there is read beyond them
        costs = Costs.load(ROOT / path, model, allow_extrapolation=True)
        shape = shape_of(costs)
        r = rho(bits, group_size, shape.kv_elem)
        h2d, gather = link_bandwidth(costs)
        mem = memory_bandwidth(costs, shape)
        n_q = Kivi(bits=bits, group_size=group_size).quantized(ctx)[0]
        for b in batches:
            base, pts = step_times(costs, shape, b, ctx, ks, bits, group_size)
            for p in pts:
                rows.append({"case": label, "batch": b, "k": p.k, "k_eff": p.k_eff, "context": ctx,
                             "k=0 (kivi)": base, "prefetch": p.prefetch, "no prefetch": p.no_prefetch,
                             "fetch removed": p.no_fetch, "fetch": p.fetch})
            summary.append({
                "case": label, "model": model, "batch": b, "context": ctx, "k0_ms": base * 1e3,
                "exceeds_k0": first_k(pts, base, tol), "exceeds_nofetch": first_k(pts, lambda p: p.no_fetch, tol),
                "hidden_up_to": hidden_up_to(pts, tol), "no_prefetch_exceeds_k0": next(
                    (p.k for p in pts if p.k and p.no_prefetch > (1 + tol) * base), None),
                "rho": r, "h2d_GBs": h2d / 1e9, "gather_GBs": gather / 1e9, "mem_GBs": mem / 1e9,
                "bound_k_h2d": r * h2d / mem * ctx, "bound_k_gather": r * gather / mem * ctx,
                "quantized": n_q, "bound_k_layer": k_layer(costs, shape, b, ctx, pts, gather),
                "extrapolated": sorted(costs.extrapolated),
            })
    return rows, summary


def fmt_k(k):
    return "never" if k is None else str(k)


def report(summary, tol) -> str:
    lines = [f"fetch hiding (specache bits 2, group 64; step = fast-fidelity decode step; tol {tol:.0%}):",
             f"{'case':30s} {'B':>3s} {'N':>5s} {'k=0 step':>10s} {'>k0':>6s} {'>nofetch':>8s} "
             f"{'noPF>k0':>7s} {'rho':>6s} {'link':>7s} {'gather':>7s} {'mem':>7s} {'k* link':>8s} {'k* gather':>9s} {'k* layer':>8s}"]
    for s in summary:
        lines.append(
            f"{s['case']:30s} {s['batch']:3d} {s['context']:5d} {s['k0_ms']:8.3f}ms {fmt_k(s['exceeds_k0']):>6s} "
            f"{fmt_k(s['exceeds_nofetch']):>8s} {fmt_k(s['no_prefetch_exceeds_k0']):>7s} {s['rho']:6.3f} "
            f"{s['h2d_GBs']:5.1f}GB {s['gather_GBs']:5.1f}GB {s['mem_GBs']:5.0f}GB "
            f"{s['bound_k_h2d']:8.0f} {s['bound_k_gather']:9.0f} {s['bound_k_layer']:8.0f}"
            + (f"  (extrapolated: {', '.join(s['extrapolated'])})" if s["extrapolated"] else ""))
    lines.append("  >k0: first k whose prefetch step exceeds the k=0 (kivi) step by > tol; >nofetch: first k "
                 "whose prefetch step exceeds the same step with the fetch removed (fetch no longer hidden); "
                 "noPF>k0: the same as >k0 without prefetch; k* = rho * bandwidth / mem * N, the design's bound "
                 "(link: pinned H2D; gather: the gather table the twin costs the fetch with; GB = GB/s); "
                 "k* layer: the k whose gather equals one whole layer's compute (weights included); "
                 "k is clamped to the quantized keys (N - residual).")
    return "\n".join(lines)


def plot(rows, summary, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame(rows)
    long = df.melt(id_vars=["case", "batch", "k"], value_vars=["prefetch", "no prefetch", "fetch removed"],
                   var_name="step", value_name="seconds")
    long["ms"] = long["seconds"] * 1e3
    long["k (0 plotted at 0.5)"] = long["k"].where(long["k"] > 0, 0.5)
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(data=long, x="k (0 plotted at 0.5)", y="ms", hue="step", style="step", row="batch",
                    col="case", kind="line", markers=True, dashes=False, height=2.6, aspect=1.25,
                    facet_kws={"sharey": False})
    for (b, case), ax in g.axes_dict.items():
        s = next(x for x in summary if x["case"] == case and x["batch"] == b)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(s["k0_ms"], color="grey", lw=0.8, ls=":", label="k=0 (kivi)")
        ax.axvline(s["bound_k_h2d"], color="black", lw=0.8, ls="--")
        ax.axvline(s["bound_k_gather"], color="black", lw=0.8, ls="-.")
        if s["exceeds_nofetch"]:
            ax.axvline(s["exceeds_nofetch"], color="red", lw=0.8, alpha=0.6)
        ax.set_title(f"{case}\nB={b}, N={s['context']}", fontsize=8)
    g.set_axis_labels("k (rows per KV head; 0 at 0.5)", "decode step (ms)")
    g.figure.suptitle("SpeCache fetch hiding: dashed k* = rho*link/mem*N (H2D), dash-dot the same with the "
                      "gather bandwidth,\nred: first k the fetch is exposed (> 5% over fetch removed); "
                      "dotted: the k=0 step", fontsize=8, y=1.04)
    out.parent.mkdir(parents=True, exist_ok=True)
    g.figure.savefig(out, dpi=130, bbox_inches="tight")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=ROOT / "results/figures/fetch_hiding.png")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    rows, summary = run(a.tol)
    print(report(summary, a.tol))
    if not a.no_plot:
        plot(rows, summary, a.out)
        print(f"figure: {a.out}")


if __name__ == "__main__":
    main()
