"""Policy evaluation for the pair chain: the linear step of the DT-BSM's policy iteration.

With the maximising actions and the optimal couplings of a sweep held fixed, the operator becomes affine,
x = base + gamma * Pi x, with Pi a sub-stochastic matrix over pairs (s, s') whose rows are the chosen couplings
(empty for a pair whose unknown term wins: its value is the constant in `base`). Gauss-Seidel solves it:
each pass contracts the error by at least gamma in the sup norm (Puterman, "Markov Decision Processes", 1994,
sec. 6.3.3), and usually much more, because updated values are read within the pass.
"""

from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def evaluate_couplings(x, base, tgt, flw, gamma, tol, max_sweeps):
    """Gauss-Seidel solve of x = base + gamma * Pi x in place, from x; returns the passes used.

    tgt[s, s', :] lists the pair indices t = x * S' + y of the coupling's cells (-1 ends the list), flw the
    masses. Stops once a pass changes no entry by more than `tol`, or after `max_sweeps` passes.
    """
    S1, S2 = x.shape
    nb = tgt.shape[2]
    flat = x.reshape(S1 * S2)
    for sweep in range(1, max_sweeps + 1):
        delta = 0.0
        for s in range(S1):
            for s2 in range(S2):
                acc = 0.0
                for pos in range(nb):
                    t = tgt[s, s2, pos]
                    if t < 0:
                        break
                    acc += flw[s, s2, pos] * flat[t]
                new = base[s, s2] + gamma * acc
                diff = abs(new - flat[s * S2 + s2])
                if diff > delta:
                    delta = diff
                flat[s * S2 + s2] = new
        if delta <= tol:
            return sweep
    return max_sweeps
