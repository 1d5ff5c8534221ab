"""Episodes: a terminated transition leads to the cell's absorbing state (reward 0) in both empirical MDPs.

The reference is a small episodic chain, a one-dimensional FrozenLake: positions 0..4, a hole left of 0 (reward 0)
and a goal right of 4 (reward 1), both terminal. The real network is slippery (the intended move 60 %, stay 20 %,
the opposite move 20 %); the twin is deterministic. Its exact mismatch, with the terminal states absorbing at
reward 0, comes from dtsync.dtbsm on the exact MDPs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import dtsync
from dtsync.config import default_config
from dtsync.contract import Transition, encode_transition
from dtsync.encoding import CellEncoding, EncodingError, StateEncoder
from dtsync.episodes import TERMINAL, absorb
from dtsync.monitor import Figures
from dtsync.offline.rank import rank
from dtsync.window import EmpiricalMDP

LENGTH = 5
GAMMA = 0.9
TIME_LIMIT = 20  # episodes longer than this are truncated: not a termination, no `done`


def outcomes(slippery: bool, s: int, a: int) -> Iterator[tuple[float, int | str, float, bool]]:
    """(probability, next state, reward, terminated) of action a (0 left, 1 right) in position s."""
    step = 1 if a == 1 else -1
    moves = [(0.6, step), (0.2, 0), (0.2, -step)] if slippery else [(1.0, step)]
    for p, move in moves:
        x = s + move
        if x < 0:
            yield p, "hole", 0.0, True
        elif x >= LENGTH:
            yield p, "goal", 1.0, True
        else:
            yield p, x, 0.0, False


def exact_mdp(slippery: bool) -> tuple[np.ndarray, np.ndarray]:
    """R (S, A) and P (S, A, S) with one absorbing terminal state at index LENGTH."""
    S = LENGTH + 1
    R, P = np.zeros((S, 2)), np.zeros((S, 2, S))
    for s in range(LENGTH):
        for a in range(2):
            for p, x, r, done in outcomes(slippery, s, a):
                R[s, a] += p * r
                P[s, a, LENGTH if done else int(x)] += p
    P[LENGTH, :, LENGTH] = 1.0
    return R, P


def exact_mismatch() -> float:
    (Rr, Pr), (Rt, Pt) = exact_mdp(True), exact_mdp(False)
    return dtsync.dtbsm(Rr, Pr, Rt, Pt, gamma=GAMMA).mismatch


def episodes(slippery: bool, n: int, rng: np.random.Generator, *, mark_done: bool = True) -> list[Transition]:
    """n transitions of episodes with random starts and a uniformly random policy."""
    out: list[Transition] = []
    s, steps = int(rng.integers(LENGTH)), 0
    while len(out) < n:
        a = int(rng.integers(2))
        choices = list(outcomes(slippery, s, a))
        _, x, r, done = choices[rng.choice(len(choices), p=[c[0] for c in choices])]
        out.append(Transition(s, a, r, x, done=done and mark_done))
        steps += 1
        if done or steps >= TIME_LIMIT:
            s, steps = int(rng.integers(LENGTH)), 0
        else:
            s = int(x)
    return out


def ranked(tmp_path: Path, n: int, seed: int, *, mark_done: bool = True) -> Figures:
    """The real and twin traces written as JSONL and ranked (the offline path, contract decoding included)."""
    rng = np.random.default_rng(seed)
    paths = {}
    for name, slippery in (("real", True), ("twin", False)):
        paths[name] = tmp_path / f"{name}-{n}-{seed}.jsonl"
        paths[name].write_bytes(b"".join(encode_transition(tr) + b"\n"
                                         for tr in episodes(slippery, n, rng, mark_done=mark_done)))  # fmt: skip
    config = default_config().with_overrides(gamma=GAMMA, window_count=n)
    (result,) = rank(config, paths["real"], {"twin": paths["twin"]})
    return result.report.figures


def test_exact_mismatch_of_the_chain_is_what_absorbing_terminals_give() -> None:
    # Cross-check of the reference itself: two distinct absorbing terminal states give the same mismatch as one.
    (Rr, Pr), (Rt, Pt) = exact_mdp(True), exact_mdp(False)

    def split(R: np.ndarray, P: np.ndarray, slippery: bool) -> tuple[np.ndarray, np.ndarray]:
        S = LENGTH + 2  # hole at LENGTH, goal at LENGTH + 1
        R2, P2 = np.zeros((S, 2)), np.zeros((S, 2, S))
        for s in range(LENGTH):
            for a in range(2):
                for p, x, r, _ in outcomes(slippery, s, a):
                    R2[s, a] += p * r
                    P2[s, a, {"hole": LENGTH, "goal": LENGTH + 1}.get(x, x)] += p  # type: ignore[call-overload]
        P2[LENGTH, :, LENGTH] = P2[LENGTH + 1, :, LENGTH + 1] = 1.0
        return R2, P2

    two = dtsync.dtbsm(*split(Rr, Pr, True), *split(Rt, Pt, False), gamma=GAMMA).mismatch
    assert two == pytest.approx(exact_mismatch(), abs=1e-7)
    assert exact_mismatch() > 1.0


def test_empirical_mismatch_converges_to_the_exact_one(tmp_path: Path) -> None:
    exact = exact_mismatch()
    errors = {n: [abs(ranked(tmp_path, n, seed).mismatch - exact) for seed in (1, 2, 3)] for n in (1_000, 100_000)}
    assert max(errors[100_000]) < 0.03, errors
    assert np.mean(errors[100_000]) < np.mean(errors[1_000]), errors


def test_terminal_states_no_longer_pin_the_upper_bound(tmp_path: Path) -> None:
    with_done = ranked(tmp_path, 20_000, 5)
    assert with_done.coverage == 1.0
    assert with_done.mismatch_upper == pytest.approx(with_done.mismatch, abs=1e-6)
    assert with_done.mismatch_upper < 0.5 * with_done.rbar / (1 - GAMMA)
    # The same traces without `done`: the terminal labels are states with no data, as before the convention.
    without = ranked(tmp_path, 20_000, 5, mark_done=False)
    assert without.mismatch_upper == pytest.approx(without.rbar / (1 - GAMMA))
    assert abs(without.mismatch - exact_mismatch()) > 0.3


def test_done_next_state_is_the_reserved_absorbing_label_and_its_own_label_is_still_checked() -> None:
    enc = CellEncoding()
    assert enc.encode(Transition(0, 1, 1.0, "goal", done=True)) == (0, 0, 1)
    assert enc.states.labels == [0, TERMINAL] and "goal" not in enc.states
    assert enc.encode(Transition(0, 1, 0.0, "goal")) == (0, 0, 2)  # the same label, not terminated: a state
    binned = CellEncoding(StateEncoder([[0.5]]))
    with pytest.raises(EncodingError):
        binned.encode(Transition((0.1,), 0, 0.0, (0.2, 0.3), done=True))


@pytest.mark.parametrize("bins", [None, [[0.5]]])
def test_batches_encode_done_as_one_by_one(bins: list[list[float]] | None) -> None:
    state = (lambda i: (float(i),)) if bins else (lambda i: i)
    batch = [Transition(state(i % 3), i % 2, 0.0, state((i + 1) % 3), done=i % 4 == 0) for i in range(40)]
    one, many = CellEncoding(StateEncoder(bins)), CellEncoding(StateEncoder(bins))
    expected = [one.encode(tr) for tr in batch]
    for _ in range(2):  # first with new labels (slow path), then with known ones (fast path)
        s, a, sn, kept, rejected = many.encode_many(batch)
        assert list(zip(s, a, sn, strict=True)) == expected and rejected == [] and len(kept) == len(batch)
    assert many.states.labels == one.states.labels and TERMINAL in many.states


def test_absorb_makes_the_terminal_rows_a_zero_reward_self_loop_without_touching_the_input() -> None:
    R = np.array([[0.5, 1.0], [0.0, 0.0]])
    P = np.array([[[0.0, 1.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])
    mdp = EmpiricalMDP(R, P, np.array([[3, 2], [0, 0]]), 5, 0.0, 1.0)
    out = absorb(mdp, 1)
    assert out.P[1].tolist() == [[0.0, 1.0], [0.0, 1.0]] and out.R[1].tolist() == [0.0, 0.0]
    assert out.N.tolist() == [[3, 2], [0, 0]] and out.samples == 5  # no invented samples
    assert out.P[0].tolist() == P[0].tolist() and P[1].sum() == 0.0  # input unchanged
    assert absorb(mdp, None) is mdp
