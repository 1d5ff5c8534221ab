"""Closed-form bounds (dtsync.metric.bounds) and the TV variant (dtsync.metric.tv)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtsync.metric.bounds import (
    policy_value,
    regret_bound,
    regret_bound_tv,
    regret_estimate,
    sample_size,
    value_iteration,
)
from dtsync.metric.tv import TVResult, dtbsm_tv


def random_mdp(rng: np.random.Generator, S: int, A: int) -> tuple[np.ndarray, np.ndarray]:
    R = rng.random((S, A))
    P = rng.random((S, A, S)) * (rng.random((S, A, S)) < 0.6)
    P[..., 0] += 1e-3  # keep every row a distribution
    return R, P / P.sum(axis=2, keepdims=True)


mdps = st.tuples(
    st.integers(2, 4), st.integers(1, 3), st.sampled_from([0.5, 0.9]), st.integers(0, 2**32 - 1)
)


# --- regret bounds and sample size -------------------------------------------------------------


def test_regret_bound_formula() -> None:
    assert regret_bound(0.1, 0.9) == pytest.approx(2.0)
    assert regret_bound(0.1, 0.9, training_gap=0.01) == pytest.approx(2.0 + 0.19)
    assert regret_bound_tv(0.1, 0.9) == pytest.approx(20.0)
    # The TV form is the exact form applied to the TV mismatch bound value / (1 - gamma).
    assert regret_bound_tv(0.3, 0.5, 0.2) == pytest.approx(regret_bound(0.3 / 0.5, 0.5, 0.2))


@pytest.mark.parametrize(
    "call",
    [
        lambda: regret_bound(0.1, 1.0),
        lambda: regret_bound(-0.1, 0.9),
        lambda: regret_bound(0.1, 0.9, training_gap=-1.0),
        lambda: regret_bound_tv(0.1, 0.0),
        lambda: sample_size(1.0, 1.0, 10, 0.1, 0.05),
        lambda: sample_size(0.9, -1.0, 10, 0.1, 0.05),
        lambda: sample_size(0.9, 1.0, 0, 0.1, 0.05),
        lambda: sample_size(0.9, 1.0, 10, 0.0, 0.05),
        lambda: sample_size(0.9, 1.0, 10, 0.1, 1.0),
    ],
)
def test_invalid_arguments_raise(call) -> None:
    with pytest.raises(ValueError):
        call()


def test_sample_size_matches_paper_figure() -> None:
    k = sample_size(gamma=0.9, rbar=1.0, n_states=10, eps=0.1, delta=0.05)
    expected = -math.log(0.025) * 0.81 * 100 / (2 * 0.01 * 0.1**4)
    assert k == math.ceil(expected)
    assert 1.45e8 < k < 1.55e8  # "about 1.5e8" in the paper
    assert sample_size(0.9, 1.0, 10, 0.2, 0.05) == math.ceil(expected / 4)
    assert sample_size(0.9, 0.0, 10, 0.1, 0.05) == 0


# --- value iteration, policy evaluation ------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(mdps)
def test_value_iteration_matches_best_deterministic_policy(args) -> None:
    S, A, gamma, seed = args
    R, P = random_mdp(np.random.default_rng(seed), S, A)
    V, policy = value_iteration(R, P, gamma)
    best = np.max([policy_value(R, P, np.array(pi), gamma) for pi in itertools.product(range(A), repeat=S)],
                  axis=0)
    np.testing.assert_allclose(V, best, atol=1e-8)
    np.testing.assert_allclose(policy_value(R, P, policy, gamma), V, atol=1e-8)


def test_policy_value_closed_form() -> None:
    R = np.array([[1.0, 5.0]])
    P = np.array([[[1.0], [0.0]]])  # action 1 is unknown
    assert policy_value(R, P, np.array([0]), 0.9)[0] == pytest.approx(10.0)
    assert policy_value(R, P, np.array([1]), 0.9)[0] == 0.0  # unknown action: sink with reward 0


def test_value_iteration_skips_unknown_actions() -> None:
    R = np.array([[0.2, 100.0], [7.0, 7.0]])
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = 1.0  # state 0: only action 0 known; state 1: nothing known
    V, policy = value_iteration(R, P, 0.5)
    assert policy[0] == 0
    np.testing.assert_allclose(V, [0.4, 0.0], atol=1e-9)


# --- plug-in regret estimate -----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(mdps)
def test_regret_estimate_is_zero_for_identical_mdps(args) -> None:
    S, A, gamma, seed = args
    R, P = random_mdp(np.random.default_rng(seed), S, A)
    assert regret_estimate(R, P, R, P, gamma) == pytest.approx(0.0, abs=1e-8)


def test_regret_estimate_swapped_rewards() -> None:
    P = np.ones((1, 2, 1))
    real, twin = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    # The twin prefers action 1, which earns nothing in the real network: regret 1/(1-gamma).
    assert regret_estimate(real, P, twin, P, 0.9) == pytest.approx(10.0)


def test_regret_estimate_falls_back_to_real_known_action() -> None:
    P_twin = np.ones((1, 3, 1))
    P_real = P_twin.copy()
    P_real[0, 2] = 0.0  # the twin's favourite action was never seen in the real network
    twin = np.array([[0.0, 0.5, 1.0]])  # twin ranks 2 > 1 > 0: fallback must pick action 1
    real = np.array([[1.0, 0.4, 9.0]])
    # V* = 1/(1-g) = 10 via action 0; the fallback action 1 earns 0.4/(1-g) = 4.
    assert regret_estimate(real, P_real, twin, P_twin, 0.9) == pytest.approx(6.0)


def test_regret_estimate_rejects_different_state_sets() -> None:
    R, P = random_mdp(np.random.default_rng(0), 3, 2)
    R2, P2 = random_mdp(np.random.default_rng(1), 2, 2)
    with pytest.raises(ValueError):
        regret_estimate(R, P, R2, P2, 0.9)


# --- TV variant ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(mdps)
def test_tv_identical_is_zero(args) -> None:
    S, A, gamma, seed = args
    R, P = random_mdp(np.random.default_rng(seed), S, A)
    res = dtbsm_tv(R, P, R, P, gamma)
    assert isinstance(res, TVResult)
    np.testing.assert_array_equal(res.per_state, np.zeros(S))
    assert res.value == 0.0 and res.mismatch_bound == 0.0


def test_tv_hand_computed() -> None:
    gamma = 0.5
    R = np.array([[0.0], [1.0]])
    R2 = np.array([[0.5], [0.2]])
    P = np.array([[[1.0, 0.0]], [[0.5, 0.5]]])
    P2 = np.array([[[0.0, 1.0]], [[0.5, 0.5]]])
    res = dtbsm_tv(R, P, R2, P2, gamma)
    assert res.rbar == pytest.approx(0.8)  # cross pairs: |1 - 0.2|
    # state 0: |0 - 0.5| + 0.5 * 0.8 / 0.5 * TV 1 = 1.3; state 1: |1 - 0.2| + 0 = 0.8
    np.testing.assert_allclose(res.per_state, [1.3, 0.8])
    assert res.value == pytest.approx(1.3)
    assert res.mismatch_bound == pytest.approx(2.6)
    assert dtbsm_tv(R, P, R2, P2, gamma, rbar=2.0).per_state[0] == pytest.approx(0.5 + 2.0)


def test_tv_ignores_actions_unknown_on_either_side() -> None:
    R = np.array([[0.0, 0.0]])
    R2 = np.array([[0.1, 50.0]])
    P = np.ones((1, 2, 1))
    P2 = P.copy()
    P2[0, 1] = 0.0  # twin never tried action 1
    res = dtbsm_tv(R, P, R2, P2, 0.9)
    assert res.rbar == pytest.approx(0.1)
    assert res.value == pytest.approx(0.1)


def test_tv_rejects_bad_input() -> None:
    R, P = random_mdp(np.random.default_rng(0), 3, 2)
    R2, P2 = random_mdp(np.random.default_rng(1), 2, 2)
    with pytest.raises(ValueError):
        dtbsm_tv(R, P, R2, P2, 0.9)
    with pytest.raises(ValueError):
        dtbsm_tv(R, P, R, P, 1.0)
    with pytest.raises(ValueError):
        dtbsm_tv(R, P, R, P, 0.9, rbar=-1.0)
