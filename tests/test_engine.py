"""Batched engine: cached decode against recomputation, padding, stopping, sampling, accounting."""
import math

import pytest
import torch
from scipy import stats

from runtime.engine import SamplingParams, generate, left_pad, sample
from core.errors import ConfigError
from runtime.kv import Step, make_cache

from .conftest import Policy


def _full_forward_last(model, ids):
    """Logits of the last token by a from-scratch pass over the whole sequence (no reuse)."""
    a = model.args
    cache = make_cache(Policy(), n_layers=a.n_layers, batch=1, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                       capacity=len(ids), device=torch.device("cpu"))
    n = len(ids)
    step = Step(0, n, torch.zeros(1, dtype=torch.long), torch.arange(n)[None])
    return model(torch.tensor([ids]), cache, step)[0, -1]


def test_cached_greedy_equals_recompute(tiny_model):
    prompt = list(range(5, 25))
    r = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=12, ignore_eos=True), Policy())
    seq = list(prompt)
    for tok in r.requests[0].tokens:
        assert _full_forward_last(tiny_model, seq).argmax().item() == tok
        seq.append(tok)


def test_batched_left_padding_equals_one_by_one(tiny_model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 31, 1, 18)]
    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batched = generate(tiny_model, prompts, p, Policy())
    for prompt, req in zip(prompts, batched.requests):
        alone = generate(tiny_model, [prompt], p, Policy())
        assert req.tokens == alone.requests[0].tokens
        assert req.prompt_len == len(prompt)


def test_left_pad_layout():
    tokens, pad = left_pad([[5, 6], [7, 8, 9]], pad_id=0, device=torch.device("cpu"))
    assert tokens.tolist() == [[0, 5, 6], [7, 8, 9]] and pad.tolist() == [1, 0]


def test_eos_stops_a_row_and_ignore_eos_does_not(tiny_model):
    prompt = list(range(40, 60))
    free = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True), Policy())
    toks = free.requests[0].tokens
    eos = toks[3]
    first = toks.index(eos)                     # the first time that token appears
    tiny_model.args.eos_id = eos
    try:
        stop = generate(tiny_model, [prompt, list(range(100, 110))], SamplingParams(max_new_tokens=8), Policy())
        kept = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True), Policy())
    finally:
        tiny_model.args.eos_id = 2
    assert stop.requests[0].tokens == toks[: first + 1] and stop.requests[0].finished_by_eos
    assert kept.requests[0].tokens == toks and not kept.requests[0].finished_by_eos


def test_temperature_sampling_is_seeded(tiny_model):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    a = generate(tiny_model, [list(range(3, 13))], p, Policy()).requests[0].tokens
    b = generate(tiny_model, [list(range(3, 13))], p, Policy()).requests[0].tokens
    c = generate(tiny_model, [list(range(3, 13))], SamplingParams(max_new_tokens=16, temperature=1.0, seed=12,
                                                                   ignore_eos=True), Policy()).requests[0].tokens
    assert a == b and a != c


def test_sample_follows_softmax_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    T, n = 0.7, 20000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, T, 1.0, g) for _ in range(n)]).flatten()
    counts = torch.bincount(draws, minlength=4).double()
    expected = torch.softmax(logits[0].double() / T, -1) * n
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.75, g).item() for _ in range(2000)}
    assert draws == {0, 1}          # 0.5 + 0.3 reaches 0.75; tokens 2, 3 never drawn
    assert sample(logits, 0.0, 1.0, None).item() == 0


def test_metrics_and_kv_accounting(tiny_model):
    a = tiny_model.args
    prompts = [list(range(3, 3 + n)) for n in (10, 20)]
    r = generate(tiny_model, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), Policy())
    # real tokens held after the last step: prompt + 5 decoded (the 6th token is never fed back)
    tokens = sum(len(p) + 5 for p in prompts)
    per_token_fp32 = a.n_layers * 2 * a.n_kv_heads * a.head_dim * 4
    assert r.kv_bytes_device == tokens * per_token_fp32 and r.kv_bytes_host == 0
    assert r.kv_ratio_vs_fp16 == pytest.approx(2.0)
    for req in r.requests:
        assert len(req.tokens) == 6 and 0 < req.ttft_s <= r.wall_s
        assert req.tpot_s > 0 and req.ttft_s + 5 * req.tpot_s == pytest.approx(r.wall_s, rel=0.05)
    assert r.decode_tokens == 2 * 5 and len(r.steps) == 5
    assert r.throughput_tok_s == pytest.approx(12 / r.wall_s)
    assert r.peak_mem_bytes > 0
    r16 = generate(tiny_model, prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), Policy(kv_dtype="float16"))
    assert r16.kv_ratio_vs_fp16 == pytest.approx(1.0)


def test_kv_dtype_float16_close_to_float32(tiny_model):
    prompt = list(range(3, 40))
    a = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True), Policy())
    b = generate(tiny_model, [prompt], SamplingParams(max_new_tokens=8, ignore_eos=True), Policy(kv_dtype="bfloat16"))
    assert len(b.requests[0].tokens) == 8
    assert sum(x == y for x, y in zip(a.requests[0].tokens, b.requests[0].tokens)) >= 6


def test_single_token_output_has_no_tpot(tiny_model):
    r = generate(tiny_model, [[5, 6, 7]], SamplingParams(max_new_tokens=1), Policy())
    assert len(r.requests[0].tokens) == 1 and r.requests[0].tpot_s is None and math.isnan(r.decode_tok_s)


def test_cache_grows_past_its_capacity(tiny_model):
    a = tiny_model.args
    cache = make_cache(Policy(), n_layers=a.n_layers, batch=1, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                       capacity=4, device=torch.device("cpu"))
    ids = list(range(3, 13))
    pad = torch.zeros(1, dtype=torch.long)
    for i, t in enumerate(ids):   # token by token, far past capacity 4
        out = tiny_model(torch.tensor([[t]]), cache, Step(i, 1, pad, torch.tensor([[i]])))
    torch.testing.assert_close(out[0, -1], _full_forward_last(tiny_model, ids), atol=1e-5, rtol=1e-5)


def test_bad_input(tiny_model):
    p = SamplingParams(max_new_tokens=4)
    with pytest.raises(ConfigError, match="batch is empty"):
        generate(tiny_model, [], p, Policy())
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate(tiny_model, [[3], []], p, Policy())
    with pytest.raises(ConfigError, match="context of 512"):
        generate(tiny_model, [[3] * 510], p, Policy())
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ConfigError, match="policy='nope' is not known"):
        generate(tiny_model, [[3]], p, Policy(name="nope"))
    with pytest.raises(ConfigError, match="policy.kv_dtype='int3'"):
        generate(tiny_model, [[3]], p, Policy(kv_dtype="int3"))
