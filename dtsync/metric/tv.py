"""TV-based DT-BSM variant: a closed-form upper bound on the exact mismatch, no optimal transport.

d_TV(s) = max_a { |R(s,a) - R'(s,a)| + gamma * Rbar / (1 - gamma) * TV(P(.|s,a), P'(.|s,a)) },
TV = half the L1 distance. It is cheap (O(S * A * S)) and comes with the proven bound
max_s d(s,s) <= max_s d_TV(s) / (1 - gamma): a transport plan that keeps the 1 - TV overlapping mass on
the diagonal (cost <= max diagonal) and moves the rest at cost <= Rbar / (1 - gamma) gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TVResult:
    """TV-variant figures for one (real, twin) pair sharing one state set."""

    per_state: np.ndarray  # (S,) d_TV(s); 0 where no action is known in both windows
    value: float  # max_s d_TV(s)
    mismatch_bound: float  # value / (1 - gamma) >= max_s d(s, s)
    rbar: float  # the reward range used


def _known(P: np.ndarray) -> np.ndarray:
    """(S, A) mask of state-actions with data: an all-zero row of P means 'never observed'."""
    return P.sum(axis=2) > 0


def reward_range(
    R_real: np.ndarray, R_twin: np.ndarray, known_real: np.ndarray, known_twin: np.ndarray
) -> float:
    """Rbar = max over s, s', a of |R(s,a) - R'(s',a)|, over rows known in both MDPs.

    Per action the largest cross gap is max(max R - min R', max R' - min R), so this is O(S * A) rather
    than O(S * S' * A). Returns 0 when no action is known on both sides.
    """
    hi_r = np.where(known_real, R_real, -np.inf).max(axis=0)
    lo_r = np.where(known_real, R_real, np.inf).min(axis=0)
    hi_t = np.where(known_twin, R_twin, -np.inf).max(axis=0)
    lo_t = np.where(known_twin, R_twin, np.inf).min(axis=0)
    both = known_real.any(axis=0) & known_twin.any(axis=0)
    if not both.any():
        return 0.0
    gap = np.maximum(hi_r - lo_t, hi_t - lo_r)
    return float(gap[both].max())


def dtbsm_tv(
    R_real: np.ndarray,
    P_real: np.ndarray,
    R_twin: np.ndarray,
    P_twin: np.ndarray,
    gamma: float,
    *,
    rbar: float | None = None,
) -> TVResult:
    """TV variant of the DT-BSM for a real MDP and a twin over the same states (S == S').

    Only actions known in both windows enter the max at a state; unknown actions are not guessed here,
    they are covered by the interval [d_lower, d_upper] of the exact metric. A state with no action known
    on both sides gets d_TV = 0. `rbar` defaults to the empirical reward range over known rows; the bound
    `mismatch_bound` is proven only when rbar is at least the true range.
    """
    R_real, P_real = np.asarray(R_real, dtype=float), np.asarray(P_real, dtype=float)
    R_twin, P_twin = np.asarray(R_twin, dtype=float), np.asarray(P_twin, dtype=float)
    if R_real.shape != R_twin.shape or P_real.shape != P_twin.shape:
        raise ValueError("dtbsm_tv needs the same state set: R, R' (S, A) and P, P' (S, A, S)")
    S, A = R_real.shape
    if P_real.shape != (S, A, S):
        raise ValueError("P must have shape (S, A, S)")
    if not 0.0 < gamma < 1.0:
        raise ValueError("gamma must lie in (0, 1)")
    known_real, known_twin = _known(P_real), _known(P_twin)
    if rbar is None:
        rbar = reward_range(R_real, R_twin, known_real, known_twin)
    elif rbar < 0:
        raise ValueError("rbar must be >= 0")

    tv = 0.5 * np.abs(P_real - P_twin).sum(axis=2)  # (S, A)
    per_sa = np.abs(R_real - R_twin) + gamma * rbar / (1.0 - gamma) * tv
    per_state = np.where(known_real & known_twin, per_sa, 0.0).max(axis=1)
    value = float(per_state.max())
    return TVResult(per_state=per_state, value=value, mismatch_bound=value / (1.0 - gamma), rbar=float(rbar))
