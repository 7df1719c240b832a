"""Masks, grouped-query attention and RoPE against hand-written references."""
import math

import pytest
import torch

from runtime.kv.base import Step, attention_reference, sdpa_gqa
from runtime.model import apply_rope, rope_tables


def test_step_mask_by_hand():
    # row 0: no pad; row 1: two pad columns. Prefill of 4 columns.
    pad = torch.tensor([0, 2])
    step = Step(start=0, n_new=4, pad=pad, positions=torch.zeros(2, 4, dtype=torch.long))
    m = step.mask()[:, 0].int().tolist()
    assert m[0] == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # pad queries (cols 0, 1) see only themselves; real queries see real keys up to themselves
    assert m[1] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    dec = Step(start=4, n_new=1, pad=pad, positions=torch.tensor([[4], [2]]))
    assert dec.mask()[:, 0, 0].int().tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert Step(start=4, n_new=1, pad=torch.zeros(2, dtype=torch.long), positions=dec.positions).mask() is None
    assert step.valid_keys().tolist() == [[True] * 4, [False, False, True, True]]


@pytest.mark.parametrize("H,Hkv,T,Tk,start", [(4, 2, 5, 5, 0), (9, 3, 1, 17, 16), (6, 6, 3, 10, 7), (8, 1, 1, 9, 8)])
def test_sdpa_gqa_matches_dense_reference(H, Hkv, T, Tk, start):
    g = torch.Generator().manual_seed(H * 100 + T)
    B, D = 3, 16
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    pad = torch.tensor([0, 1, min(3, start)])
    step = Step(start=start, n_new=T, pad=pad, positions=torch.zeros(B, T, dtype=torch.long))
    mask = step.mask(Tk)
    got = sdpa_gqa(q, k, v, mask)
    want = attention_reference(q, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _rope_complex(x, pos, base):
    """RoPE as complex multiplication with half-split pairing: (x_i + i x_{i+D/2}) * e^{i pos theta_i}."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    z = z * torch.polar(torch.ones_like(theta), pos[..., None].double() * theta)
    return torch.cat([z.real, z.imag], -1).float()


def test_rope_matches_complex_rotation():
    D, base = 64, 100000.0
    cos, sin = rope_tables(D, 8192, base)
    pos = torch.tensor([[0, 1, 17, 4095, 8191]])
    x = torch.randn(1, 2, 5, D, generator=torch.Generator().manual_seed(0))
    got = apply_rope(x, cos[pos][:, None], sin[pos][:, None])
    want = _rope_complex(x, pos[:, None], base)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))       # a rotation


def test_rope_angles_float64_at_long_positions():
    # pos * inv_freq in float32 drifts by ~pos * ulp: the tables must not
    cos, _ = rope_tables(64, 8192, 10000.0)
    exact = math.cos(8191 * 1.0)   # i = 0: inv_freq = 1
    assert abs(cos[8191, 0].item() - exact) < 1e-6


def test_rope_scores_depend_on_relative_position_only():
    D = 32
    cos, sin = rope_tables(D, 512, 10000.0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, D, generator=g), torch.randn(1, 1, 1, D, generator=g)

    def score(pq, pk):
        rq = apply_rope(q, cos[[pq]][None, None], sin[[pq]][None, None])
        rk = apply_rope(k, cos[[pk]][None, None], sin[[pk]][None, None])
        return (rq * rk).sum().item()

    assert score(10, 3) == pytest.approx(score(300, 293), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-4)
