"""KIVI quantization, packing and low-bit attention against naive references."""
import math
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError
from runtime.kv import CacheShape, Step, make_cache
from runtime.kv.base import attention_reference
from runtime.kv.kivi import KiviKV, dequantize, pack, quant_params, quantize, unpack, unpack_float


def kivi_policy(**kw):
    base = dict(name="kivi", kv_dtype="float32", bits=2, group_size=8, residual=16, one_bit_rule="specache")
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("seed", range(12))
def test_quantize_error_at_most_half_a_step(seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(torch.randint(1, 7, (3,), generator=g).tolist()) + (int(torch.randint(2, 40, (1,), generator=g)),)
    x = torch.randn(shape, generator=g) * float(torch.rand(1, generator=g) * 10 + 0.01)
    for bits in (2, 4, 8):
        scale, zero = quant_params(x, -1, bits)
        err = (dequantize(quantize(x, scale, zero, bits), scale, zero) - x).abs()
        assert (err <= scale / 2 * (1 + 1e-5) + 1e-6).all()
    # 1 bit, SpeCache's rule: codes decode to the centres of the two half-ranges
    scale, zero = quant_params(x, -1, 1, "specache")
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    deq = dequantize(quantize(x, scale, zero, 1), scale, zero)
    centres_lo, centres_hi = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    assert (torch.isclose(deq, centres_lo.expand_as(x), atol=1e-5) | torch.isclose(deq, centres_hi.expand_as(x), atol=1e-5)).all()
    assert ((deq - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-6).all()          # (max - min) / 4
    # the plain rule decodes to the ends
    scale, zero = quant_params(x, -1, 1, "plain")
    deq = dequantize(quantize(x, scale, zero, 1), scale, zero)
    assert (torch.isclose(deq, lo.expand_as(x), atol=1e-5) | torch.isclose(deq, hi.expand_as(x), atol=1e-5)).all()


def test_constant_group_is_exact():
    x = torch.full((2, 8), 3.25)
    s, z = quant_params(x, -1, 2)
    assert torch.equal(dequantize(quantize(x, s, z, 2), s, z), x)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_roundtrip_and_density(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)
    assert torch.equal(unpack_float(packed, bits, torch.float32), codes.float())
    if bits == 2:   # 4 two-bit values a byte, the first in the low bits
        assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).item() == 1 + (2 << 2) + (3 << 4)


def _naive_dequantized_cache(layer: KiviKV):
    """Rebuild K and V in full by a loop over groups and tokens (the reference)."""
    B, H, _, D = layer.k_res.shape
    K = torch.empty(B, H, layer.len, D)
    V = torch.empty(B, H, layer.len, D)
    codes_k = unpack(layer.k_codes, layer.bits).float()
    codes_v = unpack(layer.v_codes, layer.bits).float()
    for t in range(layer.kq):
        g = t // layer.G
        K[:, :, t] = codes_k[:, :, t] * layer.k_scale[:, :, g] + layer.k_zero[:, :, g]
    K[:, :, layer.kq:] = layer.k_res
    for t in range(layer.vq):
        for c in range(D):
            j = c // layer.cg
            V[:, :, t, c] = codes_v[:, :, t, c] * layer.v_scale[:, :, t, j] + layer.v_zero[:, :, t, j]
    V[:, :, layer.vq:] = layer.v_res
    return K, V


def _shape(B=2, H=2, D=16, cap=80):
    return CacheShape(n_layers=1, batch=B, n_kv_heads=H, head_dim=D, capacity=cap, dtype=torch.float32,
                      device=torch.device("cpu"))


@pytest.mark.parametrize("bits,group", [(2, 8), (4, 16), (1, 8), (8, 8)])
def test_lowbit_attention_equals_attention_over_dequantized_cache(bits, group):
    g = torch.Generator().manual_seed(bits)
    B, H, Hq, D, T = 2, 2, 4, 16, 45
    layer = KiviKV(kivi_policy(bits=bits, group_size=group, residual=2 * group), _shape(B, H, D))
    pad = torch.tensor([0, 5])
    layer.load(torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
               Step(0, T, pad, torch.zeros(B, T, dtype=torch.long)))
    for t in range(T, T + 9):    # decode steps cross group boundaries
        q = torch.randn(B, Hq, 1, D, generator=g)
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        step = Step(t, 1, pad, torch.zeros(B, 1, dtype=torch.long))
        out = layer.decode(q, k, v, step)
        K, V = _naive_dequantized_cache(layer)
        want = attention_reference(q, K, V, step.mask(t + 1))
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_residual_window_mechanics():
    layer = KiviKV(kivi_policy(group_size=8, residual=16), _shape(1, 1, 16))
    x = torch.randn(1, 1, 40, 16)
    layer.load(x, x, Step(0, 40, torch.zeros(1, dtype=torch.long), torch.zeros(1, 40, dtype=torch.long)))
    # keys: quantize whole groups until <= 16 remain -> 24 quantized, 16 residual; values: 40 - 16
    assert (layer.kq, layer.k_res.shape[2], layer.vq, layer.v_res.shape[2]) == (24, 16, 24, 16)
    step = Step(40, 1, torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    layer.decode(torch.randn(1, 1, 1, 16), x[:, :, :1], x[:, :, :1], step)
    # 17 keys > 16: one more group of 8 -> 32 quantized, 9 residual; values slide by one
    assert (layer.kq, layer.k_res.shape[2], layer.vq, layer.v_res.shape[2]) == (32, 9, 25, 16)


def test_padding_never_enters_key_ranges():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1, 1, 32, 16, generator=g)
    a = KiviKV(kivi_policy(), _shape(1, 1, 16))
    a.load(real, real, Step(0, 32, torch.tensor([0]), torch.zeros(1, 32, dtype=torch.long)))
    # same real tokens behind 8 pad columns holding huge values: groups shift by exactly one group
    padded = torch.cat([torch.full((1, 1, 8, 16), 1e4), real], dim=2)
    b = KiviKV(kivi_policy(), _shape(1, 1, 16))
    b.load(padded, padded, Step(0, 40, torch.tensor([8]), torch.zeros(1, 40, dtype=torch.long)))
    assert b.kq == 24 and a.kq == 16
    torch.testing.assert_close(b.k_scale[:, :, 1:3], a.k_scale[:, :, 0:2])
    torch.testing.assert_close(b.k_zero[:, :, 1:3], a.k_zero[:, :, 0:2])
    # an all-pad group has no range at all: zero 0 and the constant-group scale 1 (pads holding
    # 1e4 would have given zero 1e4)
    assert b.k_zero[:, :, 0].abs().max() == 0 and bool((b.k_scale[:, :, 0] == 1).all())
    # and no scale is near the smallest float: q * scale would be a denormal (~100x slower on x86)
    assert bool((b.k_scale[:, :, :3] >= 2.0 ** -100).all())


def test_kv_bytes_match_the_formula():
    # 4K context, fp16 storage, 2 bits, group 64, residual 64: (bits + 32/G)/16 + R/N of fp16
    N, H, D = 4096, 2, 64
    shape = CacheShape(1, 1, H, D, N, torch.float16, torch.device("cpu"))
    layer = KiviKV(kivi_policy(kv_dtype="float16", bits=2, group_size=64, residual=64), shape)
    x = torch.randn(1, H, N, D, dtype=torch.float16)
    layer.load(x, x, Step(0, N, torch.zeros(1, dtype=torch.long), torch.zeros(1, N, dtype=torch.long)))
    dev, host = layer.nbytes()
    fp16 = N * 2 * H * D * 2
    assert host == 0
    # exact: N - R quantized tokens at (bits + 32/G)/16 of fp16 each, R residual tokens at 16 bits
    assert dev / fp16 == pytest.approx(((N - 64) * (2 + 32 / 64) / 16 + 64) / N, rel=1e-9)
    assert dev / fp16 <= (2 + 32 / 64) / 16 + 64 / N          # the usual estimate counts all N as quantized


@pytest.mark.parametrize("bad,needle", [
    (dict(bits=3), "policy.bits=3"),
    (dict(residual=12), "policy.residual=12 must be a positive multiple of policy.group_size=8"),
    (dict(group_size=0), "policy.group_size=0"),
    (dict(one_bit_rule="x"), "policy.one_bit_rule"),
    (dict(group_size=12, residual=24), "must divide head_dim=16"),
])
def test_bad_knobs(bad, needle):
    with pytest.raises(ConfigError, match=re_escape(needle)):
        make_cache(kivi_policy(**bad), n_layers=1, batch=1, n_kv_heads=1, head_dim=16, capacity=8,
                   device=torch.device("cpu"))


def re_escape(s):
    import re

    return re.escape(s)


def test_kivi_generation_close_to_full(tiny_model):
    from runtime.engine import SamplingParams, generate

    prompt = list(range(3, 100))
    full = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True),
                    SimpleNamespace(name="full", kv_dtype="float32"))
    k8 = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True), kivi_policy(bits=8))
    assert k8.requests[0].tokens == full.requests[0].tokens     # 8-bit is near lossless
    assert math.isclose(full.kv_ratio_vs_fp16, 2.0)
    assert k8.kv_ratio_vs_fp16 < full.kv_ratio_vs_fp16
