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
rewards; Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 6) and recomputes the DT-BSM. Thin
state-actions (fewer than ``thin_below`` transitions in either window) are pooled (:func:`pool_thin`) and drawn
*once* for both windows, so that they keep agreeing in every resample (drawn apart, as before, their handful of
transitions disagreed by chance in every resample, and the correction then removed noise the data never had: on
the testbed, intervals of [0, 0] beside a point of 1.4).

*Why the plain bootstrap fails, measured*: the empirical mismatch T of two identical MDPs is far above 0 (a max
over states of noisy W1 terms, amplified by the fixed point) and the resamples only add their own noise on top,
so a percentile interval excludes the truth almost always. Bias correction by extrapolation to zero noise (SIMEX:
Cook and Stefanski, JASA 89, 1994) fixes that, but the shape of the growth of E[T] with the noise variance x
depends on the pair: fitting E[T] = theta + b x^c to the means at x = 1, 2, 3, 5 gave c = 0.40 on a random
8-state, 2-action pair and c = 0.25 on a 16-state, 4-action one, so the former fixed c = 0.4 under-corrected the
latter (coverage 40 %: the exact 0 below the lower end in 6 of 10 trials).

*Remedy: the extrapolation calibrated on the pair's own null.* The null pair pools every state-action of the two
windows (exact mismatch 0, the windows' sizes and supports). ``calibration`` pairs of windows drawn from it
(level 1, noise x = 1) and one resample of each (level 2, x = 1 + 1/fraction) give the extrapolation factor
k = E[T1] / (E[T2] - E[T1]), the one that takes the null's figure from x = 1 back to its known value 0 (the
calibration step of the iterated bootstrap, Hall and Martin, Biometrika 75, 1988, done at the one point where the
answer is known). The centre is T - k (mean of the resamples - T). Its variance comes from a double bootstrap: each
of the first ``calibration`` resamples is resampled once and corrected alike, and the spread of those corrected
figures, less the Monte Carlo part that B resamples average away, plus the delta-method error of k, is the
centre's variance; the half-width takes Student's t quantile with ``calibration`` - 1 degrees of freedom. The
upper end also reaches the unpooled figure plus its spread (pooling can only lower the figure). m-out-of-n
resamples (``fraction`` < 1; Bickel, Goetze, van Zwet, Statistica Sinica 7, 1997) are supported; the default is
n-out-of-n (fraction 1).

*What it claims*: nominal two-sided coverage ``level`` (each end missing at most (1 - level) / 2), as a
bootstrap approximation that assumes k transfers from the null to the pair at hand (measured: the factor that
would have been exact was 3.23 for an identical 8-state pair and 3.24 for a reward-biased one); it is not exact.
Measured by ``benchmarks/bench_detection.py --quick`` at level 0.98 on pairs with known exact mismatch (identical,
reward-biased, flipped, random and testbed pairs, windows 1,000-45,000): 96.9 % of 130, the truth below the lower
end in 3.1 % (nominal 1 %), above the upper end in none (README, "Noise floor").
*Cost*: 2 + B + 3 C point-only metric solves (B = ``resamples`` = 20, C = ``calibration`` = 10: 52).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# The largest extrapolation factor k: reached when resampling the null adds (almost) nothing to its figure.
MAX_FACTOR = 20.0

__all__ = ["Interval", "PermutationTest", "WindowStats", "bootstrap_interval", "permutation_test", "pool_thin",
           "thin_state_actions"]


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
    estimate: float  # the bias-corrected mismatch (the centre), clipped at 0
    factor: float  # the calibrated extrapolation factor k


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


def thin_state_actions(real: WindowStats, twin: WindowStats, min_count: int) -> np.ndarray:
    """(S, A) mask of the state-actions with fewer than `min_count` transitions in either window."""
    return np.minimum(real.n, twin.n) < min_count


def pool_thin(real: WindowStats, twin: WindowStats, min_count: int) -> tuple[WindowStats, WindowStats]:
    """Both windows with every thin state-action (fewer than `min_count` transitions in either) replaced by the
    two windows' pooled data: assumed to agree, like the point estimate's rule for missing data.

    A state-action seen once or twice has a frozen empirical law: resampling it returns the same law, so its
    chance difference would pass, through the max and through every state that can reach it, for a certain one.
    Pooled, it contributes no difference of its own, and the interval rests on the well-sampled state-actions.
    """
    return _pooled(real, twin, thin_state_actions(real, twin, min_count))


def _pooled(real: WindowStats, twin: WindowStats, mask: np.ndarray) -> tuple[WindowStats, WindowStats]:
    """Both windows with the state-actions in `mask` replaced by the two windows' pooled data."""
    n1, n2 = real.n, twin.n
    counts = real.counts + twin.counts
    n = np.maximum(n1 + n2, 1)
    mean = (n1 * real.reward_mean + n2 * twin.reward_mean) / n
    var = (n1 * (real.reward_var + (real.reward_mean - mean) ** 2)
           + n2 * (twin.reward_var + (twin.reward_mean - mean) ** 2)) / n  # fmt: skip

    def pooled(w: WindowStats) -> WindowStats:
        return WindowStats(np.where(mask[..., None], counts, w.counts), np.where(mask, mean, w.reward_mean),
                           np.where(mask, var, w.reward_var))  # fmt: skip

    return pooled(real), pooled(twin)


def _draw(stats: WindowStats, m: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(R, P) of m[s, a] parametric draws per state-action from `stats` (multinomial next states, normal means)."""
    n = stats.n
    R, P = stats.mdp()
    known = (n > 0) & (m > 0)
    pvals = np.where(known[..., None], P, 0.0)
    pvals[~known, 0] = 1.0  # any valid row; m = 0 there, so no draw lands
    counts = rng.multinomial(np.where(known, m, 0), pvals)
    Pm = np.divide(counts, m[..., None], out=np.zeros(P.shape), where=known[..., None])
    noise = rng.standard_normal(R.shape) * np.sqrt(stats.reward_var / np.maximum(m, 1))
    return np.where(known, R + noise, 0.0), Pm


def _sizes(n: np.ndarray, fraction: float) -> np.ndarray:
    return np.where(n > 0, np.maximum(1, np.ceil(fraction * n)), 0).astype(np.int64)


def resample(stats: WindowStats, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(R, P) of an m-out-of-n parametric resample: m = ceil(fraction * n) transitions per state-action."""
    return _draw(stats, _sizes(stats.n, fraction), rng)


def _resample_pair(
    real: WindowStats, twin: WindowStats, shared: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both windows resampled; the `shared` state-actions (pooled: assumed to agree) drawn once for both."""
    R1, P1 = resample(real, fraction, rng)
    R2, P2 = resample(twin, fraction, rng)
    return R1, P1, np.where(shared, R1, R2), np.where(shared[..., None], P1, P2)


def _as_stats(R: np.ndarray, P: np.ndarray, n: np.ndarray, var: np.ndarray) -> WindowStats:
    """A drawn (R, P) with its sizes n as window statistics (the reward variance kept from the source)."""
    return WindowStats(np.rint(P * n[..., None]).astype(np.int64), R, var)


def bootstrap_interval(
    real: WindowStats,
    twin: WindowStats,
    mismatch: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float],
    *,
    level: float = 0.98,
    resamples: int = 20,
    calibration: int = 10,
    fraction: float = 1.0,
    thin_below: int = 1,
    rng: np.random.Generator | None = None,
) -> Interval:
    """Null-calibrated SIMEX bootstrap interval for the mismatch at nominal coverage ``level``; see the module.

    ``mismatch(R1, P1, R2, P2)`` computes the figure for a pair of (R, P) arrays (the caller's solver, so that
    gamma, the reward range and the terminal state are the same; only the point estimate is read). State-actions
    with fewer than ``thin_below`` transitions in either window are pooled (:func:`pool_thin`) and drawn once for
    both windows. ``resamples`` draws of the windows give the noise growth and the spread, the first
    ``calibration`` of them resampled once more (the centre's variance); ``calibration`` pairs drawn from the
    pooled null, each resampled once, calibrate the extrapolation: 2 + resamples + 3 * calibration calls.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if resamples < 2:
        raise ValueError(f"resamples must be >= 2, got {resamples}")
    if calibration < 2:
        raise ValueError(f"calibration must be >= 2, got {calibration}")
    rng = rng if rng is not None else np.random.default_rng()
    shared = thin_state_actions(real, twin, thin_below)
    # Pooling takes the thin state-actions' differences out, so the pooled figure can sit below the truth: the
    # upper end also reaches the unpooled figure (which noise only raises) plus its spread.
    raw = mismatch(*real.mdp(), *twin.mdp()) if shared.any() else None
    real, twin = _pooled(real, twin, shared)
    observed = mismatch(*real.mdp(), *twin.mdp())
    m1, m2 = _sizes(real.n, fraction), _sizes(twin.n, fraction)
    values = np.empty(resamples)
    again = np.empty(min(resamples, calibration))  # a resample of each of the first resamples (double bootstrap)
    for j in range(resamples):
        R1, P1, R2, P2 = _resample_pair(real, twin, shared, fraction, rng)
        values[j] = mismatch(R1, P1, R2, P2)
        if j < len(again):
            w1, w2 = _as_stats(R1, P1, m1, real.reward_var), _as_stats(R2, P2, m2, twin.reward_var)
            again[j] = mismatch(*_resample_pair(w1, w2, shared, 1.0, rng))
    # The null pair: every state-action pooled, so the exact mismatch is 0, with the windows' own sizes and
    # supports. Its windows (level 1) and their resamples (level 2) show how this pair's noise grows.
    null_real, null_twin = _pooled(real, twin, np.ones(shared.shape, dtype=bool))
    n1, n2 = real.n, twin.n
    level1 = np.empty(calibration)
    level2 = np.empty(calibration)
    for j in range(calibration):
        R1, P1 = _draw(null_real, n1, rng)
        R2, P2 = _draw(null_twin, n2, rng)
        R2, P2 = np.where(shared, R1, R2), np.where(shared[..., None], P1, P2)
        level1[j] = mismatch(R1, P1, R2, P2)
        w1, w2 = _as_stats(R1, P1, n1, null_real.reward_var), _as_stats(R2, P2, n2, null_twin.reward_var)
        level2[j] = mismatch(*_resample_pair(w1, w2, shared, fraction, rng))
    return _simex(observed, values, again, level1, level2, level, fraction, observed if raw is None else raw)


def _t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (Abramowitz and Stegun 26.7.5, Cornish-Fisher in 1/dof): the centre's variance
    comes from `calibration` null pairs, so its half-width takes t rather than normal quantiles."""
    z = NormalDist().inv_cdf(p)
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def _simex(
    observed: float,
    values: np.ndarray,
    again: np.ndarray,
    level1: np.ndarray,
    level2: np.ndarray,
    level: float,
    fraction: float,
    raw: float,
) -> Interval:
    """The interval from the observed figure, its resamples and the null calibration (see the module)."""
    B, C = len(values), len(level1)
    a, b = float(level1.mean()), float(level2.mean())
    # k = g(1) / (g(x) - g(1)) on the null, where g(0) = 0 is known: the extrapolation factor from noise level 1
    # (the windows) back to 0, given the growth from 1 to x (a resample), for this pair's counts and supports.
    if a <= 0.0:
        k, var_k = 0.0, 0.0  # noise does not reach the figure (everything that differs is pooled): no correction
    elif b - a <= a / MAX_FACTOR:
        k, var_k = MAX_FACTOR, 0.0
    else:
        k = a / (b - a)
        # Delta method on k = a / (b - a): gradient (b / (b - a)^2, -a / (b - a)^2) against the sample covariance.
        grad = np.array([b, -a]) / (b - a) ** 2
        var_k = float(grad @ np.cov(np.vstack([level1, level2])) @ grad) / C
    growth = float(values.mean()) - observed
    centre = observed - k * growth
    var_t = float(values.var(ddof=1))  # one resample's variance about the windows' figure
    # The centre's variance by the double bootstrap: each resample's own corrected figure with one resample of it,
    # values - k (again - values), varies as the centre does plus the Monte Carlo part k^2 var_t (1 - 1/B) that
    # B resamples average away. Floored by the Monte Carlo error of the growth; plus the calibration's own error
    # (var_k * growth^2).
    first = values[: len(again)]
    var_boot = (float(np.var(first - k * (again - first), ddof=1)) - k * k * var_t * (1.0 - 1.0 / B)) * fraction
    var_c = max(var_boot, var_t * fraction * (1.0 + k * k / B)) + var_k * growth**2
    q = _t_quantile(0.5 + level / 2, min(C, len(again)) - 1)
    half = q * math.sqrt(var_c)
    high = max(centre + half, raw + q * math.sqrt(var_t * fraction), 0.0)
    return Interval(max(0.0, centre - half), high, level, B, fraction, max(centre, 0.0), k)
