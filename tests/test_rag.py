"""RAG KV reuse (runtime/rag/) on the tiny random model: store, re-rotation, selective recompute."""
import math
from types import SimpleNamespace

import pytest
import torch

from runtime.engine import SamplingParams, generate, prefill_once
from core.errors import ConfigError
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
    assert set(SELECTORS) == {"full", "reuse", "random", "epic", "cacheblend", "draft", "draft_dev", "draft_rel",
                              "draft_attn", "oracle_dev", "oracle_norm"}


# ----------------------------------------------------------------------------- EPIC's fixed prefixes

@pytest.mark.parametrize("n", [8, 16, 32])
def test_epic_fixed_prefix_takes_the_first_n_of_every_chunk(tiny_model, store, prompt_parts, n):
    chunks, q = prompt_parts
    N = N_CHUNKS * CHUNK
    for r in (0.0, 0.05, 0.9):                            # r is ignored with a fixed prefix
        res = rag_prefill(tiny_model, chunks, q, pol("epic", r, epic_prefix=n), store)
        want = [c * CHUNK + j for c in range(N_CHUNKS) for j in range(min(n, CHUNK))]   # 32 > CHUNK: whole chunks
        assert res.chosen == want
        assert res.recomputed == want + list(range(N, N + Q))
        assert res.info["budget"] == len(want) and res.info["epic_prefix"] == n


def test_epic_prefix_with_uneven_chunks(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    chunks = [chunks[0][:5], chunks[1], chunks[2][:10]]   # 5 + 24 + 10
    res = rag_prefill(tiny_model, chunks, q, pol("epic", 0.15, epic_prefix=8), store)
    assert res.chosen == [0, 1, 2, 3, 4] + list(range(5, 13)) + list(range(29, 37))


def test_epic_prefix_must_be_positive(tiny_model, store, prompt_parts):
    chunks, q = prompt_parts
    with pytest.raises(ConfigError, match="policy.epic_prefix"):
        rag_prefill(tiny_model, chunks, q, pol("epic", 0.15, epic_prefix=0), store)


# ----------------------------------------------------------------------------- python -m runtime.bench policy=rag

def _bench_cfg(tmp_path, *extra):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose(config_name="bench", overrides=[
            "model=tiny", "policy=rag", "workload=rag", "policy.chunk_len=32", "policy.question_len=8",
            "workload.prompt_len=136", "workload.gen_len=4", "policy.draft_layers=1", f"results_dir={tmp_path}",
            "progress=false", *extra])


@pytest.mark.parametrize("selector, r, extra, budget", [
    ("draft", 0.15, [], math.ceil(0.15 * 128)),
    ("random", 0.3, [], math.ceil(0.3 * 128)),
    ("epic", 0.15, ["policy.epic_prefix=8"], 4 * 8),
    ("full", 1.0, [], 128),
    ("random", 0.3, ["policy.store=disk"], math.ceil(0.3 * 128)),
    ("draft_dev", 0.15, ["policy.sink_tokens=2", "policy.draft_layers=2"], math.ceil(0.15 * 128)),
])
def test_bench_policy_rag_writes_a_record(tmp_path, selector, r, extra, budget):
    import json
    from pathlib import Path

    from runtime import bench

    cfg = _bench_cfg(tmp_path, f"policy.selector={selector}", f"policy.recompute_ratio={r}", "repeats=2", *extra)
    rec = bench.run(cfg)
    data = json.loads(Path(rec["path"]).read_text())
    assert data["policy"] == "rag" and data["config"]["policy"]["selector"] == selector
    ps = data["policy_stats"]
    assert data["ttft_s"] > 0 and ps["rag_prefill_s"] > 0       # (policy_stats: the last repeat's)
    assert ps["n_ctx"] == 4 * 32 and ps["question_len"] == 8
    assert ps["chosen"] == ps["budget"] == budget            # the budget rule: ceil(r N), or the epic prefixes
    assert ps["recomputed"] == budget + 8
    assert data["requests"] == 2 and data["output_tokens"] == 2 * 4 and data["tpot_s"] > 0
    for key in ("place_s", "select_s", "recompute_s"):
        assert ps[key] >= 0
    assert 0 <= ps["recall_vs_oracle"] <= 1 and (selector != "full" or ps["recall_vs_oracle"] == 1)
    if "policy.sink_tokens=2" in extra:
        assert ps["sink_tokens"] == 2 and ps["sinks"] == 4 * 2
    if "policy.store=disk" in extra:      # every timed run read every chunk back from its file
        assert ps["store_disk_hits"] == 2 * 4
    elif selector != "full":             # warm: every timed lookup a memory hit
        assert ps["store_disk_hits"] == 0 and ps["store_mem_hits"] >= 2 * 4


def test_bench_policy_rag_equals_engine_on_full(tmp_path):
    """selector=full decodes the same tokens as a plain full-KV generate of the same prompt."""
    from runtime import bench
    from runtime import loaders
    from runtime.engine import resolve_device

    cfg = _bench_cfg(tmp_path, "policy.selector=full", "workload.gen_len=6")
    model = loaders.from_config(cfg.model, resolve_device("cpu"))
    prompt = bench.make_prompts(cfg.workload, model.args.vocab_size, {0, 1, 2})[0]
    from runtime.bench_rag import bench_rag

    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    runs = bench_rag(model, cfg, prompt, params)
    ref = generate(model, [prompt], params, SimpleNamespace(name="full", kv_dtype="auto"))
    assert runs[0].requests[0].tokens == ref.requests[0].tokens
    # TTFT runs from rag_prefill's start: it includes the rag prefill and the first token
    assert runs[0].requests[0].ttft_s >= runs[0].policy_stats["rag_prefill_s"] > 0
    assert runs[0].prefill_s >= runs[0].policy_stats["rag_prefill_s"]


def test_bench_policy_rag_needs_batch_one(tmp_path):
    from runtime import bench

    with pytest.raises(ConfigError, match="workload.batch=2") as e:
        bench.run(_bench_cfg(tmp_path, "workload.batch=2"))
    assert "\n" not in str(e.value)


def test_split_prompt():
    from runtime.rag import split_prompt

    ids = list(range(100))
    chunks, q = split_prompt(ids, 32, 8)
    assert [len(c) for c in chunks] == [32, 32, 28] and q == ids[92:]
    assert split_prompt(ids[:5], 32, 8) == ([], ids[:5])


# ----------------------------------------------------------------------------- a separate draft: alignment

def test_align_hand_built_offsets():
    from runtime.rag import align

    # "unbelievable cats": target "un" "believ" "able" " cats"; draft "unbel" "ievable" " " "cats" (+ a 0-width special)
    t = [(0, 2), (2, 8), (8, 12), (12, 17)]
    d = [(0, 0), (0, 5), (5, 12), (12, 13), (13, 17)]
    assert align(d, t) == [[], [0, 1], [1, 2], [3], [3]]
    assert align(d, t, n_target=3) == [[], [0, 1], [1, 2], [], []]    # only context tokens count
    assert align(t, t) == [[0], [1], [2], [3]]                          # same splits: the identity
    # spans that only touch do not overlap; one draft token over many targets
    assert align([(0, 17)], t) == [[0, 1, 2, 3]] and align([(2, 2), (8, 9)], t) == [[], [2]]


def test_text_and_offsets_multibyte():
    from runtime.rag import text_and_offsets

    text, offs = text_and_offsets([b"h", b"\xc3", b"\xa9llo", b" w"])
    assert text == "héllo w"
    # the token holding half of 'é' owns that character too, so it overlaps whatever covers it
    assert offs == [(0, 1), (1, 2), (1, 5), (5, 7)]


def test_token_bytes_rebuild_the_text(shipped_tokenizer):
    from runtime.rag import text_and_offsets, token_bytes

    s = "Kelmar was born in Zürich in 1873. <|im_start|>"
    ids = shipped_tokenizer.encode(s)
    text, offs = text_and_offsets(token_bytes(shipped_tokenizer, ids))
    assert text == shipped_tokenizer.tok.decode(ids, skip_special_tokens=False) == s
    enc = shipped_tokenizer.tok.encode(s, add_special_tokens=False)
    assert offs == [tuple(o) for o in enc.offsets]


def test_span_complete_with_cover():
    s = torch.tensor([1.0, 0.9, 0.8, 0.75, 0.7, 0.1, 0.0, 0.05, 0.6, 0.65, 0.3, 0.2])
    ident = [[i] for i in range(len(s))]
    for B in (3, 6, 8):
        assert span_complete(s, B, 0.4, 0.7, 4, cover=ident) == span_complete(s, B, 0.4, 0.7, 4)
    # draft token 0 covers target 0-1, token 1 covers 2-4 (too wide for what is left), token 2 covers 5
    cover = [[0, 1], [2, 3, 4], [5]]
    chosen, _ = span_complete(torch.tensor([1.0, 0.9, 0.0]), 3, tau_smooth=0.05, cover=cover)
    assert chosen == [0, 1, 5]


def _wordlevel(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_separate_draft_with_other_splits_chooses_whole_words(tiny_model, store):
    """Target: one token per byte; draft: one per word. Every target token overlapping a chosen
    draft word is chosen, and nothing else."""
    from runtime.evals.data import ByteTokenizer
    from runtime.loaders import random_init
    from runtime.model import ModelArgs
    from runtime.rag import Draft

    bt = ByteTokenizer()
    words = "the river ran past old stone walls while rain fell on quiet empty roads".split()
    docs = [" ".join(words[i:] + words[:i]) + "." for i in (0, 3, 6)]
    chunks = [bt.encode(d) for d in docs]
    q = bt.encode(" Where did the river run?")
    draft_model = random_init(ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64,
                                        max_seq_len=512), seed=1)
    draft = Draft(model=draft_model, tok=_wordlevel(words + ["."]), target_tok=bt, name="wordlevel")
    assert not draft.same_tokenizer
    N = sum(len(c) for c in chunks)
    for r in (0.1, 0.3):
        res = rag_prefill(tiny_model, chunks, q, pol("draft", r, draft_layers=3), store, draft=draft)
        info = res.info
        assert info["aligned"] and info["draft_model"] == "wordlevel"
        assert 0 < len(res.chosen) <= math.ceil(r * N)
        text = "".join(docs) + bt.decode(q)
        enc = draft.tok.encode(text)
        spans = [enc.offsets[j] for j in info["draft_chosen"]]
        want = sorted({t for a, b in spans for t in range(a, b) if t < N})   # byte tokens: token i = char i
        assert res.chosen == want
        assert set(range(N, N + len(q))) <= set(res.recomputed)
        # whole words: a chosen letter's whole word is chosen
        for a, b in spans:
            assert set(range(a, min(b, N))) <= set(res.chosen)


class _NoOffsets:
    def encode(self, text):
        return [1, 2, 3]


class _SlowTokenizer:
    """transformers' slow tokenizers raise on return_offsets_mapping."""

    def __call__(self, text, **kw):
        raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")


@pytest.mark.parametrize("tok", [_NoOffsets(), _SlowTokenizer()])
def test_draft_tokenizer_without_offsets_is_a_config_error(tiny_model, store, prompt_parts, tok):
    from runtime.evals.data import ByteTokenizer
    from runtime.rag import Draft

    chunks, q = prompt_parts
    draft = Draft(model=tiny_model, tok=tok, target_tok=ByteTokenizer(), name="slow-draft")
    with pytest.raises(ConfigError, match="policy.draft_model=slow-draft.*offsets") as e:
        rag_prefill(tiny_model, chunks, q, pol("draft", 0.15), store, draft=draft)
    assert "\n" not in str(e.value)


def test_draft_model_path_errors(tiny_model, store, prompt_parts, tmp_path):
    chunks, q = prompt_parts
    with pytest.raises(ConfigError, match="policy.draft_model=.*no such file"):
        rag_prefill(tiny_model, chunks, q, pol("draft", 0.15, draft_model=str(tmp_path / "nope")), store)
    (tmp_path / "config.json").write_text("{}")            # a folder without tokenizer.json: no offsets
    from runtime.evals.data import ByteTokenizer

    with pytest.raises(ConfigError, match="tokenizer.json"):
        rag_prefill(tiny_model, chunks, q, pol("draft", 0.15, draft_model=str(tmp_path)), store,
                    tokenizer=ByteTokenizer())
    with pytest.raises(ConfigError, match="target's tokenizer"):   # a random target: no text to align
        rag_prefill(tiny_model, chunks, q, pol("draft", 0.15, draft_model=str(tmp_path)), store)


def test_separate_draft_same_gguf_is_the_identity(shipped_model, shipped_tokenizer):
    """The shipped GGUF loaded again as the 'separate' draft: the same tokenizer, so ids are shared
    and the choice equals the target's own first D layers; forcing the character-offset path on
    a prompt that round-trips gives the identity alignment and the same choice."""
    from runtime.evals import rag as er
    from runtime.loaders import shipped_gguf_path
    from runtime.rag import load_draft, split_chunks

    s = er.make_rag(shipped_tokenizer, 0, seed=0, chunk_len=96, n_chunks=2, hops=1)
    text = "".join(s.chunk_texts)
    ids = shipped_tokenizer.encode(text)                  # one encoding of the whole text: round-trips
    chunks = split_chunks(ids, 96)
    q = s.question
    store = ChunkStore(shipped_model, disk=False)
    p = pol("draft", 0.15, draft_layers=2, chunk_len=96)
    own = rag_prefill(shipped_model, chunks, q, p, store)
    draft = load_draft(str(shipped_gguf_path()), shipped_model, shipped_tokenizer)
    assert draft.same_tokenizer and draft.model is not shipped_model
    sep = rag_prefill(shipped_model, chunks, q, p, store, draft=draft)
    assert sep.chosen == own.chosen and not sep.info["aligned"]
    torch.testing.assert_close(sep.prefilled.logits, own.prefilled.logits)
    draft.__dict__["same_tokenizer"] = False              # force the text + offsets path
    forced = rag_prefill(shipped_model, chunks, q, p, store, draft=draft)
    assert forced.info["aligned"] and forced.info["draft_chosen"] == own.chosen
    assert forced.chosen == own.chosen
