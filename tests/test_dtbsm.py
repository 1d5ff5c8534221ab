"""Engine-specific behaviour of the exact DT-BSM: missing-data interval, labels, input errors, hard cases."""

import asyncio
import time

import numpy as np
import pytest

from dtsync.metric import bellman, evaluation, sparse, transport
from dtsync.metric.dtbsm import DTBSMSolver, dtbsm
from dtsync.metric.naive import dtbsm_naive


def random_mdp(rng: np.random.Generator, S: int, A: int, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    R = rng.random((S, A))
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            xs = rng.choice(S, size=min(k, S), replace=False)
            P[s, a, xs] = rng.random(len(xs)) + 0.05
    return R, P / P.sum(axis=-1, keepdims=True)


def ring_mdp(S: int, A: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    R = np.tile(np.linspace(0, 1, A), (S, 1)) * (np.arange(S)[:, None] % 3 == 0)
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            P[s, a, (s + a + shift) % S] = 0.7
            P[s, a, (s - 1) % S] += 0.3
    return R, P


def test_matches_naive_at_high_gamma() -> None:
    rng = np.random.default_rng(3)
    R1, P1 = random_mdp(rng, 6, 2)
    R2, P2 = random_mdp(rng, 6, 2)
    res = dtbsm(R1, P1, R2, P2, 0.95, tol=1e-9)
    ref, _ = dtbsm_naive(R1, P1, R2, P2, 0.95, tol=1e-9)
    assert np.abs(res.d - ref).max() < 1e-8
    assert res.mismatch == pytest.approx(np.diag(ref).max(), abs=1e-8)


def test_ring_mdp_converges_where_naive_policy_iteration_cycles() -> None:
    R1, P1 = ring_mdp(24, 3, 1)
    R2, P2 = ring_mdp(24, 3, 2)
    res = dtbsm(R1, P1, R2, P2, 0.9)
    ref, _ = dtbsm_naive(R1, P1, R2, P2, 0.9)
    assert np.abs(res.d - ref).max() < 2e-8


def test_missing_data_interval_contains_every_completion() -> None:
    rng = np.random.default_rng(7)
    R1, P1 = random_mdp(rng, 6, 3)
    R2, P2 = random_mdp(rng, 6, 3)
    full = dtbsm(R1, P1, R2, P2, 0.9)
    P2_holes = P2.copy()
    P2_holes[1, 0] = 0.0  # twin never tried action 0 in state 1
    P2_holes[4, :] = 0.0  # twin never left state 4
    res = dtbsm(R1, P1, R2, P2_holes, 0.9, reward_range=(0.0, 1.0))
    assert res.coverage == pytest.approx(1 - 4 / 18)
    assert np.all(res.d_lower <= res.d + 1e-9)
    assert np.all(res.d <= res.d_upper + 1e-9)
    # the true twin is one completion of the holes: its metric lies in the interval
    assert np.all(res.d_lower <= full.d + 1e-8)
    assert np.all(full.d <= res.d_upper + 1e-8)
    assert res.mismatch_lower <= full.mismatch <= res.mismatch_upper
    assert res.mismatch_upper > res.mismatch_lower


def test_full_coverage_collapses_the_interval() -> None:
    rng = np.random.default_rng(8)
    R1, P1 = random_mdp(rng, 5, 2)
    R2, P2 = random_mdp(rng, 5, 2)
    res = dtbsm(R1, P1, R2, P2, 0.9)
    assert res.coverage == 1.0
    assert res.mismatch_lower == res.mismatch == res.mismatch_upper


def test_labels_pair_states_across_different_state_sets() -> None:
    rng = np.random.default_rng(9)
    R1, P1 = random_mdp(rng, 5, 2)
    order = [3, 0, 4, 1, 2]  # the twin lists the same states in another order
    R2, P2 = R1[order], P1[order][:, :, order]
    res = dtbsm(R1, P1, R2, P2, 0.9, labels_real=list("abcde"), labels_twin=[list("abcde")[i] for i in order])
    assert res.mismatch == pytest.approx(0.0, abs=1e-9)
    assert len(res.pairs) == 5
    unlabelled = dtbsm(R1, P1, R2, P2, 0.9)
    assert unlabelled.mismatch > 0.01


def test_top_states_name_where_the_twin_departs() -> None:
    rng = np.random.default_rng(10)
    R1, P1 = random_mdp(rng, 6, 2)
    R2 = R1.copy()
    R2[2, 1] += 0.8
    res = dtbsm(R1, P1, R2, P1, 0.5)
    top = res.top_states(2)
    assert top[0][0] == 2
    assert top[0][1] == pytest.approx(res.mismatch)


def test_warm_start_after_growth_of_the_state_space_equals_cold() -> None:
    rng = np.random.default_rng(11)
    R1, P1 = random_mdp(rng, 8, 3)
    R2, P2 = random_mdp(rng, 8, 3)
    solver = DTBSMSolver()
    solver.solve(R1[:6], P1[:6, :, :6] / P1[:6, :, :6].sum(-1, keepdims=True), R2[:6],
                 P2[:6, :, :6] / np.maximum(P2[:6, :, :6].sum(-1, keepdims=True), 1e-12), 0.9)  # fmt: skip
    warm = solver.solve(R1, P1, R2, P2, 0.9)
    cold = dtbsm(R1, P1, R2, P2, 0.9)
    assert np.abs(warm.d - cold.d).max() <= 2e-8


def test_warm_start_after_reward_only_or_missing_data_changes_equals_cold() -> None:
    """The per-pair bounds a warm start reuses read the rewards and the supports: changing only rewards, or
    opening and closing holes in the data, must still give the cold result (lower, point and upper)."""
    rng = np.random.default_rng(12)
    R1, P1 = random_mdp(rng, 10, 3)
    R2, P2 = random_mdp(rng, 10, 3)
    solver = DTBSMSolver()
    solver.solve(R1, P1, R2, P2, 0.9)
    steps = []
    R2b = R2.copy()
    R2b[3:6] = 1.0 - R2b[3:6]  # rewards move, no transition does
    steps.append((R1, P1, R2b, P2))
    P1h = P1.copy()
    P1h[2, 0] = 0.0  # a hole opens
    steps.append((R1, P1h, R2b, P2))
    steps.append((R1, P1, R2, P2))  # and closes again
    for args in steps:
        warm = solver.solve(*args, 0.9, reward_range=(0.0, 1.5))
        cold = dtbsm(*args, 0.9, reward_range=(0.0, 1.5))
        for name in ("d", "d_lower", "d_upper"):
            assert np.abs(getattr(warm, name) - getattr(cold, name)).max() <= 2e-8, name


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(gamma=1.0), "gamma"),
        (dict(R_real=np.zeros((3, 2))), "shapes|R must be"),
        (dict(P_real=np.full((4, 2, 4), 0.3)), "sum to 1"),
        (dict(R_twin=np.full((4, 2), np.nan)), "finite"),
        (dict(R_twin=np.zeros((4, 3)), P_twin=np.full((4, 3, 4), 0.25)), "action"),
    ],
)
def test_bad_input_is_a_clear_error(bad: dict, message: str) -> None:
    args = dict(R_real=np.zeros((4, 2)), P_real=np.full((4, 2, 4), 0.25), R_twin=np.zeros((4, 2)),
                P_twin=np.full((4, 2, 4), 0.25), gamma=0.9)  # fmt: skip
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        dtbsm(**args)


# --- the kernels release the GIL (the daemon runs the metric in a worker thread next to its event loop) ----


@pytest.mark.parametrize(
    "kernel",
    [
        bellman.sweep, bellman.sweep_serial, transport.emd, evaluation.evaluate_couplings, sparse.sparse_rows,
        sparse.row_summary,
    ],
    ids=lambda k: k.__name__,
)
def test_kernels_release_the_gil_and_stay_cached(kernel) -> None:
    assert kernel.targetoptions.get("nogil") is True
    assert type(kernel._cache).__name__ != "NullCache"  # cache=True: no recompile per process


def _busy_kernel_call(seconds: float) -> tuple[float, float]:
    """One long compiled call (Gauss-Seidel passes with a tolerance that never stops them): (start, end)."""
    rng = np.random.default_rng(0)
    S, nb = 64, 5
    x = np.zeros((S, S))
    base = rng.random((S, S))
    tgt = rng.integers(0, S * S, size=(S, S, nb))
    flw = np.full((S, S, nb), 1.0 / nb)
    evaluation.evaluate_couplings(x, base, tgt, flw, 0.9, -1.0, 1)  # loads the kernel
    passes, took = 1, 0.0
    while took < 0.05:  # calibrate
        passes *= 2
        start = time.perf_counter()
        evaluation.evaluate_couplings(x, base, tgt, flw, 0.9, -1.0, passes)
        took = time.perf_counter() - start
    passes = int(passes * seconds / took) + 1
    start = time.perf_counter()
    evaluation.evaluate_couplings(x, base, tgt, flw, 0.9, -1.0, passes)
    return start, time.perf_counter()


def test_event_loop_keeps_running_while_a_kernel_runs_in_a_worker_thread() -> None:
    """An asyncio ticker keeps ticking during one long kernel call in an executor thread. Were the GIL held,
    the loop would stall for the whole call; allow scheduling noise up to half of it."""

    async def scenario() -> tuple[list[float], tuple[float, float]]:
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, _busy_kernel_call, 0.6)
        ticks: list[float] = []
        while not job.done():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.001)
        return ticks, await job

    # A GIL-holding kernel fails every attempt; a busy machine can spoil one (calibration or a descheduled
    # main thread), so up to three attempts.
    for _attempt in range(3):
        ticks, (start, end) = asyncio.run(scenario())
        inside = [start] + [t for t in ticks if start < t < end] + [end]
        longest_stall = max(b - a for a, b in zip(inside, inside[1:], strict=False))
        if end - start > 0.2 and len(inside) > 20 and longest_stall < 0.5 * (end - start):
            break
    assert end - start > 0.2
    assert len(inside) > 20
    assert longest_stall < 0.5 * (end - start)


def test_warm_start_after_the_metric_falls_or_rises_matches_naive() -> None:
    # The value bounds follow signed per-row clocks: a sequence in which d falls a lot (rewards shrink), then
    # moves with new transitions, then rises, must still give the exact metric at every step.
    rng = np.random.default_rng(11)
    R1, P1 = random_mdp(rng, 7, 3)
    R2, P2 = random_mdp(rng, 7, 3)
    P3 = random_mdp(rng, 7, 3)[1]
    solver = DTBSMSolver()
    for scale, Q2 in [(1.0, P2), (0.1, P2), (0.1, P3), (2.0, P3), (2.0, P2)]:
        res = solver.solve(R1 * scale, P1, R2, Q2, 0.9)
        ref, _ = dtbsm_naive(R1 * scale, P1, R2, Q2, 0.9)
        assert np.abs(res.d - ref).max() < 2e-8


def _window_sequence_with_holes(rng: np.random.Generator, S: int, A: int, steps: int) -> list[tuple[np.ndarray, ...]]:
    """Successive (real, twin) window pairs: masses drift, and state-actions go silent and come back. The real
    side is deterministic (1-point supports: 1 x k problems, whose single basis never expires), the twin is not."""
    R1, P1 = random_mdp(rng, S, A, k=1)
    R2, P2 = random_mdp(rng, S, A, k=3)
    out = []
    for _ in range(steps):
        P1 = np.where(P1 > 0, P1 * np.exp(0.2 * rng.standard_normal(P1.shape)), 0.0)
        P1 /= P1.sum(axis=-1, keepdims=True)
        R1 = np.clip(R1 + 0.05 * rng.standard_normal(R1.shape), 0.0, 1.0)
        holes1 = rng.random((S, A)) < 0.15
        holes2 = rng.random((S, A)) < 0.05
        out.append((R1.copy(), np.where(holes1[..., None], 0.0, P1), R2.copy(), np.where(holes2[..., None], 0.0, P2)))
    return out


def test_warm_upper_solve_with_holes_equals_cold_and_plain_value_iteration() -> None:
    """One solver serves the lower, upper and point solves in turn. Bounds cached by the lower solve (unknown
    terms worth 0) must not be reused by the upper solve (unknown terms worth Rbar / (1 - gamma)): along window
    sequences with holes, the warm d_upper equals a cold solve and plain value iteration with POT."""
    gamma = 0.9
    upper_value = 1.0 / (1.0 - gamma)  # rewards and the configured range in [0, 1]
    worst = 0.0
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        solver = DTBSMSolver()
        for R1, P1, R2, P2 in _window_sequence_with_holes(rng, 6, 3, 4):
            warm = solver.solve(R1, P1, R2, P2, gamma, reward_range=(0.0, 1.0))
            cold = dtbsm(R1, P1, R2, P2, gamma, reward_range=(0.0, 1.0))
            worst = max(worst, float(np.abs(warm.d_upper - cold.d_upper).max()))
            for name in ("d", "d_lower"):
                assert np.abs(getattr(warm, name) - getattr(cold, name)).max() <= 2e-8, name
    assert worst <= 2e-8
    # and the last step against plain value iteration, in upper and lower mode
    ref_upper, _ = dtbsm_naive(R1, P1, R2, P2, gamma, unknown_value=upper_value)
    ref_lower, _ = dtbsm_naive(R1, P1, R2, P2, gamma, unknown_value=0.0)
    assert np.abs(warm.d_upper - ref_upper).max() <= 2e-8
    assert np.abs(warm.d_lower - ref_lower).max() <= 2e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_problems_left_at_the_pivot_limit_widen_the_certificate(seed: int) -> None:
    """With no pivot allowed, the greedy couplings stay where they are: the result must say that its tolerance
    does not hold, and its error bound must still contain the exact metric (lower, upper and point)."""
    rng = np.random.default_rng(seed)
    R1, P1 = random_mdp(rng, 8, 3, k=4)
    R2, P2 = random_mdp(rng, 8, 3, k=4)
    P2[5, 1] = 0.0  # a hole, so the upper and point solves run too
    res = DTBSMSolver(max_pivots=0).solve(R1, P1, R2, P2, 0.9, reward_range=(0.0, 1.0))
    assert res.unfinished > 0
    assert not res.certified and res.error_bound > 1e-8
    errors = []
    for name, unknown in (("d_lower", 0.0), ("d_upper", 10.0)):
        ref, _ = dtbsm_naive(R1, P1, R2, P2, 0.9, tol=1e-10, unknown_value=unknown)
        errors.append(float(np.abs(getattr(res, name) - ref).max()))
    P2c = P2.copy()
    P2c[5, 1] = P1[5, 1]  # the point estimate's completion
    R2c = R2.copy()
    R2c[5, 1] = R1[5, 1]
    ref, _ = dtbsm_naive(R1, P1, R2c, P2c, 0.9, tol=1e-10)
    errors.append(float(np.abs(res.d - ref).max()))
    assert max(errors) > 1e-6  # the limit really left the result inexact...
    assert max(errors) <= res.error_bound  # ...and the bound says by how much, at most


def test_a_small_pivot_limit_resumes_across_sweeps_and_still_certifies() -> None:
    rng = np.random.default_rng(3)
    R1, P1 = random_mdp(rng, 8, 3, k=4)
    R2, P2 = random_mdp(rng, 8, 3, k=4)
    res = DTBSMSolver(max_pivots=1).solve(R1, P1, R2, P2, 0.9)
    ref, _ = dtbsm_naive(R1, P1, R2, P2, 0.9, tol=1e-10)
    assert res.certified and res.unfinished == 0 and res.error_bound <= 1e-8
    assert np.abs(res.d - ref).max() <= 1e-8


# --- the evaluation's extrapolation: faster where the rate is steady, harmless where it is not -------------------


def _chain(rng: np.random.Generator, S: int, nb: int, periodic: bool) -> tuple[np.ndarray, ...]:
    """A pair chain for `evaluate_couplings` (S x S pairs, rows of nb cells) and its exact solution."""
    n = S * S
    base = rng.random((S, S))
    if periodic:  # a single cycle through every pair: eigenvalues spread over the unit circle
        tgt = np.full((S, S, nb), -1, np.int64)
        tgt[..., 0] = ((np.arange(n) + 1) % n).reshape(S, S)
        flw = np.zeros((S, S, nb))
        flw[..., 0] = 1.0
    else:
        tgt = rng.integers(0, n, size=(S, S, nb))
        flw = rng.random((S, S, nb))
        flw /= flw.sum(axis=-1, keepdims=True)
    M = np.zeros((n, n))
    for t in range(n):
        for pos in range(nb):
            if tgt.reshape(n, nb)[t, pos] >= 0:
                M[t, tgt.reshape(n, nb)[t, pos]] += flw.reshape(n, nb)[t, pos]
    return base, tgt, flw, M


@pytest.mark.parametrize("periodic", [False, True], ids=["mixing", "periodic"])
@pytest.mark.parametrize("gamma", [0.9, 0.99])
def test_evaluation_reaches_the_linear_solution(periodic: bool, gamma: float) -> None:
    """x = base + gamma M x to within the stopping tolerance scaled by the tail, however the rate behaves (a
    periodic chain defeats the extrapolation, which must then undo itself, not diverge)."""
    rng = np.random.default_rng(5)
    base, tgt, flw, M = _chain(rng, 12, 3, periodic)
    exact = np.linalg.solve(np.eye(M.shape[0]) - gamma * M, base.ravel()).reshape(base.shape)
    x = np.zeros_like(base)
    tol = 1e-11
    passes = evaluation.evaluate_couplings(x, base, tgt, flw, gamma, tol, 100_000)
    assert passes < 100_000
    assert np.all(np.isfinite(x))
    assert np.abs(x - exact).max() <= 10 * tol / (1 - gamma)


def test_extrapolation_saves_passes_on_a_mixing_chain() -> None:
    """After the same 40 passes at gamma 0.99, the extrapolated error is a fraction of plain Gauss-Seidel's
    (written out here)."""
    rng = np.random.default_rng(6)
    base, tgt, flw, M = _chain(rng, 12, 3, False)
    gamma = 0.99
    exact = np.linalg.solve(np.eye(M.shape[0]) - gamma * M, base.ravel()).reshape(base.shape)
    x = np.zeros_like(base)
    evaluation.evaluate_couplings(x, base, tgt, flw, gamma, -1.0, 40)
    plain = np.zeros_like(base)
    for _ in range(40):  # plain Gauss-Seidel, written out
        flat = plain.ravel()
        for t in range(flat.size):
            cells = tgt.reshape(-1, 3)[t]
            flat[t] = base.ravel()[t] + gamma * float(flw.reshape(-1, 3)[t] @ flat[cells])
        plain = flat.reshape(base.shape)
    assert np.abs(x - exact).max() < 0.25 * np.abs(plain - exact).max()  # measured: 3.1 against 26.0
