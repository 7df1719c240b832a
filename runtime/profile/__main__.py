"""python -m runtime.profile: measure this machine into profiles/<device-slug>-<fingerprint>.json.

    python -m runtime.profile                       # shipped SmolLM2's layer shapes, full grids
    python -m runtime.profile --quick               # <= 2 minutes on the 2-core CPU box
    python -m runtime.profile --model llama7b_shape # adds that model's kernel tables to the file
    python -m runtime.profile --roofline h100-sxm   # derived from published peaks, not measured

One file per device; kernel tables are keyed by model, so a second --model run adds to the file
(transfers are re-measured each run). Written atomically: an interrupted run leaves the old
file as it was and no partial one. What is measured: measure.py; the file: docs/profiles.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.errors import ConfigError, cli_errors
from core.machine import device_facts, resolve_device, this_fingerprint
from core.profile.lookup import cache_dir
from core.profile.schema import ProfileError, load, read, validate
from core.provenance import REPO
from core.results import write_json_atomic
from core.values import number

from . import roofline
from .grids import model_args
from .measure import entry_lock, kept_models, measured_profile, write_profile
from .speed import speed_index


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="runtime.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["smollm2"], help="model shapes to profile (conf/model/)")
    ap.add_argument("--quick", action="store_true", help="coarse grids: <= 2 minutes on the 2-core box")
    ap.add_argument("--roofline", metavar="NAME", help=f"derive from published peaks: {', '.join(roofline.GPUS)}")
    ap.add_argument("--out", type=Path, help="output file (default profiles/<device-slug>-<fingerprint>.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per point (fewer where one exceeds the time budget)")
    ap.add_argument("--speed-index", action="store_true",
                    help="only re-measure this machine's speed index (<= 2 s): printed, and stored in --out when given")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                    help="print how far two profiles are apart, per table (repeatability, roofline vs measured)")
    a = ap.parse_args(argv)
    with cli_errors("runtime.profile"):
        number(a.repeats, "--repeats", ge=1, integer=True)         # 0: no timing to take a percentile of
        if a.compare:
            print(format_comparison(*a.compare))
            return
        if a.speed_index:
            print(speed_index_command(a))
            return
        if a.roofline:
            prof = roofline.profile(a.roofline, a.model)
            out = a.out or REPO / "profiles" / f"roofline-{a.roofline}.json"
            validate(prof, out)
            write_profile(out, prof, f"--out {out}: cannot write ({{why}}); pick a writable path")
        else:
            prof, out = measure_command(a)
    print(summary(prof, out))


def measure_command(a) -> tuple[dict, Path]:
    """Measure this machine into --out (default profiles/<slug>-<fingerprint>.json), under the
    file's lock (measure.entry_lock): the models of the file that are this machine's and
    validate are kept; a damaged profile of this machine (named after its fingerprint, or in
    the cache) is replaced with one line saying why; any other file that is not a profile is
    refused (move it away or pass another --out)."""
    device = resolve_device(a.device)
    facts = device_facts(device)
    # the slug (CPU name + cores) is the same on every VM of a kind: the fingerprint tells them apart
    out = a.out or REPO / "profiles" / f"{facts['slug']}-{facts['fingerprint']}.json"
    if out.is_dir():
        raise ProfileError(f"--out {out} is a directory; give the profile's file name (a .json path)")
    unwritable = f"--out {out}: cannot write ({{why}}); pick a writable path"
    with entry_lock(out, "runtime.profile", unwritable):
        existing = None
        if out.exists():
            existing = existing_tables(out, facts["fingerprint"])
        t = time.perf_counter()
        prof = measured_profile(a.model, a.quick, device, a.repeats, existing)
        prof["provenance"]["wall_s"] = round(time.perf_counter() - t, 1)
        write_profile(out, prof, unwritable)
    return prof, out


def existing_tables(out: Path, fp: str) -> dict | None:
    """measured_profile's `out_existing` from the file at --out: its models that are this
    machine's and validate alone (measure.kept_models); one line when it is damaged or another
    machine's (its tables are not kept)."""
    try:
        prof = read(out)
        why = ("not a JSON object" if not isinstance(prof, dict) else
               None if isinstance(prof.get("device"), dict) else "its device is not an object")
    except ProfileError as e:
        prof, why = None, str(e).splitlines()[0]
    if why is not None:
        ours = fp in out.name or out.resolve().parent == cache_dir().resolve()
        if not ours:
            raise ProfileError(f"{out}: exists but is not a profile ({why}); move it away or pass --out")
        print(f"runtime.profile: {out} is damaged ({why}); replacing it", file=sys.stderr)
        return None
    dev = prof["device"]
    if dev.get("fingerprint") != fp:
        print(f"runtime.profile: {out} profiles another machine ({dev.get('fingerprint') or 'unfingerprinted'}); "
              "its tables are not kept", file=sys.stderr)
        return None
    try:
        return validate(prof, out)          # a whole file of this machine, older schemas too (read as torch)
    except ProfileError:
        return kept_models(out, fp, "runtime.profile")


def speed_index_command(a) -> str:
    """`--speed-index`: this machine's index now; with --out (a profile of this machine) it is
    stored there (atomically) and the change from the stored one is printed."""
    device = resolve_device(a.device)
    args = model_args(a.model[0])
    si = speed_index(device, {**vars(args), "head_dim": args.head_dim})
    line = (f"speed index {si['index']:.2f} (gemm {si['gemm_s'] * 1e3:.2f} ms, memcpy {si['memcpy_s'] * 1e3:.2f} ms, "
            f"attention {si['attention_s'] * 1e3:.2f} ms; {si['probe_wall_s']:.2f} s), machine {this_fingerprint(device)}")
    if a.out:
        with entry_lock(a.out, "runtime.profile", f"--out {a.out}: cannot write ({{why}}); pick a writable path"):
            prof = load(a.out)
            if prof["device"].get("fingerprint") != this_fingerprint(device):
                raise ConfigError(f"--out {a.out} profiles machine {prof['device'].get('fingerprint')}, not this one "
                                  f"({this_fingerprint(device)}); its speed index stays as measured there")
            old = prof.get("speed_index", {}).get("index")
            prof["speed_index"] = si
            write_json_atomic(a.out, prof)
        line += f"; stored in {a.out}" + (f" (was {old:.2f}: x{si['index'] / old:.3f})" if old else "")
    return line


def format_comparison(path_a: Path, path_b: Path) -> str:
    """Per table, the median over its points of B / A (p50s on the same axes), and overall the
    median over all points of |B / A - 1|."""
    import numpy as np

    a, b = load(path_a), load(path_b)
    rows, devs = [], []
    for where, ta, tb in _paired_tables(a, b):
        pa, pb = np.asarray(ta["p50"], dtype=float).ravel(), np.asarray(tb["p50"], dtype=float).ravel()
        keep = pa > 0                    # a clamped-to-zero overhead has no ratio
        if not keep.any():
            continue
        r = pb[keep] / pa[keep]
        rows.append(f"  {where:<44} median B/A {np.median(r):6.3f}  (points {r.size})")
        devs.extend(np.abs(r - 1).tolist())
    if not devs:
        return f"{path_a} and {path_b} share no table on the same axes"
    head = (f"B = {path_b} ({b['provenance']['kind']}) vs A = {path_a} ({a['provenance']['kind']}): "
            f"median |B/A - 1| over {len(devs)} points = {np.median(devs):.1%}")
    return "\n".join([head, *rows])


def _paired_tables(a: dict, b: dict):
    for name, t in a["transfers"].items():
        u = b["transfers"].get(name)
        if isinstance(t, dict) and "axes" in t and isinstance(u, dict) and u.get("axes") == t["axes"]:
            yield f"transfers.{name}", t, u
    for model, m in a["models"].items():
        n = b["models"].get(model)
        if not n:
            continue
        for name, t in m["kernels"].items():
            u = n["kernels"].get(name)
            if u and u["axes"] == t["axes"]:
                yield f"{model}.{name}", t, u


def summary(prof: dict, out: Path) -> str:
    lines = [f"wrote {out} ({prof['provenance']['kind']}, {prof['device']['name']})"]
    for name in ("h2d_pinned", "d2h_pinned"):
        t = prof["transfers"][name]
        size, sec = t["axes"]["bytes"][-1], t["p50"][-1]
        lines.append(f"  {name:<14} {size / sec / 1e9:8.2f} GB/s at {size >> 20} MiB")
    for model, m in prof["models"].items():
        k = m["kernels"]
        ctx = m["grids"]["decode_attention_full"]["context"] if "grids" in m else k["decode_attention_full"]["axes"]["context"]
        lines.append(f"  {model}: prefill layer {k['prefill_layer']['p50'][-1] * 1e3:.2f} ms at "
                     f"{k['prefill_layer']['axes']['tokens'][-1]} tokens; decode attention full/kivi "
                     f"{k['decode_attention_full']['p50'][0][-1] * 1e3:.3f}/{k['decode_attention_kivi']['p50'][0][-1] * 1e3:.3f} ms "
                     f"at batch 1, context {ctx[-1]}; step overhead {k['step_overhead']['p50'][0] * 1e3:.2f} ms; "
                     f"KV memory available {m['memory']['kv_available_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
