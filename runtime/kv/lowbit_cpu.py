"""Fused low-bit attention kernels for the CPU: KIVI's scores and weighted values read straight
from the packed codes.

Why: the torch path (`KiviKV.lowbit_scores` / `lowbit_values`) unpacks every packed byte into a
float transient as large as a float32 cache, then runs batched matmuls over groups of 64 tokens
(~20 small ops per layer, twice the memory traffic of `full`'s one SDPA call): 1.8-2.6x `full`'s
decode step on this project's 2-core VM. Here each task unpacks one key group (or 64 value rows)
into a tile on its own stack and uses it at once, so the only stream from memory is the packed
codes (D * bits / 8 bytes per token) and the scales: below SDPA over a float32 cache at 2K-4K.

Same math as the torch path, term by term (keys per channel: q . k_t = (q * s_g) . c_t + q . z_g;
values per token: sum_t p_t s_t c_t + sum_t p_t z_t); only the order of float additions differs.

Built once per shape (query rows, head_dim, group, bits, value group: compile-time constants, so
every loop has a fixed trip count), with the machine's C compiler (`$CC`, else `cc`; `-O3
-march=native -fopenmp`, ~0.5 s) into `<cache root>/kernels/`, keyed by source, flags, compiler
and CPU, then loaded with ctypes; later processes reuse the file once its stamp vouches for it
(runtime/kernel_cache.py: checksum, build lock, orphaned build folders). The engine builds a
cache's shapes before its clock starts (`prepare`), so no timed step pays for a compile. The library needs
OpenMP's `libgomp.so.1`: torch's CPU wheel has already loaded one by that name, so the kernels
run in torch's thread pool with `torch.get_num_threads()` threads (one OpenMP runtime in the
process, not two fighting over the cores).

Where the kernels cannot serve a call (no compiler, a CUDA tensor, a dtype other than float32,
more than `MAX_ROWS` query rows, a head or group beyond `MAX_DIM` / `MAX_GROUP`, a value group
that is not a whole number of packed bytes) the callers keep
the torch path; `KVTESTBED_LOWBIT_KERNEL=0` forces the torch path everywhere (A/B timing, tests).
A failed build warns once, with the compiler's first error line, and never fails a run.
"""
from __future__ import annotations

import ctypes
import math
import shutil  # noqa: F401  (the compiler is found by kernel_cache with shutil.which; tests patch it here)
import threading
import warnings

import torch
from torch.profiler import record_function

from core.policies.kivi import KiviPolicyConfig, value_group
from core.profile.schema import LOWBIT_KERNEL_ENV, lowbit_kernel_enabled

from .. import kernel_cache

ENV = LOWBIT_KERNEL_ENV     # the switch and its rule live in core (the simulator reads them too)
PROFILE_NAME = "kvt::lowbit_kernel"   # the kernels' scope in torch.profiler traces
MAX_ROWS = 64          # query rows per KV head (GQA group x new tokens) the kernel handles
MAX_DIM = 512          # head_dim
MAX_GROUP = 256        # key group (tokens); the three bound the per-thread stack arrays
VALUE_CHUNK = 256      # tokens per task of the value kernel (partial sums, added in torch)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* flush denormals to zero in this thread (FTZ + DAZ): attention over values near 1e-38 is no
   different from zero, and denormal arithmetic is ~100x slower; restored on the way out */
#define FTZ_ON unsigned int csr_saved_ = _mm_getcsr(); _mm_setcsr(csr_saved_ | 0x8040);
#define FTZ_OFF _mm_setcsr(csr_saved_);
#else
#define FTZ_ON
#define FTZ_OFF
#endif

/* the key this library was built for (its file name's), read by the loader before any call */
const char kvt_key[] = KVT_KEY;

/* Built once per shape: KN query rows per KV head, KD head_dim, KG key group (tokens), KBITS,
   KCG value group (channels) are compile-time constants, so every loop has a fixed trip count
   and the compiler vectorizes and unrolls it (~1.6x the same code with runtime sizes). */
enum { N = KN, D = KD, G = KG, BITS = KBITS, CG = KCG, PER = 8 / KBITS, NB = KD / (8 / KBITS),
       NC = KD / KCG, GL = KCG / (8 / KBITS), MASK = (1 << KBITS) - 1, TILE = 64 };

/* Layout: packed byte j of a row holds channels d = j * PER + k, k < PER. Unpacking slot k of
   every byte is one vector op over j (shift, mask, convert), so the value kernel keeps rows in
   the *permuted* order k * NB + j and un-permutes its output once per chunk. */
static inline void unpack_permuted(const uint8_t *src, int rows, float *tile) {
    for (int r = 0; r < rows; r++) {
        const uint8_t *s = src + (long)r * NB;
        float *o = tile + (long)r * D;
        int32_t w[NB];
        for (int j = 0; j < NB; j++) w[j] = s[j];
        for (int k = 0; k < PER; k++)
            for (int j = 0; j < NB; j++) o[k * NB + j] = (float)((w[j] >> (k * BITS)) & MASK);
    }
}

/* scores[bh][i][t] = ((q_i * s_g) . c_t + q_i . z_g) / sqrt_d for t < kq, g = t / G.
   q (BH, N, D) contiguous; codes rows of NB bytes, cs_bh apart per bh; scale/zero (ng_cap, D)
   rows, ss_bh apart per bh; out rows of ld floats ((BH, N, ld), columns [0, kq) written). One
   task = one (bh, group). The group's bytes are transposed first (byte j of every token side by
   side), so each code slot of each byte unpacks into a vector over the G tokens, broadcast-
   multiplied into all N score rows: vector lanes run over tokens, no horizontal sums. */
void kivi_scores(const float *q, const uint8_t *codes, long cs_bh, const float *scale,
                 const float *zero, long ss_bh, float *out, long ld, int BH, int kq, float sqrt_d,
                 int nthreads) {
    int ng = kq / G;
    #pragma omp parallel num_threads(nthreads)
    {
    FTZ_ON
    #pragma omp for collapse(2) schedule(static)
    for (int bh = 0; bh < BH; bh++) {
        for (int g = 0; g < ng; g++) {
            float qs[N * D], qz[N], S[N * G], x[G];
            uint8_t bt[NB * G];
            const float *qb = q + (long)bh * N * D;
            const float *sc = scale + bh * ss_bh + (long)g * D, *zr = zero + bh * ss_bh + (long)g * D;
            for (int i = 0; i < N; i++) {
                float z = 0.f;
                for (int d = 0; d < D; d++) {
                    qs[i * D + d] = qb[i * D + d] * sc[d];
                    z += qb[i * D + d] * zr[d];
                }
                qz[i] = z;
            }
            const uint8_t *src = codes + bh * cs_bh + (long)g * G * NB;
            for (int t = 0; t < G; t++)
                for (int j = 0; j < NB; j++) bt[j * G + t] = src[t * NB + j];
            memset(S, 0, sizeof S);
            for (int j = 0; j < NB; j++) {
                const uint8_t *bj = bt + j * G;
                for (int k = 0; k < PER; k++) {
                    for (int t = 0; t < G; t++) x[t] = (float)((bj[t] >> (k * BITS)) & MASK);
                    for (int i = 0; i < N; i++) {
                        float w = qs[i * D + j * PER + k], *si = S + i * G;
                        #pragma omp simd
                        for (int t = 0; t < G; t++) si[t] += w * x[t];
                    }
                }
            }
            for (int i = 0; i < N; i++) {
                float *o = out + ((long)bh * N + i) * ld + (long)g * G;
                for (int t = 0; t < G; t++) o[t] = (S[i * G + t] + qz[i]) / sqrt_d;
            }
        }
    }
    FTZ_OFF
    }
}

/* part[bh][c][i][:] = sum over t in chunk c of (p_t s_t,grp) c_t + p_t z_t,grp, per channel group
   grp of CG channels. p rows: p_row apart, p_bh apart per bh (unit stride in t); codes as above;
   scale/zero (cap, NC) rows, ss_bh apart per bh; part (BH, nchunk, N, D). Tokens are unpacked
   TILE at a time; byte j's channels all lie in group j / GL, so where a 16-lane block stays
   inside one group its sums stay in registers across the tile's rows; the zero-point terms are
   summed apart and added once per chunk. */
void kivi_values(const float *p, long p_bh, long p_row, const uint8_t *codes, long cs_bh,
                 const float *scale, const float *zero, long ss_bh, float *part, int BH, int vq,
                 int chunk, int nthreads) {
    int nchunk = (vq + chunk - 1) / chunk;
    const int blocked = NB % 16 == 0 && (NC == 1 || GL % 16 == 0);
    #pragma omp parallel num_threads(nthreads)
    {
    FTZ_ON
    #pragma omp for collapse(2) schedule(static)
    for (int bh = 0; bh < BH; bh++) {
        for (int c = 0; c < nchunk; c++) {
            float acc[N * D], zs[N * NC], tile[TILE * D], wv[NB];
            memset(acc, 0, sizeof acc);
            memset(zs, 0, sizeof zs);
            int t1 = (c + 1) * chunk < vq ? (c + 1) * chunk : vq;
            for (int t0 = c * chunk; t0 < t1; t0 += TILE) {
                int rows = t1 - t0 < TILE ? t1 - t0 : TILE;
                unpack_permuted(codes + bh * cs_bh + (long)t0 * NB, rows, tile);
                for (int i = 0; i < N; i++) {
                    const float *pi = p + bh * p_bh + i * p_row + t0;
                    float *ai = acc + i * D;
                    for (int r = 0; r < rows; r++) {
                        const float *zr = zero + bh * ss_bh + (long)(t0 + r) * NC;
                        for (int k = 0; k < NC; k++) zs[i * NC + k] += pi[r] * zr[k];
                    }
                    if (blocked) {
                        for (int k = 0; k < PER; k++) {
                            for (int j0 = 0; j0 < NB; j0 += 16) {
                                const float *sc = scale + bh * ss_bh + (long)t0 * NC + (NC == 1 ? 0 : j0 / GL);
                                float a0[16] = {0}, a1[16] = {0};
                                int r = 0;
                                for (; r + 2 <= rows; r += 2) {
                                    float w0 = pi[r] * sc[(long)r * NC], w1 = pi[r + 1] * sc[(long)(r + 1) * NC];
                                    const float *x0 = tile + (long)r * D + k * NB + j0, *x1 = x0 + D;
                                    #pragma omp simd
                                    for (int e = 0; e < 16; e++) { a0[e] += w0 * x0[e]; a1[e] += w1 * x1[e]; }
                                }
                                if (r < rows) {
                                    float w0 = pi[r] * sc[(long)r * NC];
                                    const float *x0 = tile + (long)r * D + k * NB + j0;
                                    #pragma omp simd
                                    for (int e = 0; e < 16; e++) a0[e] += w0 * x0[e];
                                }
                                for (int e = 0; e < 16; e++) ai[k * NB + j0 + e] += a0[e] + a1[e];
                            }
                        }
                        continue;
                    }
                    for (int r = 0; r < rows; r++) {
                        const float *sc = scale + bh * ss_bh + (long)(t0 + r) * NC;
                        for (int j = 0; j < NB; j++) wv[j] = pi[r] * sc[j / GL];
                        const float *row = tile + (long)r * D;
                        for (int k = 0; k < PER; k++) {
                            #pragma omp simd
                            for (int j = 0; j < NB; j++) ai[k * NB + j] += wv[j] * row[k * NB + j];
                        }
                    }
                }
            }
            float *dst = part + ((long)bh * nchunk + c) * N * D;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < NB; j++)
                    for (int k = 0; k < PER; k++)
                        dst[i * D + j * PER + k] = acc[i * D + k * NB + j] + zs[i * NC + j / GL];
        }
    }
    FTZ_OFF
    }
}
"""

_lock = threading.Lock()
_libs: dict = {}        # shape -> loaded library
_failed: str | None = None   # why the build failed (then every call keeps the torch path)


def enabled() -> bool:
    return lowbit_kernel_enabled()


def _build(shape: tuple[int, int, int, int, int]) -> ctypes.CDLL:
    """Compile (or reuse) the kernels for one (rows, head_dim, group, bits, value group)."""
    defs = dict(zip(("KN", "KD", "KG", "KBITS", "KCG"), shape))
    dll = kernel_cache.load_library(f"lowbit-{'x'.join(map(str, shape))}", SOURCE, FLAGS, defs)
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    dll.kivi_scores.argtypes = [P, P, L, P, P, L, P, L, I, I, F, I]
    dll.kivi_scores.restype = None
    dll.kivi_values.argtypes = [P, L, L, P, L, P, P, L, P, I, I, I, I]
    dll.kivi_values.restype = None
    return dll


def library(rows: int, head_dim: int, group: int, bits: int, value_group: int):
    """The kernels for this shape, built on first use; None where they cannot run."""
    global _failed
    shape = (rows, head_dim, group, bits, value_group)
    if shape in _libs:
        return _libs[shape]
    if _failed is not None:
        return None
    with _lock:
        if shape not in _libs:
            try:
                _libs[shape] = _build(shape)
            except Exception as e:  # a build problem must never fail a run: the torch path is exact
                _failed = str(e)
                warnings.warn(f"low-bit CPU kernels unavailable, using the torch path ({e})", RuntimeWarning,
                              stacklevel=3)
                return None
    return _libs[shape]


def prepare(cache, rows: list[int]) -> None:
    """Build (or load) now the kernels a KV cache's decode steps will call with `rows` query rows
    per KV head (GQA group x new tokens), so that no timed step pays for a compile: the engine
    calls it before its clock starts. Layers that are not KIVI's on the CPU in float32 need none."""
    shapes = set()
    for layer in getattr(cache, "layers", ()):       # KIVI's layers (and SpeCache's, a KIVI copy + more)
        if not isinstance(getattr(layer, "spec", None), KiviPolicyConfig) or not hasattr(layer, "k_codes"):
            continue
        if layer.k_codes.device.type != "cpu" or layer.dtype != torch.float32:
            continue
        for n in rows:
            if n <= MAX_ROWS and layer.D <= MAX_DIM and layer.G <= MAX_GROUP and not layer.cg % (8 // layer.bits):
                shapes.add((n, layer.D, layer.G, layer.bits, layer.cg))
    if shapes and enabled():
        for shape in sorted(shapes):
            library(*shape)


def _usable(tensors, rows: int, head_dim: int, group: int, bits: int) -> bool:
    if not enabled() or rows > MAX_ROWS or head_dim > MAX_DIM or group > MAX_GROUP:
        return False
    if value_group(group, head_dim) % (8 // bits):
        return False     # a packed byte would straddle two value groups: the kernels assume it never does
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.uint8) for t in tensors)


def _strides(q, codes, scale, zero, rows: int, head_dim: int, group: int, bits: int) -> tuple[int, int] | None:
    """The (b, h) strides of the packed codes and of scale / zero when a kernel can serve the
    call (`_usable`, each walkable with one stride, zero laid out as scale), else None."""
    if not _usable((q, codes, scale, zero), rows, head_dim, group, bits):
        return None
    cs, ss = _bh_stride(codes), _bh_stride(scale)
    if cs < 0 or ss < 0 or zero.stride() != scale.stride():
        return None
    return cs, ss


def _bh_stride(t: torch.Tensor) -> int:
    """Elements between consecutive (b, h) blocks of a (B, H, rows, cols) tensor whose last two
    dims are row-major; -1 when (b, h) cannot be walked with one stride."""
    B, H = t.shape[:2]
    if t.stride(-1) != 1 or (t.shape[-2] > 1 and t.stride(-2) != t.shape[-1]):
        return -1
    if H > 1 and B > 1 and t.stride(0) != H * t.stride(1):
        return -1
    return t.stride(1) if H > 1 else t.stride(0)


def scores(qf, codes, scale, zero, kq: int, group: int, bits: int, out: torch.Tensor | None = None):
    """Fused `KiviKV.lowbit_scores`: qf (B, H_kv, n, D) float32; codes (B, H_kv, cap, D*bits/8)
    uint8; scale, zero (B, H_kv, n_groups_cap, D). Returns (B, H_kv, n, kq) (written into `out`,
    a (B, H_kv, n, >= kq) float32 buffer whose rows are contiguous, when given), or None when the
    kernel cannot serve the call (the caller keeps the torch path)."""
    B, H, n, D = qf.shape
    strides = _strides(qf, codes, scale, zero, n, D, group, bits)      # (codes', scales') or None
    if strides is None or (out is not None and (out.stride(-1) != 1 or out.stride(1) != n * out.stride(2)
                                                or out.stride(0) != H * out.stride(1))):
        return None
    cs, ss = strides
    if out is None:
        out = torch.empty(B, H, n, kq, dtype=torch.float32)
    lib = library(n, D, group, bits, value_group(group, D))
    if lib is None:
        return None
    qf = qf.contiguous()
    with record_function(PROFILE_NAME):          # a named op for torch.profiler (decode_profile.py)
        lib.kivi_scores(qf.data_ptr(), codes.data_ptr(), cs, scale.data_ptr(), zero.data_ptr(), ss, out.data_ptr(),
                        out.stride(2), B * H, kq, math.sqrt(D), torch.get_num_threads())
    return out[..., :kq]


def values(p, codes, scale, zero, vq: int, group: int, bits: int):
    """Fused `KiviKV.lowbit_values`: p (B, H_kv, n, >= vq) float32; codes (B, H_kv, cap,
    D*bits/8); scale, zero (B, H_kv, cap, D / value_group). Returns (B, H_kv, n, D), or None."""
    B, H, n = p.shape[:3]
    D = codes.shape[-1] * 8 // bits
    strides = _strides(p, codes, scale, zero, n, D, group, bits)
    if strides is None:
        return None
    cs, ss = strides
    lib = library(n, D, group, bits, value_group(group, D))
    if lib is None:
        return None
    if p.stride(-1) != 1 or (B > 1 and H > 1 and p.stride(0) != H * p.stride(1)):
        p = p.contiguous()
    p_bh = p.stride(1) if H > 1 else p.stride(0)
    nchunk = -(-vq // VALUE_CHUNK)
    part = torch.empty(B, H, nchunk, n, D, dtype=torch.float32)
    with record_function(PROFILE_NAME):
        lib.kivi_values(p.data_ptr(), p_bh, p.stride(2), codes.data_ptr(), cs, scale.data_ptr(), zero.data_ptr(),
                        ss, part.data_ptr(), B * H, vq, VALUE_CHUNK, torch.get_num_threads())
    return part[:, :, 0] if nchunk == 1 else part.sum(2)
