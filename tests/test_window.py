import math
import random
from collections import Counter

import numpy as np
import pytest

from dtsync.window import EmpiricalMDP, SlidingWindow


def brute_force(rows: list[tuple[int, int, float, int]], S: int, A: int) -> tuple[np.ndarray, ...]:
    """Recount with plain Python loops and math.fsum: the reference for every fast path."""
    N = np.zeros((S, A), dtype=np.int64)
    R = np.zeros((S, A))
    P = np.zeros((S, A, S))
    counts = Counter((s, a, sn) for s, a, _, sn in rows)
    for s in range(S):
        for a in range(A):
            rewards = [r for s_, a_, r, _ in rows if (s_, a_) == (s, a)]
            N[s, a] = len(rewards)
            if rewards:
                R[s, a] = math.fsum(rewards) / len(rewards)
                for sn in range(S):
                    P[s, a, sn] = counts[(s, a, sn)] / len(rewards)
    return N, R, P


def assert_matches(mdp: EmpiricalMDP, rows: list[tuple[int, int, float, int]], S: int, A: int) -> None:
    N, R, P = brute_force(rows, S, A)
    assert mdp.N.dtype == np.int64 and mdp.N.shape == (S, A)
    assert mdp.R.shape == (S, A) and mdp.P.shape == (S, A, S)
    np.testing.assert_array_equal(mdp.N, N)
    np.testing.assert_allclose(mdp.R, R, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mdp.P, P, rtol=1e-12, atol=0)
    np.testing.assert_allclose(mdp.P.sum(axis=2), (N > 0).astype(float))
    np.testing.assert_array_equal(mdp.known, N > 0)
    assert mdp.samples == len(rows)
    if rows:
        assert mdp.reward_min == min(r for _, _, r, _ in rows)
        assert mdp.reward_max == max(r for _, _, r, _ in rows)
    else:
        assert math.isnan(mdp.reward_min) and math.isnan(mdp.reward_max)


def rows_of(w: SlidingWindow) -> list[tuple[int, int, float, int]]:
    return [(s, a, r, sn) for s, a, r, sn, _ in w]


@pytest.mark.parametrize(
    "kwargs", [{}, {"max_count": 0}, {"max_seconds": 0.0}, {"max_seconds": -1.0}, {"max_seconds": math.nan}]
)
def test_constructor_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SlidingWindow(**kwargs)


def test_count_window_keeps_the_newest() -> None:
    w = SlidingWindow(max_count=3)
    assert len(w) == 0 and w.first_time is None and w.last_time is None
    for i in range(5):
        w.add(i, 0, float(i), i + 1, 10.0 + i)
    assert len(w) == 3
    assert [s for s, *_ in w] == [2, 3, 4]
    assert (w.first_time, w.last_time) == (12.0, 14.0)
    w.advance(1e9)  # no age limit: nothing happens
    assert len(w) == 3


def test_time_window_boundary_and_advance() -> None:
    w = SlidingWindow(max_seconds=10.0)
    for t in [0.0, 1.0, 5.0, 10.0]:
        w.add(0, 0, t, 0, t)
    assert len(w) == 4  # t=0 is exactly 10 s old: kept
    w.add(0, 0, 0.0, 0, 10.5)
    assert [t for *_, t in w] == [1.0, 5.0, 10.0, 10.5]
    w.advance(15.0)
    assert [t for *_, t in w] == [5.0, 10.0, 10.5]
    w.advance(3.0)  # the clock never moves back
    assert len(w) == 3
    w.add(0, 0, 0.0, 0, 4.0)  # a late sample does not move the clock back either
    assert (w.first_time, w.last_time) == (5.0, 4.0)
    w.advance(100.0)
    assert len(w) == 0 and w.first_time is None
    assert w.to_mdp(1, 1).samples == 0


def test_both_limits() -> None:
    w = SlidingWindow(max_count=3, max_seconds=5.0)
    for t in range(6):
        w.add(t, 0, 0.0, 0, float(t))
    assert [s for s, *_ in w] == [3, 4, 5]  # count binds
    w.add(9, 0, 0.0, 0, 9.0)
    assert [s for s, *_ in w] == [4, 5, 9]
    w.add(9, 0, 0.0, 0, 10.5)
    assert [s for s, *_ in w] == [9, 9]  # age binds


def test_to_mdp_matches_brute_force_after_many_add_evict_cycles() -> None:
    rng = random.Random(1)
    S, A = 6, 3
    w = SlidingWindow(max_count=500, max_seconds=40.0)
    log: list[tuple[int, int, float, int, float]] = []
    t = 0.0
    for step in range(20_000):
        t += rng.expovariate(20.0) if step % 5000 < 4000 else rng.expovariate(2.0)  # bursts and lulls
        tr = (
            rng.randrange(S),
            rng.randrange(A),
            rng.uniform(-5, 5) * 10 ** rng.randrange(-3, 7),
            rng.randrange(S),
            t,
        )
        w.add(*tr)
        log.append(tr)
        if step % 2500 == 0:
            assert_matches(w.to_mdp(S, A), rows_of(w), S, A)
    assert_matches(w.to_mdp(S, A), rows_of(w), S, A)
    # the window holds exactly the newest samples that satisfy both limits
    expected = [x for x in log[-500:] if x[4] >= t - 40.0]
    assert list(w) == expected
    # memory stays bounded: the dead prefix is dropped
    assert len(w._s) <= 2 * max(len(w), 1024) + 1


def test_reward_sums_do_not_drift() -> None:
    """Huge rewards passing through the window must not leave rounding residue on small ones."""
    w = SlidingWindow(max_count=7)
    rng = random.Random(2)
    for i in range(50_000):
        w.add(0, 0, rng.choice([1e12, -3e11, 0.1, 1e-3]) if i < 49_993 else 0.1 * i, 0, float(i))
    mdp = w.to_mdp(1, 1)
    expected = math.fsum(0.1 * i for i in range(49_993, 50_000)) / 7
    assert mdp.R[0, 0] == pytest.approx(expected, rel=1e-12)


def test_to_mdp_shape_and_bounds() -> None:
    w = SlidingWindow(max_count=10)
    w.add(1, 1, 2.0, 0, 0.0)
    mdp = w.to_mdp(4, 3)  # the encoding may know more states than the window has seen
    assert mdp.P.shape == (4, 3, 4) and mdp.N.sum() == 1 and mdp.P[1, 1, 0] == 1.0 and mdp.R[1, 1] == 2.0
    with pytest.raises(ValueError):
        w.to_mdp(1, 3)
    with pytest.raises(ValueError):
        w.to_mdp(4, 1)


def test_halves_are_disjoint_cover_the_window_and_stay_put() -> None:
    rng = random.Random(3)
    S, A = 5, 2
    w = SlidingWindow(max_count=301)
    log = [
        (rng.randrange(S), rng.randrange(A), rng.random(), rng.randrange(S), float(i)) for i in range(2000)
    ]
    for n, tr in enumerate(log, start=1):
        w.add(*tr)
        if n in (1, 2, 301, 302, 1500, 1501, 2000):
            even, odd = w.halves(S, A)
            live = range(max(0, n - 301), n)
            want_even = [log[i][:4] for i in live if i % 2 == 0]
            want_odd = [log[i][:4] for i in live if i % 2 == 1]
            assert_matches(even, want_even, S, A)
            assert_matches(odd, want_odd, S, A)
            full = w.to_mdp(S, A)
            np.testing.assert_array_equal(even.N + odd.N, full.N)
            assert even.samples + odd.samples == len(w) and abs(even.samples - odd.samples) <= 1


def test_halves_of_empty_window() -> None:
    even, odd = SlidingWindow(max_count=3).halves(2, 2)
    assert even.samples == odd.samples == 0 and not even.known.any() and math.isnan(odd.reward_max)


def test_from_transitions() -> None:
    rows = [(0, 1, 1.0, 2), (0, 1, 3.0, 0), (2, 0, -1.0, 2)]
    assert_matches(EmpiricalMDP.from_transitions(rows, 3, 2), rows, 3, 2)
    assert_matches(EmpiricalMDP.from_transitions(iter(rows), 4, 2), rows, 4, 2)
    assert_matches(EmpiricalMDP.from_transitions([], 2, 2), [], 2, 2)
    with pytest.raises(ValueError):
        EmpiricalMDP.from_transitions([(0, 0, 1.0, 3)], 3, 1)
    with pytest.raises(ValueError):
        EmpiricalMDP.from_transitions([(-1, 0, 1.0, 0)], 3, 1)


def test_extend_equals_adding_one_by_one() -> None:
    """A batch leaves the same window and counts as its transitions added singly (stragglers included)."""
    rng = random.Random(3)
    S, A = 5, 3
    single, batched = SlidingWindow(max_count=300, max_seconds=7.0), SlidingWindow(max_count=300, max_seconds=7.0)
    t = 0.0
    for _ in range(40):
        rows = []
        for _ in range(rng.randrange(1, 200)):
            t += rng.expovariate(30.0)
            late = rng.random() < 0.05  # an out-of-order sample
            rows.append((rng.randrange(S), rng.randrange(A), rng.uniform(-1, 1), rng.randrange(S), t - 9 * late))
        for row in rows:
            single.add(*row)
        batched.extend(*(list(col) for col in zip(*rows, strict=True)))
        assert list(single) == list(batched)
    a, b = single.to_mdp(S, A), batched.to_mdp(S, A)
    np.testing.assert_array_equal(a.N, b.N)
    np.testing.assert_allclose(a.R, b.R, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a.P, b.P)
    assert_matches(b, rows_of(batched), S, A)


def test_state_space_grows_while_running() -> None:
    w = SlidingWindow(max_count=100)
    w.add(0, 0, 1.0, 1, 0.0)
    w.add(700, 5, 2.0, 3, 1.0)  # far beyond the first dense block
    mdp = w.to_mdp(701, 6)
    assert mdp.N[700, 5] == 1 and mdp.P[700, 5, 3] == 1.0 and mdp.P[0, 0, 1] == 1.0
    with pytest.raises(ValueError):
        w.extend([-1], [0], [0.0], [0], [2.0])


def test_memory_follows_the_transitions_held_not_the_labels() -> None:
    """10,000 distinct states and 4,096 distinct actions cost a window no more than two labels do."""
    few, many = SlidingWindow(max_count=5000), SlidingWindow(max_count=5000)
    for lo in range(0, 20_000, 1000):  # in batches: one batch is held whole before eviction
        idx = np.arange(lo, lo + 1000)
        few.extend([0] * 1000, [0] * 1000, [0.5] * 1000, [1] * 1000, list(map(float, idx)))
        many.extend(list(idx % 10_000), list(idx % 4096), [0.5] * 1000, list((idx + 1) % 10_000),
                    list(map(float, idx)))  # fmt: skip
    assert len(few) == len(many) == 5000
    assert many.nbytes == few.nbytes <= 4 * 40 * 5000
    mdp = few.to_mdp(2, 1)  # counted on demand, from the transitions held
    assert mdp.samples == 5000 and int(mdp.N[0, 0]) == 5000 and mdp.P[0, 0, 1] == 1.0


def test_a_snapshot_travels_as_its_transitions_not_as_dense_arrays() -> None:
    """Pickled to a worker, a window's MDP costs ~32 bytes a transition, not 8 * S * A * S bytes."""
    import pickle

    w = SlidingWindow(max_count=1000)
    rng = np.random.default_rng(0)
    n = 1000
    w.extend(list(rng.integers(0, 256, n)), list(rng.integers(0, 16, n)), list(rng.random(n)),
             list(rng.integers(0, 256, n)), [float(i) for i in range(n)])  # fmt: skip
    mdp = w.to_mdp(256, 16)
    data = pickle.dumps(mdp)
    assert len(data) < 40 * n + 2000 < mdp.P.nbytes / 100
    back = pickle.loads(data)
    assert np.array_equal(back.P, mdp.P) and np.array_equal(back.R, mdp.R) and back.samples == n


def test_mark_used_and_relabel_see_only_the_samples_held() -> None:
    """Label freeing (CellMonitor.free_labels): what the window holds is found, then rewritten in place."""
    w = SlidingWindow(max_count=3)
    for s, a, sn in [(0, 0, 1), (2, 1, 3), (3, 1, 2), (4, 0, 3)]:
        w.add(s, a, float(s), sn, float(s))  # the first is evicted
    states, actions = np.zeros(5, dtype=bool), np.zeros(2, dtype=bool)
    w.mark_used(states, actions)
    assert states.tolist() == [False, False, True, True, True] and actions.tolist() == [True, True]
    w.relabel(np.array([-1, -1, 0, 1, 2]), np.array([1, 0]))
    after = [(0, 0, 2.0, 1), (1, 0, 3.0, 0), (2, 1, 4.0, 1)]
    assert rows_of(w) == after
    assert_matches(w.to_mdp(3, 2), after, 3, 2)
    with pytest.raises(ValueError):  # would drop state 0, which a sample holds: refused, nothing changed
        w.relabel(np.array([-1, 0, 1]), np.array([0, 1]))
    assert rows_of(w) == after
