"""TTFT of `policy=rag`'s draft variants (draft, draft_dev, draft_rel, draft_attn) next to full
recompute, the 1/(r + D/L) bound and the simulator twin's prediction, measured in one run.

Prompt: `--chunks` x `--chunk-len` random tokens + a `--question`-token question; the chunk store
is warmed first (host memory, and draft_rel's chunk-alone norms with it), so TTFT = chunk lookup
+ re-rotation + the selector (the D-layer draft over the whole prompt and its signal) + selective
recompute + the first token. Full recompute = a normal prefill of the whole prompt + the first
token. Bound: 1 / (r + D / L), L = the model's layers.

Repeats are interleaved (every configuration once per round, after one untimed warm-up round),
so drift on a shared machine hits all of them alike; each TTFT is the median over rounds with
[min, max] (which covers the median with probability 1 - 2/2^n: 0.94 at 5 rounds), and each
speed-up the median of the per-round ratios full / config. The machine's fingerprint and speed
index are printed before and after (core/machine.py, runtime/profile/speed.py). The twin's TTFT is
`simulator` on the profile of this machine (found by fingerprint, else the committed CPU profile,
which predicts the machine it was measured on; `--profile PATH` to choose), always for the
shipped model's shape.

    python benchmarks/rag_ttft.py                                  # shipped SmolLM2, 8 x 512, r=0.15, D 3 5
    python benchmarks/rag_ttft.py --model tiny --chunks 2 --chunk-len 64 --repeats 2   # a quick smoke run
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._grid import machine_lines, med_ci  # noqa: E402
from runtime.engine import prefill_once, resolve_device, sync  # noqa: E402
from runtime.rag import ChunkStore, rag_prefill  # noqa: E402

VARIANTS = ("draft", "draft_dev", "draft_rel", "draft_attn")


def load_model(name: str, device: torch.device):
    from runtime.loaders import load_gguf, random_init
    from runtime.model import ModelArgs

    if name == "shipped":
        return load_gguf(dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device)
    args = ModelArgs(dim=64, n_layers=30, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=8192)
    return random_init(args, seed=0).to(device)


@functools.lru_cache(maxsize=2)
def _twin_costs(profile: str | None, device_name: str):
    """The twin's profile (this machine's by fingerprint, else the committed CPU one), loaded once."""
    from core.profile import lookup
    from simulator.costs import Costs, ModelShape
    from simulator.run import DEFAULT_PROFILE, ROOT

    path = Path(profile) if profile else (lookup.find(torch.device(device_name), "smollm2") or ROOT / DEFAULT_PROFILE)
    c = Costs.load(path, "smollm2", allow_extrapolation=True)
    s = c.shape
    return c, ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto), path.name


def twin_ttft(profile: str | None, device, prompt: int, knobs: dict | None) -> tuple[float, str]:
    """The simulator twin's TTFT of one prompt (knobs None = policy=full) and the profile used."""
    from simulator.hardware import solve
    from simulator.policies import make_policy

    c, sh, name = _twin_costs(profile, str(device))
    pol = make_policy({"name": "full"} if knobs is None else {"name": "rag", **knobs})
    return solve(pol.prefill_graph(c, sh, [prompt])).seconds, name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["shipped", "tiny"], default="shipped")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-len", type=int, default=512)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--r", type=float, default=0.15)
    ap.add_argument("--draft-layers", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--selectors", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one untimed warm-up round)")
    ap.add_argument("--profile", default=None, help="the twin's profile (default: this machine's, else the CPU one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")

    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(a.model, device)
    L = model.args.n_layers
    if any(not 1 <= D <= L for D in a.draft_layers):
        ap.error(f"--draft-layers must be in [1, {L}]")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.args.vocab_size, (a.chunks * a.chunk_len + a.question,), generator=g).tolist()
    chunks = [ids[i * a.chunk_len:(i + 1) * a.chunk_len] for i in range(a.chunks)]
    question = ids[a.chunks * a.chunk_len:]
    prompt = ids
    before = machine_lines(device)
    print("\n".join(f"before: {x}" for x in before), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        store = ChunkStore(model, root=tmp)
        for c in chunks:                   # warm store: K/V and draft_rel's chunk-alone norms
            store.get(c)
            store.features(c)
        chosen: dict[str, int] = {}

        def run_full():
            prefill_once(model, [prompt]).logits.argmax(-1)

        def run_rag(name, pol):
            def go():
                res = rag_prefill(model, chunks, question, pol, store)
                res.prefilled.logits.argmax(-1)
                chosen[name] = len(res.chosen)
            return go

        configs = [("full recompute", None, run_full)]
        for D in a.draft_layers:
            for sel in a.selectors:
                pol = SimpleNamespace(name="rag", kv_dtype="auto", selector=sel, recompute_ratio=a.r,
                                      chunk_len=a.chunk_len, draft_layers=D, tau_smooth=0.4, tau_cover=0.7,
                                      span_max=16, seed=0, sink_tokens=0)
                name = f"{sel} D={D}"
                configs.append((name, dict(selector=sel, recompute_ratio=a.r, draft_layers=D, chunk_len=a.chunk_len,
                                           question_len=a.question), run_rag(name, pol)))
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        for rnd in range(a.repeats + 1):              # round 0: warm-up (allocator, kernels), untimed
            for name, _, fn in configs:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if rnd:
                    times[name].append(time.perf_counter() - t0)

    after = machine_lines(device)
    print("\n".join(f"after: {x}" for x in after))
    full_t = times["full recompute"]
    print(f"device={device} model={a.model} L={L} prompt={len(prompt)} ({a.chunks}x{a.chunk_len} + {a.question}) "
          f"r={a.r} rounds={a.repeats} (median [min, max])")
    rows = []
    head = f"{'config':<18}{'TTFT ms':>26}{'speed-up':>22}{'bound':>7}{'of bound':>9}{'chosen':>8}{'twin ms':>10}"
    print(head)
    for name, knobs, _ in configs:
        t = med_ci(times[name])
        sp = med_ci([f / x for f, x in zip(full_t, times[name])])
        D = knobs["draft_layers"] if knobs else None
        bound = 1.0 / (a.r + D / L) if D else None
        try:
            twin, prof = twin_ttft(a.profile, device, len(prompt), knobs)
        except Exception as e:  # a missing table / refused shape must not lose the measured table
            twin, prof = float("nan"), f"n/a ({type(e).__name__}: {str(e).splitlines()[0]})"
        rows.append(dict(config=name, ttft_s=t[0], ttft_lo=t[1], ttft_hi=t[2], speedup=sp[0], speedup_lo=sp[1],
                         speedup_hi=sp[2], bound=bound, of_bound=sp[0] / bound if bound else None,
                         chosen=chosen.get(name, a.chunks * a.chunk_len), twin_ttft_s=twin, profile=prof))
        print(f"{name:<18}{f'{t[0] * 1e3:.1f} [{t[1] * 1e3:.1f}, {t[2] * 1e3:.1f}]':>26}"
              f"{f'{sp[0]:.2f} [{sp[1]:.2f}, {sp[2]:.2f}]':>22}{f'{bound:.2f}' if bound else '':>7}"
              f"{f'{sp[0] / bound:.0%}' if bound else '':>9}{rows[-1]['chosen']:>8}{twin * 1e3:>10.1f}")
    print(f"twin: {rows[0]['profile']}" + (" (the shipped model's shape: not comparable with --model tiny)"
                                           if a.model == "tiny" else ""))
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "rows": rows,
           "times_s": times, "machine": {"before": before, "after": after}}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
