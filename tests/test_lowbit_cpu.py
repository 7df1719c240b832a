"""The fused CPU kernels of `runtime/kv/lowbit_cpu.py` against independent references: the
low-bit attention written out over a cache dequantized by a loop (tests/test_kivi.py), dense
attention, and the torch path of the same layer; plus the fallback when no compiler is there."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from runtime.engine import SamplingParams, generate
from runtime.kv import lowbit_cpu
from runtime.kv.base import Step, attention_reference
from runtime.kv.kivi import KiviKV, fold

from .test_kivi import _naive_dequantized_cache, _shape, kivi_policy


def _kernels_or_skip(rows=3, D=16, G=8, bits=2):
    if lowbit_cpu.library(rows, D, G, bits, min(G, D)) is None:
        pytest.skip(f"low-bit kernels not built here: {lowbit_cpu._failed}")


def _loaded(bits, G, D, B=2, H=2, T=150, pad=(0, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = KiviKV(kivi_policy(bits=bits, group_size=G, residual=G), _shape(B, H, D, cap=T + 16))
    p = torch.tensor(pad[:B])
    layer.load(torch.randn(B, H, T, D, generator=g) * 2, torch.randn(B, H, T, D, generator=g),
               Step(0, T, p, torch.zeros(B, T, dtype=torch.long)))
    return layer, g


# shapes: blocked value path (D 64, G 64; D 128 with two channel groups of 64) and the generic
# one (D 16; 1-bit with 8 bytes per row; several channel groups), GQA rows 1 / 3 / 6
CASES = [(2, 64, 64, 3), (1, 64, 64, 3), (4, 64, 64, 6), (8, 64, 64, 1), (2, 128, 64, 3), (4, 128, 32, 3),
         (2, 16, 8, 2), (1, 16, 8, 3), (4, 16, 16, 1), (8, 32, 8, 4), (1, 128, 64, 6)]


@pytest.mark.parametrize("bits,D,G,n", CASES)
def test_kernels_equal_lowbit_math_over_the_dequantized_cache(bits, D, G, n):
    _kernels_or_skip(n, D, G, bits)
    layer, g = _loaded(bits, G, D)
    assert layer.kq > 0 and layer.vq > 0
    K, V = _naive_dequantized_cache(layer)
    qf = torch.randn(2, 2, n, D, generator=g)
    s = lowbit_cpu.scores(qf, layer.k_codes, layer.k_scale, layer.k_zero, layer.kq, layer.G, bits)
    assert s is not None and s.shape == (2, 2, n, layer.kq)
    want = (qf.double() @ K[:, :, : layer.kq].double().transpose(-1, -2)) / math.sqrt(D)
    torch.testing.assert_close(s.double(), want, atol=2e-4, rtol=1e-4)

    # values: weights over the quantized columns, read from a wider buffer (non-contiguous slice)
    p = torch.softmax(torch.randn(2, 2, n, layer.vq + 5, generator=g), -1)
    o = lowbit_cpu.values(p[..., : layer.vq], layer.v_codes, layer.v_scale, layer.v_zero, layer.vq, layer.G, bits)
    want_o = p[..., : layer.vq].double() @ V[:, :, : layer.vq].double()
    torch.testing.assert_close(o.double(), want_o, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bits,D,G,n", CASES[:6])
def test_kernels_equal_the_torch_path(bits, D, G, n, monkeypatch):
    _kernels_or_skip(n, D, G, bits)
    layer, g = _loaded(bits, G, D, B=3, H=1, pad=(0, 3, 64))
    qf = torch.randn(3, 1, n, D, generator=g)
    p = torch.softmax(torch.randn(3, 1, n, layer.vq, generator=g), -1)
    fused_s, fused_o = layer.lowbit_scores(qf), layer.lowbit_values(p)
    monkeypatch.setenv(lowbit_cpu.ENV, "0")
    torch.testing.assert_close(fused_s, layer.lowbit_scores(qf), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fused_o, layer.lowbit_values(p), atol=1e-5, rtol=1e-5)


def test_decode_with_kernels_equals_dense_attention_over_dequantized_cache():
    """Whole decode steps (GQA, left padding, steps that quantize a new key group) through the
    kernels: the same answer as dense attention over the cache dequantized by a loop."""
    _kernels_or_skip(2, 64, 64, 2)
    B, H, Hq, D, T = 2, 2, 4, 64, 190
    g = torch.Generator().manual_seed(3)
    layer = KiviKV(kivi_policy(bits=2, group_size=64, residual=64), _shape(B, H, D, cap=T + 80))
    pad = torch.tensor([0, 11])
    layer.load(torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
               Step(0, T, pad, torch.zeros(B, T, dtype=torch.long)))
    for t in range(T, T + 70):        # crosses a key-group boundary (kq grows by 64)
        q = torch.randn(B, Hq, 1, D, generator=g)
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        step = Step(t, 1, pad, torch.zeros(B, 1, dtype=torch.long))
        out = layer.decode(q, k, v, step)
        if t % 23 == 0 or t == T + 69:
            K, V = _naive_dequantized_cache(layer)
            torch.testing.assert_close(out, attention_reference(q, K, V, step.mask(t + 1)), atol=1e-4, rtol=1e-4)


def test_generation_tokens_equal_with_and_without_kernels(tiny_model, monkeypatch):
    """Greedy tokens of a batch with padding: kernels on == torch path (summation order only)."""
    prompts = [list(range(5, 60)), list(range(7, 40)), list(range(3, 90))]
    pol = kivi_policy(bits=2, group_size=8, residual=16)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    on = generate(tiny_model, prompts, params, pol)
    monkeypatch.setenv(lowbit_cpu.ENV, "0")
    off = generate(tiny_model, prompts, params, pol)
    assert [r.tokens for r in on.requests] == [r.tokens for r in off.requests]


def test_no_compiler_falls_back_to_the_torch_path_with_one_warning(monkeypatch):
    monkeypatch.setattr(lowbit_cpu, "_libs", {})
    monkeypatch.setattr(lowbit_cpu, "_failed", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(lowbit_cpu.shutil, "which", lambda name: None)
    layer, g = _loaded(2, 8, 16)
    qf = torch.randn(2, 2, 3, 16, generator=g)
    with pytest.warns(RuntimeWarning, match="torch path"):
        s = layer.lowbit_scores(qf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # warned once, not per call
        s2 = layer.lowbit_scores(qf)
    K, _ = _naive_dequantized_cache(layer)
    want = (qf @ K[:, :, : layer.kq].transpose(-1, -2)) / 4.0
    torch.testing.assert_close(s, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, want, atol=1e-4, rtol=1e-4)


def test_kernels_decline_what_they_do_not_serve(monkeypatch):
    layer, g = _loaded(2, 8, 16)
    qf = torch.randn(2, 2, 3, 16, generator=g)
    # float64 queries, too many rows, the env switch: None, and the layer still answers
    assert lowbit_cpu.scores(qf.double(), layer.k_codes, layer.k_scale, layer.k_zero, layer.kq, 8, 2) is None
    big = torch.randn(2, 2, lowbit_cpu.MAX_ROWS + 1, 16, generator=g)
    assert lowbit_cpu.scores(big, layer.k_codes, layer.k_scale, layer.k_zero, layer.kq, 8, 2) is None
    assert layer.lowbit_scores(big).shape == (2, 2, lowbit_cpu.MAX_ROWS + 1, layer.kq)
    monkeypatch.setenv(lowbit_cpu.ENV, "0")
    assert lowbit_cpu.scores(qf, layer.k_codes, layer.k_scale, layer.k_zero, layer.kq, 8, 2) is None


def test_folded_rows_match_per_head_scores():
    """fold() puts the G query heads of a KV head in rows (g, t); the kernel's rows follow it."""
    _kernels_or_skip(3, 16, 8, 2)
    layer, g = _loaded(2, 8, 16)
    q = torch.randn(2, 6, 1, 16, generator=g)           # 6 query heads over 2 KV heads
    s = layer.lowbit_scores(fold(q, 2))                  # (2, 2, 3, kq)
    K, _ = _naive_dequantized_cache(layer)
    for h in range(6):
        want = (q[:, h] @ K[:, h // 3, : layer.kq].transpose(-1, -2)) / 4.0   # (2, 1, kq)
        torch.testing.assert_close(s[:, h // 3, h % 3], want[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits,G,D", [(2, 6, 12), (4, 3, 12), (1, 4, 16)])
def test_value_groups_that_split_a_byte_keep_the_torch_path(bits, G, D):
    """A value group of fewer channels than a byte holds (or not a multiple of them) would put one
    byte in two groups: the kernels decline (they used to give wrong values, or trap on 1-bit
    groups of 4), and the layer's answer is still attention over the dequantized cache."""
    layer, g = _loaded(bits, G, D, T=60)
    p = torch.softmax(torch.randn(2, 2, 3, layer.vq, generator=g), -1)
    assert lowbit_cpu.values(p, layer.v_codes, layer.v_scale, layer.v_zero, layer.vq, G, bits) is None
    _, V = _naive_dequantized_cache(layer)
    torch.testing.assert_close(layer.lowbit_values(p).double(), p.double() @ V[:, :, : layer.vq].double(),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_groups_get_a_normal_scale_in_every_dtype(dtype):
    from runtime.kv.kivi import quant_params, quantize, dequantize
    x = torch.full((1, 1, 8, 4), 0.75, dtype=dtype)
    scale, zero = quant_params(x, 2, 2)
    assert bool((scale == 1).all())                 # not 0 (NaN codes) and not a denormal
    codes = quantize(x, scale, zero, 2)
    assert bool((codes == 0).all()) and bool((dequantize(codes, scale, zero) == x).all())


def test_value_chunks_and_single_batch_row():
    """More than one 256-token value chunk (partial sums added in torch) and B = 1 with H > 1."""
    _kernels_or_skip(3, 64, 64, 2)
    layer, g = _loaded(2, 64, 64, B=1, H=3, T=700, pad=(0,))
    assert layer.vq > 2 * lowbit_cpu.VALUE_CHUNK
    _, V = _naive_dequantized_cache(layer)
    p = torch.softmax(torch.randn(1, 3, 3, layer.vq, generator=g), -1)
    o = lowbit_cpu.values(p, layer.v_codes, layer.v_scale, layer.v_zero, layer.vq, 64, 2)
    torch.testing.assert_close(o.double(), p.double() @ V[:, :, : layer.vq].double(), atol=1e-5, rtol=1e-4)
