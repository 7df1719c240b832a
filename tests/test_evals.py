"""runtime.evals: generated data, spec names, paired statistics, the resumable grid, perplexity."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

from runtime.engine import prefill_once
from core.errors import ConfigError
from runtime.evals import data, report, run, specs
from runtime.evals import stats as es
from runtime.evals.score import passkey_answer, score_ppl, teacher_force

from .conftest import Policy

BYTES = data.ByteTokenizer()


# ----------------------------------------------------------------------------- passkey prompts

@pytest.mark.parametrize("fmt", data.FORMATS)
def test_passkey_prompt_deterministic_once_at_depth(shipped_tokenizer, fmt):
    tok = shipped_tokenizer
    for length in (1024, 2048):
        for depth in (0.1, 0.5, 0.9):
            s = data.make_passkey(tok, length, depth, index=3, seed=7, fmt=fmt)
            assert s == data.make_passkey(tok, length, depth, index=3, seed=7, fmt=fmt)
            assert len(s.passkey) == 5 and s.passkey.isdigit()
            assert s.text.count(data.needle(s.passkey)) == 1
            assert s.text.count(s.passkey) == 2                  # both inside the one needle line
            assert s.prompt == tok.encode(s.text)
            assert length - 8 <= len(s.prompt) <= length
            assert abs(s.needle_depth - depth) < 0.06
            # the answer's digits continue the prompt token by token: what teacher forcing scores
            assert tok.encode(s.text + s.passkey) == s.prompt + tok.encode(s.passkey)
            assert len(tok.encode(s.passkey)) == 5


def test_passkey_samples_depend_on_their_coordinates_only():
    a = data.passkey_samples(BYTES, [300, 400], [0.2, 0.8], n=3, seed=1)
    b = data.passkey_samples(BYTES, [400], [0.8], n=5, seed=1)
    by_id = {s.id: s for s in a}
    assert all(by_id[s.id] == s for s in b if s.id in by_id)      # same id, same sample, whatever the grid
    keys = {s.passkey for s in a}
    assert len(keys) >= len(a) - 1                                # 12 draws from 90,000 keys
    assert data.make_passkey(BYTES, 300, 0.2, 0, seed=2).passkey != data.make_passkey(BYTES, 300, 0.2, 0, seed=1).passkey


def test_passkey_bad_input():
    with pytest.raises(ConfigError, match="shorter"):
        data.make_passkey(BYTES, 50, 0.5, 0)
    with pytest.raises(ConfigError, match="depth"):
        data.make_passkey(BYTES, 500, 1.5, 0)


def test_passkey_answer_extraction():
    assert passkey_answer("12345. Remember") == "12345"
    assert passkey_answer(" is 1234 5") == "1234"
    assert passkey_answer("no digits") == ""


def test_text_samples_are_consecutive_windows_of_the_pydoc_corpus():
    from pydoc_data.topics import topics

    xs = data.text_samples(BYTES, 300, 4, seed=3)
    corpus = BYTES.encode(data.doc_corpus(3))
    assert [s.tokens for s in xs] == [corpus[i * 300:(i + 1) * 300] for i in range(4)]
    docs = [t.strip().encode() for t in topics.values()]
    window = bytes(t - BYTES.OFFSET for t in xs[1].tokens)
    assert any(window[:100] in d for d in docs)                   # real CPython help text
    assert data.doc_corpus(3) != data.doc_corpus(4) and sorted(data.doc_corpus(3)) == sorted(data.doc_corpus(4))
    with pytest.raises(ConfigError, match="pydoc corpus"):
        data.text_samples(BYTES, 10**6, 2)


# ----------------------------------------------------------------------------- spec names

def test_spec_parser():
    p = specs.parse_spec("specache-k16-b1-g32-noprefetch")
    assert (p.name, p.k, p.bits, p.group_size, p.residual, p.prefetch) == ("specache", 16, 1, 32, 64, False)
    p = specs.parse_spec("specache-b2-k64-r128", kv_dtype="float16")
    assert (p.k, p.bits, p.group_size, p.residual, p.prefetch, p.kv_dtype) == (64, 2, 64, 128, True, "float16")
    p = specs.parse_spec("kivi4-g32")
    assert (p.name, p.bits, p.group_size, p.one_bit_rule) == ("kivi", 4, 32, "specache")
    assert not hasattr(p, "k")
    assert specs.parse_spec("offload").name == "offload"
    for bad in ("kivi3", "kivi", "kivi2-k4", "specache-k4", "specache-k4-b2-k8", "full-b2", "lru", "kivi2-x1"):
        with pytest.raises(ConfigError, match="policy spec"):
            specs.parse_spec(bad)


def test_default_grid_and_presets():
    grid = specs.default_grid()
    assert len(grid) == 5 + 4 * 2 * 2 * 2 and len(set(grid)) == len(grid)
    assert specs.expand(["kivi2", "small"])[:2] == ["full", "kivi2"]
    assert specs.expand(["kivi2", "full", "kivi2"]) == ["full", "kivi2"]


# ----------------------------------------------------------------------------- statistics

def test_mcnemar_exact_by_hand():
    # 1 sample only full gets, 7 only the policy gets, 12 concordant:
    # p = 2 * P(Bin(8, 1/2) <= 1) = 2 * (1 + 8) / 256
    full = [True] * 1 + [False] * 7 + [True] * 6 + [False] * 6
    pol = [False] * 1 + [True] * 7 + [True] * 6 + [False] * 6
    m = es.mcnemar_exact(full, pol)
    assert (m.only_full, m.only_policy) == (1, 7)
    assert m.p == pytest.approx(18 / 256, rel=1e-12)
    assert es.mcnemar_exact(pol, full).p == pytest.approx(18 / 256, rel=1e-12)
    assert es.mcnemar_exact(full, full) == es.McNemar(0, 0, 1.0)


def test_bootstrap_interval_covers_the_true_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, size=200)
    iv = es.bootstrap_mean(x, seed=1)
    assert iv.lo < 3.0 < iv.hi and iv.mean == pytest.approx(x.mean())
    t = st.t.ppf(0.975, 199) * x.std(ddof=1) / math.sqrt(200)      # the t interval, for its width
    assert iv.hi - iv.lo == pytest.approx(2 * t, rel=0.15)
    assert es.bootstrap_mean(x, seed=1) == iv                       # seeded
    # coverage over repeated samples of a skewed law: near the nominal 95%
    ivs = [es.bootstrap_mean(rng.exponential(2.0, 40), seed=i) for i in range(100)]
    assert 0.85 <= np.mean([iv.lo < 2.0 < iv.hi for iv in ivs]) <= 0.99


def test_paired_statistics_of_identical_policies_are_null():
    x = np.random.default_rng(2).normal(size=30)
    d = es.paired_delta(x, x)
    assert (d.mean, d.lo, d.hi) == (0.0, 0.0, 0.0)
    r = es.perplexity_ratio(x, x)
    assert (r.mean, r.lo, r.hi) == (1.0, 1.0, 1.0)
    nll = np.array([2.0, 2.5, 3.0])
    assert es.perplexity(nll).mean == pytest.approx(math.exp(2.5))
    assert es.bootstrap_mean([1.0]).n == 1 and math.isnan(es.bootstrap_mean([1.0]).lo)


# ----------------------------------------------------------------------------- the grid

def _passkey_grid(model, out, n, policies=("full", "kivi2")):
    samples = data.passkey_samples(BYTES, [300], [0.3, 0.7], n=n, seed=0)
    return run.run_grid(model, run.passkey_task(BYTES), samples, list(policies), out, model_name="tiny",
                        progress=False)


def _keys(path):
    return [(r["sample_id"], r["policy"]) for r in map(json.loads, path.read_text().splitlines())]


def test_grid_resumes_without_recomputing(tiny_model, tmp_path, monkeypatch):
    calls = []
    real = run.prefill_once
    monkeypatch.setattr(run, "prefill_once", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    path = _passkey_grid(tiny_model, tmp_path, n=1)             # "interrupted" after 2 samples
    first = path.read_text()
    assert len(first.splitlines()) == 2 * 2 and len(calls) == 2
    with open(path, "a") as f:
        f.write('{"task": "passkey", "sample_id": "torn')        # a crash mid-write
    path = _passkey_grid(tiny_model, tmp_path, n=3)
    keys = _keys(path)
    assert path.read_text().startswith(first)                  # done lines untouched
    assert len(keys) == len(set(keys)) == 3 * 2 * 2
    assert len(calls) == 2 + 4                                 # only the 4 new samples prefilled
    _passkey_grid(tiny_model, tmp_path, n=3)
    assert len(calls) == 6 and _keys(path) == keys             # all done: nothing run, nothing written


def test_failing_policy_is_recorded_and_retried(tiny_model, tmp_path):
    path = _passkey_grid(tiny_model, tmp_path, n=1, policies=("full", "kivi2-g64-r32"))
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    bad = [r for r in recs if r["policy"] == "kivi2-g64-r32"]
    assert len(bad) == 2 and all("residual" in r["error"] for r in bad)
    assert all("error" not in r and r["digit_logprob"] < 0 for r in recs if r["policy"] == "full")
    path = _passkey_grid(tiny_model, tmp_path, n=1, policies=("full", "kivi2-g64-r32"))
    assert len(path.read_text().splitlines()) == 4 + 2          # errors retried, full not
    table = report.passkey_table(report.load(path))
    row = table[table.policy == "kivi2-g64-r32"].iloc[0]
    assert row.n == 0 and row.errors == 2 and "residual" in row.error


def test_report_full_against_itself(tiny_model, tmp_path):
    path = _passkey_grid(tiny_model, tmp_path, n=2, policies=("full",))
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[0]["correct"] = recs[2]["correct"] = True               # some hits, so McNemar has concordant pairs
    with open(path, "w") as f:
        for r in recs + [{**r, "policy": "copy"} for r in recs]:
            f.write(json.dumps(r) + "\n")
    tables = report.report(tmp_path)
    t = tables["passkey"].set_index("policy")
    assert t.loc["copy", "mcnemar_p"] == 1.0 and t.loc["copy", "accuracy"] == 0.5
    assert (t.loc["copy", ["digit_lp_delta", "digit_lp_delta_lo", "digit_lp_delta_hi"]] == 0).all()
    assert (tmp_path / "passkey.csv").exists() and (tmp_path / "passkey.png").stat().st_size > 1000


def test_grid_refuses_another_model(tiny_model, tmp_path):
    _passkey_grid(tiny_model, tmp_path, n=1, policies=("full",))
    with pytest.raises(ConfigError, match="another --out"):
        run.run_grid(tiny_model, run.passkey_task(BYTES), [], ["full"], tmp_path, model_name="smollm2")


# ----------------------------------------------------------------------------- perplexity

def _reference_logits(model, ids):
    """The Llama forward written out in float64 from the weights alone: no cache, no runtime code."""
    a = model.args
    H, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    T = len(ids)
    W = {k: v.double() for k, v in model.state_dict().items()}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    inv = 1.0 / a.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):                                             # (heads, T, D), half-split pairs
        x1, x2 = x.chunk(2, -1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = W["tok_embeddings.weight"][torch.tensor(ids)]
    for i in range(a.n_layers):
        p = f"layers.{i}."
        h = rms(x, W[p + "attention_norm.weight"])
        q, k, v = (h @ W[p + "attention.wqkv.weight"].T).split([H * D, Hkv * D, Hkv * D], -1)
        q = rope(q.view(T, H, D).transpose(0, 1))
        k = rope(k.view(T, Hkv, D).transpose(0, 1)).repeat_interleave(H // Hkv, 0)
        v = v.view(T, Hkv, D).transpose(0, 1).repeat_interleave(H // Hkv, 0)
        s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, -math.inf)
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, H * D)
        x = x + o @ W[p + "attention.wo.weight"].T
        gate, up = (rms(x, W[p + "ffn_norm.weight"]) @ W[p + "feed_forward.w13.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ W[p + "feed_forward.w2.weight"].T
    return rms(x, W["norm.weight"]) @ W["output.weight"].T


def test_teacher_forced_perplexity_equals_full_sequence_forward(tiny_model):
    ids = data.text_samples(BYTES, 160, 1)[0]
    last = 48
    pre = prefill_once(tiny_model, [ids.tokens[:-last]])
    res = score_ppl(tiny_model, Policy(), pre, ids, last)
    logp = _reference_logits(tiny_model, ids.tokens).log_softmax(-1)
    targets = torch.tensor(ids.tokens[-last:])
    ref_nll = -logp[len(ids.tokens) - last - 1:-1].gather(1, targets[:, None]).mean().item()
    assert res["n_tokens"] == last
    assert math.exp(res["nll_mean"]) == pytest.approx(math.exp(ref_nll), rel=1e-4)
    # per token too: each teacher-forced step is the true prefix's next-token distribution
    lps, _ = teacher_force(tiny_model, Policy(), pre, ids.tokens[-last:])
    ref = logp[len(ids.tokens) - last - 1:-1].gather(1, targets[:, None])[:, 0]
    assert np.allclose(lps, ref.numpy(), atol=1e-4)


def test_cli_tiny_end_to_end(tmp_path, capsys):
    from runtime.evals.__main__ import main

    main(["ppl", "--model", "tiny", "--context", "192", "--last", "32", "--n", "2", "--policies", "full",
          "--out", str(tmp_path), "--no-progress"])
    main(["passkey", "--model", "tiny", "--lengths", "256", "--depths", "0.5", "--n", "2", "--policies", "full",
          "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "ppl.csv" in out and "passkey.csv" in out
    for name in ("ppl.csv", "ppl.png", "passkey.csv", "passkey.png", "ppl.run.json"):
        assert (tmp_path / name).exists()
    with pytest.raises(SystemExit) as e:
        main(["passkey", "--model", "tiny", "--policies", "kivi3", "--out", str(tmp_path)])
    assert e.value.code == 2 and "bits=3" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_model_retrieves_a_passkey(shipped_model, shipped_tokenizer, tmp_path):
    """The real model finds the needle through the whole pipeline (prefill once, greedy decode,
    teacher-forced digits). ~25 s on the 2-core box, most of it the first calls' warm-up."""
    samples = data.passkey_samples(shipped_tokenizer, [512], [0.2, 0.8], n=1, seed=0)
    path = run.run_grid(shipped_model, run.passkey_task(shipped_tokenizer), samples, ["full"], tmp_path,
                        model_name="smollm2", progress=False)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert all(r["correct"] for r in recs), [r["output"] for r in recs]
    assert all(-2.0 < r["digit_logprob"] < 0 for r in recs)
