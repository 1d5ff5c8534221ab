"""How much of a twin's mismatch sampling alone explains: a permutation test and a bootstrap interval.

Both start from the sufficient statistics of the two windows, per state-action (s, a): the next-state counts
N(s, a, .), the mean reward and its (population) variance. They answer two different questions.

**Permutation test** (:func:`permutation_test`; Good, "Permutation, Parametric and Bootstrap Tests of
Hypotheses", 3rd ed. 2005, ch. 3 and 6 — a stratified two-sample test, strata = state-actions).

*Null hypothesis*: for every state-action seen in both windows, the real and the twin transitions out of it are
draws from one and the same conditional distribution of (next state, reward) — the windows are exchangeable
within each (s, a). Under it, which of the pooled n1 + n2 transitions of (s, a) went to which window is a
uniformly random split with the observed sizes. Each resample redraws that split for every stratum at once:
the real side's next-state counts are a multivariate hypergeometric draw from the pooled counts (numpy
``Generator.multivariate_hypergeometric``, exact), and its mean reward is the pooled mean plus a normal
deviate with the finite-population variance sigma^2 / n1 * (n - n1) / (n - 1) (Hajek's finite-population central
limit theorem; this part is approximate, and assumes the reward is independent of the next state given (s, a),
as in the testbed; it is exact when rewards are deterministic given (s, a)).

*Statistic*: T = max over shared (s, a) of max(|R1 - R2| / se, sqrt(n1 n2 / (n1 + n2)) * TV(P1, P2)), se the
permutation standard error of the reward difference: both parts are of order 1 under the null whatever the counts,
so the max is not decided by the thinly sampled state-actions, and a change in a well-sampled one stands out.
The p-value (1 + #{T_b >= T}) / (1 + B) has exact level for any statistic.

*Cost*: one multivariate hypergeometric call per shared state-action for all B resamples (about 60 us at B=199),
then O(B * sum of pooled supports) array work; no metric solve. Measured (``benchmarks/bench_detection.py``,
process CPU): 45 ms at 72 states x 6 actions, 0.74 s at 256 x 16.

**Bootstrap interval** (:func:`bootstrap_interval`): how large is the mismatch? Each resample redraws both
windows from their own empirical MDPs (a parametric bootstrap on counts: multinomial next states, normal mean
rewards; Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 6) and recomputes the DT-BSM. The
plain percentile bootstrap fails here, as measured: the empirical mismatch of two identical MDPs is far above
0 (a max over states of noisy W1 terms) and the resamples only add their own noise on top, so its interval
excludes the truth almost always. The interval is therefore bias-corrected by extrapolation to zero noise
(SIMEX: Cook and Stefanski, JASA 89, 1994): the observed figure carries noise of scale sqrt(1/n), a resample of
m = fraction * n transitions per state-action (m-out-of-n when fraction < 1; Bickel, Goetze, van Zwet,
Statistica Sinica 7, 1997) carries sqrt(1/n + 1/m), and a mismatch that grows as a power of the noise variance
(NOISE_EXPONENT) is extrapolated back to no noise; the half-width is a normal quantile times the resamples'
spread, inflated for the correction's own noise. Nominal two-sided coverage ``level``; the coverage actually
achieved is measured by ``benchmarks/bench_detection.py`` and falls short of nominal with fewer than about 100
transitions per state-action (README, "Noise floor"). *Cost*: B metric solves (B = 20 by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# The growth of the empirical mismatch with the noise level, E[T] - theta ~ (noise variance)^NOISE_EXPONENT, and
# the share of T's variance the data-driven correction adds per unit k^2. 0.5 would be a max of pure Gaussian
# noise; fitted by hand on one random 8-state, 2-action MDP (windows 1,000-5,000; identical, reward-biased and
# flipped pairs), which gave 0.35-0.4 and 0.15 (the multinomial resamples cannot add mass where a window saw
# none). The coverage this gives elsewhere is measured by benchmarks/bench_detection.py.
NOISE_EXPONENT = 0.4
CORRECTION_NOISE = 0.15

__all__ = ["Interval", "PermutationTest", "WindowStats", "bootstrap_interval", "permutation_test", "pool_thin"]


@dataclass(frozen=True, eq=False)
class WindowStats:
    """Sufficient statistics of one window: next-state counts (S, A, S), mean and variance of rewards (S, A)."""

    counts: np.ndarray
    reward_mean: np.ndarray
    reward_var: np.ndarray

    @classmethod
    def from_arrays(
        cls, P: np.ndarray, N: np.ndarray, R: np.ndarray, reward_var: np.ndarray | None = None
    ) -> WindowStats:
        """From an empirical MDP's frequencies P, counts N and mean rewards R (variance 0 if unknown)."""
        counts = np.rint(P * N[..., None]).astype(np.int64)
        var = np.zeros(R.shape) if reward_var is None else np.maximum(reward_var, 0.0)
        return cls(counts, np.asarray(R, dtype=np.float64), var)

    @property
    def n(self) -> np.ndarray:
        """(S, A) transitions per state-action."""
        return self.counts.sum(axis=-1)

    def mdp(self) -> tuple[np.ndarray, np.ndarray]:
        """(R, P) of this window, P all-zero where a state-action has no data."""
        n = self.n
        P = np.divide(self.counts, n[..., None], out=np.zeros(self.counts.shape), where=n[..., None] > 0)
        return np.where(n > 0, self.reward_mean, 0.0), P


@dataclass(frozen=True)
class PermutationTest:
    """The p-value of the stratified permutation test, its statistic and how many strata/resamples it used."""

    p_value: float
    statistic: float
    resamples: int
    strata: int


@dataclass(frozen=True)
class Interval:
    """A two-sided interval [low, high] for the mismatch at nominal coverage ``level``."""

    low: float
    high: float
    level: float
    resamples: int
    fraction: float


def _terms(n1: np.ndarray, n2: np.ndarray, z: np.ndarray, tv: np.ndarray) -> np.ndarray:
    """max(|z|, sqrt(n_eff) TV): each state-action's discrepancy on its own sampling scale."""
    return np.maximum(np.abs(z), np.sqrt(n1 * n2 / (n1 + n2)) * tv)


def permutation_test(
    real: WindowStats,
    twin: WindowStats,
    *,
    resamples: int = 199,
    rng: np.random.Generator | None = None,
) -> PermutationTest:
    """Stratified permutation test of "the twin's windows are exchangeable with the real one's"; see the module.

    Strata are the state-actions with data in both windows; with none, there is nothing to test (p = 1, 0
    strata).
    """
    rng = rng if rng is not None else np.random.default_rng()
    n1_all, n2_all = real.n, twin.n
    shared = (n1_all > 0) & (n2_all > 0)
    s_idx, a_idx = np.nonzero(shared)
    if len(s_idx) == 0:
        return PermutationTest(1.0, 0.0, 0, 0)
    c1 = real.counts[s_idx, a_idx]  # (m, S)
    c2 = twin.counts[s_idx, a_idx]
    n1 = n1_all[s_idx, a_idx].astype(np.float64)
    n2 = n2_all[s_idx, a_idx].astype(np.float64)
    n = n1 + n2
    pooled = c1 + c2
    tv_obs = 0.5 * np.abs(c1 / n1[:, None] - c2 / n2[:, None]).sum(axis=1)
    m1, m2 = real.reward_mean[s_idx, a_idx], twin.reward_mean[s_idx, a_idx]
    # Pooled reward mean and population variance (within-window variances plus the between-window spread).
    mu = (n1 * m1 + n2 * m2) / n
    var = (n1 * (real.reward_var[s_idx, a_idx] + (m1 - mu) ** 2)
           + n2 * (twin.reward_var[s_idx, a_idx] + (m2 - mu) ** 2)) / n  # fmt: skip
    fpc = np.where(n > 1, (n - n1) / np.maximum(n - 1, 1), 0.0)
    # Standard error of m1 - m2 over random splits; floored so that equal deterministic rewards give z = 0 and
    # rounding noise in a mean cannot pass for a difference.
    scale = np.maximum(np.abs(mu), 1.0)
    se = np.maximum(np.sqrt(var / n1 * fpc) * n / n2, 1e-9 * scale)
    observed = float(_terms(n1, n2, (m1 - m2) / se, tv_obs).max())

    B = resamples
    # Next states: per stratum, B draws of the real side's counts from the pooled ones, over the pooled support.
    tv = np.zeros((B, len(s_idx)))
    for j in range(len(s_idx)):
        support = np.flatnonzero(pooled[j])
        if len(support) < 2:
            continue  # one possible next state: TV is 0 in every split
        colors = pooled[j, support]
        x1 = rng.multivariate_hypergeometric(colors, int(n1[j]), size=B)
        tv[:, j] = 0.5 * np.abs(x1 / n1[j] - (colors - x1) / n2[j]).sum(axis=1)
    # The reward difference of a random split, on the se scale: a standard normal (zero where the rewards of the
    # pooled stratum are all equal).
    z = rng.standard_normal((B, len(s_idx))) * (np.sqrt(var / n1 * fpc) * n / n2 / se)
    stats = _terms(n1, n2, z, tv).max(axis=1)
    exceed = int(np.count_nonzero(stats >= observed * (1.0 - 1e-12)))
    return PermutationTest((1 + exceed) / (1 + B), observed, B, len(s_idx))


def pool_thin(real: WindowStats, twin: WindowStats, min_count: int) -> tuple[WindowStats, WindowStats]:
    """Both windows with every thin state-action (fewer than `min_count` transitions in either) replaced by the
    two windows' pooled data: assumed to agree, like the point estimate's rule for missing data.

    A state-action seen once or twice has a frozen empirical law: resampling it returns the same law, so its
    chance difference would pass, through the max and through every state that can reach it, for a certain one.
    Pooled, it contributes no difference of its own, and the interval rests on the well-sampled state-actions.
    """
    n1, n2 = real.n, twin.n
    thin = (np.minimum(n1, n2) < min_count)[..., None]
    counts = real.counts + twin.counts
    n = np.maximum(n1 + n2, 1)
    mean = (n1 * real.reward_mean + n2 * twin.reward_mean) / n
    var = (n1 * (real.reward_var + (real.reward_mean - mean) ** 2)
           + n2 * (twin.reward_var + (twin.reward_mean - mean) ** 2)) / n  # fmt: skip

    def pooled(w: WindowStats) -> WindowStats:
        return WindowStats(np.where(thin, counts, w.counts), np.where(thin[..., 0], mean, w.reward_mean),
                           np.where(thin[..., 0], var, w.reward_var))  # fmt: skip

    return pooled(real), pooled(twin)


def resample(stats: WindowStats, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(R, P) of an m-out-of-n parametric resample: m = ceil(fraction * n) transitions per state-action."""
    n = stats.n
    m = np.where(n > 0, np.maximum(1, np.ceil(fraction * n)), 0).astype(np.int64)
    R, P = stats.mdp()
    known = n > 0
    pvals = np.where(known[..., None], P, 0.0)
    pvals[~known, 0] = 1.0  # any valid row; m = 0 there, so no draw lands
    counts = rng.multinomial(m, pvals)
    Pm = np.divide(counts, m[..., None], out=np.zeros(P.shape), where=m[..., None] > 0)
    noise = rng.standard_normal(R.shape) * np.sqrt(stats.reward_var / np.maximum(m, 1))
    return np.where(known, R + noise, 0.0), Pm


def bootstrap_interval(
    observed: float,
    real: WindowStats,
    twin: WindowStats,
    mismatch: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float],
    *,
    level: float = 0.98,
    resamples: int = 20,
    fraction: float = 1.0,
    rng: np.random.Generator | None = None,
) -> Interval:
    """Bias-corrected m-out-of-n bootstrap interval for the mismatch at nominal coverage ``level``; see the module.

    ``observed`` is the mismatch of the two windows; ``mismatch(R1, P1, R2, P2)`` computes it for a resample
    (the caller's solver, so that settings such as gamma and the reward range are the same).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    rng = rng if rng is not None else np.random.default_rng()
    values = np.empty(resamples)
    for b in range(resamples):
        R1, P1 = resample(real, fraction, rng)
        R2, P2 = resample(twin, fraction, rng)
        values[b] = mismatch(R1, P1, R2, P2)
    # Sampling noise adds to the mismatch: E[T] ~ theta + b * x^NOISE_EXPONENT, x the noise variance in units of
    # the window's (x = 1 for the observed windows; a resample of m = fraction * n transitions per state-action
    # from them carries x = 1 + 1/fraction). Two noise levels give b, hence the extrapolation to x = 0 (Cook and
    # Stefanski's SIMEX, JASA 1994, with this extrapolant).
    k = 1.0 / ((1.0 + 1.0 / fraction) ** NOISE_EXPONENT - 1.0)
    centre = observed - k * (float(values.mean()) - observed)
    spread = float(values.std(ddof=1)) * math.sqrt(fraction)  # the sampling sd of T at n transitions
    # The centre carries T's noise, the Monte Carlo error of the correction (k^2 / B) and the correction's own
    # sampling noise (CORRECTION_NOISE * k^2 of T's variance).
    inflation = math.sqrt(1.0 + k * k * (1.0 / resamples + CORRECTION_NOISE))
    half = NormalDist().inv_cdf(0.5 + level / 2) * spread * inflation
    return Interval(max(0.0, centre - half), max(0.0, centre + half), level, resamples, fraction)
