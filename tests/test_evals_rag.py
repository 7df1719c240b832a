"""runtime.evals.rag (the package): the synthetic multi-document QA, EM/F1, and the resumable rag grid."""
import json

import pytest

from core.errors import ConfigError
from runtime.evals import data
from runtime.evals import rag as er
from runtime.evals import report

BYTES = data.ByteTokenizer()


@pytest.mark.parametrize("hops", [1, 2])
def test_sample_is_deterministic_and_the_answer_sits_where_it_should(hops):
    for i in range(5):
        s = er.make_rag(BYTES, i, seed=3, chunk_len=200, n_chunks=4, hops=hops)
        assert s == er.make_rag(BYTES, i, seed=3, chunk_len=200, n_chunks=4, hops=hops)
        assert [len(c) for c in s.chunks] == [200] * 4
        assert s.prompt == [t for c in s.chunks for t in c] + BYTES.encode(s.question_text)
        holding = [c for c, t in enumerate(s.chunk_texts) if s.answer in t]
        assert holding == [s.answer_chunk]                      # the gold text in exactly one chunk
        assert s.answer not in s.question_text
        if hops == 1:
            assert s.bridge_chunk == -1
        else:
            assert s.bridge_chunk != s.answer_chunk
            company = s.question_text.split("the founder of ")[1].split(" born?")[0]
            assert [c for c, t in enumerate(s.chunk_texts) if company in t] == [s.bridge_chunk]
            assert f"{company} was founded by" in s.chunk_texts[s.bridge_chunk]
    other = er.make_rag(BYTES, 0, seed=4, chunk_len=200, n_chunks=4, hops=hops)
    assert other.answer != er.make_rag(BYTES, 0, seed=3, chunk_len=200, n_chunks=4, hops=hops).answer


def test_two_hop_bridge_person_is_in_both_chunks(shipped_tokenizer):
    s = er.make_rag(shipped_tokenizer, 1, seed=0, chunk_len=128, n_chunks=4, hops=2)
    assert [len(c) for c in s.chunks] == [128] * 4
    company = s.question_text.split("the founder of ")[1].split(" born?")[0]
    founder = s.chunk_texts[s.bridge_chunk].split(f"{company} was founded by ")[1].split(".")[0]
    assert f"{founder} was born in" in s.chunk_texts[s.answer_chunk]
    assert [c for c, t in enumerate(s.chunk_texts) if s.answer in t] == [s.answer_chunk]


def test_chunk_too_short_is_a_clear_error():
    with pytest.raises(ConfigError, match="chunk-len"):
        er.make_rag(BYTES, 0, chunk_len=30, n_chunks=2)
    with pytest.raises(ConfigError, match="hops"):
        er.make_rag(BYTES, 0, hops=3)


def test_em_and_f1_by_hand():
    assert er.extract_answer(" Kelmar.\nQuestion: x") == "Kelmar"
    assert er.extract_answer(" Kelmar in 1873.") == "Kelmar" and er.extract_answer("\n 1873, said") == "1873"
    assert er.exact_match("Kelmar.", "Kelmar") and er.exact_match("the kelmar", "Kelmar")
    assert not er.exact_match("Kelmar city", "Kelmar")
    # pred "kelmar city" vs gold "kelmar": precision 1/2, recall 1 -> F1 = 2/3
    assert er.token_f1("Kelmar city", "Kelmar") == pytest.approx(2 / 3)
    # pred "new old york" vs gold "new york": 2 common, p = 2/3, r = 1 -> 0.8
    assert er.token_f1("New old York", "New York") == pytest.approx(0.8)
    assert er.token_f1("1873", "1874") == 0.0 and er.token_f1("", "1874") == 0.0
    assert er.token_f1("1873", "1873") == 1.0


def test_points():
    pts = er.points(["full", "reuse", "random", "draft"], [0, 0.15, 1], [3, 5])
    assert [p["name"] for p in pts] == ["full", "reuse", "random-r0.15", "draft-D3-r0.15", "draft-D5-r0.15"]
    with pytest.raises(ConfigError, match="selectors"):
        er.points(["nope"], [0.1], [3])
    with pytest.raises(ConfigError, match="epic<n>"):
        er.points(["epic0"], [0.1], [3])
    # EPIC's fixed prefixes: one point each, r = the effective ratio n / chunk_len
    fixed = er.points(["epic", "epic8", "epic32"], [0.15], [3], chunk_len=256)
    assert [(p["name"], p["selector"], p.get("epic_prefix"), p["r"]) for p in fixed] == [
        ("full", "full", None, 1.0), ("epic-r0.15", "epic", None, 0.15), ("epic8", "epic", 8, 8 / 256),
        ("epic32", "epic", 32, 32 / 256)]
    assert all("draft_model" not in p for p in er.points(["draft"], [0.15], [3]))
    sep = er.points(["draft"], [0.15], [3], draft_model="/x/d.gguf")[1]
    assert sep["draft_model"] == "/x/d.gguf" and sep["name"] == "draft[d.gguf]-D3-r0.15"
    with pytest.raises(ConfigError, match="--r"):
        er.points(["random"], [1.5], [3])


def test_tiny_end_to_end_is_resumable(tmp_path):
    from runtime.evals.__main__ import TINY_ARGS
    from runtime.loaders import random_init
    from runtime.model import ModelArgs

    model = random_init(ModelArgs(**TINY_ARGS), seed=0)
    samples = er.rag_samples(BYTES, 1, seed=0, chunk_len=160, n_chunks=2, hops=(1, 2))   # 2 samples
    pts = er.points(["full", "draft", "epic8"], [0.15], [1], chunk_len=160)                 # 3 points
    path = er.run_rag(model, BYTES, samples[:1], pts, tmp_path, model_name="tiny", progress=False)
    assert len(path.read_text().splitlines()) == 3
    er.run_rag(model, BYTES, samples, pts, tmp_path, model_name="tiny", progress=False)
    er.run_rag(model, BYTES, samples, pts, tmp_path, model_name="tiny", progress=False)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    keys = [(r["sample_id"], r["policy"]) for r in recs]
    assert len(keys) == len(set(keys)) == 6
    assert all("error" not in r for r in recs)
    assert {r["chosen"] for r in recs if r["policy"] == "full"} == {320}
    assert all(r["chosen"] <= 48 and r["ttft_s"] > 0 for r in recs if r["policy"] != "full")
    assert {r["chosen"] for r in recs if r["policy"] == "epic8"} == {2 * 8}     # 8 first tokens of 2 chunks
    tables = report.report(tmp_path)                     # rag is one of report.TASKS
    t = tables["rag"]
    assert set(t.hops) == {"all", "1", "2"}
    full = t[(t.hops == "all") & (t.policy == "full")].iloc[0]
    assert full.n == 2 and full.mcnemar_p == 1.0 and full.f1_delta == 0.0
    assert t[(t.hops == "all") & (t.policy == "epic8")].iloc[0].epic_prefix == 8
    assert (tmp_path / "rag.csv").exists() and (tmp_path / "rag.png").stat().st_size > 1000
