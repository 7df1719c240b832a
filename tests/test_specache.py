"""SpeCache, offload and the transfer layer against kivi, full and naive references."""
import time
from types import SimpleNamespace

import pytest
import torch

from runtime.engine import SamplingParams, generate, prefill_once
from core.errors import ConfigError
from runtime.kv import CacheShape, Step, make_cache
from runtime.kv.specache import SpeCacheKV
from runtime.transfer import DirectLink, EmulatedLink, gather_rows

FULL = SimpleNamespace(name="full", kv_dtype="float32")
OFFLOAD = SimpleNamespace(name="offload", kv_dtype="float32")


def spec(**kw):
    base = dict(name="specache", kv_dtype="float32", bits=2, group_size=8, residual=16,
                one_bit_rule="specache", k=4, prefetch=False)
    return SimpleNamespace(**{**base, **kw})


def kivi(**kw):
    base = dict(name="kivi", kv_dtype="float32", bits=2, group_size=8, residual=16, one_bit_rule="specache")
    return SimpleNamespace(**{**base, **kw})


def _logits_trace(model, prompts, policy, steps=6):
    """Greedy tokens and every step's logits, via the engine's own prefill/decode functions."""
    from runtime.engine import decode_step, left_pad, prefill

    a = model.args
    tokens, pad = left_pad(prompts, a.pad_id, torch.device("cpu"))
    cache = make_cache(policy, n_layers=a.n_layers, batch=len(prompts), n_kv_heads=a.n_kv_heads,
                       head_dim=a.head_dim, capacity=tokens.shape[1] + steps + 1, device=torch.device("cpu"))
    logits = [prefill(model, cache, tokens, pad)]
    for _ in range(steps):
        logits.append(decode_step(model, cache, logits[-1].argmax(-1), pad))
    return torch.stack(logits, 1)


PROMPTS = [list(range(3, 60)), list(range(100, 130))]   # different lengths: left padding


def test_k0_is_exactly_kivi(tiny_model):
    a = _logits_trace(tiny_model, PROMPTS, spec(k=0))
    b = _logits_trace(tiny_model, PROMPTS, kivi())
    assert torch.equal(a, b)


def test_k_beyond_context_is_full(tiny_model):
    a = _logits_trace(tiny_model, PROMPTS, spec(k=10_000))
    b = _logits_trace(tiny_model, PROMPTS, FULL)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    c = _logits_trace(tiny_model, PROMPTS, kivi())
    assert (c - b).abs().max() > 1e-2          # the low-bit cache alone is visibly different


def test_offload_is_full(tiny_model):
    a = _logits_trace(tiny_model, PROMPTS, OFFLOAD)
    b = _logits_trace(tiny_model, PROMPTS, FULL)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    r = generate(tiny_model, PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True), OFFLOAD)
    f = generate(tiny_model, PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True), FULL)
    assert [q.tokens for q in r.requests] == [q.tokens for q in f.requests]
    assert r.kv_bytes_host == f.kv_bytes_device                    # everything lives on the host
    L = tiny_model.args.n_layers
    assert r.kv_bytes_device == f.kv_bytes_device * min(2, L) // L   # two layers resident at most


def test_offload_with_emulated_link_is_full(tiny_model):
    link = EmulatedLink(gbps=2.0, latency_us=5)
    try:
        r = generate(tiny_model, PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True), OFFLOAD, link=link)
    finally:
        link.close()
    f = generate(tiny_model, PROMPTS, SamplingParams(max_new_tokens=5, ignore_eos=True), FULL)
    assert [q.tokens for q in r.requests] == [q.tokens for q in f.requests]
    assert link.stats.copies > 0 and link.stats.bytes > 0


def _naive_select(s_low, pad, k, group, n, rows):
    """Per KV head: sum over its query heads (and chosen queries) of softmax over real columns."""
    B, H, _, kq = s_low.shape
    out = []
    for b in range(B):
        heads = []
        for h in range(H):
            mass = torch.zeros(kq)
            for g in range(group):
                for t in rows:
                    s = s_low[b, h, g * n + t].clone()
                    s[: pad[b]] = -float("inf")
                    mass += torch.softmax(s, -1)
            order = [int(i) for i in torch.argsort(mass, descending=True) if i >= pad[b]]
            heads.append(set(order[:k]))
        out.append(heads)
    return out


def test_topk_matches_naive_and_never_picks_pads():
    g = torch.Generator().manual_seed(0)
    B, H, group, n, kq, k = 2, 3, 3, 2, 24, 5
    shape = CacheShape(1, B, H, 16, 64, torch.float32, torch.device("cpu"))
    layer = SpeCacheKV(spec(k=k), shape)
    layer.pad = torch.tensor([0, 21])           # row 1 has only 3 real quantized columns
    s_low = torch.randn(B, H, group * n, kq, generator=g) * 3
    idx, valid = layer.select(s_low, slice(0, 1), group, n)
    want = _naive_select(s_low, layer.pad, k, group, n, [0])
    for b in range(B):
        for h in range(H):
            chosen = {int(i) for i, ok in zip(idx[b, h], valid[b, h]) if ok}
            assert chosen == want[b][h]
            assert all(i >= layer.pad[b] for i in chosen)
    assert valid[1].sum(-1).tolist() == [3, 3, 3]     # fewer real columns than k: the rest invalid


def test_prefetch_same_tokens_when_every_prefetched_row_hits(tiny_model):
    # prompt 33 -> 24 quantized keys, 9 residual: 6 decode steps quantize no new key group, so the
    # guess-chosen set (k >= context) holds every quantized row and recall is 1
    prompt = list(range(3, 36))
    p = SamplingParams(max_new_tokens=7, ignore_eos=True)
    on = generate(tiny_model, [prompt], p, spec(k=1000, prefetch=True))
    off = generate(tiny_model, [prompt], p, spec(k=1000, prefetch=False))
    full = generate(tiny_model, [prompt], p, FULL)
    assert on.requests[0].tokens == off.requests[0].tokens == full.requests[0].tokens
    assert on.policy_stats["topk_recall"] == 1.0
    assert 0.0 <= on.policy_stats["guess_accuracy"] <= 1.0


def test_prefetch_reports_recall_and_guess_accuracy(tiny_model):
    prompt = list(range(3, 90))
    r = generate(tiny_model, [prompt, prompt[:50]], SamplingParams(max_new_tokens=12, ignore_eos=True),
                 spec(k=4, prefetch=True))
    st = r.policy_stats
    assert 0.0 <= st["topk_recall"] <= 1.0 and 0.0 <= st["guess_accuracy"] <= 1.0
    assert st["fetched_rows"] > 0
    assert all(len(q.tokens) == 12 for q in r.requests)


def test_specache_shared_prefill_equals_own_prefill(tiny_model):
    prompts = PROMPTS
    pre = prefill_once(tiny_model, prompts, kv_dtype="float32")
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    for pol in (spec(k=4), kivi(), FULL, OFFLOAD):
        a = generate(tiny_model, prompts, p, pol, prefilled=pre)
        b = generate(tiny_model, prompts, p, pol)
        assert [q.tokens for q in a.requests] == [q.tokens for q in b.requests], pol.name


def test_specache_bytes_formula():
    N, H, D, k = 4096, 2, 64, 64
    shape = CacheShape(1, 1, H, D, N, torch.float16, torch.device("cpu"))
    layer = SpeCacheKV(spec(kv_dtype="float16", bits=2, group_size=64, residual=64, k=k), shape)
    x = torch.randn(1, H, N, D, dtype=torch.float16)
    layer.load(x, x, Step(0, N, torch.zeros(1, dtype=torch.long), torch.zeros(1, N, dtype=torch.long)))
    dev, host = layer.nbytes()
    fp16 = N * 2 * H * D * 2
    assert host == fp16
    exact = ((N - 64) * (2 + 32 / 64) / 16 + 64 + k) / N
    assert dev / fp16 == pytest.approx(exact, rel=1e-9)
    assert dev / fp16 <= (2 + 32 / 64) / 16 + (64 + k) / N <= 0.19


def test_gather_rows_matches_loop():
    g = torch.Generator().manual_seed(0)
    store = torch.randn(2, 3, 50, 8, generator=g)
    idx = torch.randint(0, 40, (2, 3, 7), generator=g)
    out = torch.empty(2, 3, 7, 8)
    gather_rows(store, idx, out)
    for b in range(2):
        for h in range(3):
            for j in range(7):
                assert torch.equal(out[b, h, j], store[b, h, idx[b, h, j]])


def test_emulated_link_copies_and_completes_no_earlier_than_its_deadline():
    link = EmulatedLink(gbps=0.5, latency_us=200)
    try:
        src = torch.randn(1 << 18)            # 1 MiB
        dst = torch.empty_like(src)
        t0 = time.perf_counter()
        t = link.copy(dst, src)
        t2 = link.copy(torch.empty_like(src), src)     # queued behind the first on the same link
        t.wait()
        first = time.perf_counter() - t0
        t2.wait()
        both = time.perf_counter() - t0
    finally:
        link.close()
    assert torch.equal(dst, src)
    one = 200e-6 + src.numel() * 4 / 0.5e9           # ~2.3 ms
    assert first >= one and both >= 2 * one
    assert link.stats.bytes == 2 * src.numel() * 4


def test_direct_link_copies_at_once():
    link = DirectLink()
    src, dst = torch.randn(10), torch.empty(10)
    link.copy(dst, src).wait()
    assert torch.equal(dst, src)


def test_bad_specache_knobs():
    with pytest.raises(ConfigError, match=r"policy.k=-1 must be >= 0"):
        make_cache(spec(k=-1), n_layers=1, batch=1, n_kv_heads=1, head_dim=16, capacity=8, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"hardware.link.gbps=0"):
        EmulatedLink(gbps=0)


@pytest.mark.parametrize("policy", [kivi(), spec(k=4), spec(k=4, prefetch=True), OFFLOAD], ids=lambda p: p.name)
@pytest.mark.parametrize("emulated", [False, True], ids=["direct", "emulated-link"])
def test_policies_grow_past_their_capacity(tiny_model, policy, emulated):
    from runtime.engine import decode_step, prefill

    a = tiny_model.args
    pad = torch.zeros(1, dtype=torch.long)
    outs = []
    link = EmulatedLink(gbps=1.0) if emulated else None
    for cap in (4, 200):   # 4: every buffer has to grow, several times (with copies in flight)
        cache = make_cache(policy, n_layers=a.n_layers, batch=1, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                           capacity=cap, device=torch.device("cpu"), link=link)
        logits = [prefill(tiny_model, cache, torch.tensor([list(range(3, 30))]), pad)]
        for t in range(40):
            logits.append(decode_step(tiny_model, cache, torch.tensor([t + 5]), pad))
        outs.append(torch.stack(logits))
    if link is not None:
        link.close()
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_emulated_link_under_inference_mode_and_failures_surface():
    link = EmulatedLink(gbps=4.0)
    try:
        with torch.inference_mode():
            src, dst = torch.randn(1000), torch.empty(1000)   # inference tensors
            link.copy(dst, src).wait()
        assert torch.equal(dst, src)
        bad = link.copy(torch.empty(3), torch.randn(4))      # shape mismatch: surfaces at wait()
        with pytest.raises(RuntimeError, match="emulated link copy failed"):
            bad.wait()
    finally:
        link.close()


# ----------------------------------------------------------------------------- policy.gather


@pytest.mark.parametrize("prefetch", [False, True])
def test_device_gather_gives_the_host_gathers_logits(tiny_model, prefetch):
    """policy.gather=device (rows straight into the device buffers, no staging) reads the same
    rows as the host gather: identical logits, step by step."""
    a = _logits_trace(tiny_model, PROMPTS, spec(k=4, prefetch=prefetch, gather="host"))
    b = _logits_trace(tiny_model, PROMPTS, spec(k=4, prefetch=prefetch, gather="device"))
    assert torch.equal(a, b)


def test_device_gather_over_emulated_link_same_tokens_and_bytes(tiny_model):
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    runs = {}
    for g in ("host", "device"):
        link = EmulatedLink(gbps=50, latency_us=1)
        runs[g] = (generate(tiny_model, PROMPTS, p, spec(k=4, gather=g), link=link), link.stats)
    (h, hs), (d, ds) = runs["host"], runs["device"]
    assert [r.tokens for r in h.requests] == [r.tokens for r in d.requests]
    # the same rows cross the link; the device gather needs no staging buffers
    assert ds.bytes == hs.bytes and ds.copies == hs.copies
    assert h.policy_stats["fetched_rows"] == d.policy_stats["fetched_rows"] > 0


def test_link_gather_matches_loop_and_meets_its_deadline():
    g = torch.Generator().manual_seed(1)
    store = torch.randn(2, 3, 50, 8, generator=g)
    idx = torch.randint(0, 50, (2, 3, 5), generator=g)
    want = torch.stack([torch.stack([store[b, h, idx[b, h]] for h in range(3)]) for b in range(2)])
    out = torch.empty(2, 3, 5, 8)
    assert DirectLink().gather(out, store, idx) is not None and torch.equal(out, want)
    link = EmulatedLink(gbps=0.01, latency_us=100)       # 960 bytes at 10 MB/s + 100 us = 196 us
    out2 = torch.empty(2, 3, 5, 8)
    t0 = time.perf_counter()
    link.gather(out2, store, idx).wait()
    assert torch.equal(out2, want)
    assert time.perf_counter() - t0 >= 100e-6 + out2.numel() * 4 / 0.01e9
    assert link.stats.bytes == out2.numel() * 4 and link.stats.copies == 1


def test_bad_gather_knob_is_one_line():
    shape = CacheShape(1, 1, 2, 8, 32, torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="policy.gather='gpu'.*host, device"):
        SpeCacheKV(spec(gather="gpu"), shape)
