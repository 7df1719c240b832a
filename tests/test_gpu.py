"""CUDA paths: the same logic as on CPU, on a GPU. Skipped without CUDA (see conftest)."""
import pytest
import torch

from runtime.engine import SamplingParams, generate
from runtime.model import ModelArgs, random_init

from .conftest import TINY, Policy

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu_greedy():
    cpu = random_init(ModelArgs(**TINY), seed=0)
    gpu = random_init(ModelArgs(**TINY), seed=0).to("cuda")
    gpu.load_state_dict(cpu.state_dict())
    prompts = [list(range(3, 30)), list(range(50, 60))]
    p = SamplingParams(max_new_tokens=12, ignore_eos=True)
    a = generate(cpu, prompts, p, Policy(kv_dtype="float32"))
    b = generate(gpu, prompts, p, Policy(kv_dtype="float32"))
    assert [r.tokens for r in a.requests] == [r.tokens for r in b.requests]
    assert b.kv_bytes_device == a.kv_bytes_device


def test_7b_shape_layer_fp16_on_cuda():
    args = ModelArgs(dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000,
                     tie_embeddings=False, max_seq_len=4096, rope_base=10000.0)
    model = random_init(args, seed=0, dtype=torch.float16, device="cuda")
    r = generate(model, [list(range(3, 1027))] * 2, SamplingParams(max_new_tokens=8, ignore_eos=True), Policy())
    assert r.kv_ratio_vs_fp16 == pytest.approx(1.0)   # auto = float16 on CUDA
    assert r.peak_mem_bytes > sum(p.numel() * 2 for p in model.parameters())
    assert all(len(q.tokens) == 8 for q in r.requests)
