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


def _solve(p, q, M, codes=None, max_pivots=transport.MAX_PIVOTS):
    """The kernels as `bellman` calls them: costs row-major in the scratch, a greedy basis unless one is given,
    its flows, then `optimize`. Returns its result, the final basis and the scratch (potentials, flows)."""
    k, kk = M.shape
    w = transport.scratch(8)
    C = w.costs
    C[: k * kk] = M.ravel()
    if codes is None:
        codes = np.full(15, -1, np.int32)
        transport.greedy_basis(k, kk, p, q, C, codes, w)
    assert transport.flows(codes, k + kk - 1, p, q, w)
    result = transport.optimize(k, kk, p, q, C, codes, w, max_pivots)
    return result, codes, w


def _check_certificate(p, q, M, result, codes, w) -> None:
    """The returned basis is a spanning tree in peeling order with the returned flows and value, its potentials
    make every basic reduced cost zero, and the slack is the smallest off-tree reduced cost (a lower bound of
    every one), so the basis is optimal for any costs within slack / 2 min(k, k') of these."""
    k, kk = M.shape
    n = k + kk - 1
    value, _pivots, status, slack = result
    assert status == 0
    flow = w.flow[:n].copy()
    assert transport.flows(codes, n, p, q, w)  # the order peels: flows follow again, feasible
    np.testing.assert_allclose(w.flow[:n], flow, atol=1e-15)
    assert (codes[n:] == -1).all()
    cells = [(int(c >> 1) // transport.STRIDE, int(c >> 1) % transport.STRIDE) for c in codes[:n]]
    assert len(set(cells)) == n
    pi = np.zeros((k, kk))
    for (i, j), f in zip(cells, flow, strict=True):
        pi[i, j] = f
    np.testing.assert_allclose(pi.sum(axis=1), p, atol=1e-12)
    np.testing.assert_allclose(pi.sum(axis=0), q, atol=1e-12)
    assert value == pytest.approx(float((pi * M).sum()), abs=1e-12)
    if n == k * kk:  # a single row or column: the only coupling, no potentials needed
        assert slack == np.inf
        return
    r = M - w.u[:k, None] - w.v[None, :kk]
    basic = np.zeros((k, kk), bool)
    basic[tuple(np.array(cells).T)] = True
    assert np.abs(r[basic]).max() <= 1e-12
    assert slack >= 0.0 and np.all(r[~basic] >= slack - 1e-15)
    assert slack == pytest.approx(max(0.0, float(r[~basic].min())), abs=1e-15)


@pytest.mark.parametrize("seed", range(2))
def test_every_shape_up_to_8_x_8_matches_pot_with_a_certificate(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for k in range(1, 9):
        for kk in range(1, 9):
            for trial in range(6):
                p, q = _marginal(rng, k), _marginal(rng, kk)
                M = rng.random((k, kk))
                if trial % 3 == 2:  # ties and zero costs
                    M = np.round(M * 2) / 2
                result, codes, w = _solve(p, q, M)
                assert result[0] == pytest.approx(ot.emd2(p, q, M), abs=1e-12)
                _check_certificate(p, q, M, result, codes, w)


@pytest.mark.parametrize("seed", range(2))
def test_warm_starts_from_an_optimal_basis_of_moved_costs(seed: int) -> None:
    """As between sweeps: the stored basis of the old costs, re-proved (most) or pivoted on from there."""
    rng = np.random.default_rng(200 + seed)
    pivoted = reproved = 0
    for _ in range(400):
        k, kk = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        p, q = _marginal(rng, k), _marginal(rng, kk)
        M = rng.random((k, kk))
        _result, codes, _w = _solve(p, q, M)
        scale = [1e-6, 1e-2, 0.3][int(rng.integers(3))]
        M2 = np.maximum(0.0, M + scale * rng.standard_normal(M.shape))
        result, codes, w = _solve(p, q, M2, codes=codes.copy())
        assert result[0] == pytest.approx(ot.emd2(p, q, M2), abs=1e-12)
        _check_certificate(p, q, M2, result, codes, w)
        pivoted += result[1] > 0
        reproved += result[1] == 0
    assert pivoted > 50 and reproved > 50


def test_degenerate_marginals_every_shape() -> None:
    """Uniform marginals whose partial sums coincide: zero basic flows, degenerate pivots, Bland's rule."""
    rng = np.random.default_rng(9)
    for k in range(2, 9):
        for kk in range(2, 9):
            for _ in range(4):
                p, q = np.full(k, 1.0 / k), np.full(kk, 1.0 / kk)
                M = rng.integers(0, 3, size=(k, kk)).astype(float)
                result, codes, w = _solve(p, q, M)
                assert result[0] == pytest.approx(ot.emd2(p, q, M), abs=1e-12)
                _check_certificate(p, q, M, result, codes, w)


def test_pivot_limit_gives_a_duality_gap_and_resumes() -> None:
    """At the limit, value is a feasible coupling's and slack bounds its excess over W1; the basis it stopped at
    is primal feasible and the next call finishes from it."""
    rng = np.random.default_rng(11)
    stopped = 0
    for _ in range(300):
        k, kk = int(rng.integers(3, 9)), int(rng.integers(3, 9))
        p, q, M = _marginal(rng, k), _marginal(rng, kk), rng.random((k, kk))
        exact = ot.emd2(p, q, M)
        limit = int(rng.integers(0, 4))
        (value, pivots, status, slack), codes, _w = _solve(p, q, M, max_pivots=limit)
        assert pivots <= limit
        if status == 1:
            stopped += 1
            assert pivots == limit
            assert value >= exact - 1e-12
            assert slack >= value - exact - 1e-12
            result, codes, w = _solve(p, q, M, codes=codes)
            assert result[0] == pytest.approx(exact, abs=1e-12)
            _check_certificate(p, q, M, result, codes, w)
        else:
            assert value == pytest.approx(exact, abs=1e-12)
    assert stopped > 100


def _greedy_reference(p, q, M) -> list[int]:
    """The greedy basis as documented: cells by cost (stable), each allocation crosses out its row if the row is
    exhausted first (and is not the last row) or the column is the last one, else its column."""
    k, kk = M.shape
    rs, rd = list(p), list(q)
    rows, cols = set(range(k)), set(range(kk))
    codes = []
    for t in sorted(range(k * kk), key=lambda t: M.ravel()[t]):
        i, j = divmod(t, kk)
        if i not in rows or j not in cols:
            continue
        f = min(rs[i], rd[j])
        rs[i] -= f
        rd[j] -= f
        code = (i * transport.STRIDE + j) << 1
        if (rs[i] <= rd[j] and len(rows) > 1) or len(cols) == 1:
            rows.discard(i)
            codes.append(code | 1)
        else:
            cols.discard(j)
            codes.append(code)
        if not rows:
            break
    return codes


def test_greedy_basis_is_the_stable_cost_order_rule() -> None:
    rng = np.random.default_rng(12)
    for _ in range(500):
        k, kk = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        p, q = _marginal(rng, k), _marginal(rng, kk)
        M = rng.random((k, kk))
        if rng.random() < 0.5:
            M = np.round(M * 2) / 2  # many equal costs: the tie order matters
        w = transport.scratch(8)
        w.costs[: k * kk] = M.ravel()
        codes = np.full(15, -1, np.int32)
        transport.greedy_basis(k, kk, p, q, w.costs, codes, w)
        assert list(codes[: k + kk - 1]) == _greedy_reference(p, q, M)
        assert (codes[k + kk - 1 :] == -1).all()


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
