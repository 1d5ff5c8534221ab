"""Episodes: the next state of a terminated transition is absorbing, with reward 0, in every empirical MDP.

Episodic traces end in terminal states that never appear as a state ``s``: left alone, a terminal state would be
a state with no data, read as missing (pinning the pessimistic bound at Rbar/(1-gamma)) and filled by guesses in
the point estimate, so an episodic pair would be measured under another convention than the MDP it came from.
The usual convention, Gymnasium's, is that termination leads to an absorbing state that pays nothing from then
on (a time-limit truncation is not a termination: the state after it is an ordinary state).

All absorbing zero-reward states are bisimilar: for two of them, d(x, y) = max_a {0 + gamma * d(x, y)}, so
d(x, y) = 0, in one MDP or across a pair. One reserved absorbing state per cell is therefore equivalent, for the
metric, to keeping every terminal state apart: the encoding maps the next state of a ``done`` transition to the
label :data:`TERMINAL`, and :func:`absorb` makes that state's rows a self-loop with reward 0 under every action,
in the real window's MDP and in each twin's alike (so d(TERMINAL, TERMINAL) = 0 and its rows are never unknown).
"""

from __future__ import annotations

import numpy as np

from dtsync.window import EmpiricalMDP

__all__ = ["TERMINAL", "absorb", "absorb_arrays"]

# A tuple holding a string can never be a contract label: labels are ints and strings, and binned vectors
# become tuples of ints. JSON shows it as ["<terminal>"] (e.g. in top_states).
TERMINAL: tuple[str] = ("<terminal>",)


def absorb(mdp: EmpiricalMDP, terminal: int | None) -> EmpiricalMDP:
    """``mdp`` with state ``terminal`` made absorbing (P(terminal | terminal, a) = 1, R = 0 for every a).

    ``terminal`` None (the cell saw no terminated transition) returns ``mdp`` unchanged. The counts ``N`` are
    left as observed (none: the terminal state is never a state ``s`` of the data), so sample-size figures count
    only real samples. The arrays are copied, never written in place.
    """
    if terminal is None or terminal >= mdp.R.shape[0]:
        return mdp
    R, P = absorb_arrays(mdp.R, mdp.P, terminal)
    return EmpiricalMDP(R, P, mdp.N, mdp.samples, mdp.reward_min, mdp.reward_max)


def absorb_arrays(R: np.ndarray, P: np.ndarray, terminal: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(R, P) with state ``terminal`` absorbing at reward 0, as copies; unchanged when ``terminal`` is None.

    The bootstrap redraws transitions only where there are samples, so its resamples need this too: a
    terminal state left without rows would read as missing data there, under another convention than the
    observed figure."""
    if terminal is None or terminal >= R.shape[0]:
        return R, P
    R, P = R.copy(), P.copy()
    R[terminal] = 0.0
    P[terminal] = 0.0
    P[terminal, :, terminal] = 1.0
    return R, P
