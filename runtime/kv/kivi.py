"""`kivi`: KIVI low-bit KV (Liu et al., ICML 2024), with SpeCache's 1-bit rule.

Keys are quantized per channel, in groups of `group_size` tokens (outlier channels keep their
own range); values per token, in groups of `group_size` channels. Asymmetric: x ~ code * scale
+ zero, codes in [0, 2^bits - 1], packed 8 / bits to a byte along the channels. The newest
tokens stay in full precision (the `residual` window): keys are quantized a whole group at a
time once the residual would exceed `residual` tokens (so it holds residual - group_size + 1 ..
residual keys); values slide one token at a time (always the newest `residual`).

1 bit: SpeCache's rule sets zero = (3 min + max) / 4 and scale = (max - min) / 2, so the two
codes decode to the centres of the lower and upper half-ranges (error <= (max - min) / 4); the
plain rule (zero = min, scale = max - min, codes decode to the ends) stays behind
`one_bit_rule=plain` for the ablation. Left-pad columns never enter a key group's min/max.

Attention never builds a dequantized copy of the cache. With keys per channel,
q . k_t = sum_d (q_d s_gd) c_td + sum_d q_d z_gd: the scales fold into the query once per group
and the zero points into one small product. With values per token,
sum_t p_t v_t = sum_t (p_t s_t) c_t + sum_t p_t z_t: the scales fold into the probabilities.
On the CPU, `lowbit_cpu` runs both as fused kernels that read the packed bytes directly (built
with the machine's C compiler on first use); elsewhere, or without a compiler, the torch path
below unpacks the codes to a float transient for the matmuls (same math, other summation order).
"""
from __future__ import annotations

import math

import torch

from core.policies import spec_of
from core.policies.kivi import BITS, ONE_BIT_RULES, KiviPolicyConfig, value_group  # noqa: F401

from .. import phases
from . import lowbit_cpu
from .base import CacheShape, LayerKV, Step, grow_columns, register


# ----------------------------------------------------------------------------- quantization

def quant_params(x: torch.Tensor, dim: int, bits: int, one_bit_rule: str = "specache",
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero of x reduced over `dim` (kept), from the min/max of the `valid` entries."""
    if valid is None:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        lo = x.masked_fill(~valid, math.inf).amin(dim, keepdim=True)
        hi = x.masked_fill(~valid, -math.inf).amax(dim, keepdim=True)
        empty = torch.isinf(lo)                    # a group made only of padding
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    if bits == 1 and one_bit_rule == "specache":
        zero, scale = (3 * lo + hi) / 4, (hi - lo) / 2
    else:
        zero, scale = lo, (hi - lo) / (2 ** bits - 1)
    # a constant group (or one made only of padding) has scale 0; any positive scale decodes it
    # exactly to `zero`. 1, not the smallest float: a scale near finfo.tiny makes q * scale a
    # denormal, and denormal arithmetic is ~100x slower on x86 (a left-padded batch's pad-only
    # key groups made every decode step 2.5x slower). Ranges below 2^-100 count as constant.
    # (compared in float32: in float16, 2^-100 rounds to 0 and a zero scale would pass)
    return torch.where(scale.float() >= 2.0 ** -100, scale, torch.ones_like(scale)), zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8, unpacked) of x: round((x - zero) / scale), clamped to [0, 2^bits - 1]."""
    q = torch.round((x.float() - zero.float()) / scale.float())
    return q.clamp_(0, 2 ** bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale + zero


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) codes < 2^bits -> (..., D * bits / 8) bytes; code j of a byte in bits [j*b, (j+1)*b)."""
    per = 8 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., D * bits / 8) bytes -> (..., D) uint8 codes."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    c = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return c.reshape(*packed.shape[:-1], -1)


_LUTS: dict = {}


def unpack_float(packed: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """`unpack` straight to floats for the matmuls: one table lookup per byte (a 256 x 8/bits
    table of the codes each byte holds) instead of shift, mask, reshape and convert, which is
    ~2x slower on CPU."""
    if bits == 8:
        return packed.to(dtype)
    key = (bits, packed.device, dtype)
    if key not in _LUTS:
        byte = torch.arange(256, device=packed.device)
        _LUTS[key] = ((byte[:, None] >> torch.arange(0, 8, bits, device=packed.device)) & (2 ** bits - 1)).to(dtype)
    out = torch.nn.functional.embedding(packed.to(torch.int32), _LUTS[key])   # (..., D*bits/8, 8/bits)
    return out.reshape(*packed.shape[:-1], -1)


# ----------------------------------------------------------------------------- the layer

@register
class KiviKV(LayerKV):
    """Packed low-bit keys and values in device memory, plus the full-precision residual."""

    declaration = KiviPolicyConfig

    def __init__(self, spec: KiviPolicyConfig, shape: CacheShape, link=None):
        # the checked declaration (make_cache); a config built in code is checked here
        self.spec = spec_of(spec, shape.head_dim)
        self.bits, self.G, self.R = self.spec.bits, self.spec.group_size, self.spec.residual
        self.rule = self.spec.one_bit_rule
        self.dtype = shape.dtype
        B, H, D = shape.batch, shape.n_kv_heads, shape.head_dim
        self.D, self.cg = D, value_group(self.G, D)
        cap = max(shape.capacity, 1)
        dev = shape.device
        nbytes = D * self.bits // 8
        self.k_codes = torch.zeros(B, H, cap, nbytes, dtype=torch.uint8, device=dev)
        self.v_codes = torch.zeros(B, H, cap, nbytes, dtype=torch.uint8, device=dev)
        n_groups = -(-cap // self.G)
        self.k_scale = torch.zeros(B, H, n_groups, D, dtype=self.dtype, device=dev)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(B, H, cap, D // self.cg, dtype=self.dtype, device=dev)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.k_res = torch.zeros(B, H, 0, D, dtype=self.dtype, device=dev)   # columns [kq, len)
        self.v_res = torch.zeros(B, H, 0, D, dtype=self.dtype, device=dev)   # columns [vq, len)
        self.kq = self.vq = self.len = 0
        self.pad = torch.zeros(B, dtype=torch.long, device=dev)

    # -- storage

    def _grow(self, need: int) -> None:
        self.k_codes, self.v_codes = grow_columns(self.k_codes, need), grow_columns(self.v_codes, need)
        self.v_scale, self.v_zero = grow_columns(self.v_scale, need), grow_columns(self.v_zero, need)
        n_groups = -(-need // self.G)
        self.k_scale, self.k_zero = grow_columns(self.k_scale, n_groups), grow_columns(self.k_zero, n_groups)

    def _append(self, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Add stored tokens to the residual, then quantize what overflows it."""
        n = step.n_store
        self.pad = step.pad
        self._grow(step.stored_end)
        self.k_res = torch.cat([self.k_res, k[:, :, :n].to(self.dtype)], dim=2)
        self.v_res = torch.cat([self.v_res, v[:, :, :n].to(self.dtype)], dim=2)
        self.len = step.stored_end
        over_k = self.k_res.shape[2] - self.R
        if over_k > 0:
            self._quantize_keys(-(-over_k // self.G) * self.G)
        over_v = self.v_res.shape[2] - self.R
        if over_v > 0:
            self._quantize_values(over_v)

    def _quantize_keys(self, n: int) -> None:
        """The oldest n residual keys (n a multiple of G) -> per-channel groups of G tokens."""
        B, H, _, D = self.k_res.shape
        x = self.k_res[:, :, :n].reshape(B, H, n // self.G, self.G, D)
        cols = self.kq + torch.arange(n, device=x.device)
        valid = (cols[None, :] >= self.pad[:, None]).view(B, 1, n // self.G, self.G, 1)
        scale, zero = quant_params(x, 3, self.bits, self.rule, valid)       # (B, H, n/G, 1, D)
        codes = quantize(x, scale, zero, self.bits).view(B, H, n, D)
        g0 = self.kq // self.G
        self.k_codes[:, :, self.kq : self.kq + n] = pack(codes, self.bits)
        self.k_scale[:, :, g0 : g0 + n // self.G] = scale.squeeze(3)
        self.k_zero[:, :, g0 : g0 + n // self.G] = zero.squeeze(3)
        self.k_res = self.k_res[:, :, n:]
        self.kq += n

    def _quantize_values(self, n: int) -> None:
        """The oldest n residual values -> per-token groups of cg channels."""
        B, H, _, D = self.v_res.shape
        x = self.v_res[:, :, :n].reshape(B, H, n, D // self.cg, self.cg)
        scale, zero = quant_params(x, 4, self.bits, self.rule)             # (B, H, n, D/cg, 1)
        codes = quantize(x, scale, zero, self.bits).view(B, H, n, D)
        self.v_codes[:, :, self.vq : self.vq + n] = pack(codes, self.bits)
        self.v_scale[:, :, self.vq : self.vq + n] = scale.squeeze(-1)
        self.v_zero[:, :, self.vq : self.vq + n] = zero.squeeze(-1)
        self.v_res = self.v_res[:, :, n:]
        self.vq += n

    def load(self, k, v, step: Step) -> None:
        self._append(k, v, step)
        phases.lap("store")                      # the prompt quantized and packed

    # -- attention pieces (shared with specache)

    def lowbit_scores(self, qf: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """qf (B, H_kv, n, D) folded queries -> q . K_lowbit / sqrt(D) over [0, kq): (B, H_kv, n, kq).
        out: a (B, H_kv, n, >= kq) buffer whose columns [0, kq) receive the scores (the view is returned)."""
        B, H, n, D = qf.shape
        ng = self.kq // self.G
        if ng == 0:
            return qf.new_zeros(B, H, n, 0)
        s = lowbit_cpu.scores(qf, self.k_codes, self.k_scale, self.k_zero, self.kq, self.G, self.bits, out=out)
        if s is not None:
            return s
        codes = unpack_float(self.k_codes[:, :, : self.kq], self.bits, self.dtype)
        codes = codes.view(B, H, ng, self.G, D)
        scale, zero = self.k_scale[:, :, :ng], self.k_zero[:, :, :ng]         # (B, H, ng, D)
        qs = qf[:, :, None] * scale[:, :, :, None]                            # (B, H, ng, n, D)
        s = qs @ codes.transpose(-1, -2)                                      # (B, H, ng, n, G)
        s = s + (qf @ zero.transpose(-1, -2)).transpose(-1, -2)[..., None]    # + q . z per group
        s = s.permute(0, 1, 3, 2, 4).reshape(B, H, n, self.kq) / math.sqrt(D)
        if out is None:
            return s
        out[..., : self.kq] = s
        return out[..., : self.kq]

    def lowbit_values(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, H_kv, n, vq) attention weights of the quantized values -> sum_t p_t v_t: (B, H_kv, n, D)."""
        B, H, n, vq = p.shape
        if vq == 0:
            return p.new_zeros(B, H, n, self.D)
        o = lowbit_cpu.values(p, self.v_codes, self.v_scale, self.v_zero, vq, self.G, self.bits)
        if o is not None:
            return o
        nc = self.D // self.cg
        codes = unpack_float(self.v_codes[:, :, :vq], self.bits, self.dtype)
        codes = codes.view(B, H, vq, nc, self.cg).permute(0, 1, 3, 2, 4)      # (B, H, nc, vq, cg)
        scale = self.v_scale[:, :, :vq].permute(0, 1, 3, 2)                   # (B, H, nc, vq)
        zero = self.v_zero[:, :, :vq].permute(0, 1, 3, 2)
        ps = p[:, :, None] * scale[:, :, :, None]                             # (B, H, nc, n, vq)
        o = ps @ codes                                                        # (B, H, nc, n, cg)
        o = o + (p[:, :, None] @ zero[..., None])                             # + sum_t p_t z_t
        return o.permute(0, 1, 3, 2, 4).reshape(B, H, n, self.D)

    def dequant_value_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized values at columns idx (B, H_kv, k) < vq: (B, H_kv, k, D)."""
        B, H, k = idx.shape
        nc = self.D // self.cg
        codes = torch.gather(self.v_codes, 2, idx[..., None].expand(B, H, k, self.v_codes.shape[-1]))
        codes = unpack_float(codes, self.bits, self.dtype).view(B, H, k, nc, self.cg)
        scale = torch.gather(self.v_scale, 2, idx[..., None].expand(B, H, k, nc))[..., None]
        zero = torch.gather(self.v_zero, 2, idx[..., None].expand(B, H, k, nc))[..., None]
        return (codes * scale + zero).view(B, H, k, self.D)

    def residual_kv(self, k: torch.Tensor, v: torch.Tensor, step: Step):
        """Full-precision keys and values of the residual, plus a speculative guess's own row."""
        k_res, v_res = self.k_res, self.v_res
        if step.spec:
            k_res = torch.cat([k_res, k[:, :, -1:].to(self.dtype)], dim=2)
            v_res = torch.cat([v_res, v[:, :, -1:].to(self.dtype)], dim=2)
        return k_res, v_res

    def decode(self, q, k, v, step: Step):
        self._append(k, v, step)
        qf = fold(q.to(self.dtype), self.k_res.shape[1])
        k_res, v_res = self.residual_kv(k, v, step)
        B, H, n, _ = qf.shape
        # one (B, H_kv, n, kq + residual) buffer: the fused kernel writes the low-bit columns in
        # place, so the scores are never concatenated (a copy of all of them per layer per step)
        scores = qf.new_empty(B, H, n, self.kq + k_res.shape[2])
        self.lowbit_scores(qf, out=scores)
        scores[..., self.kq :] = (qf @ k_res.transpose(-1, -2)) / math.sqrt(self.D)
        p = masked_softmax(scores, step, q.shape[1] // k_res.shape[1])
        o = self.lowbit_values(p[..., : self.vq]) + p[..., self.vq :] @ v_res
        return unfold(o, q.shape[1]).to(q.dtype)

    def dense_kv(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K/V of columns [0, end) for transformers' Cache.update fallback: codes -> floats
        with `unpack_float`, times scale plus zero per group, then the full-precision residual
        (the wholesale dequantization the attention path avoids)."""
        B, H = self.k_res.shape[:2]
        D, G, cg, kq, vq = self.D, self.G, self.cg, self.kq, self.vq
        codes = unpack_float(self.k_codes[:, :, :kq], self.bits, self.dtype).view(B, H, kq // G, G, D)
        k = codes * self.k_scale[:, :, : kq // G, None] + self.k_zero[:, :, : kq // G, None]
        codes = unpack_float(self.v_codes[:, :, :vq], self.bits, self.dtype).view(B, H, vq, D // cg, cg)
        v = codes * self.v_scale[:, :, :vq, :, None] + self.v_zero[:, :, :vq, :, None]
        k = torch.cat([k.reshape(B, H, kq, D), self.k_res], dim=2)
        v = torch.cat([v.reshape(B, H, vq, D), self.v_res], dim=2)
        return k, v

    # -- accounting

    def real_tokens(self, lo: int, hi: int) -> int:
        """Real (non-pad) tokens in columns [lo, hi), summed over rows."""
        return int((hi - torch.maximum(self.pad, torch.full_like(self.pad, lo))).clamp(min=0).sum())

    def nbytes(self):
        H, D, e = self.k_codes.shape[1], self.D, self.k_scale.element_size()
        codes = D * self.bits / 8
        k_q = self.real_tokens(0, self.kq) * H * (codes + 2 * D * e / self.G)     # + scale, zero per G tokens
        v_q = self.real_tokens(0, self.vq) * H * (codes + 2 * (D // self.cg) * e)  # + scale, zero per token
        res = (self.real_tokens(self.kq, self.len) + self.real_tokens(self.vq, self.len)) * H * D * e
        return int(round(k_q + v_q + res)), 0


# ----------------------------------------------------------------------------- shared helpers

def fold(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H_kv, G*T, D), rows ordered (g, t): the G query heads of a KV head."""
    B, H, T, D = q.shape
    return q.reshape(B, n_kv_heads, (H // n_kv_heads) * T, D)


def unfold(o: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, Hkv, GT, D = o.shape
    return o.reshape(B, n_heads, GT * Hkv // n_heads, D)


def masked_softmax(scores: torch.Tensor, step: Step, group: int) -> torch.Tensor:
    """softmax over the key columns with the step's mask (pads, causality of a guess)."""
    mask = step.mask(scores.shape[-1], group)             # (B, 1, G*T, Tk), (g, t) order
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
