"""Paired statistics of a policy against `full` on the same samples.

Every policy decodes from the same shared prefill of the same prompts, so the comparison is
paired: McNemar on the discordant retrievals (not two independent proportions), and bootstrap
intervals of per-sample differences (log-prob deltas, NLL differences), which cancel most of the
sample-to-sample variance that unpaired intervals would carry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class McNemar:
    only_full: int      # samples full got right and the policy wrong
    only_policy: int    # the reverse
    p: float            # exact two-sided p; 1.0 when there is no discordant pair


def mcnemar_exact(full: list[bool], policy: list[bool]) -> McNemar:
    """Exact McNemar: under H0 each discordant pair goes either way with probability 1/2, so the
    count of one kind is Binomial(discordant, 1/2)."""
    if len(full) != len(policy):
        raise ValueError("paired samples differ in length")
    a = sum(1 for f, p in zip(full, policy) if f and not p)
    b = sum(1 for f, p in zip(full, policy) if p and not f)
    p = 1.0 if a + b == 0 else float(st.binomtest(a, a + b, 0.5).pvalue)
    return McNemar(a, b, p)


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int

    def map(self, f) -> "Interval":
        """The interval of a monotone increasing function of the statistic (exp of a mean NLL)."""
        return Interval(f(self.mean), f(self.lo), f(self.hi), self.n)


def bootstrap_mean(x, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Mean of x with a seeded BCa bootstrap interval. A constant sample (e.g. full vs full) has
    a zero-width interval; fewer than two values have none (NaN)."""
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = float(x.mean())
    if len(x) < 2:
        return Interval(m, math.nan, math.nan, 1)
    if np.ptp(x) == 0:
        return Interval(m, m, m, len(x))
    res = st.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES,
                       method="BCa", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return Interval(m, float(lo), float(hi), len(x))


def paired_delta(policy, full, seed: int = 0) -> Interval:
    """Mean per-sample difference policy - full, with its bootstrap interval."""
    return bootstrap_mean(np.asarray(policy, float) - np.asarray(full, float), seed)


def perplexity(nll_per_token) -> Interval:
    """Perplexity exp(mean NLL) over samples of equal token counts, with the interval of the
    mean NLL carried through exp."""
    return bootstrap_mean(nll_per_token).map(math.exp)


def perplexity_ratio(nll_policy, nll_full, seed: int = 0) -> Interval:
    """ppl(policy) / ppl(full) = exp(mean paired NLL difference), with its interval."""
    return paired_delta(nll_policy, nll_full, seed).map(math.exp)
