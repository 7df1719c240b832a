"""runtime.bench through Hydra: the results schema, atomic writes, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from runtime import bench
from core.results import stats, write_json_atomic

CONF = str(Path(__file__).resolve().parent.parent / "conf")
ROOT = Path(__file__).resolve().parent.parent

SCHEMA = ["throughput_tok_s", "ttft_s", "tpot_s", "ttft_s_p50", "ttft_s_p90", "ttft_s_p99", "tpot_s_p50",
          "tpot_s_p90", "tpot_s_p99", "kv_bytes_device", "kv_bytes_host", "kv_ratio_vs_fp16", "peak_mem_bytes",
          "config", "provenance"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides))


def test_bench_writes_schema(tmp_path):
    cfg = _cfg("experiment=smoke", f"results_dir={tmp_path}", "progress=false", "repeats=2")
    r = bench.run(cfg)
    files = list((tmp_path / "measured").iterdir())
    assert [f.name for f in files] == [Path(r["path"]).name]        # no temp file left behind
    data = json.loads(files[0].read_text())
    for key in SCHEMA:
        assert key in data, key
    assert data["requests"] == 2 * 2 and data["output_tokens"] == 2 * 2 * 8
    assert data["ttft_s_p50"] <= data["ttft_s_p99"] and data["tpot_s_p50"] <= data["tpot_s_p99"]
    assert data["config"]["model"]["name"] == "tiny" and data["config"]["workload"]["gen_len"] == 8
    prov = data["provenance"]
    assert prov["kind"] == "measured" and prov["torch"] == torch.__version__ and prov["git_revision"]
    # KV bytes by hand: prompt lengths drawn in [8, 32] + 7 fed-back tokens, fp32, 2 layers x 2 KV heads x 16
    lens = [len(p) for p in bench.make_prompts(cfg.workload, 512, {1, 2})]
    assert data["kv_bytes_device"] == sum(n + 7 for n in lens) * 2 * 2 * 2 * 16 * 4
    assert data["kv_ratio_vs_fp16"] == pytest.approx(2.0)
    assert "throughput" in bench.format_table(r)


def test_make_prompts_seeded_and_ranged():
    cfg = _cfg("model=tiny", "workload.batch=5", "workload.prompt_len=40", "workload.prompt_len_min=10")
    a = bench.make_prompts(cfg.workload, 512, {0, 1, 2})
    assert a == bench.make_prompts(cfg.workload, 512, {0, 1, 2})
    assert all(10 <= len(p) <= 40 for p in a) and len({len(p) for p in a}) > 1
    assert min(min(p) for p in a) >= 3


def _cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "runtime.bench", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_prints_table(tmp_path):
    p = _cli("experiment=smoke", f"results_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert "TTFT" in p.stdout and "tok/s" in p.stdout
    assert len(list((tmp_path / "measured").glob("*.json"))) == 1
    assert not Path(ROOT / "outputs").exists()


@pytest.mark.parametrize("overrides,needle", [
    (["model=tiny", "workload.batch=0"], "workload.batch=0 must be >= 1"),
    (["model=tiny", "workload.gen_len=-3"], "workload.gen_len=-3 must be >= 1"),
    (["model=tiny", "workload.prompt_len=4000"], "exceeds the model's context of 2048"),
    (["model=smollm2", "model.path=/nonexistent/x.gguf"], "no such file"),
    (["model=tiny", "policy.kv_dtype=int3"], "policy.kv_dtype='int3' is not known"),
    (["model=tiny", "policy=kivi", "policy.bits=3"], "policy.bits=3 is not supported"),
    (["model=tiny", "policy=kivi", "policy.residual=48", "policy.group_size=32"],
     "policy.residual=48 must be a positive multiple of policy.group_size=32"),
    (["model=tiny", "policy=specache", "policy.k=-1"], "policy.k=-1 must be >= 0"),
    (["model=tiny", "policy=offload", "hardware.link.gbps=-2"], "hardware.link.gbps=-2.0 must be > 0"),
])
def test_cli_bad_input_one_line(tmp_path, overrides, needle):
    p = _cli(*overrides, f"results_dir={tmp_path}")
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("runtime.bench: error:"), p.stderr
    assert "Traceback" not in p.stderr
    assert needle in lines[0]
    assert not (tmp_path / "measured").exists()


def test_cli_policies_run(tmp_path):
    for pol in ("offload", "kivi", "specache"):
        p = _cli("model=tiny", f"policy={pol}", "workload.batch=2", "workload.prompt_len=200",
                 "workload.gen_len=6", "warmup=false", f"results_dir={tmp_path}")
        assert p.returncode == 0, p.stderr
    rows = [json.loads(f.read_text()) for f in (tmp_path / "measured").glob("*.json")]
    by = {r["policy"]: r for r in rows}
    assert by["offload"]["kv_bytes_host"] > 0
    assert by["kivi"]["kv_ratio_vs_fp16"] < 1.0 < by["offload"]["kv_ratio_vs_fp16"]   # fp32 residual, still < fp16 full
    assert by["specache"]["kv_bytes_host"] > 0 and "topk_recall" in by["specache"]["policy_stats"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA request is valid here")
def test_cli_cuda_on_cpu_box(tmp_path):
    p = _cli("model=tiny", "hardware=cuda", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "hardware.device=cuda but CUDA is not available" in p.stderr


def test_cli_unknown_group_option(tmp_path):
    p = _cli("model=nope", f"results_dir={tmp_path}")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("runtime.bench: error: model=nope: no such option")
    assert "smollm2" in lines[0] and "tiny" in lines[0]


def test_stats_against_numpy_by_hand():
    s = stats("x", [1.0, 2.0, 3.0, 4.0, None, float("nan")])
    assert s["x"] == 2.5 and s["x_p50"] == 2.5
    assert s["x_p90"] == pytest.approx(3.7) and s["x_p99"] == pytest.approx(3.97)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})

    class Bad:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"a": Bad()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
