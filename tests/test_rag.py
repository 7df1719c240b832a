"""RAG KV reuse (runtime/rag.py) on the tiny random model: store, re-rotation, selective recompute."""
import math
from types import SimpleNamespace

import pytest
import torch

from runtime.engine import SamplingParams, generate, prefill_once
from runtime.errors import ConfigError
from runtime.rag import (SELECTORS, ChunkStore, budget_of, placed_kv, prefill_at, rag_prefill, rerotate,
                         span_complete)

CHUNK, N_CHUNKS, Q = 24, 3, 6


def pol(selector="draft", r=0.15, **kw):
    d = dict(name="rag", kv_dtype="auto", selector=selector, recompute_ratio=r, chunk_len=CHUNK, draft_layers=1,
             tau_smooth=0.4, tau_cover=0.7, span_max=16, seed=0)
    d.update(kw)
    return SimpleNamespace(**d)


@pytest.fixture
def prompt_parts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (N_CHUNKS * CHUNK + Q,), generator=g).tolist()
    chunks = [ids[i * CHUNK:(i + 1) * CHUNK] for i in range(N_CHUNKS)]
    return chunks, ids[N_CHUNKS * CHUNK:]


@pytest.fixture
def store(tiny_model, tmp_path):
    return ChunkStore(tiny_model, root=tmp_path)


def test_rerotation_equals_direct_prefill_at_offset(tiny_model, store, prompt_parts):
    chunk = prompt_parts[0][1]
    base = store.get(chunk)
    for off in (24, 100, 400):
        direct = prefill_at(tiny_model, chunk, off)
        for (k0, v0), (kd, vd) in zip(base, direct):
            torch.testing.assert_close(rerotate(tiny_model, k0, off), kd, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v0, vd, atol=1e-5, rtol=1e-5)


def test_full_equals_normal_prefill(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    res = rag_prefill(tiny_model, chunks, q, pol("full", 1.0), store)
    ref = prefill_once(tiny_model, [sum(chunks, []) + q])
    torch.testing.assert_close(res.prefilled.logits, ref.logits, atol=1e-4, rtol=1e-4)
    for (k, v), (kr, vr) in zip(res.prefilled.kv, ref.kv):
        torch.testing.assert_close(k, kr, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, vr, atol=1e-4, rtol=1e-4)
    # r = 1 with any budgeted selector recomputes everything too
    res_r = rag_prefill(tiny_model, chunks, q, pol("random", 1.0), store)
    torch.testing.assert_close(res_r.prefilled.logits, ref.logits, atol=1e-4, rtol=1e-4)
    # and decoding continues from it under a KV policy
    prompt = sum(chunks, []) + q
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    full = SimpleNamespace(name="full", kv_dtype="auto")
    a = generate(tiny_model, [prompt], params, full, prefilled=res.prefilled)
    b = generate(tiny_model, [prompt], params, full)
    assert a.requests[0].tokens == b.requests[0].tokens


def test_reuse_is_concatenated_chunk_caches(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    res = rag_prefill(tiny_model, chunks, q, pol("reuse", 0.0), store)
    N = N_CHUNKS * CHUNK
    assert res.chosen == [] and res.recomputed == list(range(N, N + Q))
    placed = placed_kv(tiny_model, store, chunks)
    for (k, v), (kp, vp) in zip(res.prefilled.kv, placed):
        assert torch.equal(k[:, :, :N], kp) and torch.equal(v[:, :, :N], vp)
    # r = 0 with a budgeted selector is pure reuse too
    res0 = rag_prefill(tiny_model, chunks, q, pol("draft", 0.0), store)
    assert res0.chosen == []
    torch.testing.assert_close(res0.prefilled.logits, res.prefilled.logits)
    # reuse differs from a full prefill (cross-chunk attention lost), so the test is not vacuous
    ref = prefill_once(tiny_model, [sum(chunks, []) + q])
    assert not torch.allclose(res.prefilled.kv[1][0], ref.kv[1][0], atol=1e-3)


def test_question_rows_are_recomputed_with_full_attention(tiny_model, store, prompt_parts):
    """Reference for reuse: a full-attention pass of the question over the placed chunk K/V."""
    chunks, q = prompt_parts
    res = rag_prefill(tiny_model, chunks, q, pol("reuse", 0.0), store)
    # layer 0 K/V are context-independent: the question's rows equal a normal prefill's
    ref = prefill_once(tiny_model, [sum(chunks, []) + q])
    N = N_CHUNKS * CHUNK
    torch.testing.assert_close(res.prefilled.kv[0][0][:, :, N:], ref.kv[0][0][:, :, N:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.prefilled.kv[0][0], ref.kv[0][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("selector", ["random", "epic", "cacheblend", "draft"])
@pytest.mark.parametrize("r", [0.05, 0.15, 0.5])
def test_selectors_respect_budget_and_recompute_question(tiny_model, store, prompt_parts, selector, r):
    chunks, q = prompt_parts
    N = N_CHUNKS * CHUNK
    res = rag_prefill(tiny_model, chunks, q, pol(selector, r), store)
    assert len(res.chosen) <= math.ceil(r * N)
    assert len(res.chosen) >= 1
    assert all(0 <= p < N for p in res.chosen), "question tokens never count in the budget"
    assert set(range(N, N + Q)) <= set(res.recomputed)
    assert res.recomputed == sorted(set(res.chosen) | set(range(N, N + Q)))
    assert torch.isfinite(res.prefilled.logits).all()
    if selector in ("random", "cacheblend"):
        assert len(res.chosen) == math.ceil(r * N)


def test_epic_takes_chunk_prefixes(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    res = rag_prefill(tiny_model, chunks, q, pol("epic", 0.125), store)   # 3 per chunk, budget 9
    assert res.chosen == [0, 1, 2, 24, 25, 26, 48, 49, 50]
    res = rag_prefill(tiny_model, chunks, q, pol("epic", 0.15), store)    # 4 per chunk > budget 11: round-robin
    assert res.chosen == [0, 1, 2, 3, 24, 25, 26, 27, 48, 49, 50]


def test_random_is_seeded(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    a = rag_prefill(tiny_model, chunks, q, pol("random", 0.2, seed=3), store).chosen
    b = rag_prefill(tiny_model, chunks, q, pol("random", 0.2, seed=3), store).chosen
    c = rag_prefill(tiny_model, chunks, q, pol("random", 0.2, seed=4), store).chosen
    assert a == b and a != c


def test_draft_logs_what_it_chose(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    res = rag_prefill(tiny_model, chunks, q, pol("draft", 0.15, draft_layers=2), store)
    assert res.info["chosen"] == res.chosen and res.info["draft_layers"] == 2
    assert len(res.info["top_scores"]) == 8


def test_span_completion_hand_built():
    # normalised already (min 0, max 1); cuts where |diff| > 0.4, spans <= 4 tokens
    s = torch.tensor([1.0, 0.9, 0.8, 0.75, 0.7, 0.1, 0.0, 0.05, 0.6, 0.65, 0.3, 0.2])
    # spans: [0,4) (length cap), [4,5) (0.7->0.1 cut), [5,8) (0.05->0.6 cut), [8,12) (0.65->0.3 is only 0.35)
    chosen, spans = span_complete(s, budget=6, tau_smooth=0.4, tau_cover=0.7, span_max=4)
    assert spans == [(0, 4), (4, 5), (5, 8), (8, 12)]
    # greedy: 0, 1, 2 (span [0,4) 3/4 = 0.75 >= 0.7 -> add 3), 4 (own span), 9 (span [8,12): 1/4)
    assert chosen == [0, 1, 2, 3, 4, 9]
    # with budget 3, completing [0,4) does not fit: plain top 3
    assert span_complete(s, budget=3, tau_smooth=0.4, tau_cover=0.7, span_max=4)[0] == [0, 1, 2]
    # tau_cover 0.5: span [0,4) completes at its 2nd token (+2, 3), then 4, 9, 8: [8,12) is 2/4 covered but
    # completing it needs 2 more with 1 left, so it is not completed; 10 is next by score
    chosen, _ = span_complete(s, budget=8, tau_smooth=0.4, tau_cover=0.5, span_max=4)
    assert chosen == [0, 1, 2, 3, 4, 8, 9, 10]


def test_budget_of():
    assert budget_of(0.15, 72) == 11 and budget_of(0.0, 72) == 0 and budget_of(1.0, 72) == 72
    assert budget_of(0.125, 72) == 9


def test_store_memory_and_disk(tiny_model, tmp_path, prompt_parts):
    chunk = prompt_parts[0][0]
    s1 = ChunkStore(tiny_model, root=tmp_path)
    kv1 = s1.get(chunk)
    s1.get(chunk)
    assert s1.stats["computed"] == 1 and s1.stats["mem_hits"] == 1
    assert s1.path(chunk).is_file() and not list(tmp_path.glob("*.tmp"))
    s2 = ChunkStore(tiny_model, root=tmp_path)
    kv2 = s2.get(chunk)
    assert s2.stats["disk_hits"] == 1 and s2.stats["computed"] == 0
    for (a, b), (c, d) in zip(kv1, kv2):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_store_env_var(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KVTESTBED_CACHE", str(tmp_path))
    s = ChunkStore(tiny_model)
    assert s.root == tmp_path / "chunks"


def test_stale_entry_changed_text_or_weights(tiny_model, tmp_path, prompt_parts):
    a, b = prompt_parts[0][0], prompt_parts[0][1]
    s1 = ChunkStore(tiny_model, root=tmp_path)
    s1.get(a)
    # changed text: a different key; an old file copied under the new key is detected, recomputed
    s1.path(a).rename(s1.path(b))
    s2 = ChunkStore(tiny_model, root=tmp_path)
    kv_b = s2.get(b)
    assert s2.stats["stale"] == 1 and s2.stats["computed"] == 1
    ref = prefill_once(tiny_model, [b]).kv
    assert all(torch.equal(k, kr) for (k, _), (kr, _) in zip(kv_b, ref))
    # changed weights: a new identity, so the old entry is not used
    s3 = ChunkStore(tiny_model, root=tmp_path)
    old = s3.get(b)
    with torch.no_grad():
        tiny_model.layers[0].attention.wqkv.weight.mul_(1.01)
    s4 = ChunkStore(tiny_model, root=tmp_path)
    assert s4.model_id != s3.model_id and s4.path(b) != s3.path(b)
    new = s4.get(b)
    assert s4.stats["computed"] == 1 and s4.stats["disk_hits"] == 0
    assert not torch.equal(new[0][0], old[0][0])
    torch.testing.assert_close(new[0][0], prefill_once(tiny_model, [b]).kv[0][0])
    # and the old file under the new key (same text, old weights) is detected as stale
    s4.path(b).unlink()
    s3.path(b).rename(s4.path(b))
    s5 = ChunkStore(tiny_model, root=tmp_path)
    s5.get(b)
    assert s5.stats["stale"] == 1 and s5.stats["computed"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_file_is_recomputed(tiny_model, tmp_path, prompt_parts, damage):
    chunk = prompt_parts[0][0]
    s1 = ChunkStore(tiny_model, root=tmp_path)
    ref = s1.get(chunk)
    p = s1.path(chunk)
    raw = bytearray(p.read_bytes())
    if damage == "truncate":
        p.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip":
        raw[-5] ^= 0xFF
        p.write_bytes(bytes(raw))
    else:
        p.write_bytes(b"not a safetensors file")
    s2 = ChunkStore(tiny_model, root=tmp_path)
    kv = s2.get(chunk)
    assert s2.stats["corrupt"] == 1 and s2.stats["computed"] == 1
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(kv, ref))
    # and the rewritten file is good again
    s3 = ChunkStore(tiny_model, root=tmp_path)
    s3.get(chunk)
    assert s3.stats["disk_hits"] == 1


@pytest.mark.parametrize("kw, field", [
    (dict(r=1.5), "policy.recompute_ratio"),
    (dict(r=-0.1), "policy.recompute_ratio"),
    (dict(selector="bogus"), "policy.selector"),
    (dict(draft_layers=9), "policy.draft_layers"),
    (dict(tau_cover=2.0), "policy.tau_cover"),
    (dict(chunk_len=100000), "policy.chunk_len"),
])
def test_bad_policy(tiny_model, store, prompt_parts, kw, field):
    chunks, q = prompt_parts
    with pytest.raises(ConfigError, match=field) as e:
        rag_prefill(tiny_model, chunks, q, pol(**kw), store)
    assert "\n" not in str(e.value)


def test_chunk_longer_than_context(tiny_model, store):
    long = list(range(3, 3 + 600))    # TINY max_seq_len = 512
    with pytest.raises(ConfigError, match="context") as e:
        rag_prefill(tiny_model, [long], [5, 6], pol("reuse", 0.0), store)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="context"):
        store.get(long)
    with pytest.raises(ConfigError, match="question"):
        rag_prefill(tiny_model, [[5, 6]], [], pol("reuse", 0.0), store)


def test_selectors_listed():
    assert set(SELECTORS) == {"full", "reuse", "random", "epic", "cacheblend", "draft"}
