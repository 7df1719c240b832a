"""CUDA paths: the same logic as on CPU, on a GPU. Skipped without CUDA (see conftest)."""
import pytest
import torch

from runtime.engine import SamplingParams, generate
from runtime.loaders import random_init
from runtime.model import ModelArgs

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


def _trace(model, prompts, policy, steps=6):
    from .test_specache import _logits_trace

    return _logits_trace(model, prompts, policy, steps)


def _on_cuda(model):
    m = random_init(model.args, seed=0).to("cuda")
    m.load_state_dict(model.state_dict())
    return m


def test_cuda_specache_k0_is_kivi_and_large_k_is_full(tiny_model):
    from .test_specache import FULL, PROMPTS, kivi, spec

    m = _on_cuda(tiny_model)
    assert torch.equal(_trace(m, PROMPTS, spec(k=0)), _trace(m, PROMPTS, kivi()))
    torch.testing.assert_close(_trace(m, PROMPTS, spec(k=10_000)), _trace(m, PROMPTS, FULL), atol=1e-4, rtol=1e-4)


def test_cuda_offload_is_full_with_pinned_host_store(tiny_model):
    from runtime.kv import make_cache

    from .test_specache import FULL, OFFLOAD, PROMPTS

    m = _on_cuda(tiny_model)
    torch.testing.assert_close(_trace(m, PROMPTS, OFFLOAD), _trace(m, PROMPTS, FULL), atol=1e-6, rtol=1e-6)
    cache = make_cache(OFFLOAD, n_layers=2, batch=1, n_kv_heads=2, head_dim=16, capacity=8, device=torch.device("cuda"))
    assert cache[0].k_host.is_pinned() and not cache[0].k_host.is_cuda


def test_cuda_prefetch_matches_no_prefetch_when_all_hit(tiny_model):
    from .test_specache import spec

    m = _on_cuda(tiny_model)
    prompt = list(range(3, 36))
    p = SamplingParams(max_new_tokens=7, ignore_eos=True)
    on = generate(m, [prompt], p, spec(k=1000, prefetch=True))
    off = generate(m, [prompt], p, spec(k=1000, prefetch=False))
    assert on.requests[0].tokens == off.requests[0].tokens and on.policy_stats["topk_recall"] == 1.0


def test_cuda_link_non_blocking_copy_and_gather():
    from runtime.transfer import CudaLink, gather_rows

    link = CudaLink(torch.device("cuda"))
    store = torch.randn(2, 3, 100, 64).pin_memory()
    idx = torch.randint(0, 100, (2, 3, 16))
    stage = torch.empty(2, 3, 16, 64).pin_memory()
    gather_rows(store, idx, stage)
    dev = torch.empty(2, 3, 16, 64, device="cuda")
    t = link.copy(dev, stage)
    t.wait()
    want = torch.gather(store, 2, idx[..., None].expand(-1, -1, -1, 64))
    assert torch.equal(dev.cpu(), want)
    t.wait_host()


def test_cuda_host_mapped_view_is_zero_copy_and_gathers():
    """policy.gather=device: a CUDA view of the pinned store shares its memory (a host write is
    seen by the next kernel) and index_select through it gives the rows."""
    from runtime.transfer import CudaLink, host_mapped

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        store = torch.randn(2, 3, 100, 64).to(dtype).pin_memory()
        view = host_mapped(store)
        assert view.is_cuda and view.data_ptr() == store.data_ptr() and view.dtype == dtype
        store[0, 0, 0, 0] = 7.0
        assert view[0, 0, 0, 0].item() == 7.0
        idx = torch.randint(0, 100, (2, 3, 16), device="cuda")
        dst = torch.empty(2, 3, 16, 64, dtype=dtype, device="cuda")
        link = CudaLink(torch.device("cuda"))
        link.gather(dst, store, idx).wait()
        want = torch.gather(store, 2, idx.cpu()[..., None].expand(-1, -1, -1, 64))
        assert torch.equal(dst.cpu(), want)
    import pytest as _pytest
    from core.errors import ConfigError
    with _pytest.raises(ConfigError, match="pinned"):
        host_mapped(torch.randn(4))


def test_cuda_device_gather_same_tokens_as_host_gather(tiny_model):
    from .test_specache import PROMPTS, spec

    m = _on_cuda(tiny_model)
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for prefetch in (False, True):
        a = generate(m, PROMPTS, p, spec(k=4, prefetch=prefetch, gather="host"))
        b = generate(m, PROMPTS, p, spec(k=4, prefetch=prefetch, gather="device"))
        assert [r.tokens for r in a.requests] == [r.tokens for r in b.requests]
        assert a.policy_stats["fetched_rows"] == b.policy_stats["fetched_rows"]
