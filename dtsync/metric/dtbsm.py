"""The exact DT bisimulation metric between a real MDP and a twin MDP, with an interval for missing data.

d is the fixed point over all pairs (s in S, s' in S') of

    d(s,s') = max_a { |R(s,a) - R'(s',a)| + gamma * W1(P(.|s,a), P'(.|s',a); d) }

(Tao, Xu, You, arXiv 2502.17983; general form arXiv 2509.18714). The mismatch of a twin is max_s d(s,s).

Solver: policy iteration on the min-max game behind the operator. A sweep applies the operator exactly (every
transport problem solved to optimality, warm-started from its last basis) and records the maximising actions and
optimal couplings; the evaluation step then solves the linear system those choices define (Gauss-Seidel), which
jumps close to the fixed point in a few rounds at any gamma. Switching actions and couplings together can cycle,
so a candidate is kept only if its residual beats what a plain sweep guarantees (gamma times the last residual);
otherwise the plain sweep's result is taken. Every result is certified by a final exact sweep. With residual
res = ||F~ - d|| of the computed F~, and e >= ||F~ - F(d)|| (gamma times the largest duality gap of a transport
problem the simplex left at its pivot limit; 0 when every one was solved), F~ lies within
(gamma * res + e) / (1 - gamma) of the fixed point in the sup norm: ||F~ - d*|| <= e + gamma ||d - d*|| and
||d - d*|| <= (res + e) / (1 - gamma). That bound is returned; it is <= tol unless the result says otherwise.

Missing data (documented rule): a state-action with no samples in one window makes the term of that action unknown
for every pair it touches. The *lower* (optimistic) metric skips unknown terms; the *upper* (pessimistic) metric
gives them the largest possible value Rbar/(1-gamma), Rbar bounding |R - R'| (the configured reward range, or
the observed one); both are fixed points of monotone operators that sandwich every completion of the data, so the
true metric of any completion lies in [lower, upper]. The *point* estimate fills a state-action missing in one
window with the other window's data for the same state label (assume agreement where one side is silent) and
skips what neither window saw; it lies inside the interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtsync.metric import ot_kernel

_MAX_ROUNDS = 100_000
_PARALLEL_WORK = 1 << 17  # transport problems per sweep from which the sweep runs on numba's thread pool
# Policy-iteration steps for the maximising player per round. One (evaluate, then one pruned improvement sweep)
# measured best: solving its problem to the end spends improvement sweeps on couplings the next exact sweep
# replaces anyway (S=256 cold, 1 thread: 1.45-1.53 s -> 1.16-1.24 s CPU; S=64 cold 42 -> 34 ms).
_MAX_PLAYER_STEPS = 1
# Exact sweeps after convergence that resume problems left at the pivot limit before the bound is reported as is.
_EXTRA_SWEEPS = 20


@dataclass(frozen=True)
class SparseMDP:
    """An MDP's rewards and next-state supports, the form the kernels read."""

    R: np.ndarray  # (S, A)
    idx: np.ndarray  # (S, A, K) next-state indices
    mass: np.ndarray  # (S, A, K) probabilities
    n: np.ndarray  # (S, A) support sizes; 0 = unknown state-action

    @classmethod
    def from_dense(cls, R: np.ndarray, P: np.ndarray) -> SparseMDP:
        K = max(1, int((P > 0).sum(axis=-1).max(initial=0)))
        idx, mass, n = ot_kernel.sparse_rows(np.ascontiguousarray(P, dtype=np.float64), K)
        return cls(np.ascontiguousarray(R, dtype=np.float64), idx, mass, n)

    @property
    def known(self) -> np.ndarray:
        return self.n > 0


@dataclass
class FixedPoint:
    """A certified fixed point and what it cost."""

    d: np.ndarray
    sweeps: int
    residual: float
    problems: int
    pivots: int
    error_bound: float = 0.0  # certified sup-norm distance of d from the fixed point
    unfinished: int = 0  # transport problems of the final sweep left at the pivot limit


class _Workspace:
    """Per-solver state kept between calls (the warm start): every transport problem's basis and bounds.

    codes (S, S', A, 2K-1): tree bases; wb, ex (S, S', A): the value anchors and optimality expiries read by
    `ot_kernel.sweep`. ex is relative to `cum`, an upper bound on the sup-norm path length of d since the
    workspace was (re)set; wb to the row clock Pr[s, a] = sum_x P(x|s, a) rowC[x], with rowC[x] the sum over
    reads of the largest (signed) change in row x of d: a coupling of (s, a)'s problem has row marginal
    P(.|s, a), so its value rose by at most the change of Pr, and fell by at least minus it when every entry
    fell (the big steps after an exact sweep lower d); G to Z[s], which advances by the largest change of
    Pr[s, .]. Both bound from above only. All advance in `observe` each
    time d is read. A state-action whose data changed since the last call loses its anchors (its basis is kept
    as a warm start and re-proved).
    """

    def __init__(self) -> None:
        self.key: tuple[int, ...] | None = None
        self.codes = np.full((0, 0, 0, 1), -1, np.int32)
        self.wb = np.zeros((0, 0, 0))
        self.ex = np.zeros((0, 0, 0))
        self.act = np.zeros((0, 0), np.int64)
        self.G = np.zeros((0, 0))
        self.exa = np.zeros((0, 0))
        self.tgt = np.zeros((0, 0, 1), np.int64)
        self.flw = np.zeros((0, 0, 1))
        self.cum = 0.0
        self.rowC = np.zeros(0)
        self.Pr = np.zeros((0, 0))
        self.Z = np.zeros(0)
        self.seen: np.ndarray | None = None
        self.m1: SparseMDP | None = None
        self.m2: SparseMDP | None = None

    def prepare(self, m1: SparseMDP, m2: SparseMDP) -> None:
        S1, A = m1.n.shape
        S2 = m2.n.shape[0]
        nb = 2 * max(m1.idx.shape[2], m2.idx.shape[2]) - 1
        key = (S1, S2, A, nb, m1.idx.shape[2], m2.idx.shape[2])
        if key != self.key:
            old = self.codes
            codes = np.full((S1, S2, A, max(nb, old.shape[3])), -1, np.int32)
            s1, s2, a = (min(x, y) for x, y in zip(old.shape[:3], (S1, S2, A), strict=True))
            codes[:s1, :s2, :a, : old.shape[3]] = old[:s1, :s2, :a]  # bases are re-validated before use
            self.codes = codes
            self.wb = np.full((S1, S2, A), np.inf)
            self.ex = np.full((S1, S2, A), -np.inf)
            self.act = np.full((S1, S2), -1, np.int64)
            self.G = np.full((S1, S2), np.inf)
            self.exa = np.full((S1, S2), -np.inf)
            self.tgt = np.full((S1, S2, codes.shape[3]), -1, np.int64)
            self.flw = np.zeros((S1, S2, codes.shape[3]))
            self.cum = 0.0
            self.rowC = np.zeros(S1)
            self.Z = np.zeros(S1)
            self.seen = None
            self.key = key
        else:
            assert self.m1 is not None and self.m2 is not None
            c1 = _changed_rows(self.m1, m1)
            c2 = _changed_rows(self.m2, m2)
            # G (the competitors' bound per pair) also reads the rewards.
            self.G[(c1 | (self.m1.R != m1.R)).any(axis=1), :] = np.inf
            self.G[:, (c2 | (self.m2.R != m2.R)).any(axis=1)] = np.inf
            if c1.any():
                s, a = np.nonzero(c1)
                self.wb[s, :, a] = np.inf
                self.ex[s, :, a] = -1.0  # expired; the basis stays as a warm start
            if c2.any():
                s2, a = np.nonzero(c2)
                self.wb[:, s2, a] = np.inf
                self.ex[:, s2, a] = -1.0
        self.m1, self.m2 = m1, m2
        self.Pr = self._row_clock()  # at the new masses: Z advances with d only

    def _row_clock(self) -> np.ndarray:
        """Pr[s, a] = sum_x P(x|s, a) rowC[x]: how far, at most, any coupling of (s, a)'s problems moved."""
        assert self.m1 is not None
        return np.einsum("sak,sak->sa", self.m1.mass, self.rowC[self.m1.idx])

    def observe(self, d: np.ndarray) -> None:
        """d is about to be read: advance cum by how far it moved since last read."""
        if self.seen is None:
            self.seen = d.copy()
            self.Pr = self._row_clock()
            return
        moved = d - self.seen
        self.cum += float(np.max(np.abs(moved), initial=0.0)) * (1.0 + 1e-12)
        rise = np.max(moved, axis=1, initial=-np.inf)  # signed: wb and G only bound from above
        self.rowC += rise + 1e-12 * np.abs(rise)
        self.seen[...] = d
        old = self.Pr
        self.Pr = self._row_clock()
        if old.shape[1]:
            rise = np.max(self.Pr - old, axis=1)
            self.Z += rise + 1e-12 * np.abs(rise)


def _changed_rows(old: SparseMDP, new: SparseMDP) -> np.ndarray:
    return (
        (old.n != new.n)
        | (old.idx != new.idx).any(axis=-1)
        | (old.mass != new.mass).any(axis=-1)
    )


def fixed_point(
    m1: SparseMDP,
    m2: SparseMDP,
    gamma: float,
    tol: float,
    unknown_value: float,
    start: np.ndarray | None = None,
    workspace: _Workspace | None = None,
    max_pivots: int = ot_kernel.MAX_PIVOTS,
) -> FixedPoint:
    """Fixed point of the DT-BSM operator in which unknown terms are worth `unknown_value`.

    Strategy iteration with the minimising player (the couplings) outside: an exact sweep computes F(d) and
    re-optimises the couplings that matter; then the maximising player's problem for those fixed couplings
    (an ordinary discounted MDP over pairs, no transport problems) is advanced by `_MAX_PLAYER_STEPS` steps of
    policy iteration, whose improvement steps are cheap pruned sweeps without pivoting. A round is kept only if
    its exact residual beats gamma times the last one (what a plain sweep guarantees); otherwise the plain
    sweep's F is taken. Stops once the certified error bound is <= tol; if problems left at the pivot limit keep
    it above tol once the residual is small, up to `_EXTRA_SWEEPS` more exact sweeps resume their simplex, and
    the result then carries the bound it has (error_bound > tol).
    """
    S1, A = m1.n.shape
    S2 = m2.n.shape[0]
    if S1 == 0 or S2 == 0:
        return FixedPoint(np.zeros((S1, S2)), 0, 0.0, 0, 0)
    ws = workspace or _Workspace()
    ws.prepare(m1, m2)
    d = _reward_gap(m1, m2, unknown_value) if start is None else np.array(start, dtype=np.float64, copy=True)
    F = np.empty((S1, S2))
    act = ws.act
    tgt, flw = ws.tgt, ws.flw
    stats = np.zeros((S1, 4), np.int64)
    gaps = np.zeros(S1)
    stop = tol * (1.0 - gamma) / gamma
    rows = np.arange(S1)[:, None]
    cols = np.arange(S2)[None, :]

    # Small problems run on the calling thread: waking the pool for a millisecond of work costs more than it
    # saves (and on a busy machine the slowest thread's wake-up dominates).
    kernel = ot_kernel.sweep if S1 * S2 * A >= _PARALLEL_WORK else ot_kernel.sweep_serial

    def run(x: np.ndarray, exact: bool) -> float:
        ws.observe(x)
        gaps[:] = 0.0
        kernel(
            x, ws.cum, ws.Pr, ws.Z, exact, m1.R, m1.idx, m1.mass, m1.n, m2.R, m2.idx, m2.mass, m2.n,
            gamma, unknown_value, ws.codes, ws.wb, ws.ex, ws.G, ws.exa, F, act, tgt, flw, stats, gaps, max_pivots,
        )  # fmt: skip
        return float(np.max(np.abs(F - x)))

    def base() -> np.ndarray:
        a = np.maximum(act, 0)
        return np.where(act >= 0, np.abs(m1.R[rows, a] - m2.R[cols, a]), F)

    def solve_max_player(x: np.ndarray, inner_tol: float) -> np.ndarray:
        """Policy iteration for the maximising player with the couplings fixed; x holds T_pi(previous)."""
        for _inner in range(_MAX_PLAYER_STEPS):
            ot_kernel.evaluate_couplings(x, base(), tgt, flw, gamma, inner_tol, 100_000)
            r = run(x, False)
            x[...] = F
            if r <= inner_tol:
                break
        return x

    if start is None:
        # Cold: cost-blind corner couplings (no pivoting), then policy iteration steps for the maximising player
        # with them: d near an upper bound, where the first exact sweep has far fewer pivots to do.
        run(d, False)
        d = solve_max_player(F.copy(), 1e-3 * float(np.max(np.abs(F), initial=1.0)))
    accepted_F: np.ndarray | None = None
    accepted_res = np.inf
    candidate = False
    sweeps = 0
    extra = 0
    for _ in range(_MAX_ROUNDS):
        sweeps += 1
        failed = int(stats[:, 2].sum())
        res = run(d, True)
        e = float(gaps.max())
        bound = (gamma * res + e) / (1.0 - gamma)
        if res <= stop and (bound <= tol or extra >= _EXTRA_SWEEPS):
            unfinished = int(stats[:, 2].sum()) - failed
            return FixedPoint(F.copy(), sweeps, res, int(stats[:, 0].sum()), int(stats[:, 1].sum()), bound, unfinished)
        if res <= stop:  # converged but for problems left at the pivot limit: resume them
            extra += 1
            d = F.copy()
            candidate = False
            continue
        if candidate and res > gamma * accepted_res and accepted_F is not None:
            # The round did worse than a plain sweep would have: take the plain sweep instead.
            d = accepted_F
            candidate = False
            continue
        accepted_F = F.copy()
        accepted_res = res
        d = solve_max_player(F.copy(), max(stop * 0.1, res * 1e-2))
        candidate = True
    raise RuntimeError(f"DT-BSM did not converge in {_MAX_ROUNDS} rounds (residual {res:.3g})")


def _reward_gap(m1: SparseMDP, m2: SparseMDP, unknown_value: float) -> np.ndarray:
    """F(0) in closed form (W1 with zero cost is 0): a cold start that needs no transport problem, and whose
    costs already make the first greedy bases meaningful."""
    both = m1.known[:, None, :] & m2.known[None, :, :]
    gap = np.where(both, np.abs(m1.R[:, None, :] - m2.R[None, :, :]), 0.0).max(axis=-1, initial=0.0)
    return np.where((~both).any(axis=-1), np.maximum(gap, unknown_value), gap)


@dataclass(frozen=True)
class DTBSMResult:
    """The metric between a real and a twin MDP: point estimate, interval, and what it rests on."""

    d: np.ndarray
    d_lower: np.ndarray
    d_upper: np.ndarray
    mismatch: float
    mismatch_lower: float
    mismatch_upper: float
    iterations: int
    rbar: float
    coverage: float
    pairs: np.ndarray  # (m, 2): (real index, twin index) of the states both sides share
    labels: list[Any]
    problems: int
    pivots: int
    # Certified sup-norm distance of d, d_lower and d_upper from their fixed points (the largest of the three);
    # <= the requested tol unless transport problems stayed at the pivot limit (`unfinished` > 0).
    error_bound: float = 0.0
    unfinished: int = 0
    certified: bool = True  # error_bound <= the requested tol

    def top_states(self, k: int = 5) -> list[tuple[Any, float]]:
        """The k shared states with the largest d(s, s): where the twin's behaviour departs most."""
        if len(self.pairs) == 0:
            return []
        diag = self.d[self.pairs[:, 0], self.pairs[:, 1]]
        order = np.argsort(-diag, kind="stable")[:k]
        return [(self.labels[i], float(diag[i])) for i in order]


def _validate(name: str, R: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    R = np.asarray(R, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    if R.ndim != 2 or P.ndim != 3 or P.shape[:2] != R.shape:
        raise ValueError(f"{name}: R must be (S, A) and P (S, A, S'), got {R.shape} and {P.shape}")
    if not (np.all(np.isfinite(R)) and np.all(np.isfinite(P))):
        raise ValueError(f"{name}: R and P must be finite")
    if np.any(P < 0):
        raise ValueError(f"{name}: P has negative entries")
    sums = P.sum(axis=-1)
    if np.any((sums > 0) & (np.abs(sums - 1.0) > 1e-6)):
        raise ValueError(f"{name}: every row of P must sum to 1 (or be all zero for an unknown state-action)")
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.where(sums[..., None] > 0, P / np.where(sums > 0, sums, 1.0)[..., None], 0.0)
    return R, P


def _complete(R: np.ndarray, P: np.ndarray, R_other: np.ndarray, P_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill state-actions this side never saw with the other side's data for the same state (point estimate)."""
    missing = (P.sum(axis=-1) == 0) & (P_other.sum(axis=-1) > 0)
    return np.where(missing, R_other, R), np.where(missing[..., None], P_other, P)


class DTBSMSolver:
    """Computes the metric repeatedly, warm-starting each call from the previous one (sliding windows).

    Warm starts keep both the previous fixed points and every transport problem's optimal basis; the result
    is certified the same way as a cold start, so it equals a cold recompute to the tolerance.
    """

    def __init__(self, max_pivots: int = ot_kernel.MAX_PIVOTS) -> None:
        self._workspace = _Workspace()
        self._last: dict[str, np.ndarray] = {}
        self._max_pivots = max_pivots

    def _start(self, mode: str, S1: int, S2: int) -> np.ndarray | None:
        last = self._last.get(mode)
        if last is None:
            return None
        start = np.zeros((S1, S2))
        s1, s2 = min(S1, last.shape[0]), min(S2, last.shape[1])
        start[:s1, :s2] = last[:s1, :s2]
        return start

    def _solve(self, mode: str, m1: SparseMDP, m2: SparseMDP, gamma: float, tol: float, unknown: float) -> FixedPoint:
        start = self._start(mode, m1.n.shape[0], m2.n.shape[0])
        fp = fixed_point(m1, m2, gamma, tol, unknown, start, self._workspace, self._max_pivots)
        self._last[mode] = fp.d
        return fp

    def solve(
        self,
        R_real: np.ndarray,
        P_real: np.ndarray,
        R_twin: np.ndarray,
        P_twin: np.ndarray,
        gamma: float,
        tol: float = 1e-8,
        *,
        labels_real: Sequence[Any] | None = None,
        labels_twin: Sequence[Any] | None = None,
        reward_range: tuple[float, float] | None = None,
    ) -> DTBSMResult:
        """See `dtbsm`."""
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma}")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        R1, P1 = _validate("real", R_real, P_real)
        R2, P2 = _validate("twin", R_twin, P_twin)
        S1, A = R1.shape
        S2 = R2.shape[0]
        if R2.shape[1] != A:
            raise ValueError(f"real and twin must share the action set: {A} vs {R2.shape[1]} actions")
        if P1.shape[2] != S1 or P2.shape[2] != S2:
            raise ValueError("P must map each MDP's states to its own states: P_real (S, A, S), P_twin (S', A, S')")
        lab1 = list(labels_real) if labels_real is not None else list(range(S1))
        lab2 = list(labels_twin) if labels_twin is not None else list(range(S2))
        if len(lab1) != S1 or len(lab2) != S2:
            raise ValueError("labels must have one entry per state")
        pos2 = {label: j for j, label in enumerate(lab2)}
        pairs = np.array([(i, pos2[lab]) for i, lab in enumerate(lab1) if lab in pos2], dtype=np.int64).reshape(-1, 2)
        labels = [lab1[i] for i in pairs[:, 0]]

        known1 = P1.sum(axis=-1) > 0
        known2 = P2.sum(axis=-1) > 0
        diff = np.abs(R1[:, None, :] - R2[None, :, :])
        both = known1[:, None, :] & known2[None, :, :]
        rbar = float(diff[both].max(initial=0.0))
        seen = np.concatenate([R1[known1], R2[known2]])
        span = float(seen.max() - seen.min()) if seen.size else 0.0
        if reward_range is not None:
            span = max(span, float(reward_range[1]) - float(reward_range[0]))
        upper_value = max(rbar, span) / (1.0 - gamma)

        k1, k2 = known1[pairs[:, 0]], known2[pairs[:, 1]]
        either = int((k1 | k2).sum())
        coverage = float((k1 & k2).sum() / either) if either else 0.0
        complete = bool(known1.all() and known2.all())

        m1 = SparseMDP.from_dense(R1, P1)
        m2 = SparseMDP.from_dense(R2, P2)
        lower = self._solve("lower", m1, m2, gamma, tol, 0.0)
        if complete:
            point = upper = lower
        else:
            upper = self._solve("upper", m1, m2, gamma, tol, upper_value)
            aligned = S1 == S2 and len(pairs) == S1 and bool(np.all(pairs[:, 0] == pairs[:, 1]))
            if aligned:
                c1 = SparseMDP.from_dense(*_complete(R1, P1, R2, P2))
                c2 = SparseMDP.from_dense(*_complete(R2, P2, R1, P1))
                point = self._solve("point", c1, c2, gamma, tol, 0.0)
            else:
                point = lower

        def worst(d: np.ndarray) -> float:
            return float(d[pairs[:, 0], pairs[:, 1]].max()) if len(pairs) else 0.0

        fps = (lower,) if complete else (lower, upper, point)
        error_bound = max(fp.error_bound for fp in fps)
        return DTBSMResult(
            d=point.d,
            d_lower=lower.d,
            d_upper=upper.d,
            mismatch=worst(point.d),
            mismatch_lower=worst(lower.d),
            mismatch_upper=worst(upper.d),
            iterations=point.sweeps,
            rbar=rbar,
            coverage=coverage,
            pairs=pairs,
            labels=labels,
            problems=sum(fp.problems for fp in fps),
            pivots=sum(fp.pivots for fp in fps),
            error_bound=error_bound,
            unfinished=sum(fp.unfinished for fp in fps),
            certified=error_bound <= tol,
        )


def dtbsm(
    R_real: np.ndarray,
    P_real: np.ndarray,
    R_twin: np.ndarray,
    P_twin: np.ndarray,
    gamma: float,
    tol: float = 1e-8,
    *,
    labels_real: Sequence[Any] | None = None,
    labels_twin: Sequence[Any] | None = None,
    reward_range: tuple[float, float] | None = None,
) -> DTBSMResult:
    """DT-BSM between a real MDP (R (S, A), P (S, A, S)) and a twin (R' (S', A), P' (S', A, S')).

    A row of P that is all zero marks a state-action with no data. `.d` is within `tol` (sup norm) of the exact
    fixed point; `.mismatch` = max over shared state labels of d(s, s) (labels default to the state indices, so
    with S = S' it is max_s d(s, s)); `.mismatch_lower` / `.mismatch_upper` bound it under missing data.
    """
    return DTBSMSolver().solve(
        R_real, P_real, R_twin, P_twin, gamma, tol,
        labels_real=labels_real, labels_twin=labels_twin, reward_range=reward_range,
    )  # fmt: skip
