"""Feasibility before work: what a run needs, estimated from its config before
anything is allocated or simulated, against what this machine or a documented limit allows.
A run that cannot fit is refused in one line naming the field, the need and the limit.

The runtime (runtime.bench / runtime.serve) holds, at least:
- the model's weights (bytes of the loaded parameters);
- the KV of the requests held at once, in the policy's bytes (its declaration's `kv_bytes`, the
  formula the caches are tested against) at prompt_len + gen_len tokens each: the whole batch
  in runtime.bench; in runtime.serve at most scheduler.max_batch requests, and no more than
  hardware.kv_budget_bytes when it is set;
- the prefill activations of the batch (hidden states and MLP of prompt_len tokens per row);
- runtime.serve: every request's prompt token ids (it draws them up front), PROMPT_TOKEN_BYTES each.
On CPU everything is host memory (`core.machine.memory_limits`: the machine's total RAM); on
CUDA the device part (weights, device KV, activations) is held against the GPU's memory and the
host KV (offload, SpeCache) against RAM.

runtime.serve replays arrivals in real time: its expected span (a trace's last arrival,
n_requests / rate for Poisson, (ceil(n_requests / users) - 1) x think_s closed) may be at most SERVE_MAX_SPAN_S.

The simulator holds one Request per request and does work per decoded token of every running
request (one event per iteration, a batch's bookkeeping per step): at most SIM_MAX_REQUESTS
requests and SIM_MAX_TOKEN_STEPS[fidelity] token-steps (requests x gen_len; the detailed fidelity
runs a SimPy process per op, so its limit counts token-steps x layers). Measured on the 2-core
box: the fast fidelity ~250 k token-steps/s, the detailed one ~20 k token-layer-steps/s, so each
limit is a few minutes of simulation.
"""
from __future__ import annotations

import math

from core.errors import ConfigError
from core.policies import ModelShape, PolicyConfig, kv_dtype_name

SIM_MAX_REQUESTS = 2_000_000
SIM_MAX_TOKEN_STEPS = {"fast": 50_000_000, "detailed": 5_000_000}
SERVE_MAX_SPAN_S = 24 * 3600.0
PROMPT_TOKEN_BYTES = 36          # a prompt token id held as a Python int in a list (8 + 28)
ACTIVATION_BYTES = 4             # float32 activations on CPU (the conservative case)

GIB = 2 ** 30


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def n_requests(w) -> int:
    """How many requests a workload sends (a trace: its rows, read and checked)."""
    if w.arrival == "static":
        return int(w.batch)
    if w.arrival == "trace":
        from core.workload import read_trace

        return len(read_trace(w.trace))
    return int(w.n_requests)


def _which(w) -> str:
    return "workload.batch" if w.arrival == "static" else ("workload.trace" if w.arrival == "trace" else "workload.n_requests")


def kv_per_request(spec: PolicyConfig, shape: ModelShape, tokens: int) -> tuple[int, int]:
    """(device, host) KV bytes of one request at `tokens`, in the policy's bytes."""
    return spec.kv_bytes([int(tokens)], shape)


def check_runtime(cfg, runner: str, spec: PolicyConfig, shape: ModelShape, *, weights_bytes: int, dim: int,
                  ffn_dim: int, host_bytes: int, device_bytes: int | None) -> dict:
    """Refuse a runtime run whose estimated memory exceeds the machine's; returns the estimate.
    device_bytes None: a CPU run (everything is host memory)."""
    w = cfg.workload
    ctx = int(w.prompt_len) + int(w.gen_len)
    d1, h1 = kv_per_request(spec, shape, ctx)
    n = n_requests(w)
    if runner == "runtime.bench":
        held, field = int(w.batch), "workload.batch"
        kv_dev, kv_host = held * d1, held * h1
        prompts = 0
    else:
        held = min(n, int(cfg.scheduler.max_batch))
        field = f"{_which(w)} / scheduler.max_batch"
        kv_dev, kv_host = held * d1, held * h1
        budget = cfg.hardware.get("kv_budget_bytes")
        if budget is not None:
            kv_dev = min(kv_dev, int(budget))
        host_cap = cfg.hardware.get("host_memory_bytes")
        if host_cap is not None:
            kv_host = min(kv_host, int(host_cap))
        prompts = n * int(w.prompt_len) * PROMPT_TOKEN_BYTES
        check_span(w, n)
    rows = held if runner == "runtime.bench" else min(held, int(cfg.scheduler.max_batch))
    act = rows * int(w.prompt_len) * (4 * dim + 3 * ffn_dim) * ACTIVATION_BYTES
    est = {"weights": weights_bytes, "kv_device": kv_dev, "kv_host": kv_host, "activations": act, "prompts": prompts}
    pol = f"policy={spec.name}'s {shape.kv_dtype} bytes"
    if device_bytes is None:
        need = weights_bytes + kv_dev + kv_host + act + prompts
        if need > host_bytes:
            raise ConfigError(f"{field}: the run needs ~{_gib(need)} of memory (weights {_gib(weights_bytes)} + KV of "
                              f"{held} x {ctx} tokens in {pol} {_gib(kv_dev + kv_host)} + activations {_gib(act)}"
                              + (f" + prompts {_gib(prompts)}" if prompts else "") + f") but this machine has "
                              f"{_gib(host_bytes)}; lower {field.split(' / ')[0]}, workload.prompt_len or "
                              "workload.gen_len, or pick a smaller policy")
    else:
        need = weights_bytes + kv_dev + act
        if need > device_bytes:
            raise ConfigError(f"{field}: the run needs ~{_gib(need)} of device memory (weights {_gib(weights_bytes)} "
                              f"+ KV of {held} x {ctx} tokens in {pol} {_gib(kv_dev)} + activations {_gib(act)}) but "
                              f"the GPU has {_gib(device_bytes)}; lower {field.split(' / ')[0]}, workload.prompt_len "
                              "or workload.gen_len, or pick a smaller policy")
        if kv_host + prompts > host_bytes:
            raise ConfigError(f"{field}: the run needs ~{_gib(kv_host + prompts)} of host memory (host KV of {held} x "
                              f"{ctx} tokens in {pol}" + (f" + prompts {_gib(prompts)}" if prompts else "")
                              + f") but this machine has {_gib(host_bytes)}; lower {field.split(' / ')[0]} or "
                              "workload.prompt_len")
    return est


def check_runtime_memory(cfg, runner: str, spec: PolicyConfig, model, device) -> dict:
    """check_runtime for a loaded runtime model (its `args` and parameters) on `device`."""
    from core.machine import memory_limits

    a = model.args
    shape = ModelShape(a.n_layers, a.n_kv_heads, a.head_dim, kv_dtype_name(cfg.policy.kv_dtype, device.type))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    host, dev = memory_limits(device)
    return check_runtime(cfg, runner, spec, shape, weights_bytes=weights, dim=a.dim, ffn_dim=a.ffn_dim,
                         host_bytes=host, device_bytes=dev)


def check_span(w, n: int) -> None:
    """runtime.serve waits for arrivals in real time: refuse a replay longer than SERVE_MAX_SPAN_S."""
    if w.arrival in ("poisson", "gamma"):
        span, field = n / float(w.rate), "workload.rate"
    elif w.arrival == "closed":
        # each user sends its next request think_s after its last one: the last of n waits
        # ceil(n / users) - 1 pauses (the requests' own service time comes on top)
        span, field = (math.ceil(n / max(int(w.users), 1)) - 1) * float(w.think_s), "workload.think_s"
    elif w.arrival == "trace":
        from core.workload import read_trace

        span, field = max((r.arrival_s for r in read_trace(w.trace)), default=0.0), "workload.trace"
    else:
        return
    if span > SERVE_MAX_SPAN_S:
        raise ConfigError(f"{field}: runtime.serve replays arrivals in real time and this workload spans "
                          f"~{span:.3g} s, beyond its limit of {SERVE_MAX_SPAN_S:.0f} s (24 h); raise workload.rate, "
                          "shorten the trace or send fewer requests (python -m simulator.run has no such limit)")


def check_simulation(cfg, n_layers: int) -> dict:
    """Refuse a simulation beyond SIM_MAX_REQUESTS requests or SIM_MAX_TOKEN_STEPS; returns the estimate."""
    w = cfg.workload
    field = _which(w)
    if w.arrival == "trace":
        from core.workload import read_trace

        trace = read_trace(w.trace)
        n, steps = len(trace), sum(r.gen_len for r in trace)
    else:
        n = n_requests(w)
        steps = n * int(w.gen_len)
    if n > SIM_MAX_REQUESTS:
        raise ConfigError(f"{field}: the simulation would hold {n} requests, beyond its limit of {SIM_MAX_REQUESTS} "
                          "(core/feasibility.py); simulate fewer requests")
    fidelity = str(cfg.get("fidelity", "fast"))
    work = steps * (n_layers if fidelity == "detailed" else 1)
    limit = SIM_MAX_TOKEN_STEPS.get(fidelity, SIM_MAX_TOKEN_STEPS["fast"])
    if work > limit:
        what = "token-steps x layers" if fidelity == "detailed" else "token-steps (requests x gen_len)"
        raise ConfigError(f"{field} / workload.gen_len: the simulation needs {work:.3g} {what} at fidelity={fidelity}, "
                          f"beyond its limit of {limit:.3g} (minutes of simulation; core/feasibility.py); lower "
                          f"{field} or workload.gen_len" + (", or use fidelity=fast" if fidelity == "detailed" else ""))
    return {"requests": n, "work": work}
