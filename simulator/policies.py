"""Per-step operation graphs of each KV policy: what runs on which engine, after what.

One twin per runtime policy (runtime/kv/), with the same names and knobs. A step is a list of
`Op`s in *issue order*; each engine (compute, h2d, d2h) is an in-order stream, as a CUDA stream
is: an op starts when its dependencies have ended and the previous op issued to its engine has
ended. hardware.py executes such a graph in two fidelities (SimPy processes, or a recurrence).

Copy/compute interference (the profile's `transfers.overlap.gemm_slowdown_with_copy` = s):
a compute op that runs *beside* a copy by design (offload: layer i beside the fetch of layer
i+1; specache with prefetch: layer i+1 beside the gather issued after layer i; offload/specache
prefill: layer i+1 beside the D2H store of layer i) is taken to start with it, and runs at 1/s of
its speed while the copy lasts: duration = d + min(d (s - 1), c (1 - 1/s)) for compute d and
copy c. The stretch is computed here, when the graph is built, so both fidelities see the same
durations. One-token write-backs (D2H) are too small to count and are not stretched against.

SpeCache's speculative token (prefetch=True): the step carries a second query row per request
(the real token and the guess), so its layer, attention, score and replace costs are looked up at
2 x batch query rows; the fetched rows are the batch's k rows per KV head (one set per request).
The runtime's storing-nothing first pass after prefill is not modelled (one pass per request).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.errors import ConfigError

from runtime.profile.schema import bits_table

from .costs import Costs, ModelShape

ENGINES = ("compute", "h2d", "d2h")


@dataclass(frozen=True)
class Op:
    name: str
    engine: str            # compute | h2d | d2h
    seconds: float
    deps: tuple[str, ...] = ()


def beside(d: float, c: float, s: float) -> float:
    """Compute d seconds long, started with a copy c seconds long that slows it by s."""
    if c <= 0 or s <= 1:
        return d
    return d + min(d * (s - 1), c * (1 - 1 / s))


# ----------------------------------------------------------------------------- the twins

@dataclass
class Policy:
    """The twin of runtime/kv/full.py: every token in device memory."""

    name: str = "full"
    kv_dtype: str = "auto"
    attn_table = "decode_attention_full"

    def tables(self) -> tuple[str, ...]:
        return ("decode_layer", "step_overhead", "lm_head_sample", "prefill_layer", self.attn_table)

    def key(self) -> tuple:
        return tuple(sorted(vars(self).items()))

    # -- bytes (must equal the runtime's KVCache.nbytes() for the same config and tokens)

    def layer_bytes(self, tokens: list[int], s: ModelShape) -> tuple[float, float]:
        """(device, host) bytes of one layer holding a batch with these real-token counts."""
        return 2 * sum(tokens) * s.kv_row, 0

    def kv_bytes(self, tokens: list[int], s: ModelShape) -> tuple[int, int]:
        d, h = self.layer_bytes(tokens, s)
        return s.n_layers * int(round(d)), s.n_layers * int(round(h))

    def reserve_bytes(self, n: int, s: ModelShape) -> int:
        """Device bytes to reserve for a request that will reach n tokens: the most it holds
        at any length up to n (the low-bit policies shrink when a group is quantized)."""
        return max(self.kv_bytes([m], s)[0] for m in self.peak_lengths(n))

    def peak_lengths(self, n: int) -> list[int]:
        return [n]

    def reserve_host_bytes(self, n: int, s: ModelShape) -> int:
        """Host bytes to reserve for a request that will reach n tokens (its host KV only grows)."""
        return self.kv_bytes([n], s)[1]

    # -- step graphs

    def query_rows(self, batch: int) -> int:
        return batch

    def prefill_graph(self, c: Costs, s: ModelShape, prompts: list[int]) -> list[Op]:
        n = len(prompts)
        # the runtime prefills a batch left-padded to its longest prompt: every row costs that
        per_layer = n * c.table("prefill_layer")(max(prompts)) + self.prefill_extra(c, prompts)
        stored = self.prefill_store_bytes(s, prompts)
        store = c.d2h(stored)                  # per layer, to put the prompt's K/V in host memory
        ops = [Op("overhead", "compute", c.table("step_overhead")(n))]
        prev = "overhead"
        for i in range(s.n_layers):
            d = beside(per_layer, store, c.gemm_slowdown) if (i > 0 and store) else per_layer
            d += c.issue_cost(stored)
            ops.append(Op(f"layer{i}", "compute", d, (prev,)))
            prev = f"layer{i}"
            if store:
                ops.append(Op(f"store{i}", c.engine("d2h"), store, (prev,)))
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(n), (prev,)))
        return ops

    def prefill_extra(self, c: Costs, prompts: list[int]) -> float:
        return 0.0

    def prefill_store_bytes(self, s: ModelShape, prompts: list[int]) -> int:
        """Bytes per layer the prefill writes to the host (0: the policy keeps none there)."""
        return 0

    def layer_compute(self, c: Costs, s: ModelShape, batch: int, ctx: float) -> float:
        return c.decode_layer(batch, ctx, self.attn_table, rows=self.query_rows(batch))

    def decode_graph(self, c: Costs, s: ModelShape, batch: int, ctx: float) -> list[Op]:
        """One decode step of `batch` requests whose contexts average `ctx` tokens."""
        layer = self.layer_compute(c, s, batch, ctx)
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            ops.append(Op(f"layer{i}", "compute", layer, (prev,)))
            prev = f"layer{i}"
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(self.query_rows(batch)), (prev,)))
        return ops


@dataclass
class Offload(Policy):
    """runtime/kv/offload.py: every layer on the host, two device slots; layer i+1 is fetched
    while layer i computes (the last layer fetches layer 0 for the next step)."""

    name: str = "offload"

    def tables(self):
        return super().tables() + ("h2d_pinned", "d2h_pinned")

    def layer_bytes(self, tokens, s):
        host = 2 * sum(tokens) * s.kv_row
        return int(host * min(2, s.n_layers) / s.n_layers), host

    def kv_bytes(self, tokens, s):
        d, h = self.layer_bytes(tokens, s)
        return s.n_layers * d, s.n_layers * h

    def prefill_store_bytes(self, s, prompts):
        return 2 * sum(prompts) * s.kv_row

    def decode_graph(self, c, s, batch, ctx):
        layer = self.layer_compute(c, s, batch, ctx)
        fetch = c.h2d(2 * batch * ctx * s.kv_row)
        back = c.d2h(2 * batch * s.kv_row)                 # this step's token, written back
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            deps = (prev,) if i == 0 else (prev, f"fetch{i}")
            nxt = (i + 1) % s.n_layers
            # the slot of layer i+1 frees when layer i-1 is done: the fetch waits for it
            ops.append(Op(f"fetch{nxt}" if nxt else "fetch0_next", c.engine("h2d"), fetch, (prev,)))
            d = beside(layer, fetch, c.gemm_slowdown) + c.issue_cost(2 * batch * (ctx + 1) * s.kv_row)
            ops.append(Op(f"layer{i}", "compute", d, deps))
            prev = f"layer{i}"
            ops.append(Op(f"back{i}", c.engine("d2h"), back, (prev,)))
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(batch), (prev,)))
        return ops


@dataclass
class Kivi(Policy):
    """runtime/kv/kivi.py: packed low-bit K/V + a full-precision residual window."""

    name: str = "kivi"
    bits: int = 2
    group_size: int = 64
    residual: int = 64
    one_bit_rule: str = "specache"

    @property
    def attn_table(self) -> str:
        """The profile's KIVI attention table for these bits (decode_attention_kivi[_<b>bit])."""
        return bits_table("decode_attention_kivi", self.bits)

    def tables(self):
        return super().tables() + (bits_table("quantize", self.bits),)

    def quantized(self, n: int) -> tuple[int, int]:
        """(keys, values) quantized at n tokens: keys a whole group at a time once the residual
        overflows, values token by token."""
        G, R = self.group_size, self.residual
        return (G * math.ceil((n - R) / G) if n > R else 0), max(n - R, 0)

    def layer_bytes(self, tokens, s):
        D, e, H = s.head_dim, s.kv_elem, s.n_kv_heads
        cg = min(self.group_size, D)
        codes = D * self.bits / 8
        dev = 0.0
        for n in tokens:
            kq, vq = self.quantized(n)
            dev += kq * H * (codes + 2 * D * e / self.group_size)       # + scale, zero per group of keys
            dev += vq * H * (codes + 2 * (D // cg) * e)                 # + scale, zero per value group
            dev += ((n - kq) + (n - vq)) * H * D * e                    # the residual window
        return dev, 0

    def peak_lengths(self, n):
        # bytes grow with n between key quantizations and drop at each: the peak up to n is at n
        # or just before the last quantization (n' with one group fewer quantized)
        kq, _ = self.quantized(n)
        if kq == 0:
            return [n]
        return [n, self.residual + kq - self.group_size]

    def prefill_extra(self, c, prompts):
        return sum(c.quantize(t, self.bits, self.group_size) for t in prompts)

    def layer_compute(self, c, s, batch, ctx):
        return c.decode_layer(batch, ctx, self.attn_table, rows=self.query_rows(batch),
                              bits=self.bits, group_size=self.group_size)


@dataclass
class Specache(Kivi):
    """runtime/kv/specache.py: a kivi copy on the device, 16-bit K/V on the host, k rows per
    KV head fetched every step (k = 0: exactly kivi; k beyond the quantized keys: clamped)."""

    name: str = "specache"
    k: int = 64
    prefetch: bool = True
    gather: str = "host"        # host: CPU index_select + copy | device: a device kernel reads pinned host rows (UVA)

    def tables(self):
        # gather=device on a measured GPU profile also reads transfers.gather_device (Costs.gather)
        return super().tables() + (bits_table("score_topk", self.bits), bits_table("gather_replace", self.bits),
                                   "gather", "d2h_pinned")

    def k_eff(self, ctx: float) -> int:
        return min(self.k, self.quantized(int(ctx))[0])

    def layer_bytes(self, tokens, s):
        dev, _ = super().layer_bytes(tokens, s)
        fetched = sum(2 * s.n_kv_heads * min(self.k, self.quantized(n)[0]) * s.head_dim * s.kv_elem for n in tokens)
        return dev + fetched, 2 * sum(tokens) * s.kv_row

    def peak_lengths(self, n):
        return sorted(set(super().peak_lengths(n)))

    def query_rows(self, batch):
        return 2 * batch if (self.prefetch and self.k > 0) else batch

    def prefill_store_bytes(self, s, prompts):
        return 2 * sum(prompts) * s.kv_row

    def decode_graph(self, c, s, batch, ctx):
        if self.k == 0:                                   # the runtime runs plain kivi
            return Kivi.decode_graph(self, c, s, batch, ctx)
        rows = self.query_rows(batch)
        k = self.k_eff(ctx)
        attend = c.decode_layer(batch, ctx, self.attn_table, rows=rows, bits=self.bits, group_size=self.group_size) \
            + c.score_topk(rows, ctx, self.bits, self.group_size, batch=batch)
        replace = c.replace(rows, k, s, self.bits)
        fetch = c.gather(2 * batch * k * s.kv_row, self.gather)
        back = c.d2h(2 * batch * s.kv_row)
        ops = [Op("overhead", "compute", c.table("step_overhead")(batch))]
        prev = "overhead"
        for i in range(s.n_layers):
            if self.prefetch:
                # rows for this step were fetched during the previous one; this layer's guess
                # picks the next step's rows, fetched beside the next layer's compute
                d = attend + replace + c.issue_cost(2 * batch * (k + 1) * s.kv_row)
                ops.append(Op(f"layer{i}", "compute", beside(d, fetch, c.gemm_slowdown) if i else d, (prev,)))
                prev = f"layer{i}"
                ops.append(Op(f"fetch{i}", c.engine("h2d"), fetch, (prev,)))
            else:
                # score -> fetch -> attend with the rows: the fetch is on the critical path
                ops.append(Op(f"score{i}", "compute", attend, (prev,)))
                ops.append(Op(f"fetch{i}", c.engine("h2d"), fetch, (f"score{i}",)))
                ops.append(Op(f"layer{i}", "compute", replace + c.issue_cost(2 * batch * (k + 1) * s.kv_row),
                              (f"fetch{i}",)))
                prev = f"layer{i}"
            ops.append(Op(f"back{i}", c.engine("d2h"), back, (prev,)))
        ops.append(Op("lm_head", "compute", c.table("lm_head_sample")(rows), (prev,)))
        return ops


POLICIES = {"full": Policy, "offload": Offload, "kivi": Kivi, "specache": Specache}


def make_policy(cfg) -> Policy:
    """The twin of a policy config (`name` and its knobs, as in conf/policy/*.yaml)."""
    name = cfg.get("name") if hasattr(cfg, "get") else getattr(cfg, "name", None)
    known = all_policies()
    if name not in known:
        raise ConfigError(f"policy={name!r} is not known; choose one of: {', '.join([*sorted(POLICIES), *sorted(set(known) - set(POLICIES))])}")
    cls = known[name]
    knobs = {f: cfg[f] for f in cls.__dataclass_fields__ if f in cfg}
    pol = cls(**knobs)
    check(pol)
    return pol


def all_policies() -> dict:
    """POLICIES plus the twins in their own modules (imported here: they subclass Policy)."""
    from .rag import Rag
    return {**POLICIES, "rag": Rag}


def check(p: Policy) -> None:
    from . import rag
    if isinstance(p, rag.Rag):
        rag.check(p)
    if isinstance(p, Kivi):
        from runtime.kv.kivi import check_knobs
        check_knobs(p)
    if isinstance(p, Specache) and p.k < 0:
        raise ConfigError(f"policy.k={p.k} must be >= 0 (0 = plain KIVI; k beyond the context is clamped)")
    if isinstance(p, Specache) and p.gather not in ("host", "device"):
        raise ConfigError(f"policy.gather={p.gather!r} is not known; choose one of: host, device")
