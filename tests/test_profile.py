"""runtime.profile: schema validation, roofline derivation, a small measured profile, CLI errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.profile import ProfileError, load, validate
from runtime.profile import __main__ as cli
from runtime.profile import grids, kernels, roofline, transfers
from runtime.profile.timing import Timer
from runtime.profile.whole_model import lm_head_in_model, whole_model_prefill

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def roof():
    return roofline.profile("h100-sxm", ["smollm2", "llama7b_shape"])


def test_roofline_validates_and_follows_its_peaks(roof):
    validate(roof, "roofline")
    assert roof["provenance"]["kind"] == "roofline" and roof["provenance"]["sources"]
    h2d = roof["transfers"]["h2d_pinned"]
    rate = h2d["axes"]["bytes"][-1] / h2d["p50"][-1]
    assert rate == pytest.approx(3.938e9 * 16 * 0.85, rel=0.01)           # PCIe 5 x16 at 85%
    k = roof["models"]["llama7b_shape"]["kernels"]["decode_attention_full"]
    ctx = k["axes"]["context"]
    t = dict(zip(ctx, k["p50"][0]))
    # memory bound: K+V of 8192 tokens x 32 heads x 128 x 2 bytes, over 3.35 TB/s x 0.8, + 4 launches
    want = 2 * 8192 * 32 * 128 * 2 / (3.35e12 * 0.8) + 4 * 5e-6
    assert t[8192] == pytest.approx(want, rel=1e-6)
    mem = roof["models"]["llama7b_shape"]["memory"]
    assert mem["weights_bytes"] > 12e9          # 32 layers of a 7B model in fp16, not the 4 timed


def test_unknown_roofline_lists_known(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--roofline", "tpu9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown GPU; known: h100-sxm, h100-pcie, h200, a100, a6000, l40s" in err


def test_load_names_what_is_wrong(tmp_path, roof):
    p = tmp_path / "p.json"
    with pytest.raises(ProfileError, match="no such profile"):
        load(p)
    p.write_text(json.dumps(roof)[:5000])
    with pytest.raises(ProfileError, match="not valid JSON.*truncated"):
        load(p)
    newer = {**roof, "schema_version": 99}
    p.write_text(json.dumps(newer))
    with pytest.raises(ProfileError, match="schema_version 99 is newer"):
        load(p)
    broken = json.loads(json.dumps(roof))
    del broken["models"]["smollm2"]["kernels"]["mlp"]
    p.write_text(json.dumps(broken))
    with pytest.raises(ProfileError, match=r"missing 'models.smollm2.kernels.mlp'"):
        load(p)
    broken = json.loads(json.dumps(roof))
    broken["models"]["smollm2"]["kernels"]["mlp"]["p50"] = [1.0]
    p.write_text(json.dumps(broken))
    with pytest.raises(ProfileError, match=r"models.smollm2.kernels.mlp.p50 has shape \[1\]"):
        load(p)
    del broken["device"]["memory_bytes"]
    with pytest.raises(ProfileError, match="device.memory_bytes"):
        validate(broken, "x")


@pytest.fixture
def small_grids(monkeypatch):
    """Shrink every grid so a measured profile takes seconds."""
    monkeypatch.setattr(transfers, "transfer_sizes", lambda quick: [4096, 1 << 20])
    orig = grids.kernel_axes

    def axes(args, quick, device, *rest, **kw):
        a = orig(args, True, device, *rest, **kw)
        small = {"tokens": [16, 64], "batch": [1, 2], "context": [256, 512], "k": [16, 64], "m": [16, 32]}
        return {name: {ax: small[ax] for ax in spec} for name, spec in a.items()}
    monkeypatch.setattr(grids, "kernel_axes", axes)


def test_measured_profile_of_tiny_model(tmp_path, small_grids):
    out = tmp_path / "cpu.json"
    other = {"shape": {}, "kernels": {}, "memory": {}}
    cli.main(["--model", "tiny", "--quick", "--out", str(out), "--repeats", "3"])
    prof = load(out)
    assert prof["provenance"]["kind"] == "measured" and prof["device"]["type"] == "cpu"
    assert prof["provenance"]["git_revision"] and prof["provenance"]["repeats"] == 3
    t = prof["transfers"]["h2d_pinned"]
    assert t["p50"][1] > t["p50"][0] > 0                            # 1 MiB takes longer than 4 KiB
    k = prof["models"]["tiny"]["kernels"]
    assert all(p10 <= p50 <= p90 for p10, p50, p90 in zip(k["mlp"]["p10"], k["mlp"]["p50"], k["mlp"]["p90"]))
    assert prof["models"]["tiny"]["memory"]["kv_available_bytes"] > 0
    # schema 3: every kernel table says which code path it timed, the one the runtime takes now
    from core.profile.schema import SCHEMA_VERSION, current_code_path
    assert prof["schema_version"] == SCHEMA_VERSION == 3
    tables = {n: t for n, t in k.items() if isinstance(t, dict) and "axes" in t}
    assert tables and all(t["code_path"] == current_code_path("cpu", n) for n, t in tables.items())
    assert prof["transfers"]["emulated_link"]["achieved_gbps"][0] == pytest.approx(0.5, rel=0.25)
    # a second run adds to the file: another model's tables stay
    prof["models"]["other"] = {**prof["models"]["tiny"], "shape": {**prof["models"]["tiny"]["shape"], "dim": 1}}
    out.write_text(json.dumps(prof))
    cli.main(["--model", "tiny", "--quick", "--out", str(out), "--repeats", "3"])
    again = load(out)
    assert set(again["models"]) == {"tiny", "other"} and again["models"]["other"]["shape"]["dim"] == 1
    del other


def test_interrupted_run_leaves_no_file(tmp_path, small_grids, monkeypatch):
    out = tmp_path / "cpu.json"

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(kernels, "measure_kernels", boom)
    with pytest.raises(SystemExit) as e:            # Ctrl-C: one line, exit 130 (core/errors.cli_errors)
        cli.main(["--model", "tiny", "--quick", "--out", str(out)])
    assert e.value.code == 130
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "runtime.profile", "--roofline", "a100",
                        "--out", "/proc/nope/a100.json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "Warning" not in ln and "import pynvml" not in ln]
    assert len(lines) == 1 and "cannot write" in lines[0], p.stderr


def test_committed_profiles_load():
    files = sorted((ROOT / "profiles").glob("*.json"))
    assert files, "profiles/ should hold the committed CPU and roofline profiles"
    kinds = {load(f)["provenance"]["kind"] for f in files}
    assert kinds == {"measured", "roofline"}


def test_compare_prints_median_deviation(tmp_path, roof):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(roof))
    slower = json.loads(json.dumps(roof))
    for m in slower["models"].values():
        for t in m["kernels"].values():
            t["p50"] = (torch.tensor(t["p50"]) * 1.2).tolist()
    b.write_text(json.dumps(slower))
    text = cli.format_comparison(a, b)
    assert "smollm2.mlp" in text and "1.200" in text


def test_gpu_suite_bench_commands_compose():
    """The suite runs where nothing can be fixed by hand: its Hydra overrides must compose."""
    from hydra import compose, initialize_config_dir

    from core.checks import check_config, check_shape
    from core.config import register
    from runtime import gpu_suite

    register()
    from runtime.model import ModelArgs

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, overrides in gpu_suite.bench_commands():
            cfg = compose(config_name="bench", overrides=overrides)
            args = ModelArgs.from_dict(dict(cfg.model.args))
            check_config(cfg, "runtime.bench")
            check_shape(cfg, "runtime.bench", head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                        n_layers=args.n_layers)
            assert cfg.hardware.device == "cuda", name


def test_whole_model_prefill_times_the_exact_prompt_lengths():
    """The whole/alone ratio is measured at the need's exact prompt lengths (plus the quick
    grid's 256), and read between them by core/profile/interp.py's rule, flat past the ends."""
    from core.profile.interp import curve
    from core.profile.schema import table
    from runtime.loaders import random_init
    from runtime.model import ModelArgs

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=512)
    m = random_init(args, 0)
    toks = [16, 64, 96, 256]
    alone = table({"tokens": toks}, [1e-4 * (1 + t / 64) for t in toks])
    timer = Timer(torch.device("cpu"), repeats=3, warmup=1, budget_s=0.05)
    with torch.inference_mode():
        out = whole_model_prefill(m, timer, torch.device("cpu"), alone, lambda T: (lambda: None), True,
                                  tokens_at=[96, 100, 64])      # 100: not a grid point, skipped
    w = out["whole_model"]
    assert w["tokens"] == [64, 96, 256] and len(w["ratio_to_alone"]) == 3 and all(3 <= r <= 5 for r in w["alternations"])
    ratio = curve(w["tokens"], w["ratio_to_alone"], toks)
    assert out["p50"] == pytest.approx([a * r for a, r in zip(alone["p50"], ratio)])
    assert ratio[0] == w["ratio_to_alone"][0]                                  # flat below 64


def test_lm_head_in_model_rescales_the_lone_table_by_hand():
    alone = {"axes": {"batch": [1, 2, 4, 8]}, "unit": "s", "p50": [1.0, 1.2, 2.0, 3.0],
             "p10": [0.9, 1.1, 1.8, 2.7], "p90": [1.1, 1.3, 2.2, 3.3]}
    out = lm_head_in_model(alone, {1: 1.5, 4: 2.0})          # ratios 1.5 at batch 1, 1.0 at batch 4
    assert out["p50"][0] == pytest.approx(1.5) and out["p50"][2] == pytest.approx(2.0)
    assert out["p50"][3] == pytest.approx(3.0)               # flat past the last measured batch
    assert 1.0 < out["p50"][1] / alone["p50"][1] < 1.5       # read between the two ratios
    assert out["p10"][0] == pytest.approx(0.9 * 1.5)
    assert out["in_model"]["ratio_to_alone"] == pytest.approx([1.5, 1.0])
    assert lm_head_in_model(alone, {}) is alone
