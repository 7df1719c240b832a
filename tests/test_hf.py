"""runtime/hf.py: the KV policies inside transformers' own models (kvtestbed_cache + the
"kvtestbed" attention); runtime/hf_checks.py: `model=hf` folders for runtime.bench /
runtime.evals, and bad input."""
import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime import hf as H  # noqa: E402
from runtime import hf_checks  # noqa: E402
from runtime.engine import SamplingParams, generate  # noqa: E402
from core.errors import ConfigError  # noqa: E402
from runtime.kv import policy_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city "
        "to the fall of Constantinople. Historians divide it into the Kingdom, the Republic and the Empire, "
        "each with its own institutions, wars and famous leaders such as Julius Caesar and Augustus. ")
NEW = 16
# (policy, knobs): a 200-token prompt puts 128 tokens past the residual of 64, so the low-bit
# policies really quantize (kivi 2-bit's tokens differ from full's here)
CASES = [("full", {}), ("offload", {}), ("kivi", {"bits": 2}), ("specache", {"bits": 2, "k": 64})]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: on the shared 2-core box another process's busy thread
    stalls every OpenMP barrier of a 2-thread run (measured: 20x slower steps); 1 thread is not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_model(hf_shipped):
    """transformers' model of the shipped GGUF, switched to the kvtestbed attention for this module."""
    model, _ = hf_shipped
    before = model.config._attn_implementation
    model.set_attn_implementation(H.ATTN_NAME)
    yield model
    model.set_attn_implementation(before)


@pytest.fixture(scope="module")
def prompts(shipped_tokenizer):
    ids = shipped_tokenizer.encode(TEXT * 5)[:200]
    assert len(ids) == 200
    return ids, ids[:150]


def _hf_generate(model, prompts, cache) -> list[list[int]]:
    """transformers' generate, greedy, left-padded batch (pad id 2 as the shipped model's)."""
    T = max(map(len, prompts))
    x = torch.full((len(prompts), T), 2)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        x[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(x, attention_mask=mask, cache=cache, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=2)
    return out[:, T:].tolist()


def _ours(model, prompts, policy, knobs) -> list[list[int]]:
    spec = policy_spec(policy, **{**H._defaults(policy), **knobs, "kv_dtype": "auto"})
    r = generate(model, list(prompts), SamplingParams(max_new_tokens=NEW, ignore_eos=True), spec)
    return [q.tokens for q in r.requests]


@pytest.mark.parametrize("policy,knobs", CASES, ids=[c[0] for c in CASES])
def test_generate_tokens_equal_our_runtime(hf_model, shipped_model, prompts, policy, knobs):
    """transformers + integrated policy == this project's runtime, same policy and knobs."""
    cache = H.kvtestbed_cache(policy, hf_model.config, **knobs)
    got = _hf_generate(hf_model, prompts[:1], cache)
    assert got == _ours(shipped_model, prompts[:1], policy, knobs)
    assert cache.get_seq_length() == 200 + NEW - 1 and cache.nbytes()[0] > 0
    if policy == "specache":
        assert cache.stats()["fetched_rows"] > 0


def test_left_padded_batch_equals_our_runtime(hf_model, shipped_model, prompts):
    cache = H.kvtestbed_cache("kivi", hf_model.config, bits=2)
    assert _hf_generate(hf_model, prompts, cache) == _ours(shipped_model, prompts, "kivi", {"bits": 2})


def test_cache_update_fallback_with_sdpa(hf_model, shipped_model, prompts):
    """attn_implementation="sdpa": plain Cache.update returning dequantized K/V, same tokens."""
    hf_model.set_attn_implementation("sdpa")
    try:
        cache = H.kvtestbed_cache("kivi", hf_model.config, bits=2)
        got = _hf_generate(hf_model, prompts, cache)
    finally:
        hf_model.set_attn_implementation(H.ATTN_NAME)
    assert got == _ours(shipped_model, prompts, "kivi", {"bits": 2})


# ----------------------------------------------------------------------------- architectures

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=1024)


def _tiny(model_type: str, attn: str):
    cfg = transformers.AutoConfig.for_model(model_type, **SMALL)
    if hasattr(cfg, "sliding_window"):
        cfg.sliding_window = None
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _logits(model, cache, ids, steps=6):
    """Prefill + greedy steps through forward(); the logits of every step (B, steps + 1, V)."""
    out = []
    with torch.inference_mode():
        o = model(ids, cache=cache, use_cache=True)
        for _ in range(steps):
            out.append(o.logits[:, -1])
            o = model(o.logits[:, -1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
        out.append(o.logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("model_type", H.SUPPORTED_MODEL_TYPES)
def test_supported_architectures(model_type):
    """Each supported type, random tiny weights: `full` through the attention interface ==
    transformers' DynamicCache; kivi through it == kivi through the dequantizing fallback;
    specache with k >= the context == full."""
    model = _tiny(model_type, "sdpa")
    ids = torch.randint(3, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    kivi = dict(group_size=16, residual=32)
    ref = _logits(model, transformers.DynamicCache(config=model.config), ids)
    fallback = _logits(model, H.kvtestbed_cache("kivi", model.config, **kivi), ids)
    model.set_attn_implementation(H.ATTN_NAME)
    full = _logits(model, H.kvtestbed_cache("full", model.config), ids)
    low = _logits(model, H.kvtestbed_cache("kivi", model.config, **kivi), ids)
    spec_all = _logits(model, H.kvtestbed_cache("specache", model.config, k=1000, **kivi), ids)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low, fallback, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spec_all, ref, atol=1e-5, rtol=1e-5)
    assert (low - ref).abs().max() > 1e-3          # the 2-bit cache is really quantized


def test_second_generate_continues_the_cache():
    """A second generate() on the same cache (a chat turn) appends several tokens in one pass."""
    model = _tiny("llama", "sdpa")
    ids = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    more = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))

    def two_turns(cache):
        with torch.inference_mode():
            first = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=5,
                                   do_sample=False)
            x = torch.cat([first, more], 1)
            return model.generate(x, attention_mask=torch.ones_like(x), cache=cache, max_new_tokens=5,
                                  do_sample=False)[0, -5:].tolist()

    want = two_turns(transformers.DynamicCache(config=model.config))
    model.set_attn_implementation(H.ATTN_NAME)
    for policy, knobs in [("full", {}), ("offload", {}), ("specache", dict(k=1000, group_size=16, residual=32))]:
        assert two_turns(H.kvtestbed_cache(policy, model.config, **knobs)) == want, policy


# ----------------------------------------------------------------------------- bad input

def test_unsupported_architecture_names_type_and_supported():
    for mt in ("gpt2", "gemma2"):
        with pytest.raises(ConfigError, match=f"model_type '{mt}' is not supported.*llama, mistral, qwen2, qwen3"):
            H.kvtestbed_cache("kivi", transformers.AutoConfig.for_model(mt))
    cfg = transformers.AutoConfig.for_model("mistral", **SMALL)
    cfg.sliding_window = 128
    with pytest.raises(ConfigError, match="sliding_window=128"):
        H.kvtestbed_cache("full", cfg)


def test_transformers_version_outside_tested_range(monkeypatch):
    monkeypatch.setattr(hf_checks, "transformers_version", lambda: "4.46.0")
    with pytest.raises(ConfigError, match=r"transformers 4.46.0 is outside the tested range >=5.24,<6"):
        H.kvtestbed_cache("full", transformers.AutoConfig.for_model("llama", **SMALL))
    monkeypatch.setattr(hf_checks, "transformers_version", lambda: "6.0.0")
    with pytest.raises(ConfigError, match="outside the tested range"):
        H.check_transformers_version()


def test_pyproject_pins_the_tested_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers{",".join(H.TRANSFORMERS_RANGE)}"' in text


@pytest.mark.parametrize("policy,knobs,msg", [
    ("kivi", {"bits": 3}, "bits=3 is not supported"),
    ("kivi", {"bits": 2.0}, "bits=2.0 must be an integer"),
    ("kivi", {"group_size": 64, "residual": 32}, "residual=32 must be a positive multiple"),
    ("kivi", {"group_size": 0}, "group_size=0 must be >= 1"),
    ("kivi", {"kv_dtype": "int8"}, "kv_dtype='int8'"),
    ("kivi", {"k": 64}, r"unknown knob\(s\) \['k'\]"),
    ("full", {"bits": 2}, r"unknown knob\(s\) \['bits'\]"),
    ("specache", {"k": -1}, "k=-1 must be >= 0"),
    ("specache", {"prefetch": True}, "prefetch=True .* not available inside transformers' generate"),
    ("rag", {}, "policy 'rag' is not known"),
])
def test_knobs_out_of_range(policy, knobs, msg):
    with pytest.raises(ConfigError, match=msg):
        H.kvtestbed_cache(policy, transformers.AutoConfig.for_model("llama", **SMALL), **knobs)


def test_paths_that_need_the_attention_interface():
    model = _tiny("llama", "sdpa")
    for policy in ("specache", "offload"):
        with pytest.raises(ConfigError, match=f"policy '{policy}' needs attn_implementation='kvtestbed'"):
            H.kvtestbed_cache(policy, model.config)
    model.set_attn_implementation(H.ATTN_NAME)
    ids = torch.randint(3, 256, (2, 12))
    with pytest.raises(ConfigError, match="needs a kvtestbed cache"):
        model(ids, cache=transformers.DynamicCache(config=model.config), use_cache=True)
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, -3:] = 0
    with pytest.raises(ConfigError, match="not left padding"):
        model(ids, attention_mask=right, cache=H.kvtestbed_cache("kivi", model.config), use_cache=True)
    with pytest.raises(ConfigError, match="beam search"):
        model.generate(ids[:1], attention_mask=torch.ones(1, 12, dtype=torch.long), num_beams=2,
                       max_new_tokens=3, cache=H.kvtestbed_cache("full", model.config))


# ----------------------------------------------------------------------------- model=hf folders

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, hf_shipped):
    """A local transformers folder: random tiny Llama weights with the shipped vocabulary and tokenizer."""
    folder = tmp_path_factory.mktemp("hf_llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    hf_shipped[1].save_pretrained(folder)
    return folder


def test_bench_model_hf(hf_folder, tmp_path):
    from hydra import compose, initialize_config_dir

    from runtime import bench

    def cfg(*over):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="bench", overrides=["model=hf", "policy=kivi", "workload.batch=1",
                                                           "workload.prompt_len=160", "workload.gen_len=4",
                                                           "progress=false", "repeats=1", f"results_dir={tmp_path}", *over])

    r = bench.run(cfg(f"model.path={hf_folder}"))
    assert r["model"] == "hf" and r["policy"] == "kivi" and r["output_tokens"] == 4
    with pytest.raises(ConfigError, match="model.path is required"):
        bench.run(cfg())
    with pytest.raises(ConfigError, match="no such folder -- it looks like a hub id"):
        bench.run(cfg("model.path=HuggingFaceTB/SmolLM2-135M"))
    with pytest.raises(ConfigError, match="is a file"):
        bench.run(cfg(f"model.path={hf_folder / 'config.json'}"))


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        H.check_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="lacks num_hidden_layers"):
        H.check_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ConfigError, match="model_type 'qwen2' is not supported by this runtime's model"):
        H.check_hf_folder(tmp_path)
    full = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, vocab_size=300)
    (tmp_path / "config.json").write_text(json.dumps(full))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="no \\*.safetensors files \\(found pytorch_model.bin"):
        H.check_hf_folder(tmp_path)


def test_evals_model_hf(hf_folder, tmp_path, capsys):
    from runtime.evals.__main__ import main

    main(["ppl", "--model", "hf", "--model-path", str(hf_folder), "--context", "160", "--last", "16", "--n", "1",
          "--policies", "full", "kivi2", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "ppl.csv").exists() and "ppl.csv" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ppl.run.json").read_text())
    assert meta["model"] == f"hf:{hf_folder.resolve()}"
    with pytest.raises(SystemExit) as e:
        main(["ppl", "--model", "hf", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "model.path is required" in capsys.readouterr().err
