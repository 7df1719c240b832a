"""RAG selection signals against independent references (tiny random model, CPU, fast):
the trace's norms / K/V deviation / question attention vs a hand-written dense forward, the
oracle's deviation vs a per-token loop over a normal prefill, sink tokens, recall, the shared
trace giving the same choice as a live selection, the chunk-alone features, the twin's costs."""
import json
import math
import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from core.policies.rag import RagPolicyConfig, budget_of, deep_layers, feature_bytes
from runtime.engine import prefill_once
from runtime.loaders import random_init
from runtime.model import ModelArgs
from runtime.rag import ChunkStore, oracle_set, placed_kv, rag_prefill, recall, select, selector_scores, trace
from runtime.rag.selectors import sink_positions, span_complete, top_with_sinks

ARGS = dict(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, max_seq_len=512,
            rope_base=10000.0)
CHUNK, N_CHUNKS, Q = 20, 3, 7
N = CHUNK * N_CHUNKS
SCORING = ("cacheblend", "draft", "draft_dev", "draft_rel", "draft_attn", "oracle_dev", "oracle_norm")


@pytest.fixture(scope="module")
def model():
    return random_init(ModelArgs(**ARGS), seed=3)


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 512, (N + Q,), generator=g).tolist()
    return [ids[i * CHUNK:(i + 1) * CHUNK] for i in range(N_CHUNKS)], ids[N:], ids


@pytest.fixture(scope="module")
def store(model):
    return ChunkStore(model, disk=False)


@pytest.fixture(scope="module")
def traced(model, parts, store):
    chunks, _, prompt = parts
    reused = placed_kv(model, store, chunks)
    return reused, trace(model, prompt, model.args.n_layers, N, reused=reused, attn=True)


def pol(selector, r=0.2, D=3, **kw):
    return SimpleNamespace(**{**dict(name="rag", kv_dtype="auto", selector=selector, recompute_ratio=r,
                                     chunk_len=CHUNK, draft_layers=D, seed=0), **kw})


def naive_forward(model, ids):
    """A dense reference forward written out by hand (no cache, no SDPA, explicit RoPE and
    softmax, GQA by index): per layer the hidden-state norms after the block, K and V
    (H_kv, T, hd), and the attention probabilities (H, T, T)."""
    a = model.args
    H, Hkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
    T = len(ids)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]                   # (T, hd/2)

    def rope(x):                                                        # (heads, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    out = []
    with torch.no_grad():
        x = model.tok_embeddings.weight[torch.tensor(ids)].double()
        for blk in model.layers:
            at = blk.attention
            h = blk.attention_norm(x.float()).double()
            qkv = h @ at.wqkv.weight.double().T
            q = rope(qkv[:, : H * hd].view(T, H, hd).transpose(0, 1))
            k = rope(qkv[:, H * hd:(H + Hkv) * hd].view(T, Hkv, hd).transpose(0, 1))
            v = qkv[:, (H + Hkv) * hd:].view(T, Hkv, hd).transpose(0, 1)
            probs = torch.zeros(H, T, T, dtype=torch.float64)
            o = torch.zeros(H, T, hd, dtype=torch.float64)
            for head in range(H):
                kvh = head // (H // Hkv)
                s = q[head] @ k[kvh].T / math.sqrt(hd)
                s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
                probs[head] = torch.softmax(s, dim=-1)
                o[head] = probs[head] @ v[kvh]
            x = x + o.transpose(0, 1).reshape(T, H * hd) @ at.wo.weight.double().T
            f = blk.ffn_norm(x.float()).double()
            gate, up = (f @ blk.feed_forward.w13.weight.double().T).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ blk.feed_forward.w2.weight.double().T
            out.append(dict(norm=x.norm(dim=-1), k=k, v=v, probs=probs))
    return out


def test_trace_matches_a_dense_forward_by_hand(model, parts, traced, store):
    """norms (draft, oracle_norm), question attention mass (draft_attn) and chunk-alone norms
    (draft_rel) against the hand-written forward."""
    chunks, _, prompt = parts
    _, tr = traced
    ref = naive_forward(model, prompt)
    L = model.args.n_layers
    for li in range(L):
        assert torch.allclose(tr.norms[li].double(), ref[li]["norm"], rtol=1e-4)
        mass = ref[li]["probs"][:, N:, :N].mean(dim=(0, 1))                 # question rows, context columns
        assert torch.allclose(tr.attn[li].double(), mass, rtol=1e-4, atol=1e-7)
    alone = [naive_forward(model, c) for c in chunks]
    solo = torch.stack([torch.cat([a[li]["norm"] for a in alone]) for li in range(L)])
    for D in (1, 3, 5, L):
        deep = list(range(D - math.ceil(D / 3), D))
        assert list(deep_layers(D)) == deep
        want = sum(ref[li]["norm"][:N] for li in deep) / len(deep)
        assert torch.allclose(selector_scores("draft", tr, D, L).double(), want, rtol=1e-4)
        want = sum(ref[li]["probs"][:, N:, :N].mean(dim=(0, 1)) for li in deep) / len(deep)
        assert torch.allclose(selector_scores("draft_attn", tr, D, L).double(), want, rtol=1e-4, atol=1e-7)
        want = sum((ref[li]["norm"][:N] / solo[li]).log().abs() for li in deep) / len(deep)
        got = selector_scores("draft_rel", tr, D, L, [store.features(c) for c in chunks])
        assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-5)
    assert torch.allclose(selector_scores("oracle_norm", tr, 1, L), selector_scores("draft", tr, L, L))


def test_oracle_dev_equals_a_per_token_loop_over_a_normal_prefill(model, parts, traced):
    """The deviation from the engine's own prefill K/V (prefill_once), one token at a time."""
    _, _, prompt = parts
    reused, tr = traced
    L = model.args.n_layers
    kv = prefill_once(model, [prompt]).kv
    deep = range(L - math.ceil(L / 3), L)
    want = torch.zeros(N, dtype=torch.float64)
    for j in range(N):
        for li in deep:
            dk = sum(float((kv[li][0][0, h, j] - reused[li][0][0, h, j]).double().square().sum())
                     for h in range(model.args.n_kv_heads))
            dv = sum(float((kv[li][1][0, h, j] - reused[li][1][0, h, j]).double().square().sum())
                     for h in range(model.args.n_kv_heads))
            want[j] += (math.sqrt(dk) + math.sqrt(dv)) / len(deep)
    got = selector_scores("oracle_dev", tr, 1, L).double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert want[:CHUNK].max() < 1e-4 * want[CHUNK:].max()      # the first chunk sits at its own positions
    B = budget_of(0.2, N)
    top = sorted(torch.topk(want, B).indices.tolist())
    assert oracle_set(model, prompt, reused, N, B) == top
    chosen, _ = select("oracle_dev", r=0.2, chunks=parts[0], model=model, prompt=prompt, reused=reused,
                       policy=pol("oracle_dev"))
    assert chosen == top


@pytest.mark.parametrize("selector", SCORING)
def test_shared_trace_chooses_what_a_live_selection_chooses(model, parts, store, traced, selector):
    """The evals select from one precomputed full trace per question; rag_prefill without it
    runs the selector's own (D-layer, layer-1, full) pass: the same tokens."""
    chunks, q, _ = parts
    _, tr = traced
    for D, sink in ((3, 0), (5, 2)):
        p = pol(selector, D=D, sink_tokens=sink)
        live = rag_prefill(model, chunks, q, p, store)
        shared = rag_prefill(model, chunks, q, p, store, traced=tr)
        assert live.chosen == shared.chosen, (selector, D)
        assert len(live.chosen) == budget_of(0.2, N)


@pytest.mark.parametrize("selector", ("random",) + SCORING)
def test_sink_tokens_always_chosen_within_the_budget(model, parts, store, traced, selector):
    chunks, _, prompt = parts
    reused, tr = traced
    for r, n in ((0.2, 3), (0.05, 2), (0.5, 30)):
        B = budget_of(r, N)
        chosen, info = select(selector, r=r, chunks=chunks, model=model, prompt=prompt, reused=reused,
                              policy=pol(selector, r=r, sink_tokens=n), store=store, traced=tr)
        sinks = {c * CHUNK + j for c in range(N_CHUNKS) for j in range(min(n, CHUNK))}
        assert len(chosen) <= B and len(set(chosen)) == len(chosen) and all(0 <= p < N for p in chosen)
        if len(sinks) <= B:
            assert sinks <= set(chosen)
        else:                                   # more sinks than budget: every chunk's token 0 first
            assert set(chosen) <= sinks and {c * CHUNK for c in range(N_CHUNKS)} <= set(chosen)


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, 30), min_size=1, max_size=5), n=st.integers(0, 8), r=st.floats(0, 1),
       seed=st.integers(0, 10 ** 6), spans=st.booleans())
def test_sinks_and_budget_property(lens, n, r, seed, spans):
    N_ = sum(lens)
    B = budget_of(r, N_)
    scores = torch.rand(N_, generator=torch.Generator().manual_seed(seed))
    sinks = sink_positions(lens, n, B)
    starts = [sum(lens[:c]) for c in range(len(lens))]
    every = {s + j for s, m in zip(starts, lens) for j in range(min(n, m))}
    assert set(sinks) <= every and len(sinks) == min(len(every), B)
    chosen = span_complete(scores, B, pre=sinks)[0] if spans else top_with_sinks(scores, B, sinks)
    assert len(chosen) == len(set(chosen)) and set(sinks) <= set(chosen)
    assert len(chosen) <= B and (spans or len(chosen) == B)


def test_recall_by_hand(model, parts, traced):
    assert recall([1, 2, 3], [2, 3, 4, 5]) == 0.5
    assert recall([], [1]) == 0.0 and recall([1, 2], [1, 2]) == 1.0
    assert math.isnan(recall([1], []))
    from runtime.evals.rag import Shared

    reused, tr = traced
    sh = Shared(traced=tr, oracle_scores=selector_scores("oracle_dev", tr, 1, 6), seconds=0.0, oracles={})
    assert sh.oracle(12) == oracle_set(model, parts[2], reused, N, 12)
    assert sh.oracle(N + 5) == list(range(N)) and sh.oracle(0) == []


def test_chunk_features_stored_counted_and_checked(model, parts, tmp_path):
    c = parts[0][1]
    s1 = ChunkStore(model, root=tmp_path)
    f = s1.features(c)
    assert f.shape == (model.args.n_layers, CHUNK) and s1.stats["feature_computed"] == 1
    assert s1.stats["feature_bytes"] == feature_bytes(CHUNK, model.args.n_layers) == 4 * CHUNK * 6
    s2 = ChunkStore(model, root=tmp_path)
    assert torch.equal(s2.features(c), f) and s2.stats["feature_disk_hits"] == 1 and s2.stats["feature_computed"] == 0
    kv = s1.get(c)                              # filled by the features' pass: a memory hit, prefill_once's K/V
    assert s1.stats["computed"] == 1 and s1.stats["mem_hits"] == 1
    assert all(torch.equal(a, b) for pair, ref in zip(kv, prefill_once(model, [c]).kv) for a, b in zip(pair, ref))
    path = next(tmp_path.glob("*.feat.safetensors"))
    path.write_bytes(path.read_bytes()[:-9] + b"corrupted")
    s3 = ChunkStore(model, root=tmp_path)
    assert torch.equal(s3.features(c), f) and s3.stats["corrupt"] == 1 and s3.stats["feature_computed"] == 1


@pytest.mark.parametrize("knobs, msg", [
    (dict(selector="epic", sink_tokens=4), "policy.sink_tokens=4"),
    (dict(selector="full", sink_tokens=1), "policy.sink_tokens=1"),
    (dict(selector="reuse", sink_tokens=2), "policy.sink_tokens=2"),
    (dict(selector="draft", sink_tokens=-1), "policy.sink_tokens"),
    (dict(selector="draft_dev", draft_model="/x.gguf"), "policy.draft_model"),
    (dict(selector="draft_attn", draft_layers=0), "policy.draft_layers"),
    (dict(selector="draft_dev", draft_layers=1), "policy.draft_layers=1")])
def test_declaration_refuses_in_one_line(knobs, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")) as e:
        RagPolicyConfig(**knobs).check()
    assert "\n" not in str(e.value)
    RagPolicyConfig(selector="oracle_dev", sink_tokens=4).check()        # the runtime takes them


# ----------------------------------------------------------------------------- the simulator twin

@pytest.fixture(scope="module")
def cpu():
    from pathlib import Path

    from simulator.costs import Costs, ModelShape

    c = Costs.load(Path(__file__).resolve().parents[1] / "profiles/cpu-intel-r-xeon-r-processor-2c.json", "smollm2",
                   allow_extrapolation=True)
    s = c.shape
    return c, ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)


@pytest.mark.parametrize("sel", ["oracle_dev", "oracle_norm"])
def test_simulator_refuses_the_oracles(sel):
    from simulator.policies import make_policy

    with pytest.raises(ConfigError, match=f"policy.selector={sel}") as e:
        make_policy({"name": "rag", "selector": sel})
    assert "\n" not in str(e.value)


def test_twin_costs_of_the_draft_variants(cpu):
    from simulator.hardware import solve
    from simulator.policies import make_policy

    c, sh = cpu
    n, q = 8 * 512, 32
    P = n + q

    def ttft(**kw):
        return solve(make_policy({"name": "rag", **kw}).prefill_graph(c, sh, [P])).seconds

    for D in (3, 5, 10):
        k = math.ceil(D / 3)
        base = ttft(selector="draft", draft_layers=D)
        # on this CPU profile every op is serial on the compute thread: extras add exactly
        assert ttft(selector="draft_dev", draft_layers=D) - base == pytest.approx(k * c.table("rope_rerotate")(n))
        assert ttft(selector="draft_attn", draft_layers=D) - base == pytest.approx(
            k * c.table("selective_prefill")(q, P))
        assert ttft(selector="draft_rel", draft_layers=D) == pytest.approx(base)           # warm: nothing to load
        feat = 8 * c.table("chunk_load")(512) * feature_bytes(512, 30) / (2 * 512 * sh.kv_row)
        assert ttft(selector="draft_rel", draft_layers=D, store="disk") - ttft(
            selector="draft", draft_layers=D, store="disk") == pytest.approx(feat)
        assert ttft(selector="draft_dev", draft_layers=D, sink_tokens=4) == ttft(selector="draft_dev", draft_layers=D)
    attn3 = ttft(selector="draft_attn", draft_layers=3) - ttft(selector="draft", draft_layers=3)
    attn10 = ttft(selector="draft_attn", draft_layers=10) - ttft(selector="draft", draft_layers=10)
    assert attn10 == pytest.approx(4 * attn3)                                   # ceil(10/3) = 4 deep layers


# ----------------------------------------------------------------------------- the result log, two writers

def _writer(path, who, n):
    from runtime.evals.run import ResultLog

    log = ResultLog(path)
    for i in range(n):
        log.append({"sample_id": f"s{i}", "policy": who, "pad": "x" * (i * 37 % 3000)})
    for i in range(n // 2):                     # the other writer's keys: written once in all
        log.append({"sample_id": f"s{i}", "policy": "shared"})


def test_two_processes_append_whole_lines_without_duplicates(tmp_path):
    path = tmp_path / "rag.jsonl"
    ctx = mp.get_context("fork")
    ps = [ctx.Process(target=_writer, args=(path, w, 150)) for w in ("a", "b")]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [(r["sample_id"], r["policy"]) for r in recs]
    assert len(keys) == len(set(keys)) == 150 * 2 + 75


def test_shards_partition_the_questions(tmp_path):
    from runtime.evals import data
    from runtime.evals import rag as er
    from runtime.evals.__main__ import TINY_ARGS

    tiny = random_init(ModelArgs(**TINY_ARGS), seed=0)
    tok = data.ByteTokenizer()
    samples = er.rag_samples(tok, 2, seed=0, chunk_len=160, n_chunks=2, hops=(1,))
    pts = er.points(["full", "draft_attn", "oracle_dev"], [0.15], [1], chunk_len=160, sink_tokens=[0, 2])
    assert [p["name"] for p in pts] == ["full", "draft_attn-D1-r0.15", "draft_attn-D1-r0.15-s2",
                                        "oracle_dev-r0.15", "oracle_dev-r0.15-s2"]
    for k in (0, 1):
        er.run_rag(tiny, tok, samples, pts, tmp_path, model_name="tiny", progress=False, shard=(k, 2))
    recs = [json.loads(x) for x in (tmp_path / "rag.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["policy"]) for r in recs) == sorted((i, p["name"]) for i in (0, 1) for p in pts)
    assert all(r["recall_vs_oracle"] == 1.0 for r in recs if r["policy"] in ("full", "oracle_dev-r0.15"))
    t = er.rag_table(__import__("runtime.evals.report", fromlist=["load"]).load(tmp_path / "rag.jsonl"))
    assert {"recall_vs_oracle", "recall_vs_oracle_lo", "recall_vs_oracle_hi", "sink_tokens"} <= set(t.columns)
    assert er.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            er.parse_shard(bad)
    with pytest.raises(ConfigError, match="--draft-model"):
        er.points(["draft_rel"], [0.15], [3], draft_model="/x.gguf")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=" \n.,inKa1", max_size=24))
def test_an_answer_settled_early_is_the_answer_of_every_continuation(text):
    from runtime.evals.rag import answer_settled, extract_answer

    for cut in range(len(text) + 1):
        if answer_settled(text[:cut]):
            assert extract_answer(text[:cut]) == extract_answer(text), (text, cut)


def test_a_torn_line_left_by_a_killed_writer_is_cut_before_the_next_append(tmp_path):
    from runtime.evals.run import ResultLog

    path = tmp_path / "rag.jsonl"
    a = ResultLog(path)
    a.append({"sample_id": "s0", "policy": "p"})
    with open(path, "ab") as f:                 # another process died mid-line
        f.write(b'{"sample_id": "s1", "pol')
    assert a.append({"sample_id": "s2", "policy": "p"})
    assert [json.loads(x)["sample_id"] for x in path.read_text().splitlines()] == ["s0", "s2"]
    assert not a.append({"sample_id": "s0", "policy": "p"}) and ResultLog(path).done == {("s0", "p"), ("s2", "p")}


def test_rag_ttft_benchmark_smoke(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rag_ttft.py"
    spec = importlib.util.spec_from_file_location("rag_ttft_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--model", "tiny", "--chunks", "2", "--chunk-len", "32", "--question", "8", "--repeats", "1",
                    "--draft-layers", "3", "--selectors", "draft", "draft_attn"])
    names = [r["config"] for r in out["rows"]]
    assert names == ["full recompute", "draft D=3", "draft_attn D=3"]
    text = capsys.readouterr().out
    assert "fingerprint" in text and "twin" in text
    d3 = out["rows"][1]
    assert d3["bound"] == pytest.approx(1 / (0.15 + 3 / 30)) and d3["chosen"] == budget_of(0.15, 64)
    assert out["rows"][2]["twin_ttft_s"] > d3["twin_ttft_s"] > 0             # the attention read is costed
