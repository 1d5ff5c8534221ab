"""Properties of the DT-BSM that the theory guarantees, checked on the fast engine and on the naive oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtsync.metric.bounds import policy_value, regret_bound, regret_estimate, value_iteration
from dtsync.metric.dtbsm import DTBSMSolver, dtbsm
from dtsync.metric.naive import dtbsm_naive
from dtsync.metric.tv import dtbsm_tv

TOL = 1e-8


def random_mdp(rng: np.random.Generator, S: int, A: int, sparse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rewards in [0, 1]; rows dense, or supported on 1..3 random next states."""
    R = rng.random((S, A))
    P = rng.random((S, A, S)) + 1e-3
    if sparse:
        for s in range(S):
            for a in range(A):
                keep = rng.choice(S, size=rng.integers(1, min(3, S) + 1), replace=False)
                mask = np.zeros(S, dtype=bool)
                mask[keep] = True
                P[s, a, ~mask] = 0.0
    return R, P / P.sum(axis=2, keepdims=True)


def perturb(rng: np.random.Generator, R: np.ndarray, P: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """A nearby MDP on the same supports: what a twin, or the next window, looks like."""
    R2 = np.clip(R + scale * rng.standard_normal(R.shape), 0.0, 1.0)
    P2 = np.where(P > 0, P * np.exp(scale * rng.standard_normal(P.shape)), 0.0)
    return R2, P2 / P2.sum(axis=2, keepdims=True)


@st.composite
def mdp_pairs(draw, same_states: bool = False, max_states: int = 5):
    """(R, P, R', P', gamma); the twin is independent or a perturbation; S' may differ unless same_states."""
    S = draw(st.integers(2, max_states))
    A = draw(st.integers(1, 3))
    gamma = draw(st.sampled_from([0.5, 0.9]))
    sparse = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    R, P = random_mdp(rng, S, A, sparse)
    if draw(st.booleans()):
        R2, P2 = perturb(rng, R, P, scale=draw(st.sampled_from([0.01, 0.3])))
    else:
        S2 = S if same_states else draw(st.integers(2, max_states))
        R2, P2 = random_mdp(rng, S2, A, draw(st.booleans()))
    return R, P, R2, P2, gamma


def optimal_values(R: np.ndarray, P: np.ndarray, gamma: float) -> np.ndarray:
    return value_iteration(R, P, gamma, tol=1e-12)[0]


# --- engine against the oracle ---------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(mdp_pairs())
def test_engine_matches_naive(pair) -> None:
    R, P, R2, P2, gamma = pair
    expected, _ = dtbsm_naive(R, P, R2, P2, gamma, tol=TOL)
    res = dtbsm(R, P, R2, P2, gamma, tol=TOL)
    np.testing.assert_allclose(res.d, expected, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(mdp_pairs(same_states=True, max_states=4))
def test_naive_oracle_satisfies_theory(pair) -> None:
    """The oracle is checked on its own, so the engine is not compared against a wrong reference."""
    R, P, R2, P2, gamma = pair
    d, _ = dtbsm_naive(R, P, R2, P2, gamma, tol=TOL)
    gap = np.abs(optimal_values(R, P, gamma)[:, None] - optimal_values(R2, P2, gamma)[None, :])
    assert np.all(gap <= d + 1e-6)
    assert np.max(np.diag(d)) <= dtbsm_tv(R, P, R2, P2, gamma).mismatch_bound + 1e-6
    same, _ = dtbsm_naive(R, P, R, P, gamma, tol=TOL)
    np.testing.assert_allclose(np.diag(same), 0.0, atol=1e-7)


def test_naive_rejects_unknown_rows() -> None:
    R, P = random_mdp(np.random.default_rng(0), 3, 2, sparse=False)
    P_missing = P.copy()
    P_missing[1, 0] = 0.0
    with pytest.raises(ValueError):
        dtbsm_naive(R, P_missing, R, P, 0.9)


# --- guarantees from the theory, on the engine -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(mdp_pairs())
def test_value_gap_is_bounded_by_d(pair) -> None:
    R, P, R2, P2, gamma = pair
    d = dtbsm(R, P, R2, P2, gamma, tol=TOL).d
    gap = np.abs(optimal_values(R, P, gamma)[:, None] - optimal_values(R2, P2, gamma)[None, :])
    assert np.all(gap <= d + 1e-6)


@settings(max_examples=40, deadline=None)
@given(mdp_pairs(same_states=True))
def test_identical_mdps_have_zero_mismatch(pair) -> None:
    R, P, _, _, gamma = pair
    res = dtbsm(R, P, R, P, gamma, tol=TOL)
    assert res.mismatch == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(np.diag(res.d), 0.0, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(mdp_pairs(same_states=True))
def test_mismatch_is_within_tv_bound(pair) -> None:
    R, P, R2, P2, gamma = pair
    res = dtbsm(R, P, R2, P2, gamma, tol=TOL)
    assert res.mismatch == pytest.approx(np.max(np.diag(res.d)), abs=1e-9)
    assert res.mismatch <= dtbsm_tv(R, P, R2, P2, gamma).mismatch_bound + 1e-6


@settings(max_examples=60, deadline=None)
@given(mdp_pairs(same_states=True))
def test_regret_bound_holds_for_twin_policy(pair) -> None:
    R, P, R2, P2, gamma = pair
    V_twin, policy = value_iteration(R2, P2, gamma, tol=1e-12)
    training_gap = max(0.0, float(np.max(V_twin - policy_value(R2, P2, policy, gamma))))
    regret = float(np.max(optimal_values(R, P, gamma) - policy_value(R, P, policy, gamma)))
    bound = regret_bound(dtbsm(R, P, R2, P2, gamma, tol=TOL).mismatch, gamma, training_gap)
    assert regret <= bound + 1e-6
    assert regret_estimate(R, P, R2, P2, gamma) <= bound + 1e-6


@settings(max_examples=40, deadline=None)
@given(mdp_pairs())
def test_swapping_roles_transposes_d(pair) -> None:
    R, P, R2, P2, gamma = pair
    forward = dtbsm(R, P, R2, P2, gamma, tol=TOL).d
    backward = dtbsm(R2, P2, R, P, gamma, tol=TOL).d
    np.testing.assert_allclose(backward, forward.T, atol=2 * TOL)


@settings(max_examples=40, deadline=None)
@given(mdp_pairs(), st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 0.05]))
def test_warm_start_equals_cold_start(pair, seed, scale) -> None:
    R, P, R2, P2, gamma = pair
    rng = np.random.default_rng(seed)
    solver = DTBSMSolver()
    solver.solve(R, P, R2, P2, gamma, tol=TOL)
    R_next, P_next = perturb(rng, R, P, scale)  # the real window moved on
    warm = solver.solve(R_next, P_next, R2, P2, gamma, tol=TOL)
    cold = dtbsm(R_next, P_next, R2, P2, gamma, tol=TOL)
    np.testing.assert_allclose(warm.d, cold.d, atol=2 * TOL)
