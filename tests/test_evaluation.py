"""The policy-evaluation solve (`dtsync.metric.evaluation`) meets its stated stopping rule: once a pass changes
no entry by more than tol, the residual ||base + gamma Pi x - x||_inf is at most gamma * tol, so x lies within
gamma * tol / (1 - gamma) of the exact solution. Checked against a dense solve on random sub-stochastic systems
(with empty rows), on slow-mixing chains at gamma 0.99 and 0.999, and on a periodic chain that defeats the
extrapolation."""

from __future__ import annotations

import numpy as np
import pytest

from dtsync.metric.evaluation import evaluate_couplings


def _dense(tgt: np.ndarray, flw: np.ndarray) -> np.ndarray:
    """Pi as a dense matrix over flat pair indices, read the way the kernel reads it (-1 ends a row)."""
    S1, S2, nb = tgt.shape
    n = S1 * S2
    Pi = np.zeros((n, n))
    for p, (row, mass) in enumerate(zip(tgt.reshape(n, nb), flw.reshape(n, nb), strict=True)):
        for t, f in zip(row, mass, strict=True):
            if t < 0:
                break
            Pi[p, t] += f
    return Pi


def _random_system(rng: np.random.Generator, S1: int, S2: int, nb: int, empty: float, deficit: float):
    """Rows of 1..nb random cells whose masses sum to 1 - U(0, deficit); a fraction `empty` of rows is empty."""
    n = S1 * S2
    tgt = np.full((S1, S2, nb), -1, np.int64)
    flw = np.zeros((S1, S2, nb))
    for s in range(S1):
        for s2 in range(S2):
            if rng.random() < empty:
                continue
            k = int(rng.integers(1, nb + 1))
            mass = rng.random(k) + 1e-3
            tgt[s, s2, :k] = rng.choice(n, size=k, replace=False)
            flw[s, s2, :k] = mass / mass.sum() * (1.0 - deficit * rng.random())
    return rng.random((S1, S2)), tgt, flw


def _residual(x: np.ndarray, base: np.ndarray, Pi: np.ndarray, gamma: float) -> float:
    flat = x.ravel()
    return float(np.max(np.abs(base.ravel() + gamma * Pi @ flat - flat)))


def _check(x0, base, tgt, flw, gamma: float, tol: float, max_sweeps: int = 100_000) -> tuple[np.ndarray, int]:
    x = x0.copy()
    passes = evaluate_couplings(x, base, tgt, flw, gamma, tol, max_sweeps)
    assert 1 <= passes < max_sweeps
    assert np.all(np.isfinite(x))
    Pi = _dense(tgt, flw)
    slack = 1e-12 * (1.0 + float(np.max(np.abs(x))))
    assert _residual(x, base, Pi, gamma) <= gamma * tol + slack
    exact = np.linalg.solve(np.eye(Pi.shape[0]) - gamma * Pi, base.ravel()).reshape(x.shape)
    assert np.max(np.abs(x - exact)) <= gamma * tol / (1.0 - gamma) + slack
    return x, passes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_random_sub_stochastic_systems_meet_the_tolerance(seed: int, gamma: float) -> None:
    rng = np.random.default_rng(seed)
    S1, S2, nb = int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.integers(1, 6))
    base, tgt, flw = _random_system(rng, S1, S2, nb, empty=0.2, deficit=0.05 * (seed % 2))
    for tol in (1e-3, 1e-8, 1e-12):
        _check(rng.random((S1, S2)) * 10.0, base, tgt, flw, gamma, tol)


def _birth_death(S: int, up: float, down: float) -> tuple[np.ndarray, np.ndarray]:
    """A birth-death chain on S states as an S x 1 pair system: up, down or stay (reflecting ends)."""
    tgt = np.full((S, 1, 3), -1, np.int64)
    flw = np.zeros((S, 1, 3))
    for s in range(S):
        tgt[s, 0] = [min(s + 1, S - 1), max(s - 1, 0), s]
        flw[s, 0] = [up, down, 1.0 - up - down]
    return tgt, flw


@pytest.mark.parametrize("gamma", [0.99, 0.999])
@pytest.mark.parametrize("rates", [(0.3, 0.1), (0.1, 0.3), (0.25, 0.25)])
def test_slow_mixing_chain_meets_the_tolerance(gamma: float, rates: tuple[float, float]) -> None:
    S = 200
    tgt, flw = _birth_death(S, *rates)
    base = (np.arange(S, dtype=np.float64) / S)[:, None]
    for tol in (1e-4, 1e-10):
        _check(np.zeros((S, 1)), base, tgt, flw, gamma, tol)


def test_periodic_chain_stays_finite_and_meets_the_tolerance() -> None:
    """A deterministic 2-cycle: the change ratios alternate, so an extrapolation must be undone, not kept."""
    S = 50
    tgt = np.full((S, 1, 1), -1, np.int64)
    tgt[:, 0, 0] = np.arange(S) ^ 1
    flw = np.ones((S, 1, 1))
    base = np.where(np.arange(S) % 2 == 0, 1.0, 0.0)[:, None]
    _check(np.zeros((S, 1)), base, tgt, flw, 0.999, 1e-9)


def test_empty_rows_take_their_base_and_the_count_is_in_passes() -> None:
    """With every row empty x = base exactly: the first pass writes it, the second changes nothing."""
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    tgt = np.full((3, 4, 2), -1, np.int64)
    flw = np.zeros((3, 4, 2))
    x = np.full((3, 4), 7.0)
    assert evaluate_couplings(x, base, tgt, flw, 0.9, 0.0, 100) == 2
    assert np.array_equal(x, base)


def test_cells_after_the_end_marker_are_ignored() -> None:
    rng = np.random.default_rng(7)
    base, tgt, flw = _random_system(rng, 4, 5, 3, empty=0.0, deficit=0.0)
    padded_t = np.concatenate([tgt, np.full((4, 5, 1), -1, np.int64), rng.integers(0, 20, (4, 5, 2))], axis=2)
    padded_f = np.concatenate([flw, np.zeros((4, 5, 1)), rng.random((4, 5, 2))], axis=2)
    x, _ = _check(np.zeros((4, 5)), base, tgt, flw, 0.9, 1e-10)
    y = np.zeros((4, 5))
    evaluate_couplings(y, base, padded_t, padded_f, 0.9, 1e-10, 100_000)
    assert np.array_equal(x, y)


def test_stops_at_max_sweeps_when_the_tolerance_cannot_be_met() -> None:
    tgt, flw = _birth_death(30, 0.2, 0.2)
    x = np.zeros((30, 1))
    assert evaluate_couplings(x, np.ones((30, 1)), tgt, flw, 0.99, -1.0, 17) == 17
    assert np.all(np.isfinite(x))
