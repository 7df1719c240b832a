"""Per-request records (`<stem>.requests.csv`), the time series and the serving metrics: rows
against a hand-computed schedule, metrics against numpy on the rows, the same columns from
runtime.serve, percentile names, goodput only under an SLO, bad input and unwritable folders."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from core.config import SloConfig, WorkloadConfig, register
from core.errors import ConfigError, cli_errors
from core.per_request import (REQUEST_COLUMNS, TIMESERIES_COLUMNS, TokenTimes, metric_stats, percentile_key,
                              request_rows, weighted_percentiles, write_requests_csv)
from core.results import completion_rate_of, serving_metrics
from simulator.costs import KV_ELEMENT_BYTES, Costs, ModelShape
from simulator.policies import Full, Op
from simulator.scheduler import Sim

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
CPU = ROOT / "profiles/cpu-intel-r-xeon-r-processor-2c.json"
PREFILL, DECODE = 0.5, 0.125          # exact in binary: the hand-computed times below are exact too


class Fixed(Full):
    """`full`'s twin with a fixed step time: a prefill costs PREFILL, a decode step DECODE."""

    def prefill_graph(self, c, s, prompts):
        return [Op("overhead", "compute", PREFILL)]

    def decode_graph(self, c, s, batch, ctx):
        return [Op("overhead", "compute", DECODE)]


def _costs():
    c = Costs.load(CPU, "tiny", allow_extrapolation=True)
    s = c.shape
    return c.bind(s, s["n_layers"], KV_ELEMENT_BYTES[c.kv_dtype_auto])


def _shape(c):
    s = c.shape
    return ModelShape(s["n_layers"], s["n_kv_heads"], s["head_dim"], c.kv_dtype_auto)


def _cfg(name, *overrides):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _slo(**kw):
    return OmegaConf.structured(SloConfig(**kw))


@pytest.fixture
def hand(tmp_path):
    """Three requests on a fixed step time (prefill_first, no memory limit):
    r0 arrives 0.00 (gen 3): admitted 0, prefilled 0 -> 0.5;
    r1 arrives 0.25 (gen 2): admitted 0.5, prefilled 0.5 -> 1.0;
    decode r0 + r1 1.0 -> 1.125 (r1 done), decode r0 1.125 -> 1.25 (r0 done);
    r2 arrives 3.00 (gen 1): admitted 3, prefilled 3 -> 3.5, done."""
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_len,gen_len\n0.0,4,3\n0.25,4,2\n3.0,4,1\n")
    c = _costs()
    sim = Sim(c, _shape(c), Fixed(), 10 ** 12, timeseries=True)
    reqs = sim.run(OmegaConf.structured(WorkloadConfig(arrival="trace", trace=str(trace))))
    return sim, reqs


def test_rows_equal_the_hand_computed_schedule(hand, tmp_path):
    sim, reqs = hand
    path = write_requests_csv(tmp_path / "r.requests.csv", request_rows(reqs, sim.token_times(reqs)))
    df = pd.read_csv(path)
    assert tuple(df.columns) == REQUEST_COLUMNS
    nan = math.nan
    want = {  # id: arrival, admitted, first, done, prompt, out, queue, ttft, tpot, e2e, itl mean/p50/p90/p99/max
        0: (0.0, 0.0, 0.5, 1.25, 4, 3, 0.0, 0.5, 0.375, 1.25, 0.375, 0.375, 0.125 + 0.9 * 0.5, 0.125 + 0.99 * 0.5, 0.625),
        1: (0.25, 0.5, 1.0, 1.125, 4, 2, 0.25, 0.75, 0.125, 0.875, 0.125, 0.125, 0.125, 0.125, 0.125),
        2: (3.0, 3.0, 3.5, 3.5, 4, 1, 0.0, 0.5, nan, 0.5, nan, nan, nan, nan, nan),
    }
    for _, row in df.iterrows():
        got = tuple(row[c] for c in REQUEST_COLUMNS[1:-1])
        assert got == pytest.approx(want[row.request_id], rel=1e-12, abs=1e-15, nan_ok=True), row.request_id
        assert row.preemptions == 0


def test_timeseries_rows_at_each_scheduler_event(hand):
    sim, _ = hand
    kv = lambda *tokens: Full().kv_bytes(list(tokens), sim.shape)   # noqa: E731
    want = [(0.0, 1, 0, 0, 0, 1),                       # r0's prefill starts
            (0.5, 2, 0, *kv(4), 1),                     # r1's prefill: r0 holds its prompt
            (1.0, 2, 0, *kv(4, 4), 1),                  # decode of both
            (1.125, 1, 0, *kv(5), 1),                   # decode of r0 alone
            (1.25, 0, 0, 0, 0, 0),                      # idle until r2
            (3.0, 1, 0, 0, 0, 1),
            (3.5, 0, 0, 0, 0, 0)]
    assert len(TIMESERIES_COLUMNS) == 6 and sim.series == want


def test_simulator_writes_the_records_and_the_time_series(tmp_path):
    """simulate(): the CSVs beside the result, metrics against numpy on the rows; the ITL pooled
    over every request's gaps, its token times rebuilt from the timeline's decode iterations."""
    from simulator.run import build_sim, simulate

    ov = ["model=tiny", "workload=poisson", "workload.n_requests=40", "workload.rate=400", "workload.prompt_len=64",
          "workload.prompt_len_min=16", "workload.gen_len=12", f"results_dir={tmp_path}", "progress=false",
          "metrics.percentiles=[99.9,25]", "timeseries=true", "timeline=true",
          "allow_extrapolation=true"]   # the test cache holds the committed profile (batch grid to 4)
    rec = simulate(_cfg("simulate", *ov))
    df = pd.read_csv(rec["requests_path"])
    assert Path(rec["requests_path"]).name == Path(rec["path"]).stem + ".requests.csv"
    assert tuple(pd.read_csv(rec["timeseries_path"]).columns) == TIMESERIES_COLUMNS
    assert len(df) == rec["requests"] == 40 and df.queue_s.max() > 0          # some requests waited
    for m in ("ttft", "tpot", "e2e", "queue"):
        x = df[f"{m}_s"].to_numpy()
        assert rec[f"{m}_mean_s"] == pytest.approx(x.mean(), rel=1e-12)
        assert rec[f"{m}_std_s"] == pytest.approx(x.std(), rel=1e-9, abs=1e-15)
        for p in (50, 90, 99, 99.9, 25):
            assert rec[f"{m}_{percentile_key(p)}_s"] == pytest.approx(np.percentile(x, p), rel=1e-12, abs=1e-15)
    assert rec["ttft_s"] == rec["ttft_mean_s"] and rec["ttft_s_p99"] == rec["ttft_p99_s"]   # the old names stay
    # an independent reference for ITL: each request's tokens at its prefill and at every decode
    # iteration's end (the timeline's steps) after it, up to its done time
    cfg = _cfg("simulate", *ov)
    sim, _ = build_sim(cfg)
    reqs = sim.run(cfg.workload)
    ends = np.asarray([t0 + dur for stage, t0, dur, *_ in sim.steps if stage == "decode"])
    gaps = []
    for r, row in zip(reqs, df.itertuples()):
        t = np.concatenate(([r.first_token_s], ends[(ends > r.first_token_s) & (ends <= r.done_s + 1e-12)]))
        assert len(t) == r.gen_len and t[-1] == pytest.approx(r.done_s, abs=1e-12)
        g = np.diff(t)
        gaps.append(g)
        assert (row.itl_mean_s, row.itl_p50_s, row.itl_p90_s, row.itl_p99_s, row.itl_max_s) == pytest.approx(
            (g.mean(), *np.percentile(g, [50, 90, 99]), g.max()), rel=1e-9)
    g = np.concatenate(gaps)
    assert rec["itl_mean_s"] == pytest.approx(g.mean(), rel=1e-9)
    assert rec["itl_std_s"] == pytest.approx(g.std(), rel=1e-9)
    for p in (50, 90, 99, 99.9, 25):
        assert rec[f"itl_{percentile_key(p)}_s"] == pytest.approx(np.percentile(g, p), rel=1e-9)


@pytest.mark.parametrize("extra", [["fidelity=detailed"], ["workload=closed", "workload.users=3"],
                                   ["scheduler.order=decode_first", "scheduler.max_batch=2"]],
                         ids=["detailed", "closed", "decode_first"])
def test_each_requests_last_token_is_its_done_time(extra):
    """The shared decode-iteration times give every request exactly output_len tokens, the last
    at its done time, whatever the fidelity, arrivals or order."""
    from simulator.run import build_sim

    cfg = _cfg("simulate", "model=tiny", "workload=poisson", "workload.n_requests=12", "workload.rate=300",
               "workload.prompt_len=48", "workload.gen_len=6", "progress=false", *extra)
    sim, _ = build_sim(cfg)
    reqs = sim.run(cfg.workload)
    t = sim.token_times(reqs)
    assert list(t.count) == [r.gen_len - 1 for r in reqs]
    assert [t.later[s + c - 1] for s, c in zip(t.start, t.count)] == [r.done_s for r in reqs]


def test_goodput_only_under_an_slo_and_completion_rate_always(hand):
    _, reqs = hand
    span = 3.5
    m = serving_metrics(reqs, _slo())
    assert "goodput_req_s" not in m and "goodput_fraction" not in m and m["completion_rate"] == 3 / span
    m = serving_metrics(reqs, _slo(e2e_s=1.0))                    # r0's 1.25 s is over
    assert m["goodput_fraction"] == 2 / 3 and m["goodput_req_s"] == 2 / span
    m = serving_metrics(reqs, _slo(ttft_s=0.6, e2e_s=1.0))        # r1's 0.75 s TTFT is over too
    assert m["goodput_fraction"] == 1 / 3 and m["completion_rate"] == 3 / span
    m = serving_metrics(reqs, _slo(tpot_s=0.2))                   # r0's 0.375; r2 has one token: no TPOT
    assert m["goodput_fraction"] == 2 / 3
    # an old record: goodput_req_s without an SLO was the completion rate
    old = {"goodput_req_s": 1.5, "config": {"slo": {"ttft_s": None, "tpot_s": None}}}
    assert completion_rate_of(old) == 1.5 and completion_rate_of({**old, "completion_rate": 2.0}) == 2.0
    assert math.isnan(completion_rate_of({"goodput_req_s": 1.5, "config": {"slo": {"ttft_s": 1.0}}}))


def test_percentile_names_and_weighted_percentiles():
    assert [percentile_key(p) for p in (50, 99.0, 99.9, 99.99, 0.5, 12.25)] == \
        ["p50", "p99", "p99_9", "p99_99", "p0_5", "p12_25"]
    rng = np.random.default_rng(0)
    v, c = rng.normal(size=200), rng.integers(0, 6, size=200)
    ps = [0.1, 1, 25, 50, 90, 99, 99.9]
    assert weighted_percentiles(v[c > 0], c[c > 0], ps) == pytest.approx(np.percentile(np.repeat(v, c), ps), rel=1e-12)
    s = metric_stats("itl", v, [99.9], c)
    e = np.repeat(v, c)
    assert (s["itl_mean_s"], s["itl_std_s"], s["itl_p99_9_s"]) == pytest.approx((e.mean(), e.std(), np.percentile(e, 99.9)))
    assert all(math.isnan(x) for x in metric_stats("tpot", [math.nan], [99.9]).values())
    # CSR token times (the runtime's own lists) pool exactly the per-request gaps
    lists = [[0.0, 0.1, 0.35], [0.2], [0.05, 0.5, 0.6, 1.0]]
    vals, counts = TokenTimes.from_lists(lists).pooled()
    assert sorted(np.repeat(vals, counts)) == pytest.approx(sorted([0.1, 0.25, 0.45, 0.1, 0.4]))


def test_serve_writes_the_same_columns_from_its_token_times(tmp_path):
    from runtime import serve

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = serve.run(_cfg("serve", "model=tiny", "workload=poisson", "workload.rate=50", "workload.n_requests=4",
                             "workload.prompt_len=24", "workload.gen_len=4", f"results_dir={tmp_path}",
                             "progress=false", "warmup=false", "metrics.percentiles=[99.9]"))
    finally:
        torch.set_num_threads(threads)
    df = pd.read_csv(rec["requests_path"])
    assert tuple(df.columns) == REQUEST_COLUMNS and len(df) == 4
    assert Path(rec["requests_path"]).name == Path(rec["path"]).stem + ".requests.csv"
    for row, pr in zip(df.itertuples(), rec["per_request"]):           # the JSON's rows, kept as they were
        assert row.request_id == pr["id"] and row.output_len == pr["gen_len"] == 4
        assert (row.ttft_s, row.tpot_s) == pytest.approx((pr["ttft_s"], pr["tpot_s"]), rel=1e-12)
        assert row.queue_s == pytest.approx(pr["admitted_s"] - pr["arrival_s"], abs=1e-12)
        assert row.e2e_s == pytest.approx(pr["done_s"] - pr["arrival_s"], rel=1e-12)
        assert row.itl_mean_s == pytest.approx(row.tpot_s, rel=1e-9)      # (last - first) / (n - 1) either way
        assert row.itl_max_s >= row.itl_p99_s >= row.itl_p50_s > 0
    for m in ("ttft", "e2e", "queue"):
        assert rec[f"{m}_p99_9_s"] == pytest.approx(np.percentile(df[f"{m}_s"], 99.9), rel=1e-12, abs=1e-15)
    assert "goodput_req_s" not in rec and rec["completion_rate"] == pytest.approx(4 / rec["wall_s"])
    assert "ITL mean" in serve.format_table(rec)


def test_serve_loop_records_every_token_time():
    from runtime import loaders, serve

    cfg = _cfg("serve", "model=tiny", "workload.batch=2", "workload.prompt_len=16", "workload.gen_len=5",
               "progress=false")
    out = serve.serve(loaders.from_config(cfg.model, torch.device("cpu")), cfg)
    for r in out.requests:
        t = r.token_times
        assert len(t) == r.gen_len and t[0] == r.first_token_s and t[-1] == r.done_s and t == sorted(t)


BAD = [("metrics.percentiles=[100]", "metrics.percentiles[0]=100.0 is outside (0, 100)"),
       ("metrics.percentiles=[99.9,0]", "metrics.percentiles[1]=0.0 is outside (0, 100)"),
       ("metrics.percentiles=[nan]", "metrics.percentiles[0]=nan is not a finite number"),
       ("slo.e2e_s=0", "slo.e2e_s=0.0 must be > 0"),
       ("slo.e2e_s=-1", "slo.e2e_s=-1.0 must be > 0"),
       ("slo.ttft_s=nan", "slo.ttft_s=nan is not a finite number")]


@pytest.mark.parametrize("override,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_metrics_and_slo_are_one_line_exit_2(override, msg, tmp_path, capsys):
    from simulator.run import simulate

    with pytest.raises(SystemExit) as e, cli_errors("simulator.run"):
        simulate(_cfg("simulate", "model=tiny", override, f"results_dir={tmp_path}"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and msg in err, err


def test_the_command_line_refuses_a_bad_percentile(tmp_path):
    p = subprocess.run([sys.executable, "-m", "simulator.run", "model=tiny", "metrics.percentiles=[99.9,100]",
                        f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "simulator.run: error: metrics.percentiles[1]=100.0 is outside (0, 100); give percentiles strictly between "
        "0 and 100, e.g. metrics.percentiles=[99.9]"], p.stderr


def test_an_unwritable_results_folder_fails_before_the_run(tmp_path, monkeypatch):
    """The requests CSV goes beside the result: a folder that cannot take it is refused before
    anything is simulated or served."""
    from runtime import loaders, serve
    from simulator import run as sim_run

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the results folder would be")

    def never(*a, **k):
        raise AssertionError("ran before the results folder was checked")

    monkeypatch.setattr(Sim, "run", never)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        sim_run.simulate(_cfg("simulate", "model=tiny", f"results_dir={blocked}"))
    monkeypatch.setattr(loaders, "from_config", never)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        serve.run(_cfg("serve", "model=tiny", f"results_dir={blocked}"))
