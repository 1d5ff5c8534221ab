"""The permutation test and the bootstrap interval: level under the null, power, and coverage where the plain
bootstrap fails (identical twins, whose empirical mismatch is far above the exact 0)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from dtsync.metric import dtbsm
from dtsync.metric.evidence import WindowStats, bootstrap_interval, permutation_test, resample
from dtsync.offline.sample import random_mdp, shifted_actions


def window(R: np.ndarray, P: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.05) -> WindowStats:
    """n transitions of the uniform behaviour policy, as sufficient statistics."""
    S, A = R.shape
    cum = P.cumsum(-1)
    cum[..., -1] = 1.0
    a = rng.integers(A, size=n)
    u = rng.random(n)
    s_col, sn_col = np.empty(n, np.int64), np.empty(n, np.int64)
    s = 0
    for i in range(n):
        s_col[i] = s
        s = int(np.searchsorted(cum[s, a[i]], u[i], side="right"))
        sn_col[i] = s
    r = R[s_col, a] + noise * rng.standard_normal(n)
    sa = s_col * A + a
    N = np.bincount(sa, minlength=S * A).reshape(S, A)
    counts = np.bincount(sa * S + sn_col, minlength=S * A * S).reshape(S, A, S)
    mean = np.divide(np.bincount(sa, weights=r, minlength=S * A).reshape(S, A), N, out=np.zeros((S, A)), where=N > 0)
    sq = np.divide(np.bincount(sa, weights=r * r, minlength=S * A).reshape(S, A), N, out=np.zeros((S, A)), where=N > 0)
    return WindowStats(counts, mean, np.maximum(sq - mean**2, 0.0))


@pytest.fixture(scope="module")
def mdp() -> tuple[np.ndarray, np.ndarray]:
    return random_mdp(np.random.default_rng(3), 6, 2, 3)


def test_p_values_are_uniform_on_identical_twins(mdp: tuple[np.ndarray, np.ndarray]) -> None:
    R, P = mdp
    rng = np.random.default_rng(0)
    p = np.array([permutation_test(window(R, P, 400, rng), window(R, P, 300, rng), rng=rng).p_value
                  for _ in range(300)])  # fmt: skip
    # Binomial(300, q) bands at about 3 sd: the level holds at every cut, not only at alpha.
    for q in (0.05, 0.1, 0.25, 0.5):
        assert abs((p <= q).mean() - q) < 3 * np.sqrt(q * (1 - q) / 300) + 0.01, (q, (p <= q).mean())


@pytest.mark.parametrize("change", ["reward bias", "dynamics flip"])
def test_the_test_sees_a_reward_bias_and_a_flip_that_keeps_frequencies(
    mdp: tuple[np.ndarray, np.ndarray], change: str
) -> None:
    R, P = mdp
    R2, P2 = (R + 0.05, P) if change == "reward bias" else (R, shifted_actions(P))
    rng = np.random.default_rng(1)
    result = permutation_test(window(R, P, 3000, rng), window(R2, P2, 3000, rng), rng=rng)
    assert result.p_value == pytest.approx(1 / 200) and result.strata == 12


def test_equal_deterministic_rewards_are_not_a_difference() -> None:
    """Rewards that are a function of (s, a) (the testbed) give zero reward variance on both sides: equal means
    must read z = 0, not 0/0 or a rounding difference blown up to infinity."""
    counts = np.array([[[40, 60]], [[50, 50]]])
    mean = np.array([[0.1 + 0.2], [0.7]])
    same = WindowStats(counts, mean, np.zeros((2, 1)))
    other = WindowStats(counts.copy(), mean + 1e-17, np.zeros((2, 1)))
    assert permutation_test(same, other, rng=np.random.default_rng(0)).p_value > 0.5


def test_no_shared_state_action_is_nothing_to_test() -> None:
    a = WindowStats(np.array([[[3, 0]], [[0, 0]]]), np.zeros((2, 1)), np.zeros((2, 1)))
    b = WindowStats(np.array([[[0, 0]], [[2, 2]]]), np.zeros((2, 1)), np.zeros((2, 1)))
    result = permutation_test(a, b)
    assert (result.p_value, result.strata) == (1.0, 0)


def _resampled(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> float:
    return dtbsm(a, b, c, d, 0.9, 1e-4, reward_range=(0.0, 1.0), point_only=True).mismatch


def _interval(R: np.ndarray, P: np.ndarray, R2: np.ndarray, P2: np.ndarray, n: int, rng: np.random.Generator,
              fraction: float = 1.0, thin_below: int = 1) -> tuple[float, float, float]:  # fmt: skip
    x, y = window(R, P, n, rng), window(R2, P2, n, rng)
    iv = bootstrap_interval(x, y, _resampled, level=0.9, fraction=fraction, thin_below=thin_below, rng=rng)
    return dtbsm(*x.mdp(), *y.mdp(), 0.9, 1e-6, reward_range=(0.0, 1.0)).mismatch, iv.low, iv.high


def test_interval_reaches_zero_for_identical_twins_where_the_point_is_far_above(
    mdp: tuple[np.ndarray, np.ndarray],
) -> None:
    R, P = mdp
    rng = np.random.default_rng(2)
    runs = [_interval(R, P, R, P, 1500, rng) for _ in range(12)]
    assert min(obs for obs, _, _ in runs) > 0.3  # the empirical mismatch of identical twins: pure noise
    # A percentile interval of the resamples would sit above the point; the corrected one reaches 0 mostly.
    assert sum(low == 0.0 for _, low, _ in runs) >= 8, runs


def test_interval_covers_a_large_exact_mismatch(mdp: tuple[np.ndarray, np.ndarray]) -> None:
    R, P = mdp
    P2 = shifted_actions(P)
    truth = dtbsm(R, P, R, P2, 0.9).mismatch
    rng = np.random.default_rng(4)
    runs = [_interval(R, P, R, P2, 3000, rng) for _ in range(12)]
    assert sum(low <= truth <= high for _, low, high in runs) >= 9, (truth, runs)
    assert all(low > 0.5 * truth for _, low, _ in runs)


def test_the_calibration_follows_the_pair_where_a_fixed_extrapolation_did_not() -> None:
    """Identical 16-state, 4-action twins at 5,000 transitions (78 per state-action): the growth of the figure
    with noise is flatter than on 8-state pairs, and the former fixed extrapolation (exponent 0.4, factor 3.1)
    left the exact 0 below the lower end in 6 of 10 trials. Calibrated on the pair's own null, the factor is
    larger and the interval reaches 0."""
    R, P = random_mdp(np.random.default_rng(3), 16, 4, 3)
    rng = np.random.default_rng(5)
    factors, lows = [], []
    for _ in range(6):
        x, y = window(R, P, 5000, rng), window(R, P, 5000, rng)
        iv = bootstrap_interval(x, y, _resampled, level=0.98, thin_below=50, rng=rng)
        factors.append(iv.factor)
        lows.append(iv.low)
    assert min(factors) > 3.5, factors
    assert sum(low == 0.0 for low in lows) >= 5, lows


def test_pooled_state_actions_are_drawn_once_for_both_windows() -> None:
    """Thin state-actions are pooled (assumed to agree): a resample must keep them agreeing. Drawn apart, each
    side's handful of transitions would disagree by chance, and the noise growth the correction reads would be
    that of the thin state-actions (the testbed's [0, 0] intervals beside points of 1.4)."""
    counts = np.array([[[3, 2, 1]], [[2, 2, 2]], [[1, 4, 1]]])
    stats = WindowStats(counts, np.array([[0.2], [0.5], [0.9]]), np.full((3, 1), 0.01))
    other = WindowStats(counts[::-1].copy(), np.array([[0.3], [0.5], [0.7]]), np.full((3, 1), 0.01))
    iv = bootstrap_interval(stats, other, _resampled, level=0.98, thin_below=50, rng=np.random.default_rng(0))
    # Everything pooled: no difference left, and none created (up to the resamples' solver tolerance, 1e-4).
    assert iv.low < 0.01 and iv.estimate < 0.01, iv


def test_the_upper_end_reaches_the_unpooled_figure() -> None:
    """Pooling takes the thin state-actions' differences out and can pull the interval below a real mismatch;
    the upper end still reaches the unpooled figure, so an interval never reads [0, 0] beside a large point."""
    R, P = random_mdp(np.random.default_rng(3), 6, 2, 3)
    rng = np.random.default_rng(1)
    x, y = window(R, P, 300, rng), window(R + 0.2, shifted_actions(P), 300, rng)
    point = dtbsm(*x.mdp(), *y.mdp(), 0.9, 1e-6, reward_range=(0.0, 1.0)).mismatch
    iv = bootstrap_interval(x, y, _resampled, level=0.98, thin_below=50, rng=rng)
    assert point > 1.0 and iv.high >= point, (point, iv)


def test_fewer_resamples_than_calibration_draws_still_give_a_finite_interval(
    mdp: tuple[np.ndarray, np.ndarray],
) -> None:
    R, P = mdp
    rng = np.random.default_rng(8)
    x, y = window(R, P, 1000, rng), window(R + 0.1, P, 1000, rng)
    iv = bootstrap_interval(x, y, _resampled, resamples=3, calibration=10, rng=rng)
    assert np.isfinite(iv.low) and np.isfinite(iv.high) and iv.low <= iv.high


def test_resample_keeps_unknown_state_actions_unknown() -> None:
    stats = WindowStats(np.array([[[3, 1]], [[0, 0]]]), np.array([[0.5], [0.0]]), np.array([[0.01], [0.0]]))
    R, P = resample(stats, 0.5, np.random.default_rng(0))
    assert P[1, 0].sum() == 0 and R[1, 0] == 0
    assert P[0, 0].sum() == pytest.approx(1.0)


@pytest.mark.parametrize(("kwargs", "message"), [({"level": 1.0}, "level"), ({"fraction": 0.0}, "fraction"),
                                                 ({"resamples": 1}, "resamples"),
                                                 ({"calibration": 1}, "calibration")])  # fmt: skip
def test_interval_arguments_are_checked(kwargs: dict[str, float], message: str) -> None:
    stats = WindowStats(np.array([[[3, 1]]]), np.array([[0.5]]), np.zeros((1, 1)))
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(stats, stats, lambda *a: 0.0, **kwargs)  # type: ignore[arg-type]


# --- the detection benchmark, short: the goals of the default rule on streams with known truth ------------------


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_detection.py"
    spec = importlib.util.spec_from_file_location("bench_detection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_detection"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_identical_twins_raise_no_event_from_noise_where_the_old_rules_did(bench) -> None:  # type: ignore[no-untyped-def]
    """Windows filling from empty and then sliding, 1,000 looks: the evidence rule stays quiet; acting on the
    point (or on the excess over the one-split noise floor) fires from sampling noise alone."""
    m = bench.small(0)
    fired = {"evidence": 0, "excess": 0}
    for seed in range(2):
        res = bench.run_stream(m, m, window=1000, every=50, evaluations=500, seed=seed)
        for rule in fired:
            fired[rule] += len(res.fired[rule])
    assert fired["evidence"] == 0
    assert fired["excess"] > 0  # the same streams: the noise is there to be seen


@pytest.mark.parametrize(("change", "windows"), [("reward bias +0.1", 1.5), ("flip", 1.0)])
def test_a_drift_of_twice_the_threshold_is_flagged_soon(bench, change: str, windows: float) -> None:  # type: ignore[no-untyped-def]
    """A flip (7x the threshold) is flagged within one window. A reward bias of twice the threshold within one
    and a half: at window 5,000 the bias-corrected mismatch of this pair has a spread of about 0.25 (measured over
    trials), so the 99 % lower end sits about 0.7 below the truth of 1.0 and crosses 0.5 on a favourable draw: in
    the benchmark's seeds after 0.8 windows, with seed 3 after 1.2."""
    m = bench.small(0)
    after = bench.biased(m, 0.1) if change.startswith("reward") else (m[0], bench.shifted_actions(m[1]))
    assert bench.exact(m, after) >= 2 * bench.THRESHOLD - 1e-9
    window = 5000
    res = bench.run_stream(m, m, window=window, every=250, evaluations=(3 * window) // 250, seed=3, after=after,
                           change_at=window)  # fmt: skip
    fires = res.fired["evidence"]
    assert fires and fires[0] > window, fires  # nothing before the change
    assert fires[0] - window <= windows * window  # within that many window lengths after it


def test_point_only_solve_gives_the_point_estimate_of_the_full_solve() -> None:
    """The resamples solve the point estimate alone; with holes in either window it must equal the full solve's."""
    rng = np.random.default_rng(7)
    R1, P1 = random_mdp(rng, 6, 2, 3)
    R2, P2 = random_mdp(rng, 6, 2, 3)
    P1[1, 0] = 0.0  # a hole in the real window, another in the twin's, and a state-action seen by neither
    P2[3, 1] = 0.0
    P1[5, 1] = P2[5, 1] = 0.0
    full = dtbsm(R1, P1, R2, P2, 0.9, 1e-9)
    alone = dtbsm(R1, P1, R2, P2, 0.9, 1e-9, point_only=True)
    assert full.mismatch_upper > full.mismatch  # the holes matter
    assert alone.mismatch == pytest.approx(full.mismatch, abs=1e-7)
