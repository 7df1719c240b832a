"""Workloads: gamma (bursty) arrivals, lognormal / trace lengths, the clock-resolution refusal, and
that the defaults draw exactly what they drew before (core/workload.py; docs/simulator.md#workloads).

References are closed forms (gamma and lognormal moments, the sampling error of a mean and of a
standard deviation from the fourth moment), scipy's distributions and hand-pinned draws."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import integrate, stats

from core.checks import check_config
from core.config import WorkloadConfig
from core.errors import ConfigError
from core.workload import (CLOCK_LIMIT_S, CLOCK_RESOLUTION_S, Lengths, check, check_clock, open_arrivals)

ROOT = Path(__file__).resolve().parents[1]


def W(**kw):
    return OmegaConf.structured(WorkloadConfig(**kw))


def gaps(w) -> np.ndarray:
    t = np.array([r.arrival_s for r in open_arrivals(w)])
    return np.diff(np.concatenate([[0.0], t]))


def lengths(w, n: int) -> np.ndarray:
    ln = Lengths(w, np.random.default_rng(w.seed))
    return np.array([ln.pair() for _ in range(n)])


def sd_of_sd(cv: float, excess_kurtosis: float, n: int) -> float:
    """Relative standard error of a sample standard deviation: Var(s^2) ~ sigma^4 (2 + kurt) / n."""
    return math.sqrt((2 + excess_kurtosis) / n) / 2


# ----------------------------------------------------------------------------- arrivals

@pytest.mark.parametrize("k", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_mean_one_over_rate_and_cv_one_over_sqrt_burstiness(k):
    n, rate = 50_000, 4.0
    g = gaps(W(arrival="gamma", rate=rate, burstiness=k, n_requests=n, seed=11))
    cv = 1 / math.sqrt(k)
    assert stats.gamma(k, scale=1 / (rate * k)).mean() == pytest.approx(1 / rate)   # the parameterisation
    assert g.mean() == pytest.approx(1 / rate, rel=5 * cv / math.sqrt(n))            # 5 standard errors
    assert g.std() / g.mean() == pytest.approx(cv, rel=5 * sd_of_sd(cv, 6 / k, n) + 5 * cv / math.sqrt(n))


def test_burstiness_one_is_poisson():
    pw = W(arrival="poisson", rate=3.0, n_requests=20_000, seed=5)
    gw = W(arrival="gamma", rate=3.0, burstiness=1.0, n_requests=20_000, seed=5)
    # in distribution: the gamma gaps against the exponential CDF (and a two-sample test on another seed)
    assert stats.kstest(gaps(gw), stats.expon(scale=1 / 3.0).cdf).pvalue > 1e-3
    assert stats.ks_2samp(gaps(gw), gaps(W(arrival="poisson", rate=3.0, n_requests=20_000, seed=6))).pvalue > 1e-3
    # and in fact draw for draw: numpy's gamma of shape 1 is its exponential
    assert [r.arrival_s for r in open_arrivals(gw)] == [r.arrival_s for r in open_arrivals(pw)]


def test_bursty_arrivals_cluster():
    """Burstiness < 1: more gaps far below the mean and a few far above it, the same mean rate."""
    smooth, bursty = (gaps(W(arrival="gamma", rate=1.0, burstiness=k, n_requests=20_000)) for k in (4.0, 0.1))
    assert (bursty < 0.1).mean() > 0.5 > (smooth < 0.1).mean()
    assert bursty.max() > 3 * smooth.max()


# ----------------------------------------------------------------------------- lengths

def test_lognormal_mean_and_cv_and_its_parameterisation():
    mean, cv, n = 161.31, 1.0, 100_000
    s2 = math.log1p(cv ** 2)
    ref = stats.lognorm(s=math.sqrt(s2), scale=math.exp(math.log(mean) - s2 / 2))
    assert ref.mean() == pytest.approx(mean) and ref.std() / ref.mean() == pytest.approx(cv)
    w = W(prompt_dist="lognormal", prompt_len=10 ** 7, prompt_len_mean=mean, prompt_len_cv=cv,
          gen_dist="lognormal", gen_len=10 ** 7, gen_len_mean=20.0, gen_len_cv=0.5, seed=3)
    x = lengths(w, n)
    kurt = math.exp(4 * s2) + 2 * math.exp(3 * s2) + 3 * math.exp(2 * s2) - 6
    assert x[:, 0].mean() == pytest.approx(mean, rel=5 * cv / math.sqrt(n))
    assert x[:, 0].std() / x[:, 0].mean() == pytest.approx(cv, rel=5 * sd_of_sd(cv, kurt, n) + 5 * cv / math.sqrt(n))
    assert x[:, 1].mean() == pytest.approx(20.0, rel=5 * 0.5 / math.sqrt(n))
    assert stats.kstest(x[:5000, 0] + 0.5, ref.cdf).statistic < 0.03       # the shape, rounding aside


def test_cv_zero_gives_the_mean_and_draws_are_clamped():
    x = lengths(W(prompt_dist="lognormal", prompt_len=512, prompt_len_mean=100.0, prompt_len_cv=0.0), 50)
    assert set(x[:, 0]) == {100} and set(x[:, 1]) == {64}
    x = lengths(W(prompt_dist="lognormal", prompt_len=300, prompt_len_min=20, prompt_len_mean=100.0,
                  prompt_len_cv=3.0, gen_dist="uniform", gen_len=64, gen_len_min=8), 5000)
    assert x[:, 0].min() == 20 and x[:, 0].max() == 300 and (x[:, 0] == 300).sum() > 10
    assert x[:, 1].min() == 8 and x[:, 1].max() == 64


def test_sharegpt_preset_matches_the_published_means_up_to_its_clamps():
    """conf/workload/sharegpt.yaml: lognormal lengths with the vLLM paper's ShareGPT means (161.31
    in, 337.99 out), clamped as vLLM's benchmark filters ShareGPT; the sample means match the
    clamped distribution's expectation, computed here by quadrature."""
    import yaml

    preset = yaml.safe_load((ROOT / "conf/workload/sharegpt.yaml").read_text())
    preset.pop("defaults")
    w = W(**preset)
    check(w)
    assert (w.prompt_len_mean, w.gen_len_mean) == (161.31, 337.99)
    x = lengths(w, 100_000)
    for col, half in enumerate(("prompt", "gen")):
        mean, cv = getattr(w, f"{half}_len_mean"), getattr(w, f"{half}_len_cv")
        lo, hi = getattr(w, f"{half}_len_min"), getattr(w, f"{half}_len")
        s2 = math.log1p(cv ** 2)
        d = stats.lognorm(s=math.sqrt(s2), scale=math.exp(math.log(mean) - s2 / 2))
        clamped = (lo * d.cdf(lo) + integrate.quad(lambda v: v * d.pdf(v), lo, hi, limit=200)[0]
                   + hi * d.sf(hi))
        assert x[:, col].min() >= lo and x[:, col].max() <= hi
        assert x[:, col].mean() == pytest.approx(clamped, rel=5 * cv / math.sqrt(len(x)) + 0.5 / clamped)
        assert round(clamped) == {"prompt": 160, "gen": 318}[half]     # the means the yaml states


def test_trace_lengths_resample_the_rows_keeping_their_pairs(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_len,gen_len\n0,10,3\n0,20,5\n0,30,7\n")
    w = W(arrival="gamma", burstiness=0.5, n_requests=300, prompt_dist="trace", gen_dist="trace", trace=str(p),
          prompt_len=25, gen_len=64)
    reqs = open_arrivals(w)
    pairs = {(r.prompt_len, r.gen_len) for r in reqs}
    assert pairs == {(10, 3), (20, 5), (25, 7)}                 # 30 clamped to prompt_len = 25


# ----------------------------------------------------------------------------- defaults did not move

def test_default_draws_are_todays():
    """Hand-pinned from the code before lengths had distributions (numpy default_rng(seed): the
    gaps as one vector, then one integers() per uniform prompt length)."""
    ts = [r.arrival_s for r in open_arrivals(W(arrival="poisson", rate=2.0, n_requests=50))][:3]
    assert ts == [0.3399659519844548, 0.8497645027173871, 0.8596678340119148]
    r = open_arrivals(W(arrival="poisson", rate=5.0, n_requests=50, prompt_len_min=16, prompt_len=256, seed=7))
    assert [(q.arrival_s, q.prompt_len, q.gen_len) for q in r[:4]] == [
        (0.1415058511583843, 175, 64), (0.3465465208173653, 109, 64), (0.4602562522940156, 160, 64),
        (0.6392782250130482, 93, 64)]
    assert [q.prompt_len for q in open_arrivals(W(prompt_len_min=10, prompt_len=300, batch=9))] == [
        257, 195, 158, 88, 99, 21, 31, 14, 61]
    ln = Lengths(W(prompt_len_min=5, prompt_len=90, seed=4), np.random.default_rng(4))   # the closed loop's
    assert [ln.prompt() for _ in range(6)] == [67, 86, 80, 48, 85, 88]


def test_bench_default_prompts_are_todays():
    from runtime.bench import make_prompts

    p = make_prompts(W(), 49152, {0, 1, 2})
    assert [len(x) for x in p] == [512] * 4
    assert p[0][:8] == [48305, 35148, 734, 27990, 23689, 405, 25795, 24844] and p[3][-4:] == [22431, 4148, 38115, 17064]
    p = make_prompts(W(seed=3, batch=2, prompt_len=64), 49152, {0, 1, 2})
    assert [len(x) for x in p] == [64, 64] and p[1][:6] == [32592, 30799, 17198, 24077, 31447, 12691]


# ----------------------------------------------------------------------------- one place for both halves

ARGS = SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, vocab_size=512)


def _served(w):
    from runtime.arrivals import Arrivals

    a = Arrivals(w, ARGS, lambda r: None)
    out = []
    while not a.exhausted:
        for r in a.due(float("inf")):
            out.append(r)
            a.completed(r, r.arrival_s + 1.0)
    return sorted(out, key=lambda r: r.id)


@pytest.mark.parametrize("kw", [dict(prompt_len_min=10, prompt_len=40, batch=5),
                                dict(prompt_dist="lognormal", prompt_len_mean=20.0, prompt_len=60, batch=6, seed=9)])
def test_bench_serve_and_simulator_draw_the_same_static_batch(kw):
    from runtime.bench import make_prompts

    w = W(**kw)
    prompts = make_prompts(w, 512, {0, 1, 2})
    assert [len(p) for p in prompts] == [r.prompt_len for r in open_arrivals(w)]      # the simulator's lengths
    assert [r.prompt for r in _served(w)] == prompts                                  # runtime.serve's prompts


@pytest.mark.parametrize("kw", [dict(arrival="gamma", burstiness=0.3, rate=50.0, n_requests=40),
                                dict(arrival="closed", users=3, think_s=0.5, n_requests=20)])
def test_serve_replays_the_simulators_requests(kw):
    w = W(**kw, prompt_dist="lognormal", prompt_len_mean=100.0, prompt_len=400, gen_dist="lognormal",
          gen_len_mean=30.0, gen_len=128, seed=2)
    served = [(r.prompt_len, r.gen_len) for r in _served(w)]
    if w.arrival == "closed":      # the simulator's closed loop draws Lengths.pair() per request, in id order
        assert served == [tuple(x) for x in lengths(w, w.n_requests)]
    else:
        sim = open_arrivals(w)
        assert served == [(r.prompt_len, r.gen_len) for r in sim]
        assert [r.arrival_s for r in _served(w)] == [r.arrival_s for r in sim]
    assert len(set(served)) > 5


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,needle", [
    (dict(arrival="gamma", burstiness=0.0), "workload.burstiness=0.0 must be > 0"),
    (dict(arrival="gamma", burstiness=-1.0), "workload.burstiness=-1.0 must be > 0"),
    (dict(arrival="gamma", burstiness=float("nan")), "workload.burstiness=nan is not a finite number"),
    (dict(arrival="gamma", burstiness=float("inf")), "workload.burstiness=inf is not a finite number"),
    (dict(arrival="poisson", burstiness=0.5), "set workload.arrival=gamma"),
    (dict(arrival="gamma", rate=0.0), "workload.rate=0.0 must be > 0"),
    (dict(prompt_dist="lognormal", prompt_len_mean=100.0, prompt_len_cv=-0.5), "workload.prompt_len_cv=-0.5 must be >= 0"),
    (dict(gen_dist="lognormal", gen_len_mean=10.0, gen_len_cv=float("nan")), "workload.gen_len_cv=nan is not a finite"),
    (dict(prompt_dist="lognormal"), "workload.prompt_len_mean is not set"),
    (dict(prompt_dist="lognormal", prompt_len_mean=1000.0), "workload.prompt_len_mean=1000.0 must be in [1, 512]"),
    (dict(gen_dist="lognormal", gen_len_mean=0.0), "workload.gen_len_mean=0.0 must be > 0"),
    (dict(prompt_dist="zipf"), "workload.prompt_dist='zipf' is not known"),
    (dict(gen_len_min=0), "workload.gen_len_min=0 must be a whole number in [1, workload.gen_len=64]"),
    (dict(gen_dist="trace"), "workload.gen_dist=trace needs workload.trace"),
    (dict(arrival="trace", trace="x.csv", prompt_dist="lognormal"), "replays the trace's own lengths"),
    (dict(arrival="poisson", rate=1e-13), "workload.rate: the last request arrives at ~1e+15 s"),
    (dict(arrival="gamma", rate=5e-324), "workload.rate: the last request arrives at ~inf s"),
    (dict(arrival="closed", users=1, n_requests=10, think_s=1e8), "workload.think_s: the last request arrives"),
])
def test_bad_workloads_are_one_line_naming_the_field(kw, needle):
    with pytest.raises(ConfigError) as e:
        check(W(**kw))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bench_refuses_drawn_output_lengths():
    w = W(gen_dist="lognormal", gen_len_mean=30.0)
    check(w, "simulator.run")
    with pytest.raises(ConfigError, match="runtime.bench generates workload.gen_len tokens"):
        check(w, "runtime.bench")


def test_clock_criterion_is_the_float_spacing():
    """Refused exactly where float64 seconds are coarser than CLOCK_RESOLUTION_S."""
    below = np.nextafter(CLOCK_LIMIT_S, 0)
    assert np.spacing(below) <= CLOCK_RESOLUTION_S < np.spacing(CLOCK_LIMIT_S)
    check_clock(float(below), "x")
    with pytest.raises(ConfigError, match="clock values are 1.49e-08 s apart"):
        check_clock(CLOCK_LIMIT_S, "x")
    assert 3600 * 24 * 365 < CLOCK_LIMIT_S < 3600 * 24 * 365 * 3      # ~2 years of arrivals


def test_a_trace_arriving_too_late_is_refused(tmp_path):
    p = tmp_path / "late.csv"
    p.write_text("arrival_s,prompt_len,gen_len\n0,10,3\n1e15,10,3\n")
    with pytest.raises(ConfigError, match=r"workload.trace=.*late.csv: the last request arrives at ~1e\+15 s"):
        open_arrivals(W(arrival="trace", trace=str(p)))


def test_check_config_reaches_the_workload_check():
    from core.cli import compose_or_explain

    cfg = compose_or_explain("simulate", ["model=tiny", "workload=sharegpt", "workload.arrival=gamma",
                                          "workload.burstiness=0.5"])
    check_config(cfg, "simulator.run")
    cfg = compose_or_explain("bench", ["model=tiny", "workload=sharegpt", "workload.arrival=static"])
    with pytest.raises(ConfigError, match="workload.gen_dist=lognormal"):
        check_config(cfg, "runtime.bench")


@pytest.mark.parametrize("args,needle", [
    (["workload=gamma", "workload.burstiness=0"], "workload.burstiness=0.0 must be > 0"),
    (["workload=poisson", "workload.rate=1e-13"], "workload.rate: the last request arrives"),
])
def test_cli_exits_2_with_one_line(args, needle):
    p = subprocess.run([sys.executable, "-m", "simulator.run", "model=tiny", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_config_hash_leaves_out_the_draw_keys_at_their_defaults():
    """Committed validation CSVs resume: a config without the draw keys hashes as one with them at
    their defaults; a drawn workload hashes differently."""
    from analysis.compose import config_hash
    from core.workload import DRAW_DEFAULTS

    full = OmegaConf.to_container(W())
    before = {k: v for k, v in full.items() if k not in DRAW_DEFAULTS}
    h = lambda w: config_hash(*(OmegaConf.create({"workload": w, "hardware": {}}) for _ in range(2)))
    assert h(full) == h(before)
    assert h({**full, "burstiness": 0.5}) != h(full) != h({**full, "gen_dist": "lognormal", "gen_len_mean": 9.0})
