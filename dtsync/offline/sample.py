"""Synthetic traces for a first run and for tests: a random real network, a faithful twin, a drifting twin.

The drifting twin is the case generic drift detectors miss: halfway through, the effect of every action is
shifted to the next action (P'(.|s,a) = P(.|s,a+1)) while rewards stay tied to the action taken. Under the
uniform behaviour policy the state frequencies and the reward distribution do not change at all; only the
dynamics of each action do, which is what the DT-BSM measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dtsync.contract import Transition, encode_transition


def random_mdp(rng: np.random.Generator, n_states: int, n_actions: int, support: int) -> tuple[np.ndarray, np.ndarray]:
    """Rewards U[0, 1] and, per state-action, `support` random next states with random probabilities."""
    R = rng.random((n_states, n_actions))
    P = np.zeros((n_states, n_actions, n_states))
    for s in range(n_states):
        for a in range(n_actions):
            nxt = rng.choice(n_states, size=min(support, n_states), replace=False)
            P[s, a, nxt] = rng.random(len(nxt)) + 0.1
    return R, P / P.sum(axis=-1, keepdims=True)


def simulate(
    R: np.ndarray,
    P: np.ndarray,
    steps: int,
    rng: np.random.Generator,
    *,
    start_state: int = 0,
    start_time: float = 0.0,
    step: float = 0.01,
    reward_noise: float = 0.05,
) -> list[Transition]:
    """Run the uniform random behaviour policy for `steps` transitions, `step` seconds of trace time apart."""
    n_states, n_actions = R.shape
    s = start_state
    out = []
    for i in range(steps):
        a = int(rng.integers(n_actions))
        s_next = int(rng.choice(n_states, p=P[s, a]))
        r = float(R[s, a] + reward_noise * rng.standard_normal())
        out.append(Transition(s=s, a=a, r=round(r, 6), s_next=s_next, t=round(start_time + i * step, 6), seq=i))
        s = s_next
    return out


def shifted_actions(P: np.ndarray) -> np.ndarray:
    """P'(.|s,a) = P(.|s,a+1 mod A): same state frequencies under a uniform policy, different dynamics."""
    return np.roll(P, -1, axis=1)


def write_jsonl(path: Path, transitions: list[Transition]) -> None:
    with path.open("wb") as f:
        for tr in transitions:
            f.write(encode_transition(tr) + b"\n")


def write_samples(
    out_dir: Path, *, steps: int = 20_000, seed: int = 7, n_states: int = 8, n_actions: int = 2, step: float = 0.01
) -> dict[str, Path]:
    """Write real.jsonl, faithful.jsonl and drifting.jsonl (dynamics change at the midpoint) into out_dir.

    Transitions are `step` seconds of trace time apart (100 per second by default, a gNB-like control rate).
    """
    rng = np.random.default_rng(seed)
    R, P = random_mdp(rng, n_states, n_actions, support=3)
    out_dir.mkdir(parents=True, exist_ok=True)
    half = steps // 2
    first = simulate(R, P, half, rng, step=step)
    last = first[-1].s_next
    assert isinstance(last, int)  # simulate labels states by their index
    second = simulate(
        R, shifted_actions(P), steps - half, rng, start_state=last, start_time=half * step, step=step
    )
    second = [Transition(tr.s, tr.a, tr.r, tr.s_next, tr.t, half + i) for i, tr in enumerate(second)]
    traces = {
        "real": simulate(R, P, steps, rng, step=step),
        "faithful": simulate(R, P, steps, rng, step=step),
        "drifting": first + second,
    }
    paths = {}
    for name, transitions in traces.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], transitions)
    return paths
