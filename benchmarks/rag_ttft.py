"""TTFT of `policy=rag` selector=draft against full recompute, side by side (the
speed-up SpecCache reports, 2.17-3.95x TTFT, checked on this runtime).

Prompt: `--chunks` x `--chunk-len` random tokens + a `--question`-token question; the chunk store
is warmed first (host memory), so TTFT = chunk lookup + re-rotation + draft prefill (D layers
over the whole prompt) + selective recompute + the first token. Full recompute = a normal
prefill of the whole prompt + the first token. Bound: 1 / (r + D / L), L = the model's layers.

    python benchmarks/rag_ttft.py                       # shipped SmolLM2, 8 x 512, r=0.15, D 3 5 10
    python benchmarks/rag_ttft.py --model tiny --chunks 2 --chunk-len 64   # a quick smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from runtime.engine import prefill_once, resolve_device, sync
from runtime.rag import ChunkStore, rag_prefill


def load_model(name: str, device: torch.device):
    from runtime.model import ModelArgs, load_gguf, random_init

    if name == "shipped":
        return load_gguf(dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device)
    args = ModelArgs(dim=64, n_layers=30, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=8192)
    return random_init(args, seed=0).to(device)


def timed(fn, device, repeats: int) -> float:
    fn()                                   # warm-up (allocator, kernels)
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["shipped", "tiny"], default="shipped")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-len", type=int, default=512)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--r", type=float, default=0.15)
    ap.add_argument("--draft-layers", type=int, nargs="+", default=[3, 5, 10])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    device = resolve_device(a.device)
    model = load_model(a.model, device)
    L = model.args.n_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.args.vocab_size, (a.chunks * a.chunk_len + a.question,), generator=g).tolist()
    chunks = [ids[i * a.chunk_len:(i + 1) * a.chunk_len] for i in range(a.chunks)]
    question = ids[a.chunks * a.chunk_len:]
    prompt = ids

    with tempfile.TemporaryDirectory() as tmp:
        store = ChunkStore(model, root=tmp)
        for c in chunks:                   # warm store
            store.get(c)

        def full():
            return prefill_once(model, [prompt]).logits.argmax(-1)

        t_full = timed(full, device, a.repeats)
        print(f"device={device} model={a.model} L={L} prompt={len(prompt)} "
              f"({a.chunks}x{a.chunk_len} + {a.question}) r={a.r}")
        print(f"{'config':<22}{'TTFT ms':>10}{'speed-up':>10}{'bound':>8}{'of bound':>10}{'chosen':>8}")
        print(f"{'full recompute':<22}{t_full * 1e3:>10.1f}{1.0:>10.2f}{'':>8}{'':>10}{len(prompt) - a.question:>8}")
        for D in a.draft_layers:
            pol = SimpleNamespace(name="rag", kv_dtype="auto", selector="draft", recompute_ratio=a.r,
                                  chunk_len=a.chunk_len, draft_layers=D, tau_smooth=0.4, tau_cover=0.7,
                                  span_max=16, seed=0)
            res = {}

            def rag():
                res["r"] = rag_prefill(model, chunks, question, pol, store)
                return res["r"].prefilled.logits.argmax(-1)

            t = timed(rag, device, a.repeats)
            bound = 1.0 / (a.r + D / L)
            sp = t_full / t
            print(f"{'draft D=' + str(D):<22}{t * 1e3:>10.1f}{sp:>10.2f}{bound:>8.2f}{sp / bound:>10.0%}"
                  f"{len(res['r'].chosen):>8}")


if __name__ == "__main__":
    main()
