"""runtime.serve: continuous batching of cohorts against engine.generate, the simulator's admission
rules under a KV budget, real-time arrival replay, and the simulator's results schema."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from runtime import loaders
from runtime import serve
from runtime.engine import SamplingParams, generate
from core.errors import ConfigError
from simulator.policies import make_policy

CONF = str(Path(__file__).resolve().parent.parent / "conf")
CPU = torch.device("cpu")
KIVI = ["policy=kivi", "policy.bits=2", "policy.group_size=16", "policy.residual=16"]
SPECACHE = ["policy=specache", "policy.bits=2", "policy.group_size=16", "policy.residual=16", "policy.k=8",
            "policy.prefetch=true"]


def _cfg(*overrides, name="serve"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=["model=tiny", *overrides])


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # a 2-core box shared with others: one thread is faster and steadier
    yield loaders.from_config(_cfg().model, CPU)
    torch.set_num_threads(threads)


def _alone(model, prompts, gen_len, policy):
    r = generate(model, prompts, SamplingParams(max_new_tokens=gen_len, ignore_eos=True), policy)
    return [q.tokens for q in r.requests]


@pytest.mark.parametrize("policy", [["policy=full"], KIVI], ids=["full", "kivi2"])
def test_static_batch_is_one_cohort_with_generate_tokens(tiny, policy):
    cfg = _cfg("workload.batch=3", "workload.prompt_len=80", "workload.prompt_len_min=30", "workload.gen_len=24",
               "progress=false", *policy)
    out = serve.serve(tiny, cfg)
    reqs = out.requests
    assert out.cohorts == 1 and out.max_batch_reached == 3 and out.prefill_iterations == 1
    assert len({r.prompt_len for r in reqs}) > 1            # left padding is exercised
    assert [r.tokens for r in reqs] == _alone(tiny, [r.prompt for r in reqs], 24, cfg.policy)
    assert all(r.arrival_s == 0.0 and r.admitted_s >= 0 and r.first_token_s <= r.done_s for r in reqs)


def _reqs(base, lens, gen_len, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lens):
        r = serve.ServedRequest(base + i, 0.0, n, gen_len)
        r.prompt = torch.randint(3, 512, (n,), generator=g).tolist()
        out.append(r)
    return out


def _first(c):
    for r, t in zip(c.reqs, c.nxt.tolist()):
        r.tokens.append(t)
        r.generated = 1


@pytest.mark.parametrize("policy", [["policy=full"], KIVI, SPECACHE, ["policy=offload"]],
                         ids=["full", "kivi2", "specache-prefetch", "offload"])
def test_two_cohorts_decoded_together_match_each_alone(tiny, policy):
    """Cohort B joins A's decoding after 3 steps and leaves first: the composite's attention split
    (each cohort its own column, padding and Step; SpeCache's guess) changes no token."""
    cfg = _cfg(*policy)
    server = serve.Server(tiny, cfg.policy)
    a, b = _reqs(0, [70, 41, 55], 20, 1), _reqs(10, [33, 60], 9, 2)
    ca = server.prefill(a)
    _first(ca)
    server.speculate(ca)
    live, step = [ca], 0
    while live:
        if step == 3:
            cb = server.prefill(b)
            _first(cb)
            server.speculate(cb)
            live.append(cb)
        server.decode(live)
        for c in live:
            for r, t in zip(c.reqs, c.nxt.tolist()):
                if not r.finished:
                    r.tokens.append(t)
                    r.generated += 1
        live = [c for c in live if not c.done]
        step += 1
    assert (ca.guess is not None) == (policy is SPECACHE)
    for group in (a, b):
        assert [r.tokens for r in group] == _alone(tiny, [r.prompt for r in group], group[0].gen_len, cfg.policy)
    if policy is SPECACHE:
        assert 0 <= server.policy_stats([])["guess_accuracy"] <= 1


def _reserve(cfg, tiny, n_tokens):
    return make_policy(cfg.policy).reserve_bytes(n_tokens, serve.kv_shape(tiny, cfg.policy, CPU))


@pytest.mark.parametrize("policy", [["policy=full"], KIVI], ids=["full", "kivi2"])
def test_budget_of_two_requests_admits_two_at_a_time_in_fifo_order(tiny, policy):
    base = ["workload=poisson", "workload.rate=400", "workload.n_requests=7", "workload.prompt_len=40",
            "workload.gen_len=6", "progress=false", *policy]
    budget = 2 * _reserve(_cfg(*base), tiny, 46)
    cfg = _cfg(*base, f"hardware.kv_budget_bytes={budget}")
    out = serve.serve(tiny, cfg)
    reqs = out.requests
    assert [r.id for r in reqs] == list(range(7)) and all(r.generated == 6 and len(r.tokens) == 6 for r in reqs)
    assert out.max_batch_reached == 2
    # at no admission are more than two requests in service (admitted, not yet done)
    for r in reqs:
        assert sum(q.admitted_s <= r.admitted_s < q.done_s for q in reqs) <= 2
    admitted = [r.admitted_s for r in reqs]
    assert admitted == sorted(admitted)                       # FIFO
    assert all(r.admitted_s >= r.arrival_s for r in reqs)

    with pytest.raises(ConfigError, match="kv_budget_bytes"):
        serve.serve(tiny, _cfg(*base, f"hardware.kv_budget_bytes={budget // 2 - 1}"))


@pytest.mark.parametrize("overrides,message", [
    (["hardware.kv_budget_bytes=0"], "kv_budget_bytes=0"),
    (["workload.arrival=bursty"], "workload.arrival='bursty'"),
    (["workload.prompt_len=2040", "workload.gen_len=16"], "context"),
    (["scheduler.order=lifo"], "scheduler.order"),
    (["policy=rag"], "policy='rag'"),
    (["scheduler.batching=ragged"], "scheduler.batching=ragged: runtime.serve batches in cohorts"),
    (["scheduler.batching=paged"], "scheduler.batching='paged'"),
])
def test_bad_input_names_the_field(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        serve.serve(tiny, _cfg(*overrides))


def test_trace_arrivals_are_replayed_in_real_time(tiny, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,gen_len\n0.0,24,4\n0.25,16,5\n0.5,30,3\n")
    out = serve.serve(tiny, _cfg("workload=trace", f"workload.trace={trace}", "progress=false"))
    reqs = out.requests
    assert [(r.arrival_s, r.prompt_len, r.gen_len) for r in reqs] == [(0.0, 24, 4), (0.25, 16, 5), (0.5, 30, 3)]
    for r in reqs:
        assert r.arrival_s <= r.admitted_s <= r.first_token_s <= r.done_s
        assert r.ttft_s > 0 and len(r.tokens) == r.gen_len
    assert reqs[-1].done_s >= 0.5                             # the run waited for the last arrival
    assert out.cohorts == 3


def test_closed_users(tiny):
    cfg = _cfg("workload=closed", "workload.users=2", "workload.n_requests=5", "workload.think_s=0.01",
               "workload.prompt_len=20", "workload.gen_len=3", "progress=false")
    reqs = serve.serve(tiny, cfg).requests
    assert [r.id for r in reqs] == list(range(5))
    assert [r.arrival_s for r in reqs[:2]] == [0.0, 0.0]
    assert all(r.arrival_s >= 0.01 for r in reqs[2:])         # sent think_s after an earlier one completed
    done = sorted(r.done_s for r in reqs)
    assert all(r.arrival_s >= done[i] for i, r in enumerate(reqs[2:]))


@pytest.mark.parametrize("policy", [["policy=full"], KIVI], ids=["full", "kivi2"])
def test_run_writes_the_simulators_schema(tiny, tmp_path, policy):
    from simulator.run import simulate

    common = ["workload.batch=3", "workload.prompt_len=64", "workload.gen_len=8", f"results_dir={tmp_path}",
              *policy]
    rec = serve.run(_cfg(*common, "progress=false", "warmup=false"))
    sim = simulate(_cfg(*common, name="simulate"))
    files = sorted((tmp_path / "measured").glob("*.json"))      # the per-request CSV lies beside it
    assert [f.name for f in files] == [Path(rec["path"]).name] and files[0].name.startswith("serve_tiny_")
    data = json.loads(files[0].read_text())
    missing = set(sim) - set(rec) - {"sim_wall_s", "sim_iterations", "extrapolated"}   # simulator-only fields
    assert not missing, missing
    assert set(data) == set(rec) - {"path"}                  # the path is added after writing, as in bench
    assert data["requests"] == 3 and data["output_tokens"] == 24 and data["max_batch_reached"] == 3
    # the same requests and the same KV bytes as the simulator's twin (fixed lengths: same peak holding)
    assert data["kv_bytes_device"] == sim["kv_bytes_device"] and data["kv_bytes_host"] == sim["kv_bytes_host"]
    assert [(r["prompt_len"], r["gen_len"]) for r in data["per_request"]] == [(64, 8)] * 3
    assert data["provenance"]["kind"] == "measured" and data["config"]["scheduler"]["name"] == "continuous"
    assert "throughput" in serve.format_table(rec)


def test_request_done_before_its_cohort_releases_its_reservation(tiny, tmp_path):
    """Two requests admitted together with different gen_len: the short one is done (and its
    reservation back) when it has its tokens, while its row computes on until the cohort ends."""
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,gen_len\n0.0,30,3\n0.0,20,12\n")
    out = serve.serve(tiny, _cfg("workload=trace", f"workload.trace={trace}", "progress=false"))
    short, long = out.requests
    assert out.cohorts == 1 and short.cohort == long.cohort == 0
    assert len(short.tokens) == 3 and len(long.tokens) == 12 and short.done_s < long.done_s
    ref = _alone(tiny, [short.prompt, long.prompt], 12, _cfg().policy)
    assert short.tokens == ref[0][:3] and long.tokens == ref[1]


def test_decode_first_admits_only_when_drained(tiny):
    cfg = _cfg("workload=poisson", "workload.rate=300", "workload.n_requests=6", "workload.prompt_len=24",
               "workload.gen_len=5", "scheduler.order=decode_first", "progress=false")
    reqs = serve.serve(tiny, cfg).requests
    for r in reqs:
        for q in reqs:
            if q.cohort != r.cohort:      # cohorts never overlap: a new one starts after the last finished
                assert q.admitted_s >= r.done_s or r.admitted_s >= q.done_s
