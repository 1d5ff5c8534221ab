"""The testbed's exact MDP, and the pieces of one step that the simulator shares with it.

For a scheme a, UE i serves served_i(a, x_i) chunks (see :mod:`dtsync.testbed.params`), then one event e
(or none) moves the post-service state:

    P(s' | s, a) = p_none [s' = post(s, a)] + sum_e p_e [s' = e(post(s, a))]
    R(s, a)      = sum_i w_i served_i(a, x_i) / reward_scale

For a model with ``buckets``, both sides are averaged over the levels of a group: P = M P_fine M and
R = M R_fine, with M = kron_i M_i and M_i(x, y) = 1/|g| when y has x's channel level and a buffer level in
x's group g (the model takes the level to be uniform in its group, and reports one uniformly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import NamedTuple

import numpy as np

from dtsync.testbed.params import UE, TestbedParams

__all__ = ["Event", "TestbedMDP", "capacity", "events", "exact_mdp", "reward_scale", "served_table", "state_labels"]


@dataclass(frozen=True, eq=False)
class TestbedMDP:
    """R (S, A) expected rewards, P (S, A, S) transition probabilities, and the labels of states and actions."""

    R: np.ndarray
    P: np.ndarray
    labels: list[str]
    actions: list[str]


class Event(NamedTuple):
    """What can happen after service in one step: a batch of ``size`` chunks at UE ``ue``, or (size 0) a
    channel update of that UE; ``prob`` per step."""

    prob: float
    ue: int
    size: int


def capacity(rb: int, rate: float) -> int:
    """Whole chunks ``rb`` RBs carry at ``rate`` chunks per RB (the 1e-9 absorbs float error like 3 * 0.1)."""
    return math.floor(rb * rate + 1e-9)


def served_table(ue: UE, rbs: list[int]) -> np.ndarray:
    """served (A, L, C): chunks sent at buffer level b, channel level c, with ``rbs[a]`` RBs (full UE: L = 1)."""
    out = np.zeros((len(rbs), ue.buffer_levels, ue.channel_levels), dtype=np.int64)
    for a, rb in enumerate(rbs):
        for c, rate in enumerate(ue.channel.rates):
            cap = capacity(rb, rate)
            out[a, :, c] = cap if ue.full else np.minimum(np.arange(ue.buffer_levels), cap)
    return out


def _rbs(params: TestbedParams, i: int) -> list[int]:
    return [rbs[i] for rbs in params.schemes.values()]


def reward_scale(params: TestbedParams) -> float:
    """sum_i w_i * (L_i - 1, or for a full UE its largest RB share): rewards are divided by it.

    It depends only on what a twin shares with the real network (weights, levels, schemes), never on the
    rates, so real and twin rewards are on one scale; with rates of at most 1 chunk per RB they lie in [0, 1].
    """
    return sum(
        ue.weight * (max(rbs[i] for rbs in params.schemes.values()) if ue.full else ue.buffer_levels - 1)
        for i, ue in enumerate(params.ues)
    )


def events(params: TestbedParams) -> list[Event]:
    """Every event with its probability per step (arrival batches first, then channel updates)."""
    out = [
        Event(float(p), i, k)
        for i, ue in enumerate(params.ues)
        for k, p in enumerate(ue.traffic.batches(), start=1)
        if p > 0
    ]
    out += [Event(ue.channel.update, i, 0) for i, ue in enumerate(params.ues) if ue.channel.update > 0]
    return out


def _grouping(ue: UE) -> np.ndarray:
    """M_i (n, n): uniform average over the buffer levels of x's group at x's channel level (identity if fine)."""
    C, n = ue.channel_levels, ue.n_local
    if ue.buckets is None:
        return np.eye(n)
    M = np.zeros((n, n))
    for group in ue.buckets:
        for b in group:
            for other in group:
                for c in range(C):
                    M[b * C + c, other * C + c] = 1.0 / len(group)
    return M


def state_labels(params: TestbedParams) -> list[str]:
    """Labels in state-index order, e.g. ``"camera:c1 laptop:b2c0 phone:b0c1"`` (b buffer, c channel level)."""
    per_ue = [
        [f"{ue.name}:c{c}" if ue.full else f"{ue.name}:b{b}c{c}" for b in range(ue.buffer_levels)
         for c in range(ue.channel_levels)]
        for ue in params.ues
    ]  # fmt: skip
    return reduce(lambda acc, part: [f"{x} {y}" for x in acc for y in part], per_ue)


def exact_mdp(params: TestbedParams) -> TestbedMDP:
    """The exact (R, P) of the testbed under ``params`` (rows of P sum to 1), with state and action labels."""
    ues = params.ues
    A, S = len(params.schemes), params.n_states
    radix = tuple(ue.n_local for ue in ues)
    x = np.stack(np.unravel_index(np.arange(S), radix), axis=1)  # (S, n): local states, UE 0 most significant
    C = np.array([ue.channel_levels for ue in ues])
    L = np.array([ue.buffer_levels for ue in ues])
    b, c = x // C, x % C
    served = [served_table(ue, _rbs(params, i)) for i, ue in enumerate(ues)]
    weight = np.array([ue.weight for ue in ues])
    evs = events(params)
    p_none = 1.0 - sum(e.prob for e in evs)
    rows = np.arange(S)

    def index(bb: np.ndarray, cc: np.ndarray) -> np.ndarray:
        return np.ravel_multi_index((bb * C + cc).T, radix)

    R = np.zeros((S, A))
    P = np.zeros((S, A, S))
    for a in range(A):
        sent = np.stack([served[i][a, b[:, i], c[:, i]] for i in range(len(ues))], axis=1)
        R[:, a] = sent @ weight / reward_scale(params)
        post = np.where(L > 1, b - sent, 0)
        Pa = P[:, a, :]  # a view: scattering into it fills P
        np.add.at(Pa, (rows, index(post, c)), p_none)
        for e in evs:
            bb, cc = post.copy(), c.copy()
            if e.size > 0:
                bb[:, e.ue] = np.minimum(L[e.ue] - 1, bb[:, e.ue] + e.size)
                np.add.at(Pa, (rows, index(bb, cc)), e.prob)
                continue
            T = np.asarray(ues[e.ue].channel.transition, dtype=float)
            for level in range(C[e.ue]):
                cc[:, e.ue] = level
                np.add.at(Pa, (rows, index(bb, cc)), e.prob * T[c[:, e.ue], level])
    M = reduce(np.kron, [_grouping(ue) for ue in ues])
    if not np.array_equal(M, np.eye(S)):
        R = M @ R
        P = np.tensordot(M, P, axes=(1, 0)) @ M
    return TestbedMDP(R=R, P=P, labels=state_labels(params), actions=params.actions)
