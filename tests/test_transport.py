"""The kernels against POT: one transport problem (`transport.emd` vs `ot.emd2`), and one Bellman sweep
(`bellman.sweep_serial` / `bellman.sweep` vs a plain sweep of `ot.emd2` calls), cold and warm, in every mode."""

from __future__ import annotations

import numpy as np
import ot
import pytest

from dtsync.metric import bellman, transport
from dtsync.metric.dtbsm import _complete
from dtsync.metric.sparse import SparseMDP

# --- one transport problem -------------------------------------------------------------------------------


def _marginal(rng: np.random.Generator, k: int) -> np.ndarray:
    x = rng.random(k) + 1e-3
    return x / x.sum()


@pytest.mark.parametrize("seed", range(6))
def test_emd_matches_pot_on_random_problems(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(200):
        k, kk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        p, q = _marginal(rng, k), _marginal(rng, kk)
        M = rng.random((k, kk))
        if rng.random() < 0.3:  # ties and zero costs: degenerate problems
            M = np.round(M * 3) / 3
        value, _pivots, status = transport.emd(p, q, M)
        assert status == 0
        assert value == pytest.approx(ot.emd2(p, q, M), abs=1e-12)


def test_emd_matches_pot_with_degenerate_marginals() -> None:
    """Equal partial sums make basic flows zero (degenerate pivots): Bland's rule must still end."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        k = int(rng.integers(2, 9))
        p = np.full(k, 1.0 / k)
        q = np.full(k, 1.0 / k)[rng.permutation(k)]
        M = rng.integers(0, 3, size=(k, k)).astype(float)
        value, _pivots, status = transport.emd(p, q, M)
        assert status == 0
        assert value == pytest.approx(ot.emd2(p, q, M), abs=1e-12)


def test_emd_at_the_pivot_limit_reports_it_and_an_upper_bound() -> None:
    rng = np.random.default_rng(8)
    stopped = 0
    for _ in range(100):
        p, q, M = _marginal(rng, 6), _marginal(rng, 6), rng.random((6, 6))
        exact = ot.emd2(p, q, M)
        value, pivots, status = transport.emd(p, q, M, 0)
        assert pivots == 0
        assert value >= exact - 1e-12
        stopped += status
        if status == 0:
            assert value == pytest.approx(exact, abs=1e-12)
    assert stopped > 50  # a greedy start is rarely optimal on 6 x 6 problems


# --- one Bellman sweep -----------------------------------------------------------------------------------


def _random_pair(rng: np.random.Generator, S: int, A: int, holes: float) -> tuple[np.ndarray, ...]:
    def mdp() -> tuple[np.ndarray, np.ndarray]:
        R = rng.random((S, A))
        P = np.zeros((S, A, S))
        for s in range(S):
            for a in range(A):
                k = int(rng.integers(1, 5))
                P[s, a, rng.choice(S, size=k, replace=False)] = rng.random(k) + 1e-3
        P /= P.sum(axis=-1, keepdims=True)
        P[rng.random((S, A)) < holes] = 0.0
        return R, P

    return (*mdp(), *mdp())


def _pot_sweep(R1, P1, R2, P2, d, gamma, unknown) -> np.ndarray:
    """The operator, written plainly: one ot.emd2 per known (s, s', a), `unknown` for the other terms."""
    S1, A = R1.shape
    S2 = R2.shape[0]
    F = np.zeros((S1, S2))
    for s in range(S1):
        for s2 in range(S2):
            best = 0.0
            for a in range(A):
                x, y = np.flatnonzero(P1[s, a]), np.flatnonzero(P2[s2, a])
                if len(x) == 0 or len(y) == 0:
                    best = max(best, unknown)
                    continue
                w1 = ot.emd2(P1[s, a, x], P2[s2, a, y], np.ascontiguousarray(d[np.ix_(x, y)]))
                best = max(best, abs(R1[s, a] - R2[s2, a]) + gamma * w1)
            F[s, s2] = best
    return F


def _mode_data(mode: str, R1, P1, R2, P2, gamma) -> tuple[tuple[np.ndarray, ...], float]:
    """The MDPs and unknown-term value of each solve `DTBSMSolver` runs (same rule as the solver)."""
    if mode == "point":
        return (*_complete(R1, P1, R2, P2), *_complete(R2, P2, R1, P1)), 0.0
    return (R1, P1, R2, P2), (0.0 if mode == "lower" else 1.0 / (1.0 - gamma))


def _engine_sweep(ws, data, d, gamma, unknown, exact, parallel=False) -> bellman.SweepOutput:
    m1, m2 = SparseMDP.from_dense(data[0], data[1]), SparseMDP.from_dense(data[2], data[3])
    ws.prepare(m1, m2)
    ws.observe(d)
    out = bellman.SweepOutput(np.empty(d.shape), np.zeros((d.shape[0], 4), np.int64), np.zeros(d.shape[0]))
    kernel = bellman.sweep if parallel else bellman.sweep_serial
    kernel(d, ws.cum, m1, m2, ws.state(), gamma, unknown, exact, transport.MAX_PIVOTS, out)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_exact_sweep_equals_a_plain_pot_sweep_cold_and_warm_in_every_mode(seed: int) -> None:
    """One workspace, as in the solver, serves the three modes in turn while d moves up and down and the data
    changes; every exact sweep must equal the plain operator, whatever the stored bases and bounds say."""
    rng = np.random.default_rng(seed)
    gamma = 0.9
    S, A = 7, 3
    R1, P1, R2, P2 = _random_pair(rng, S, A, holes=0.15)
    ws = bellman.Workspace()
    d = rng.random((S, S)) * 3.0
    for step in range(12):
        if step % 4 == 3:  # the real window moves: masses change on a few rows, a hole opens or closes
            rows = rng.random((S, A)) < 0.3
            P1 = np.where(rows[..., None] & (P1 > 0), P1 * np.exp(0.3 * rng.standard_normal(P1.shape)), P1)
            P1 /= np.where(P1.sum(axis=-1, keepdims=True) > 0, P1.sum(axis=-1, keepdims=True), 1.0)
            P1[int(rng.integers(S)), int(rng.integers(A))] = 0.0
        for mode in ("lower", "upper", "point"):
            data, unknown = _mode_data(mode, R1, P1, R2, P2, gamma)
            out = _engine_sweep(ws, data, d, gamma, unknown, exact=True, parallel=step % 2 == 1)
            ref = _pot_sweep(*data, d, gamma, unknown)
            np.testing.assert_allclose(out.F, ref, atol=1e-10, err_msg=f"step {step}, {mode}")
            assert out.stats[:, 2].sum() == 0 and out.gaps.max() == 0.0
        # small moves keep most bounds alive (the warm path); large ones and falls exercise the signed clocks
        d = np.maximum(0.0, d + rng.normal(scale=[0.001, 0.05, 1.0][step % 3], size=d.shape))


@pytest.mark.parametrize("seed", range(3))
def test_improvement_sweep_is_the_operator_of_its_stored_couplings(seed: int) -> None:
    """exact=False pivots nothing: its F is max_a over the stored (feasible) couplings, so F >= F(d), and the
    recorded choice and coupling reproduce F: |dR| of the action + gamma <coupling, d>, or the unknown term."""
    rng = np.random.default_rng(10 + seed)
    gamma = 0.9
    S, A = 6, 3
    R1, P1, R2, P2 = _random_pair(rng, S, A, holes=0.1)
    ws = bellman.Workspace()
    d = rng.random((S, S)) * 3.0
    for step in range(6):
        mode = ("lower", "upper", "point")[step % 3]
        data, unknown = _mode_data(mode, R1, P1, R2, P2, gamma)
        out = _engine_sweep(ws, data, d, gamma, unknown, exact=step % 2 == 0)
        ref = _pot_sweep(*data, d, gamma, unknown)
        assert np.all(out.F >= ref - 1e-10)
        flat = d.reshape(-1)
        value = np.where(ws.tgt >= 0, ws.flw * flat[np.maximum(ws.tgt, 0)], 0.0).sum(axis=-1)
        a = np.maximum(ws.act, 0)
        rebuilt = np.abs(data[0][np.arange(S)[:, None], a] - data[2][np.arange(S)[None, :], a]) + gamma * value
        rebuilt = np.where(ws.act >= 0, rebuilt, out.F)
        np.testing.assert_allclose(rebuilt, out.F, atol=1e-10)
        d = np.maximum(0.0, d + rng.normal(scale=0.05, size=d.shape))
