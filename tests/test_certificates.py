"""The optimality certificates the pruned sweep relies on (`dtsync.metric.bellman.sweep`, step (v)).

A basis proved optimal with smallest off-tree reduced cost `slack` must stay optimal while the costs move by
less than the certificate allows: by delta per cell with 2 min(k, k') delta < slack (the sup-norm clock), or by
r_x per cell of row x with 2 sum_x r_x < slack (the row clock). Each case re-runs the simplex from the proved
basis on perturbed costs: it must find that basis optimal (no pivot), with the value POT computes.
"""

from __future__ import annotations

import numpy as np
import ot
import pytest

from dtsync.metric import transport


def _solved(rng: np.random.Generator, k: int, kk: int):  # type: ignore[no-untyped-def]
    p = rng.random(k) + 1e-3
    q = rng.random(kk) + 1e-3
    p, q = p / p.sum(), q / q.sum()
    C = rng.random(k * kk)
    w = transport.scratch(max(k, kk))
    codes = np.full(2 * max(k, kk) - 1, -1, np.int32)
    w.costs[: k * kk] = C
    transport.greedy_basis(k, kk, p, q, w.costs, codes, w)
    transport.flows(codes, k + kk - 1, p, q, w)
    _value, _pivots, status, slack = transport.optimize(k, kk, p, q, w.costs, codes, w, transport.MAX_PIVOTS)
    assert status == 0
    return p, q, C, codes, w, slack


def _proved(rng: np.random.Generator, count: int, k_max: int = 8):  # type: ignore[no-untyped-def]
    """Random problems of 2..k_max x 2..k_max with their proved optimal basis and a finite, positive slack."""
    for _ in range(count):
        k, kk = int(rng.integers(2, k_max + 1)), int(rng.integers(2, k_max + 1))
        p, q, C, codes, w, slack = _solved(rng, k, kk)
        if np.isfinite(slack) and slack > 1e-9:
            yield k, kk, p, q, C, codes, w, slack


def _pivots_after(p, q, C, codes, w, k: int, kk: int) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    w.costs[: k * kk] = C
    transport.flows(codes, k + kk - 1, p, q, w)
    value, pivots, status, _slack = transport.optimize(k, kk, p, q, w.costs, codes, w, transport.MAX_PIVOTS)
    assert status == 0
    return pivots, value


@pytest.mark.parametrize("seed", range(4))
def test_row_clock_certificate_keeps_the_basis_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    checked = 0
    for k, kk, p, q, C, codes, w, slack in _proved(rng, 400):
        # Per-row budgets r_x with 2 sum_x r_x just under the slack; every cell of row x moves by up to r_x,
        # adversarially signed.
        shares = rng.random(k)
        r = 0.999 * slack / 2 * shares / shares.sum()
        moved = C + (rng.choice([-1.0, 1.0], size=(k, kk)) * r[:, None] * rng.uniform(0.5, 1.0, (k, kk))).ravel()
        pivots, value = _pivots_after(p, q, moved, codes.copy(), w, k, kk)
        assert pivots == 0
        assert value == pytest.approx(ot.emd2(p, q, moved.reshape(k, kk)), abs=1e-12)
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("seed", range(4))
def test_sup_norm_certificate_keeps_the_basis_optimal(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for k, kk, p, q, C, codes, w, slack in _proved(rng, 400):
        delta = 0.999 * slack / (2 * min(k, kk))
        moved = C + rng.choice([-1.0, 1.0], size=k * kk) * delta
        pivots, _value = _pivots_after(p, q, moved, codes.copy(), w, k, kk)
        assert pivots == 0


def test_row_clock_is_tight_up_to_its_factor() -> None:
    """Not vacuous: moving one row by a little more than slack / 2 (and the rest not at all) can break the
    basis; over many problems some do."""
    rng = np.random.default_rng(9)
    broken = 0
    for k, kk, p, q, C, codes, w, slack in _proved(rng, 400, k_max=5):
        moved = C.reshape(k, kk).copy()
        x = int(rng.integers(k))
        moved[x] += rng.choice([-1.0, 1.0], size=kk) * 1.2 * slack / 2
        pivots, _value = _pivots_after(p, q, moved.ravel(), codes.copy(), w, k, kk)
        broken += pivots > 0
    assert broken > 0
