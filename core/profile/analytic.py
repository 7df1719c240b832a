"""Roofline costs as formulas of the shape asked for (no torch: the simulator imports this).

Each kernel's time is max(FLOPs / (peak FLOP/s x compute efficiency), bytes / (HBM bandwidth x
memory efficiency)) plus its kernel launches; transfers are latency + bytes / (PCIe rate x link
efficiency). The GPU's peaks and the efficiencies live in a roofline profile (`device.peak_flops`,
`device.hbm_bytes_per_s`, `device.pcie`, `provenance.assumptions`); the shape is the model's
(`dim`, `n_heads`, `n_kv_heads`, `head_dim`, `ffn_dim`, `vocab_size`) and the KV element size;
the point is whatever the caller asks (batch, context, k, bits, group size): nothing is read
from a grid, so a GQA-8 shape costs what GQA-8 reads, at 32K context as at 4K.

`runtime/profile/roofline.py` writes roofline profile files from these same formulas (tables on
the measured grids, for `--compare` against a measured profile and for older readers); the
simulator (`simulator/costs.py`) calls the formulas directly for any roofline profile.
The GPUs' datasheet peaks are gpus.toml beside this file; docs/profiles.md says why these formulas.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

# Peaks from the vendors' datasheets (gpus.toml beside this file): dense FP16/BF16 tensor-core
# FLOP/s, HBM/GDDR bandwidth, memory, PCIe generation x width, and the datasheet each comes from
GPUS = {name: {**gpu, "pcie": tuple(gpu["pcie"])}
        for name, gpu in tomllib.loads(Path(__file__).with_name("gpus.toml").read_text()).items()}
PCIE_LANE = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9}

ASSUMPTIONS = {
    "compute_efficiency": 0.6,      # of dense tensor-core peak reached by large GEMMs
    "memory_efficiency": 0.8,       # of HBM peak reached by streaming kernels
    "pcie_efficiency": 0.85,        # pinned H2D/D2H of large copies
    "pageable_factor": 0.5,         # pageable copies are staged through a bounce buffer
    "pcie_latency_s": 10e-6,
    "launch_s": 5e-6,               # per kernel launch (eager PyTorch)
    "step_overhead_s": 300e-6,      # Python engine loop per decode step, outside the layers
    "layer_glue_s": 150e-6,         # Python between a layer's kernels (eager PyTorch, ~15 launches)
    "host_gather_bytes_per_s": 10e9,  # CPU index_select into pinned staging (policy.gather=host)
    # policy.gather=device: a device kernel reads the rows straight from pinned host memory
    # (UVA / zero-copy); each 256-byte row is whole PCIe read requests, taken at the pinned copy
    # rate times this factor (no host CPU pass, no staging)
    "device_gather_link_factor": 1.0,
    "runtime_overhead_bytes": 1.5e9,  # CUDA context, cuBLAS workspace, allocator slack
    "disk_bytes_per_s": 2e9,        # NVMe read/write of chunk K/V files
    "activation_tokens": 2048,      # activation peak sized as a 2K-token prefill: tokens x dim x 2 B x 20
    "bytes_per_weight": 2, "bytes_per_kv": 2,
}

# launches per kernel group (eager PyTorch), as the tables have always stated them
LAUNCHES = dict(prefill_layer=15, decode_layer=15, attention_full=4, attention_kivi=10, score_topk=8,
                replace=6, quantize=6, projections=2, mlp=4, lm_head=3, rope=4, selective_prefill=15)

# the per-layer shape keys a cost depends on (a measured table is keyed by these)
SHAPE_KEYS = ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size")


def lowbit_bits_per_element(bits: float, group_size: int) -> float:
    """KIVI storage per K/V element: `bits` of code + a 16-bit scale and zero per group."""
    return bits + 32 / group_size


@dataclass(frozen=True)
class Shape:
    """One model's shape as the costs need it."""

    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    n_layers: int = 1
    tie_embeddings: bool = False
    kv_elem: int = 2               # bytes per K/V element (16-bit)
    weight_elem: int = 2

    @classmethod
    def of(cls, d: dict, n_layers: int | None = None, kv_elem: int = 2) -> "Shape":
        head_dim = d.get("head_dim") or d["dim"] // d["n_heads"]
        return cls(int(d["dim"]), int(d["n_heads"]), int(d["n_kv_heads"]), int(head_dim), int(d["ffn_dim"]),
                   int(d["vocab_size"]), int(n_layers or d.get("n_layers") or 1), bool(d.get("tie_embeddings", False)),
                   int(kv_elem))

    @property
    def p_attn(self) -> int:
        """q, k, v and o projection weights of one layer."""
        return self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim + self.n_heads * self.head_dim * self.dim

    @property
    def p_mlp(self) -> int:
        return 3 * self.dim * self.ffn_dim

    @property
    def kv_row(self) -> int:
        """Bytes of one token's K (or V) in one layer, all KV heads."""
        return self.n_kv_heads * self.head_dim * self.kv_elem

    def kv_row_lowbit(self, bits: float, group_size: int) -> float:
        return self.n_kv_heads * self.head_dim * lowbit_bits_per_element(bits, group_size) / 8

    def weights_bytes(self) -> int:
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return (self.n_layers * (self.p_attn + self.p_mlp) + emb) * self.weight_elem


class Roofline:
    """The roofline cost of every op the simulator's twins issue, for one GPU and one shape.
    Method names are the profile's table names; arguments are the point (seconds out)."""

    def __init__(self, shape: Shape, flops: float, hbm: float, pcie_bytes_per_s: float,
                 memory: float | None = None, assumptions: dict | None = None):
        self.s = shape
        self.flops, self.hbm, self.pcie_raw, self.memory_total = float(flops), float(hbm), float(pcie_bytes_per_s), memory
        self.a = {**ASSUMPTIONS, **(assumptions or {})}

    @classmethod
    def of_gpu(cls, gpu: dict, shape: Shape) -> "Roofline":
        gen, width = gpu["pcie"]
        return cls(shape, gpu["flops"], gpu["hbm"], PCIE_LANE[gen] * width, gpu["memory"])

    @classmethod
    def of_profile(cls, profile: dict, shape: Shape) -> "Roofline":
        d = profile["device"]
        return cls(shape, d["peak_flops"], d["hbm_bytes_per_s"], d["pcie"]["theoretical_bytes_per_s"],
                   d.get("memory_bytes"), profile["provenance"].get("assumptions"))

    def with_shape(self, shape: Shape) -> "Roofline":
        return Roofline(shape, self.flops, self.hbm, self.pcie_raw, self.memory_total, self.a)

    # -- the two roofs

    @property
    def pcie(self) -> float:
        """Pinned copy rate, bytes/s."""
        return self.pcie_raw * self.a["pcie_efficiency"]

    def kernel(self, flops: float, nbytes: float, launches: int) -> float:
        a = self.a
        return max(flops / (self.flops * a["compute_efficiency"]), nbytes / (self.hbm * a["memory_efficiency"])) \
            + launches * a["launch_s"]

    def copy(self, nbytes: float, pageable: bool = False) -> float:
        if nbytes <= 0:
            return 0.0
        rate = self.pcie * (self.a["pageable_factor"] if pageable else 1.0)
        return self.a["pcie_latency_s"] + nbytes / rate

    # -- kernels (per layer unless named otherwise)

    def prefill_layer(self, T: float) -> float:
        s, w = self.s, self.s.weight_elem
        return self.kernel(2 * T * (s.p_attn + s.p_mlp) + 2 * s.n_heads * s.head_dim * T * T,
                           (s.p_attn + s.p_mlp) * w + 12 * T * s.dim * w + 2 * T * s.kv_row, LAUNCHES["prefill_layer"])

    def decode_layer(self, rows: float) -> float:
        """A decode layer without its attention: the weight GEMMs of `rows` query rows + the
        Python glue between the layer's kernels."""
        s = self.s
        return self.kernel(2 * rows * (s.p_attn + s.p_mlp), (s.p_attn + s.p_mlp) * s.weight_elem,
                           LAUNCHES["decode_layer"]) + self.a["layer_glue_s"]

    def decode_attention_full(self, batch: float, ctx: float, rows: float | None = None) -> float:
        """`rows` query rows (default `batch`) over `batch` sequences' 16-bit K/V of `ctx` tokens:
        the K/V are read once per sequence, however many query rows it carries."""
        s, rows = self.s, batch if rows is None else rows
        return self.kernel(4 * rows * s.n_heads * s.head_dim * ctx, 2 * batch * ctx * s.kv_row, LAUNCHES["attention_full"])

    def decode_attention_kivi(self, batch: float, ctx: float, rows: float | None = None,
                              bits: float = 2, group_size: int = 64) -> float:
        """Attention over packed `bits`-bit K/V (dequantised in the kernel: 2x the FLOPs)."""
        s, rows = self.s, batch if rows is None else rows
        return self.kernel(8 * rows * s.n_heads * s.head_dim * ctx, 2 * batch * ctx * s.kv_row_lowbit(bits, group_size),
                           LAUNCHES["attention_kivi"])

    def score_topk(self, rows: float, ctx: float, bits: float = 2, group_size: int = 64,
                   batch: float | None = None) -> float:
        """q . K_lowbit over every token, and the top-k per KV head (fp32 scores written, read)."""
        s, batch = self.s, rows if batch is None else batch
        return self.kernel(4 * rows * s.n_heads * s.head_dim * ctx,
                           batch * ctx * s.kv_row_lowbit(bits, group_size) + 8 * rows * s.n_kv_heads * ctx,
                           LAUNCHES["score_topk"])

    def replace(self, rows: float, k: float) -> float:
        """Attend with k fetched 16-bit rows replacing their low-bit ones (compute only)."""
        s = self.s
        return self.kernel(4 * rows * s.n_heads * s.head_dim * k, 4 * rows * k * s.kv_row, LAUNCHES["replace"])

    def gather_host(self, nbytes: float) -> float:
        """policy.gather=host: the CPU index_selects the rows into pinned staging, then one copy."""
        if nbytes <= 0:
            return 0.0
        return self.copy(nbytes) + nbytes / self.a["host_gather_bytes_per_s"]

    def gather_device(self, nbytes: float) -> float:
        """policy.gather=device: a device kernel reads the rows from pinned host memory over the
        link (UVA): the link's rate, no host pass."""
        if nbytes <= 0:
            return 0.0
        return self.a["pcie_latency_s"] + nbytes / (self.pcie * self.a["device_gather_link_factor"])

    def gather_replace(self, batch: float, k: float) -> float:
        """The profile table: host gather of k K and V rows + their copy + the replace."""
        return self.gather_host(2 * batch * k * self.s.kv_row) + self.replace(batch, k)

    def quantize(self, T: float, bits: float = 2, group_size: int = 64) -> float:
        s = self.s
        return self.kernel(10 * T * s.n_kv_heads * s.head_dim,
                           T * (s.kv_row + s.kv_row_lowbit(bits, group_size)), LAUNCHES["quantize"])

    def projections(self, T: float) -> float:
        s = self.s
        return self.kernel(2 * T * s.p_attn, s.p_attn * s.weight_elem + 4 * T * s.dim * s.weight_elem, LAUNCHES["projections"])

    def mlp(self, T: float) -> float:
        s = self.s
        return self.kernel(2 * T * s.p_mlp, s.p_mlp * s.weight_elem + 6 * T * s.ffn_dim * s.weight_elem, LAUNCHES["mlp"])

    def lm_head_sample(self, B: float) -> float:
        s = self.s
        return self.kernel(2 * B * s.dim * s.vocab_size, s.dim * s.vocab_size * s.weight_elem + B * s.vocab_size * 4,
                           LAUNCHES["lm_head"])

    def step_overhead(self, B: float = 1) -> float:
        return self.a["step_overhead_s"]

    def rope_rerotate(self, T: float) -> float:
        s = self.s
        return self.kernel(6 * T * s.kv_row, 2 * T * s.kv_row, LAUNCHES["rope"])

    def chunk_store(self, T: float) -> float:
        n = 2 * T * self.s.kv_row
        return n / self.pcie + n / self.a["disk_bytes_per_s"]

    chunk_load = chunk_store

    def selective_prefill(self, m: float, N: float) -> float:
        s = self.s
        return self.kernel(2 * m * (s.p_attn + s.p_mlp) + 4 * s.n_heads * s.head_dim * m * N,
                           (s.p_attn + s.p_mlp) * s.weight_elem + 2 * N * s.kv_row, LAUNCHES["selective_prefill"])

    # -- transfers (bytes)

    def h2d_pinned(self, n: float) -> float:
        return self.copy(n)

    d2h_pinned = h2d_pinned

    def h2d_pageable(self, n: float) -> float:
        return self.copy(n, pageable=True)

    d2h_pageable = h2d_pageable

    # -- memory

    def activation_bytes(self) -> int:
        return int(self.a["activation_tokens"] * self.s.dim * 2 * 20)

    def kv_available_bytes(self, extra_weights: int = 0) -> int:
        """Device bytes left for KV: total - runtime overhead - weights (whole model, plus any
        `extra_weights`, e.g. a draft model) - the activation peak."""
        if self.memory_total is None:
            raise ValueError("no device memory in this roofline")
        return int(max(self.memory_total - self.a["runtime_overhead_bytes"] - self.s.weights_bytes() - extra_weights
                       - self.activation_bytes(), 0))

    # -- lower bounds the physics tests use (no efficiency, no launches)

    def decode_step_lower_bound(self, batch: int, ctx: float) -> float:
        kv = self.s.n_layers * 2 * batch * ctx * self.s.kv_row
        return (self.s.weights_bytes() + kv) / self.hbm


KERNELS = ("prefill_layer", "decode_attention_full", "decode_attention_kivi", "score_topk", "gather_replace",
           "quantize", "projections", "mlp", "lm_head_sample", "step_overhead", "decode_layer", "rope_rerotate",
           "chunk_store", "chunk_load", "selective_prefill")
TRANSFERS = ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable")
