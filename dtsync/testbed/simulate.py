"""Step the testbed and emit telemetry: ``Transition(s, a, r, s_next, t, seq)`` in the contract's shape.

The step is the physics written out (service, then at most one arrival batch or channel update; see
:mod:`dtsync.testbed.params`), not a draw from the matrix of :func:`exact_mdp`; the tests check that the two
agree, which is what lets the pre-filtering study use the exact MDP in place of the simulator.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from dtsync.contract import Transition
from dtsync.testbed.model import events, reward_scale, served_table, state_labels
from dtsync.testbed.params import TestbedParams

__all__ = ["Switch", "transitions"]

_BLOCK = 4096  # uniforms drawn per numpy call; the loop itself works on plain floats


class Switch(NamedTuple):
    """From step ``step`` on (``seq >= step``) the simulator runs with ``params`` (same label space)."""

    step: int
    params: TestbedParams


class _Step:
    """One parameter set as plain Python tables, so a step costs a few list look-ups and bisects."""

    def __init__(self, params: TestbedParams) -> None:
        rbs = list(params.schemes.values())
        self.L = [ue.buffer_levels for ue in params.ues]
        self.C = [ue.channel_levels for ue in params.ues]
        self.weight = [ue.weight / reward_scale(params) for ue in params.ues]
        self.served = [served_table(ue, [r[i] for r in rbs]).tolist() for i, ue in enumerate(params.ues)]
        self.channel = [np.cumsum(ue.channel.transition, axis=1).tolist() for ue in params.ues]
        self.groups = [
            {b: g for g in (ue.buckets or tuple((b,) for b in range(ue.buffer_levels))) for b in g} for ue in params.ues
        ]
        evs = events(params)
        self.events = [(e.ue, e.size) for e in evs]
        self.cum_events = np.cumsum([e.prob for e in evs]).tolist()

    def __call__(self, b: list[int], c: list[int], a: int, u: list[float]) -> float:
        """Advance buffer levels ``b`` and channel levels ``c`` in place; return the reward. Uses 2n + 2 uniforms."""
        n = len(b)
        gain = 0.0
        for i in range(n):
            group = self.groups[i][b[i]]
            level = group[min(int(u[i] * len(group)), len(group) - 1)]  # the model's level: uniform in its group
            sent = self.served[i][a][level][c[i]]
            gain += self.weight[i] * sent
            b[i] = level - sent if self.L[i] > 1 else 0
        k = bisect_right(self.cum_events, u[n])
        if k < len(self.events):
            i, size = self.events[k]
            if size:
                b[i] = min(self.L[i] - 1, b[i] + size)
            else:
                c[i] = _draw(self.channel[i][c[i]], u[n + 1])
        for i in range(n):
            group = self.groups[i][b[i]]
            b[i] = group[min(int(u[n + 2 + i] * len(group)), len(group) - 1)]  # the reported level
        return gain


def _draw(cum: list[float], u: float) -> int:
    return min(bisect_right(cum, u), len(cum) - 1)


def _behaviour_tables(behaviour: np.ndarray | None, S: int, A: int) -> list[list[float]] | None:
    """Per-state cumulative action distributions; None for the uniform policy."""
    if behaviour is None:
        return None
    pol = np.asarray(behaviour)
    if pol.shape == (S,):
        if not np.issubdtype(pol.dtype, np.integer) or pol.min() < 0 or pol.max() >= A:
            raise ValueError(f"a deterministic behaviour must give an action index in 0..{A - 1} per state")
        pol = np.eye(A)[pol]
    if pol.shape != (S, A) or np.any(pol < 0) or np.any(np.abs(pol.sum(axis=1) - 1.0) > 1e-6):
        raise ValueError(f"behaviour must be (S,) action indices or (S, A) probabilities with S={S}, A={A}")
    return np.cumsum(pol, axis=1).tolist()


def transitions(
    params: TestbedParams,
    *,
    steps: int,
    seed: int,
    behaviour: np.ndarray | None = None,
    start_time: float = 0.0,
    step_seconds: float = 0.01,
    switch: Switch | None = None,
) -> Iterator[Transition]:
    """Yield ``steps`` transitions of the testbed from a uniformly random start state.

    ``behaviour``: None for the default uniform random choice among allocation schemes, an (S,) array of
    action indices or an (S, A) array of probabilities, in the state order of :func:`state_labels`.
    States are labels like ``"camera:c1 laptop:b2c0 phone:b0c1"``, actions are scheme names;
    ``t = start_time + seq * step_seconds`` and ``seq`` counts from 0. ``switch`` changes the parameters from
    one step on (e.g. a twin whose channel model goes stale midway: ``Switch(k, preset("frozen-channel"))``).
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if switch is not None and switch.params.label_space() != params.label_space():
        raise ValueError("switch params must have the same UEs, levels and schemes as params (same label space)")
    labels = state_labels(params)
    actions = params.actions
    S, A = len(labels), len(actions)
    policy = _behaviour_tables(behaviour, S, A)
    step = _Step(params)
    radix = [ue.n_local for ue in params.ues]
    n = len(radix)
    rng = np.random.default_rng(seed)
    s = int(rng.integers(S))
    x = [int(v) for v in np.unravel_index(s, radix)]
    b = [xi // ci for xi, ci in zip(x, step.C, strict=True)]
    c = [xi % ci for xi, ci in zip(x, step.C, strict=True)]
    block: list[list[float]] = []
    for i in range(steps):
        if switch is not None and i == switch.step:
            step = _Step(switch.params)
        if i % _BLOCK == 0:
            block = rng.random((_BLOCK, 2 * n + 3)).tolist()
        u = block[i % _BLOCK]
        a = min(int(u[0] * A), A - 1) if policy is None else _draw(policy[s], u[0])
        r = step(b, c, a, u[1:])
        s_next = 0
        for k in range(n):
            s_next = s_next * radix[k] + b[k] * step.C[k] + c[k]
        yield Transition(
            s=labels[s], a=actions[a], r=round(r, 6), s_next=labels[s_next], t=round(start_time + i * step_seconds, 6),
            seq=i,
        )  # fmt: skip
        s = s_next
