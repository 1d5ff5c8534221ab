"""The obvious DT-BSM: plain fixed-point iteration with one POT `emd2` call per transport problem.

Kept deliberately simple. It is the test oracle for the fast engine (`dtsync.metric.dtbsm`) and the
baseline its benchmark is measured against, so it must stay easy to check by eye rather than fast.
"""

from __future__ import annotations

import numpy as np
import ot


def dtbsm_naive(
    R_real: np.ndarray,
    P_real: np.ndarray,
    R_twin: np.ndarray,
    P_twin: np.ndarray,
    gamma: float,
    tol: float = 1e-8,
    unknown_value: float | None = None,
) -> tuple[np.ndarray, int]:
    """DT-BSM d (S, S') by iterating F from d = 0; returns (d, sweeps).

    F(d)(s, s') = max_a |R(s,a) - R'(s',a)| + gamma * W1(P(.|s,a), P'(.|s',a); d), with each W1 solved
    exactly by `ot.emd2` on the supports of the two rows. F is a gamma-contraction, so stopping once
    max|d_{n+1} - d_n| <= tol * (1 - gamma) / gamma guarantees max|d_{n+1} - d*| <= tol.
    By default every row of P_real and P_twin must be a distribution; with `unknown_value`, an all-zero row
    marks an unknown state-action whose term is worth that constant (0: the engine's lower metric,
    Rbar/(1-gamma): its upper metric).
    """
    R_real, P_real = np.asarray(R_real, dtype=float), np.asarray(P_real, dtype=float)
    R_twin, P_twin = np.asarray(R_twin, dtype=float), np.asarray(P_twin, dtype=float)
    S, A = R_real.shape
    S2 = R_twin.shape[0]
    if P_real.shape != (S, A, S) or R_twin.shape != (S2, A) or P_twin.shape != (S2, A, S2):
        raise ValueError("shapes must be R (S, A), P (S, A, S), R' (S', A), P' (S', A, S')")
    if not 0.0 < gamma < 1.0:
        raise ValueError("gamma must lie in (0, 1)")
    if unknown_value is None and (np.any(P_real.sum(axis=2) <= 0) or np.any(P_twin.sum(axis=2) <= 0)):
        raise ValueError("dtbsm_naive needs full data: every state-action row of P must be known")

    reward_gap = np.abs(R_real[:, None, :] - R_twin[None, :, :])  # (S, S', A)
    supp_real = [[np.flatnonzero(P_real[s, a]) for a in range(A)] for s in range(S)]
    supp_twin = [[np.flatnonzero(P_twin[t, a]) for a in range(A)] for t in range(S2)]
    threshold = tol * (1.0 - gamma) / gamma

    d = np.zeros((S, S2))
    sweeps = 0
    while True:
        d_new = np.empty_like(d)
        for s in range(S):
            for t in range(S2):
                best = 0.0
                for a in range(A):
                    x, y = supp_real[s][a], supp_twin[t][a]
                    if len(x) == 0 or len(y) == 0:
                        best = max(best, float(unknown_value or 0.0))
                        continue
                    p, q = P_real[s, a, x], P_twin[t, a, y]
                    cost = np.ascontiguousarray(d[np.ix_(x, y)])
                    w1 = ot.emd2(p / p.sum(), q / q.sum(), cost)
                    best = max(best, reward_gap[s, t, a] + gamma * float(w1))
                d_new[s, t] = best
        sweeps += 1
        delta = float(np.max(np.abs(d_new - d)))
        d = d_new
        if delta <= threshold:
            return d, sweeps
