"""Performance bounds built on the DT-BSM: deployment regret, sample size, and a plug-in regret estimate.

Formulas from Tao, Xu, You (arXiv 2502.17983); docs/theory.md states them with what they assume.

Unknown state-actions (all-zero rows of P) are completed one way everywhere in this module: taking an
unknown action ends the episode with reward 0 (a jump to an absorbing zero-reward sink). Value iteration
never chooses such an action when a known one exists, so the completion only decides (a) the value of a
state with no known action, which is 0, and (b) the value of a given policy that picks an unknown action.
"""

from __future__ import annotations

import math

import numpy as np


def _check_gamma(gamma: float) -> None:
    if not 0.0 < gamma < 1.0:
        raise ValueError("gamma must lie in (0, 1)")


def regret_bound(mismatch: float, gamma: float, training_gap: float = 0.0) -> float:
    """max_s (V*(s) - V^pi(s)) <= 2/(1-gamma) * DT-BSM + (1+gamma)/(1-gamma) * eps'.

    eps' (`training_gap`) is the policy's optimality gap in the twin; the bound is what deploying a policy
    trained in the twin can cost in the real network.
    """
    _check_gamma(gamma)
    if mismatch < 0 or training_gap < 0:
        raise ValueError("mismatch and training_gap must be >= 0")
    return 2.0 / (1.0 - gamma) * mismatch + (1.0 + gamma) / (1.0 - gamma) * training_gap


def regret_bound_tv(tv_value: float, gamma: float, training_gap: float = 0.0) -> float:
    """The regret bound with the TV variant: 2/(1-gamma)^2 * max_s d_TV(s) + (1+gamma)/(1-gamma) * eps'.

    It is `regret_bound` applied to the TV mismatch bound max_s d_TV(s) / (1 - gamma).
    """
    _check_gamma(gamma)
    if tv_value < 0 or training_gap < 0:
        raise ValueError("tv_value and training_gap must be >= 0")
    return 2.0 / (1.0 - gamma) ** 2 * tv_value + (1.0 + gamma) / (1.0 - gamma) * training_gap


def sample_size(gamma: float, rbar: float, n_states: int, eps: float, delta: float) -> int:
    """Paper's per-(s,a) sample count K for metric accuracy eps with confidence 1 - delta.

    K = ceil(-ln(delta/2) * gamma^2 * Rbar^2 * |S|^2 / (2 eps^2 (1-gamma)^4)): Hoeffding per transition
    entry, no union bound. Very conservative (gamma=0.9, |S|=10, eps=0.1, Rbar=1: ~1.5e8), which is why
    coverage and intervals for missing data are reported alongside.
    """
    _check_gamma(gamma)
    if rbar < 0:
        raise ValueError("rbar must be >= 0")
    if n_states < 1:
        raise ValueError("n_states must be >= 1")
    if eps <= 0:
        raise ValueError("eps must be > 0")
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must lie in (0, 1)")
    k = -math.log(delta / 2.0) * gamma**2 * rbar**2 * n_states**2 / (2.0 * eps**2 * (1.0 - gamma) ** 4)
    return math.ceil(k)


def _known_mask(P: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    return P.sum(axis=2) > 0 if known is None else np.asarray(known, dtype=bool)


def _q_values(R: np.ndarray, P: np.ndarray, V: np.ndarray, gamma: float, known: np.ndarray) -> np.ndarray:
    """Q(s,a) = R(s,a) + gamma * sum_x P(x|s,a) V(x) on known state-actions, -inf on unknown ones."""
    return np.where(known, R + gamma * P @ V, -np.inf)


def _greedy_values(Q: np.ndarray) -> np.ndarray:
    """max_a Q(s,a), with 0 for a state that has no known action (the completion above)."""
    best = Q.max(axis=1)
    return np.where(np.isfinite(best), best, 0.0)


def value_iteration(
    R: np.ndarray, P: np.ndarray, gamma: float, tol: float = 1e-10, known: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal values V* (S,) and a greedy policy (S,) of int, to sup-norm accuracy tol.

    Unknown state-actions (`known` False; default: all-zero P rows) are left out of the max; a state with
    no known action has value 0 and policy 0 (see the module docstring). Stops once
    max|V_{n+1} - V_n| <= tol (1-gamma)/gamma, the contraction criterion for error <= tol.
    """
    _check_gamma(gamma)
    R, P = np.asarray(R, dtype=float), np.asarray(P, dtype=float)
    known = _known_mask(P, known)
    threshold = tol * (1.0 - gamma) / gamma
    V = np.zeros(R.shape[0])
    while True:
        V_new = _greedy_values(_q_values(R, P, V, gamma, known))
        done = float(np.max(np.abs(V_new - V))) <= threshold
        V = V_new
        if done:
            break
    policy = np.argmax(_q_values(R, P, V, gamma, known), axis=1)  # all -inf row -> action 0
    return V, policy


def policy_value(R: np.ndarray, P: np.ndarray, policy: np.ndarray, gamma: float) -> np.ndarray:
    """Exact V^pi (S,) by solving (I - gamma P_pi) V = R_pi.

    A state whose chosen action is unknown (all-zero row) gets R_pi = 0 and no successors, i.e. value 0,
    the same completion `value_iteration` uses.
    """
    _check_gamma(gamma)
    R, P = np.asarray(R, dtype=float), np.asarray(P, dtype=float)
    states = np.arange(R.shape[0])
    policy = np.asarray(policy, dtype=int)
    P_pi = P[states, policy]
    R_pi = np.where(P_pi.sum(axis=1) > 0, R[states, policy], 0.0)
    return np.linalg.solve(np.eye(len(states)) - gamma * P_pi, R_pi)


def regret_estimate(
    R_real: np.ndarray, P_real: np.ndarray, R_twin: np.ndarray, P_twin: np.ndarray, gamma: float
) -> float:
    """Plug-in regret of deploying the twin's optimal policy in the (empirical) real MDP.

    Solves the twin by value iteration, evaluates its greedy policy exactly in the real MDP and returns
    max_s (V*_real(s) - V^pi_real(s)), clipped at 0 (true regret is never negative; only the solver
    tolerance can make it so). Where the twin's action is unknown in the real MDP at s, the policy falls
    back to the real-known action with the best twin Q value (twin-unknown actions rank last; ties go to
    the lowest index), so the estimate never rests on the sink completion for states the real MDP knows.
    This is an estimate, not a guarantee: it inherits the sampling error of both empirical MDPs.
    """
    R_real, P_real = np.asarray(R_real, dtype=float), np.asarray(P_real, dtype=float)
    R_twin, P_twin = np.asarray(R_twin, dtype=float), np.asarray(P_twin, dtype=float)
    if R_real.shape != R_twin.shape or P_real.shape != P_twin.shape:
        raise ValueError("regret_estimate needs the same state set for real and twin")
    known_real, known_twin = P_real.sum(axis=2) > 0, P_twin.sum(axis=2) > 0

    V_twin, _ = value_iteration(R_twin, P_twin, gamma, known=known_twin)
    Q_twin = _q_values(R_twin, P_twin, V_twin, gamma, known_twin)
    # Rank real-known actions by twin Q; real-unknown ones below everything, twin-unknown ones just above.
    rank = np.where(known_real, np.where(known_twin, Q_twin, np.finfo(float).min), -np.inf)
    policy = np.argmax(rank, axis=1)

    V_star, _ = value_iteration(R_real, P_real, gamma, known=known_real)
    V_pi = policy_value(R_real, P_real, policy, gamma)
    return max(0.0, float(np.max(V_star - V_pi)))
