"""Policy evaluation for the pair chain: the linear step of the DT-BSM's policy iteration.

With the maximising actions and the optimal couplings of a sweep held fixed, the operator becomes affine,
x = base + gamma * Pi x, with Pi a sub-stochastic matrix over pairs (s, s') whose rows are the chosen couplings
(empty for a pair whose unknown term wins: its value is the constant in `base`). Gauss-Seidel solves it:
each pass contracts the error by at least gamma in the sup norm (Puterman, "Markov Decision Processes", 1994,
sec. 6.3.3), and usually much more, because updated values are read within the pass.

Pi is (nearly) stochastic, so the slowest error mode decays by a steady ratio rho per pass: once two successive
ratios of the passes' sup-norm changes agree, the remaining geometric tail rho/(1-rho) times the last change is
added in one step (Aitken extrapolation along the dominant mode; Brezinski, "Extrapolation Methods", 1991). It
is a guess, and needs to be no more: the solver only uses x as a candidate, which the next exact sweep certifies
or rejects (`dtsync.metric.dtbsm`), so it changes how fast the fixed point is reached, never what is returned.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Two successive change ratios count as one steady rate when their tails rho/(1-rho) agree to about this
# fraction; the extrapolation is given up after this many steps that did not help.
_STEADY = 0.05
_FAILURES = 2


@njit(cache=True, nogil=True)
def evaluate_couplings(x, base, tgt, flw, gamma, tol, max_sweeps):
    """Gauss-Seidel solve of x = base + gamma * Pi x in place, from x; returns the passes used.

    tgt[s, s', :] lists the pair indices t = x * S' + y of the coupling's cells (-1 ends the list), flw the
    masses. Stops once a pass changes no entry by more than `tol` (then the residual ||base + gamma Pi x - x||_inf
    is at most gamma * tol: each entry's update read the entries updated after it in that pass at their old
    values), or after `max_sweeps` passes; the count returned is of passes over all pairs. A steady
    contraction rate is extrapolated (module docstring); the extrapolation step is capped at gamma / (1 - gamma)
    times the last pass's change, the tail of the slowest rate Gauss-Seidel can have. If the pass after an
    extrapolation changes x by more than the pass before it (the rate was not a single real mode: a periodic
    chain, say), the step is undone; after `_FAILURES` such steps plain Gauss-Seidel finishes the call.
    """
    S1, S2 = x.shape
    nb = tgt.shape[2]
    flat = x.reshape(S1 * S2)
    change = np.empty(S1 * S2)
    backup = np.empty(S1 * S2)
    last = np.inf
    last_ratio = -1.0
    before = np.inf  # the change of the pass before the last extrapolation
    extrapolated = False
    failures = 0
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
                step = new - flat[s * S2 + s2]
                change[s * S2 + s2] = step
                if not abs(step) <= delta:  # NaN-safe: a NaN counts as the largest change
                    delta = abs(step)
                flat[s * S2 + s2] = new
        if extrapolated:
            extrapolated = False
            if not delta < before:  # it did not help: undo it
                flat[:] = backup
                failures += 1
                last = np.inf
                last_ratio = -1.0
                continue
        if delta <= tol:
            return sweep
        ratio = delta / last if last > 0.0 else 0.0
        if failures < _FAILURES and 0.0 < ratio < 1.0 and abs(ratio - last_ratio) <= _STEADY * (1.0 - ratio):
            tail = min(ratio, gamma) / (1.0 - min(ratio, gamma))
            backup[:] = flat
            before = delta
            extrapolated = True
            for t in range(S1 * S2):
                flat[t] += tail * change[t]
            last = np.inf  # the next two passes measure the rate afresh
            last_ratio = -1.0
        else:
            last = delta
            last_ratio = ratio
    return max_sweeps
