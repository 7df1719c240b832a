"""GGUF (written here with the gguf package), HF safetensors and random-init loaders."""
import numpy as np
import pytest
import torch

from core.errors import ConfigError
from runtime.loaders import load_gguf, load_hf, random_init
from runtime.model import ModelArgs

from .conftest import TINY


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to q/k rows (written out independently)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model, quant=None, bogus=None):
    """Write `model` as a llama GGUF. quant: {gguf tensor name: GGMLQuantizationType}."""
    import gguf

    a: ModelArgs = model.args
    quant = quant or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_base)
    w.add_vocab_size(a.vocab_size)
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    tensors = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    for i, blk in enumerate(model.layers):
        q, k, v = blk.attention.wqkv.weight.split([H * D, Hkv * D, Hkv * D])
        gate, up = blk.feed_forward.w13.weight.chunk(2)
        tensors.update({
            f"blk.{i}.attn_q.weight": _llamacpp_permute(q.numpy(), H),
            f"blk.{i}.attn_k.weight": _llamacpp_permute(k.numpy(), Hkv),
            f"blk.{i}.attn_v.weight": v, f"blk.{i}.attn_output.weight": blk.attention.wo.weight,
            f"blk.{i}.ffn_gate.weight": gate, f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": blk.feed_forward.w2.weight,
            f"blk.{i}.attn_norm.weight": blk.attention_norm.weight, f"blk.{i}.ffn_norm.weight": blk.ffn_norm.weight,
        })
    expected = {}
    for name, t in tensors.items():
        arr = np.ascontiguousarray(t if isinstance(t, np.ndarray) else t.detach().numpy(), dtype=np.float32)
        if name in quant:
            qarr = gguf.quants.quantize(arr, quant[name])
            w.add_tensor(name, qarr, raw_dtype=quant[name])  # shape from the byte shape
            expected[name] = gguf.quants.dequantize(qarr, quant[name])
        else:
            w.add_tensor(name, arr)
            expected[name] = arr
    if bogus:
        w.add_tensor("blk.0.bogus.weight", np.zeros((4, 84), np.uint8), raw_dtype=bogus)  # 4 x 256 Q2_K
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_gguf_roundtrip_undoes_rope_permutation(tmp_path):
    src = random_init(ModelArgs(**TINY), seed=3)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, src)
    got = load_gguf(path)
    assert got.args.n_kv_heads == 2 and got.args.tie_embeddings
    for (n1, p1), (n2, p2) in zip(src.state_dict().items(), got.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=n1)


def test_gguf_quantized_tensors_dequantize(tmp_path):
    import gguf

    Q = gguf.GGMLQuantizationType
    src = random_init(ModelArgs(**TINY), seed=4)
    path = tmp_path / "tiny_q.gguf"
    expected = _write_gguf(path, src, quant={"token_embd.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q4_1,
                                             "blk.1.attn_v.weight": Q.Q4_1})
    got = load_gguf(path)
    torch.testing.assert_close(got.tok_embeddings.weight, torch.from_numpy(expected["token_embd.weight"]))
    torch.testing.assert_close(got.layers[0].feed_forward.w2.weight, torch.from_numpy(expected["blk.0.ffn_down.weight"]))
    v = got.layers[1].attention.wqkv.weight[-2 * 16:]
    torch.testing.assert_close(v, torch.from_numpy(expected["blk.1.attn_v.weight"]))
    # quantization error of Q4_1 on N(0, 0.02) weights: small but not zero
    err = (got.layers[0].feed_forward.w2.weight - src.layers[0].feed_forward.w2.weight).abs().max()
    assert 0 < err < 0.01


def test_gguf_unsupported_type(tmp_path):
    import gguf

    src = random_init(ModelArgs(**TINY), seed=5)
    path = tmp_path / "odd.gguf"
    _write_gguf(path, src, bogus=gguf.GGMLQuantizationType.Q2_K)
    with pytest.raises(ConfigError, match=r"unsupported tensor type Q2_K in .*odd\.gguf"):
        load_gguf(path)


def test_gguf_missing_and_corrupt(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path=.*nope\.gguf: no such file"):
        load_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        load_gguf(bad)
    src = random_init(ModelArgs(**TINY), seed=6)
    good = tmp_path / "cut.gguf"
    _write_gguf(good, src)
    good.write_bytes(good.read_bytes()[:5000])   # truncated download
    with pytest.raises(ConfigError, match="cut.gguf"):
        load_gguf(good)


def test_hf_folder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                   max_position_embeddings=256, rope_theta=5000.0, tie_word_embeddings=False,
                                   rms_norm_eps=1e-6)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)            # config.json + model.safetensors
    ours = load_hf(tmp_path)
    assert not ours.args.tie_embeddings and ours.args.rope_base == 5000.0
    from runtime.engine import prefill
    from runtime.kv import make_cache
    from .conftest import Policy

    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    a = ours.args
    cache = make_cache(Policy(), n_layers=a.n_layers, batch=1, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                       capacity=40, device=torch.device("cpu"))
    from runtime.kv import Step

    logits = ours(ids, cache, Step(0, 40, torch.zeros(1, dtype=torch.long), torch.arange(40)[None]))
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        load_hf(tmp_path)


def test_random_init_shapes_and_7b_layer():
    a = ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000,
                  tie_embeddings=False, max_seq_len=64)
    with torch.device("meta"):
        from runtime.model import Transformer

        m = Transformer(a)
    per_layer = sum(p.numel() for p in m.layers[0].parameters())
    # q 4096x4096, k/v 4096x1024 each, o 4096x4096, 3 MLP mats 4096x14336, two norms
    assert per_layer == 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096
    tiny = random_init(ModelArgs(**TINY), seed=7)
    again = random_init(ModelArgs(**TINY), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(tiny.parameters(), again.parameters()))
    assert abs(tiny.layers[0].attention.wo.weight.std().item() - 0.02) < 0.003


def test_model_args_errors():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelArgs(**{**TINY, "n_kv_heads": 3})
    with pytest.raises(ConfigError, match="model.args has unknown keys"):
        ModelArgs.from_dict({**TINY, "layers": 3})
    with pytest.raises(ConfigError, match="model.args.dim"):
        ModelArgs(**{**TINY, "dim": -4})
