"""Where one decode step's time goes: this runtime next to transformers, per op family.

    python benchmarks/decode_profile.py [--batch 1 4 16] [--context 512 2048 4096] [--steps 3]
                                        [--policy full|kivi] [--no-hf] [--out FILE.md]

Both sides load the shipped SmolLM2 GGUF in float32, start from the same synthetic prefilled
cache (benchmarks/_grid.py; equal lengths, no padding), run 2 untimed decode steps, then
`--steps` steps under `torch.profiler` (CPU). transformers runs its model's forward with a
DynamicCache (what `generate` uses) and `attention_mask` of ones, then argmax: the work of one
`generate` step without its logits processors.

Every top-level aten op (one not called from inside another aten op) is put in one family:

  projections   nn.Linear inside the layers (q/k/v, o, gate/up, down) and the vocabulary head
  attention     SDPA, or the matmuls/softmax of an attention written out (HF eager); kivi: all
                of its decode but the append (the fused low-bit kernels of runtime/kv/lowbit_cpu.py,
                or the torch path's unpack and matmuls; the residual window; softmax)
  masks/padding building attention masks (ours: Step.mask; HF: create_causal_mask)
  cache writes  storing the new K/V (ours: the in-place column write, kivi: append + quantize;
                HF: DynamicCache.update)
  sampling      argmax over the logits
  other ops     RMSNorm, RoPE, SiLU, residual adds, embedding lookup, views
  python        the step's wall time under the profiler minus all top-level ops: interpreter,
                module dispatch, profiler bookkeeping (inflated by the profiler itself)

Prints a markdown table per (batch, context): milliseconds per step per family, both sides.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import contextlib
import statistics
import sys
import time
import warnings

import torch

# measure the checkout this script lives in, not whichever one an editable install points at
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.profiler import ProfilerActivity, profile, record_function

from _grid import hf_fill, ours_prefilled, synthetic
from runtime.engine import decode_step, load_prefilled
from runtime.kv import base as kv_base, make_cache, policy_spec
from runtime.kv import full as kv_full
from runtime.kv import kivi as kv_kivi
from runtime.kv import lowbit_cpu
from runtime.profile.timing import wall_times
from runtime.loaders import load_gguf, shipped_gguf_path
from core.provenance import cpu_name

FAMILIES = ("projections", "attention", "masks/padding", "cache writes", "sampling", "other ops", "python")
SCOPES = {"kvt::mask": "masks/padding", "kvt::cache_write": "cache writes", "kvt::sampling": "sampling",
          "kvt::attention": "attention", "kvt::projection": "projections"}
ATTN_OPS = ("scaled_dot_product", "matmul", "bmm", "softmax", "baddbmm", "_flash_attention")
PROJ_OPS = ("aten::linear", "aten::addmm", "aten::mm")


def _scoped(fn, name):
    def wrapped(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    wrapped.__wrapped__ = fn
    return wrapped


@contextlib.contextmanager
def instrument(hf_modeling=None):
    """Scope names around the pieces whose aten ops are ambiguous by name alone."""
    patches = [(kv_base.Step, "mask", kv_base.Step.mask, "kvt::mask"),
               (kv_full.FullKV, "_write", kv_full.FullKV._write, "kvt::cache_write"),
               # kivi: appending + quantizing is its cache write; the rest of decode (unpack,
               # low-bit scores and values, softmax) is its attention
               (kv_kivi.KiviKV, "_append", kv_kivi.KiviKV._append, "kvt::cache_write"),
               (kv_kivi.KiviKV, "decode", kv_kivi.KiviKV.decode, "kvt::attention")]
    try:
        from transformers import cache_utils
        patches.append((cache_utils.DynamicLayer, "update", cache_utils.DynamicLayer.update, "kvt::cache_write"))
        if hf_modeling is not None and hasattr(hf_modeling, "create_causal_mask"):
            patches.append((hf_modeling, "create_causal_mask", hf_modeling.create_causal_mask, "kvt::mask"))
    except ImportError:
        pass
    for obj, attr, fn, name in patches:
        setattr(obj, attr, _scoped(fn, name))
    hooks = []
    try:
        yield
    finally:
        for obj, attr, fn, _ in patches:
            setattr(obj, attr, fn)
        for h in hooks:
            h.remove()


def linear_scopes(model):
    """record_function around every nn.Linear (forward pre/post hooks)."""
    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            def pre(mod, args):
                mod._kvt_rf = record_function("kvt::projection")
                mod._kvt_rf.__enter__()

            def post(mod, args, out):
                mod._kvt_rf.__exit__(None, None, None)
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return hooks


def family_of(ev) -> str | None:
    """The family of a top-level aten op, or None if it is not top-level."""
    scope = None
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return None           # called from inside another aten op: counted there
        if scope is None and p.name in SCOPES:
            scope = SCOPES[p.name]
        p = p.cpu_parent
    if scope is not None:
        return scope
    if any(s in ev.name for s in ATTN_OPS):
        return "attention"
    if ev.name in PROJ_OPS:
        return "projections"
    if "argmax" in ev.name:
        return "sampling"
    return "other ops"


def breakdown(run_step, steps: int) -> tuple[dict[str, float], float]:
    """ms per step per family under the profiler, and the unprofiled median step ms."""
    for _ in range(2):
        run_step()
    plain = wall_times(run_step, torch.device("cpu"), steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            with record_function("kvt::step"):
                run_step()
        wall = time.perf_counter() - t
    fam = dict.fromkeys(FAMILIES, 0.0)
    for ev in prof.events():
        if ev.name == lowbit_cpu.PROFILE_NAME:
            # the fused low-bit CPU kernels (ctypes calls, no aten op inside): attention
            fam["attention"] += ev.cpu_time_total / 1e3
            continue
        if not ev.name.startswith("aten::"):
            continue
        f = family_of(ev)
        if f is not None:
            fam[f] += ev.cpu_time_total / 1e3   # us -> ms
    fam["python"] = max(wall * 1e3 - sum(fam.values()), 0.0)
    return {k: v / steps for k, v in fam.items()}, statistics.median(plain) * 1e3


def ours_stepper(model, ids, policy, steps):
    """Our engine's decode step from the synthetic prefilled cache of benchmarks/_grid.py."""
    B, T = ids.shape
    pr, pad, k, v, lg = synthetic(model, [T] * B, 0)
    cache = make_cache(policy, n_layers=model.args.n_layers, batch=B, n_kv_heads=model.args.n_kv_heads,
                       head_dim=model.args.head_dim, capacity=T + steps * 2 + 8, device=model.device)
    with torch.inference_mode():
        nxt = load_prefilled(cache, ours_prefilled(model, pr, pad, k, v, lg)).argmax(-1)
    state = {"nxt": nxt}

    def step():
        with torch.inference_mode():
            logits = decode_step(model, cache, state["nxt"], pad)
            with record_function("kvt::sampling"):
                state["nxt"] = logits.argmax(-1)
            state["nxt"].tolist()
    return step


def hf_stepper(hf, model, ids, cache):
    """transformers' forward + argmax over a DynamicCache filled with the same synthetic K/V."""
    B, T = ids.shape
    pr, pad, k, v, lg = synthetic(model, [T] * B, 0)
    hf_fill(cache, hf.config.num_hidden_layers, k, v)
    state = {"nxt": lg.argmax(-1, keepdim=True), "n": T}

    def step():
        with torch.inference_mode():
            state["n"] += 1
            am = torch.ones(B, state["n"], dtype=torch.long)
            o = hf(state["nxt"], past_key_values=cache, use_cache=True, attention_mask=am, logits_to_keep=1)
            with record_function("kvt::sampling"):
                state["nxt"] = o.logits[:, -1].argmax(-1, keepdim=True)
            state["nxt"].tolist()
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--steps", type=int, default=3, help="profiled decode steps per point (after 2 warm-up)")
    ap.add_argument("--policy", default="full", help="our KV policy: full or kivi (2-bit, group 64, residual 64)")
    ap.add_argument("--no-hf", action="store_true", help="profile only this runtime")
    ap.add_argument("--out", default=None, help="also write the markdown tables to this file")
    a = ap.parse_args(argv)
    for f in ("batch", "context"):
        if any(x < 1 for x in getattr(a, f)):
            print(f"decode_profile.py: error: --{f} values must be >= 1", file=sys.stderr)
            sys.exit(2)
    if a.steps < 1:
        print("decode_profile.py: error: --steps must be >= 1", file=sys.stderr)
        sys.exit(2)
    if a.policy not in ("full", "kivi"):
        print(f"decode_profile.py: error: --policy={a.policy} is not known; use full or kivi", file=sys.stderr)
        sys.exit(2)
    warnings.filterwarnings("ignore")
    policy = policy_spec("full") if a.policy == "full" else policy_spec(
        "kivi", bits=2, group_size=64, residual=64, one_bit_rule="specache")
    model = load_gguf()
    hf = modeling = None
    if not a.no_hf:
        import transformers.utils.logging as hf_logging
        from transformers import AutoModelForCausalLM
        from transformers.models.llama import modeling_llama as modeling

        hf_logging.set_verbosity_error()
        p = shipped_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    hooks = linear_scopes(model) + (linear_scopes(hf) if hf is not None else [])
    lines = [f"Decode step profile, {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"shipped SmolLM2 fp32, ours `{a.policy}`, ms per step (torch.profiler, mean of {a.steps} steps)", ""]
    hdr = "| batch | context | side | " + " | ".join(FAMILIES) + " | profiled total | unprofiled step |"
    lines += [hdr, "|" + " --- |" * (len(FAMILIES) + 5)]
    print("\n".join(lines), flush=True)
    g = torch.Generator().manual_seed(0)
    with instrument(modeling):
        for T in a.context:
            for B in a.batch:
                ids = torch.randint(20, model.args.vocab_size, (B, T), generator=g)
                sides = [("ours", ours_stepper(model, ids, policy, a.steps + 2))]
                if hf is not None:
                    from transformers import DynamicCache
                    sides.append(("transformers", hf_stepper(hf, model, ids, DynamicCache(config=hf.config))))
                for name, step in sides:
                    fam, plain = breakdown(step, a.steps)
                    row = (f"| {B} | {T} | {name} | " + " | ".join(f"{fam[f]:.1f}" for f in FAMILIES)
                           + f" | {sum(fam.values()):.1f} | {plain:.1f} |")
                    lines.append(row)
                    print(row, flush=True)
    for h in hooks:
        h.remove()
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
