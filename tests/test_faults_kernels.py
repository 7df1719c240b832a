"""Faults around the compiled low-bit kernels, the timed region and the transformers adapter
(runtime/kernel_cache.py, runtime/kv/lowbit_cpu.py, runtime/engine.py `prepare_cache`,
runtime/hf.py): a kernel file that is not the one its name promises is rebuilt and never called;
killed builds leave nothing behind for long; concurrent builders compile once; `runtime.cache`
knows the kernels; no compile lands in a timed step; a transformers cache made from another
model's config is one line; the README's transformers example runs without deprecation warnings.
Before/after per case: tests/fault_cases_kernels.md."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from runtime import cache as cache_cli
from runtime.kv import lowbit_cpu

try:
    from runtime import kernel_cache
except ImportError:          # the tree before kernel stamps: these tests then fail, for the reasons in
    kernel_cache = None      # tests/fault_cases_kernels.md

ROOT = Path(__file__).resolve().parent.parent
SHAPE_A = (2, 16, 8, 2, 8)      # rows, head_dim, group, bits, value group
SHAPE_B = (6, 16, 8, 2, 8)
SHAPE_C = (3, 16, 8, 2, 8)


def _need_compiler():
    try:
        (kernel_cache.compiler if kernel_cache else lowbit_cpu._compiler)()
    except RuntimeError as e:
        pytest.skip(f"no C compiler here: {e}")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache root and a process that has loaded no kernel yet."""
    _need_compiler()
    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lowbit_cpu, "_libs", {})
    monkeypatch.setattr(lowbit_cpu, "_failed", None)
    if kernel_cache is not None:
        monkeypatch.setattr(kernel_cache, "_swept", False)
    monkeypatch.delenv(lowbit_cpu.ENV, raising=False)
    return tmp_path / "cache" / "kernels"


def _sub_env(root: Path, **extra) -> dict:
    env = {**os.environ, "KVTESTBED_CACHE": str(root), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", **extra}
    env.pop(lowbit_cpu.ENV, None)
    return env


# A child process: the fused scores of each shape's kernel (argv) against the same scores written
# out in float64 (exit 0 and "ok" when equal). A kernel built for another shape, called with this
# one's arguments, reads and writes past its buffers: that must never happen in the test process.
CHILD = textwrap.dedent("""
    import sys, torch
    from runtime.kv import lowbit_cpu
    for arg in sys.argv[1:]:
        rows, D, G, bits, vg = map(int, arg.split(","))
        g = torch.Generator().manual_seed(0)
        B, H, T = 1, 2, 4 * G
        codes = torch.randint(0, 256, (B, H, T, D * bits // 8), dtype=torch.uint8, generator=g)
        scale = torch.rand(B, H, T // G, D, generator=g) + 0.5
        zero = torch.randn(B, H, T // G, D, generator=g)
        q = torch.randn(B, H, rows, D, generator=g)
        got = lowbit_cpu.scores(q, codes, scale, zero, T, G, bits)
        assert got is not None, f"kernels not used: {lowbit_cpu._failed}"
        shifts = torch.arange(0, 8, bits)
        c = ((codes[..., None].long() >> shifts) & (2 ** bits - 1)).reshape(B, H, T, D).double()
        k = c * scale.repeat_interleave(G, 2).double() + zero.repeat_interleave(G, 2).double()
        want = (q.double() @ k.transpose(-1, -2)) / D ** 0.5
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)
    print("ok")
""")


def _child(root: Path, *shapes, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, *(",".join(map(str, s)) for s in shapes)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=_sub_env(root, **env))


def _lib(folder: Path, shape) -> Path:
    libs = list(folder.glob(f"lowbit-{'x'.join(map(str, shape))}-*.so"))
    assert len(libs) == 1, libs
    return libs[0]


# ----------------------------------------------------------------------------- kernel files

def test_swapped_kernel_is_rebuilt_not_called(fresh):
    """Another shape's library copied over this shape's (A: the .so only; C: the .so and its
    stamp): a process asking for A and C says so in one line each, rebuilds them and computes
    the right scores, instead of calling the wrong library (a crash or heap corruption before)."""
    for shape in (SHAPE_A, SHAPE_B, SHAPE_C):                  # built here; nothing swapped is called here
        assert lowbit_cpu.library(*shape) is not None, lowbit_cpu._failed
    a, b, c = (_lib(fresh, s) for s in (SHAPE_A, SHAPE_B, SHAPE_C))
    b_bytes = b.read_bytes()

    def swap(dst: Path, data: bytes) -> None:
        # a new file renamed over the old one: this process has the old one mapped, and writing into
        # a mapped library in place would crash this process (at exit), not the one under test
        tmp = dst.with_name(dst.name + ".swap")
        tmp.write_bytes(data)
        os.replace(tmp, dst)

    swap(a, b_bytes)
    for suffix in (".so", ".json"):
        if b.with_suffix(suffix).exists():                     # (no stamps before: the .so alone)
            swap(c.with_suffix(suffix), b.with_suffix(suffix).read_bytes())
    r = _child(fresh.parent, SHAPE_A, SHAPE_C)
    assert r.returncode == 0 and "ok" in r.stdout, f"exit {r.returncode}: {r.stderr[-2000:]}"
    for lib, why in ((a, "sha256"), (c, "stamp names key")):
        lines = [ln for ln in r.stderr.splitlines() if lib.name in ln]
        assert len(lines) == 1 and "rebuilding" in lines[0] and why in lines[0], r.stderr
        assert lib.read_bytes() != b_bytes


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no stamp"])
def test_damaged_kernel_is_rebuilt_and_used(fresh, damage, capfd):
    assert lowbit_cpu.library(*SHAPE_A) is not None
    lib = _lib(fresh, SHAPE_A)
    good = lib.read_bytes()
    # a new file in its place (this process has the old one mapped: writing into it would crash us)
    bad = lib.with_name("damaged")
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 3])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(len(good)))
    else:
        bad.write_bytes(good)
        lib.with_suffix(".json").unlink()
    os.replace(bad, lib)
    capfd.readouterr()
    lowbit_cpu._libs.clear()
    assert lowbit_cpu.library(*SHAPE_A) is not None, lowbit_cpu._failed      # rebuilt, not the torch path
    assert lib.read_bytes() == good                  # the same compiler, flags and source: the same bytes
    err = [ln for ln in capfd.readouterr().err.splitlines() if lib.name in ln]
    assert len(err) == 1 and "rebuilding" in err[0]
    assert kernel_cache.verify(lib, lib.stem.rsplit("-", 1)[1]) is None


def test_concurrent_builders_compile_once(tmp_path):
    """Two processes asking for the same new kernel at once: one compiles, the other waits on
    the key's lock and loads its file (a compiler that takes 2 s more makes the windows overlap)."""
    _need_compiler()
    real_cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "slowcc"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -o "*) echo x >> {log}; sleep 2;; esac\nexec {real_cc} "$@"\n')
    wrapper.chmod(0o755)
    root = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, ",".join(map(str, SHAPE_A))], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_sub_env(root, CC=str(wrapper))) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    assert log.read_text().count("x") == 1
    assert not [p for p in (root / "kernels").iterdir() if p.is_dir()]      # no build folder left


def test_orphaned_build_folders_are_removed(fresh):
    """What killed builds left: an old `tmp*` folder (the name builds had before) and a fresh
    one of a key nobody is building go at the next use of the kernels."""
    fresh.mkdir(parents=True)
    old = fresh / "tmpq1w2e3r4"
    old.mkdir()
    (old / "lowbit.c").write_text("/* half a build */")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    idle = fresh / "tmp-lowbit-9x9x9x9x9-0123456789abcdef-abc123"
    idle.mkdir()
    assert lowbit_cpu.library(*SHAPE_A) is not None
    assert not old.exists() and not idle.exists()
    assert not [p for p in fresh.iterdir() if p.is_dir()]


def test_a_running_build_keeps_its_folder(fresh):
    """A fresh build folder of a key whose lock another process holds (a build running now)
    stays, through the next use of the kernels and through `runtime.cache --clear kernels`."""
    fresh.mkdir(parents=True)
    busy_lib = fresh / "lowbit-8x8x8x8x8-fedcba9876543210.so"
    busy = fresh / f"tmp-{busy_lib.stem}-xyz789"
    busy.mkdir()
    code = ("import sys; from runtime.kernel_cache import locked; from pathlib import Path\n"
            f"with locked(Path({str(busy_lib)!r})):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=_sub_env(fresh.parent))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lowbit_cpu.library(*SHAPE_A) is not None
        assert busy.exists()
        cache_cli.main(["--clear", "kernels"])
        assert busy.exists() and not list(fresh.glob("*.so"))
    finally:
        holder.communicate("", timeout=30)


def test_runtime_cache_lists_and_clears_kernels(fresh, capsys):
    assert lowbit_cpu.library(*SHAPE_A) is not None
    cache_cli.main([])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[:1] == ["kernels"])
    assert int(line.split()[1]) >= 2                             # the library and its stamp
    cache_cli.main(["--clear", "kernels"])
    out = capsys.readouterr().out
    assert re.search(r"cleared .*kernels: \d+ files removed", out)
    assert not list(fresh.glob("*.so"))
    lowbit_cpu._libs.clear()
    assert lowbit_cpu.library(*SHAPE_A) is not None and list(fresh.glob("*.so"))   # rebuilt at next use


# ----------------------------------------------------------------------------- the timed region

@pytest.mark.parametrize("policy,warmup", [("kivi", True), ("specache", False)])
def test_no_kernel_compile_inside_a_timed_run(fresh, policy, warmup, tmp_path, monkeypatch):
    """Empty kernel cache: every compile happens before a run's clock starts (the warm-up, or
    without one the engine's prepare_cache, which also serves runtime.serve's warm-up, the
    profiler's whole-model runs and analysis.validate), none while a prefill or decode step is
    timed. specache with prefetch needs two shapes (1 and 2 query rows per KV head x the GQA group)."""
    from hydra import compose, initialize_config_dir

    from runtime import bench, engine

    timed = [False]
    seen: list[tuple[tuple, bool]] = []
    real_build, real_prefill, real_generate = lowbit_cpu._build, engine.prefill, bench.generate

    def build(shape):
        seen.append((shape, timed[0]))
        return real_build(shape)

    def prefill(*a, **k):             # the first thing inside a run's clock
        timed[0] = True
        return real_prefill(*a, **k)

    def generate(*a, **k):
        timed[0] = False
        try:
            return real_generate(*a, **k)
        finally:
            timed[0] = False

    monkeypatch.setattr(lowbit_cpu, "_build", build)
    monkeypatch.setattr(engine, "prefill", prefill)
    monkeypatch.setattr(bench, "generate", generate)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=[
            "model=tiny", f"policy={policy}", "policy.group_size=16", "policy.residual=16", "policy.k=8"
            if policy == "specache" else "policy.bits=2", "workload.batch=2", "workload.prompt_len=80",
            "workload.gen_len=6", "repeats=1", "progress=false", f"warmup={str(warmup).lower()}",
            f"results_dir={tmp_path / 'res'}"])
    bench.run(cfg)
    assert seen, "no low-bit kernel was built: the run never reached them"
    assert not [s for s, t in seen if t], f"compiled inside a timed run: {seen}"
    assert len({s for s, _ in seen}) == (2 if policy == "specache" else 1)


# ----------------------------------------------------------------------------- transformers

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=1024)


def _hf_case(attn: str, policy: str, **other):
    transformers = pytest.importorskip("transformers")
    from runtime import hf

    cfg = transformers.AutoConfig.for_model("llama", **SMALL)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              cache=transformers.DynamicCache(config=model.config))
    if attn == hf.ATTN_NAME:
        model.set_attn_implementation(hf.ATTN_NAME)
    bad = model.config.__class__.from_dict({**model.config.to_dict(), **other})
    bad._attn_implementation = model.config._attn_implementation
    cache = hf.kvtestbed_cache(policy, bad)
    with torch.inference_mode():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             cache=cache)
    return want, got


@pytest.mark.parametrize("attn,policy,other", [
    ("sdpa", "full", {"num_hidden_layers": 4}),           # the Cache.update fallback: the cache never advanced
    ("sdpa", "kivi", {"num_hidden_layers": 1}),
    ("kvtestbed", "full", {"num_hidden_layers": 4}),      # the attention interface: checked at the first call
    ("kvtestbed", "specache", {"num_hidden_layers": 3}),
    ("kvtestbed", "kivi", {"num_key_value_heads": 4}),
    ("sdpa", "full", {"head_dim": 32}),
])
def test_hf_cache_for_another_models_config_is_one_line(attn, policy, other):
    with pytest.raises(ConfigError) as e:
        _hf_case(attn, policy, **other)
    msg = str(e.value)
    assert "\n" not in msg and "model.config" in msg and "was made for" in msg, msg


# ----------------------------------------------------------------------------- the README example

def _readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    hf_blocks = [b for b in blocks if "kvtestbed_cache" in b]
    assert len(hf_blocks) == 1, "README.md shows one transformers example (a ```python block with kvtestbed_cache)"
    return hf_blocks[0]


def test_readme_transformers_example_uses_the_current_api():
    """The example loads the shipped GGUF and passes the cache as `cache=` (`past_key_values=` is
    deprecated in transformers 5); it compiles. Running it: the slow test below."""
    code = _readme_python()
    compile(code, "README.md", "exec")
    assert "shipped_gguf_path" in code and "gguf_file=" in code
    assert "cache=" in code and "past_key_values" not in code and "torch_dtype" not in code
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.slow
def test_readme_transformers_example_runs_without_deprecation_warnings(tmp_path):
    pytest.importorskip("transformers")
    from runtime.loaders import shipped_gguf_path

    try:
        shipped_gguf_path()
    except ConfigError as e:
        pytest.skip(str(e))
    script = tmp_path / "readme_example.py"
    script.write_text(_readme_python())
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", str(script)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
