"""The exact DT bisimulation metric between a real MDP and a twin MDP, with an interval for missing data.

d is the fixed point over all pairs (s in S, s' in S') of

    d(s,s') = max_a { |R(s,a) - R'(s',a)| + gamma * W1(P(.|s,a), P'(.|s',a); d) }

(Tao, Xu, You, arXiv 2502.17983; general form arXiv 2509.18714). The mismatch of a twin is max_s d(s,s).

Solver: policy iteration on the min-max game behind the operator. A sweep applies the operator exactly (every
transport problem solved to optimality, warm-started from its last basis) and records the maximising actions and
optimal couplings; the evaluation step then solves the linear system those choices define (Gauss-Seidel, its
steady rate extrapolated), which jumps close to the fixed point in a few rounds at any gamma. A candidate that is
not finite is discarded before any sweep reads it (a NaN would void every bound of the pruning). Switching
actions and couplings together can cycle, so a candidate is kept only if its residual beats what a plain sweep
guarantees (gamma times the last residual) or it is provably no farther from the fixed point than the plain
sweep; otherwise the plain sweep's result is taken. The sweeps themselves are `dtsync.metric.bellman`'s
(pruned, with the proof of the pruning there), the transport problems `dtsync.metric.transport`'s, the
evaluation `dtsync.metric.evaluation`'s.

Every result is certified by a final exact sweep. With residual res = ||F~ - d|| of the computed F~, and
e >= ||F~ - F(d)|| (gamma times the largest duality gap of a transport problem the simplex left at its pivot
limit; 0 when every one was solved), F~ lies within (gamma * res + e) / (1 - gamma) of the fixed point in the sup
norm: ||F~ - d*|| <= e + gamma ||d - d*|| and ||d - d*|| <= (res + e) / (1 - gamma). That bound is returned; it
is <= tol unless the result says otherwise.

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

import numba
import numpy as np

from dtsync.metric import bellman, transport
from dtsync.metric.evaluation import evaluate_couplings
from dtsync.metric.sparse import SparseMDP, row_summary

_MAX_ROUNDS = 100_000
_PARALLEL_WORK = 1 << 17  # transport problems per sweep from which the sweep runs on numba's thread pool
# Policy-iteration steps for the maximising player per round. One (evaluate, then one pruned improvement sweep)
# measured best: solving its problem to the end spends improvement sweeps on couplings the next exact sweep
# replaces anyway (S=256 cold, 1 thread: 1.45-1.53 s -> 1.16-1.24 s CPU; S=64 cold 42 -> 34 ms).
_MAX_PLAYER_STEPS = 1
# Each evaluation is solved to this fraction of the last exact residual: 1e-2 left the fixed point to gain at
# most 100x per round (warm refresh S=256: 4.5 exact sweeps per step); 1e-4 with extrapolated Gauss-Seidel
# takes 3.5 (measured p50 146 -> 128 ms at equal load). Tighter buys no further sweep.
_EVAL_RELATIVE = 1e-4
_EVAL_PASSES = 100_000
# Exact sweeps after convergence that resume problems left at the pivot limit before the bound is reported as is.
_EXTRA_SWEEPS = 20


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


def fixed_point(
    m1: SparseMDP,
    m2: SparseMDP,
    gamma: float,
    tol: float,
    unknown_value: float,
    start: np.ndarray | None = None,
    workspace: bellman.Workspace | None = None,
    max_pivots: int = transport.MAX_PIVOTS,
) -> FixedPoint:
    """Fixed point of the DT-BSM operator in which unknown terms are worth `unknown_value`.

    Strategy iteration with the minimising player (the couplings) outside: an exact sweep computes F(d) and
    re-optimises the couplings that matter; then the maximising player's problem for those fixed couplings
    (an ordinary discounted MDP over pairs, no transport problems) is advanced by `_MAX_PLAYER_STEPS` steps of
    policy iteration, whose improvement steps are cheap pruned sweeps without pivoting. A round is kept only if
    its exact residual beats gamma times the last one (what a plain sweep guarantees), or if it is provably no
    farther from the fixed point than the plain sweep (`_closer_from_below`); otherwise the plain sweep's F is
    taken. Stops once the certified error bound is <= tol; if problems left at the pivot limit keep
    it above tol once the residual is small, up to `_EXTRA_SWEEPS` more exact sweeps resume their simplex, and
    the result then carries the bound it has (error_bound > tol).
    """
    S1, A = m1.n.shape
    S2 = m2.n.shape[0]
    if S1 == 0 or S2 == 0:
        return FixedPoint(np.zeros((S1, S2)), 0, 0.0, 0, 0)
    ws = workspace or bellman.Workspace()
    ws.prepare(m1, m2)
    d = _reward_gap(m1, m2, unknown_value) if start is None else np.array(start, dtype=np.float64, copy=True)
    F = np.empty((S1, S2))
    act = ws.act
    tgt, flw = ws.tgt, ws.flw
    out = bellman.SweepOutput(F, np.zeros((S1, 4), np.int64), np.zeros(S1))
    stats, gaps = out.stats, out.gaps
    stop = tol * (1.0 - gamma) / gamma
    rows = np.arange(S1)[:, None]
    cols = np.arange(S2)[None, :]

    # Small problems run on the calling thread: waking the pool for a millisecond of work costs more than it
    # saves (and on a busy machine the slowest thread's wake-up dominates); so does a one-thread process.
    parallel = S1 * S2 * A >= _PARALLEL_WORK and numba.get_num_threads() > 1
    kernel = bellman.sweep if parallel else bellman.sweep_serial

    def run(x: np.ndarray, exact: bool) -> float:
        ws.observe(x)
        gaps[:] = 0.0
        kernel(x, ws.cum, m1, m2, ws.state(), gamma, unknown_value, exact, max_pivots, out)
        return float(np.max(np.abs(F - x)))

    def base() -> np.ndarray:
        a = np.maximum(act, 0)
        return np.where(act >= 0, np.abs(m1.R[rows, a] - m2.R[cols, a]), F)

    def solve_max_player(x: np.ndarray, inner_tol: float) -> np.ndarray:
        """Policy iteration for the maximising player with the couplings fixed; x holds T_pi(previous)."""
        for _inner in range(_MAX_PLAYER_STEPS):
            previous = x.copy()
            evaluate_couplings(x, base(), tgt, flw, gamma, inner_tol, _EVAL_PASSES)
            if not np.all(np.isfinite(x)):  # never let a sweep read a non-finite d: its bounds would be void
                x[...] = previous
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
        worse = candidate and res > gamma * accepted_res and accepted_F is not None
        if worse and accepted_F is not None and not _closer_from_below(d, F, accepted_F):
            # The round did worse than a plain sweep would have: take the plain sweep instead.
            d = accepted_F
            candidate = False
            continue
        accepted_F = F.copy()
        accepted_res = res
        d = solve_max_player(F.copy(), max(stop * 0.1, res * _EVAL_RELATIVE))
        candidate = True
    raise RuntimeError(f"DT-BSM did not converge in {_MAX_ROUNDS} rounds (residual {res:.3g})")


def _closer_from_below(x: np.ndarray, Fx: np.ndarray, F_prev: np.ndarray) -> bool:
    """x <= F(x) and x >= F(d_prev): then d_prev's plain sweep is no closer to the fixed point d* than x.

    A sub-solution of the monotone operator lies below d* (x <= F(x) <= F(F(x)) ... -> d*), so entrywise
    0 <= d* - x <= d* - F(d_prev) <= gamma ||d* - d_prev||. At gamma near 1 a policy-iteration round often
    raises the residual while it gains on the error; this accepts such a round on its error.
    """
    margin = 1e-12 * (1.0 + float(np.max(np.abs(Fx), initial=0.0)))
    return bool(np.all(Fx >= x - margin) and np.all(x >= F_prev - margin))


def _reward_gap(m1: SparseMDP, m2: SparseMDP, unknown_value: float) -> np.ndarray:
    """F(0) in closed form (W1 with zero cost is 0): a cold start that needs no transport problem, and whose
    costs already make the first greedy bases meaningful. One action at a time: (S, S') temporaries only."""
    gap = np.zeros((m1.n.shape[0], m2.n.shape[0]))
    missing = np.zeros(gap.shape, dtype=bool)
    for a in range(m1.n.shape[1]):
        both = m1.known[:, None, a] & m2.known[None, :, a]
        np.maximum(gap, np.where(both, np.abs(m1.R[:, None, a] - m2.R[None, :, a]), 0.0), out=gap)
        missing |= ~both
    return np.where(missing, np.maximum(gap, unknown_value), gap)


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


@dataclass(frozen=True)
class _Side:
    """One validated MDP: R, the raw P, and its `row_summary` (rows are divided by their sums when converted)."""

    R: np.ndarray
    P: np.ndarray
    sums: np.ndarray
    n: np.ndarray

    def sparse(self) -> SparseMDP:
        return SparseMDP.from_rows(self.R, self.P, self.sums, self.n)

    def dense(self) -> np.ndarray:
        """P with every known row normalised (only the point estimate's completion needs it dense)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.sums[..., None] > 0, self.P / np.where(self.sums > 0, self.sums, 1.0)[..., None], 0.0)


def _validate(name: str, R: np.ndarray, P: np.ndarray) -> _Side:
    R = np.asarray(R, dtype=np.float64)
    P = np.ascontiguousarray(P, dtype=np.float64)
    if R.ndim != 2 or P.ndim != 3 or P.shape[:2] != R.shape:
        raise ValueError(f"{name}: R must be (S, A) and P (S, A, S'), got {R.shape} and {P.shape}")
    sums, n, finite, nonneg = row_summary(P)
    if not (finite and np.all(np.isfinite(R))):
        raise ValueError(f"{name}: R and P must be finite")
    if not nonneg:
        raise ValueError(f"{name}: P has negative entries")
    if np.any((sums > 0) & (np.abs(sums - 1.0) > 1e-6)):
        raise ValueError(f"{name}: every row of P must sum to 1 (or be all zero for an unknown state-action)")
    return _Side(R, P, sums, n)


def _largest_reward_gap(R1: np.ndarray, known1: np.ndarray, R2: np.ndarray, known2: np.ndarray) -> float:
    """Rbar = max over actions and known pairs of |R(s, a) - R'(s', a)|, from each action's extremes."""
    rbar = 0.0
    for a in range(R1.shape[1]):
        r1, r2 = R1[known1[:, a], a], R2[known2[:, a], a]
        if r1.size and r2.size:
            rbar = max(rbar, float(r1.max() - r2.min()), float(r2.max() - r1.min()))
    return rbar


def _complete(R: np.ndarray, P: np.ndarray, R_other: np.ndarray, P_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill state-actions this side never saw with the other side's data for the same state (point estimate)."""
    missing = (P.sum(axis=-1) == 0) & (P_other.sum(axis=-1) > 0)
    return np.where(missing, R_other, R), np.where(missing[..., None], P_other, P)


class DTBSMSolver:
    """Computes the metric repeatedly, warm-starting each call from the previous one (sliding windows).

    Warm starts keep both the previous fixed points and every transport problem's optimal basis; the result
    is certified the same way as a cold start, so it equals a cold recompute to the tolerance. `max_pivots`
    caps the simplex per problem and sweep (a problem that reaches it resumes at the next sweep; if some never
    finish, the result says so: `certified` False, `error_bound` > tol). One numba thread per process
    (`numba.set_num_threads(1)`) runs every sweep on the calling thread.
    """

    def __init__(self, max_pivots: int = transport.MAX_PIVOTS) -> None:
        self._workspace = bellman.Workspace()
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
        point_only: bool = False,
    ) -> DTBSMResult:
        """See `dtbsm`. `point_only` solves the point estimate alone (one fixed point instead of three when data
        are missing): `mismatch_lower` / `mismatch_upper` then repeat it, for callers that only read `mismatch`
        (the bootstrap's resamples)."""
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma must be in (0, 1), got {gamma}")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        real = _validate("real", R_real, P_real)
        twin = _validate("twin", R_twin, P_twin)
        R1, P1, R2, P2 = real.R, real.P, twin.R, twin.P
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

        known1 = real.n > 0
        known2 = twin.n > 0
        rbar = _largest_reward_gap(R1, known1, R2, known2)
        seen = np.concatenate([R1[known1], R2[known2]])
        span = float(seen.max() - seen.min()) if seen.size else 0.0
        if reward_range is not None:
            span = max(span, float(reward_range[1]) - float(reward_range[0]))
        upper_value = max(rbar, span) / (1.0 - gamma)

        k1, k2 = known1[pairs[:, 0]], known2[pairs[:, 1]]
        either = int((k1 | k2).sum())
        coverage = float((k1 & k2).sum() / either) if either else 0.0
        complete = bool(known1.all() and known2.all())

        m1 = real.sparse()
        m2 = twin.sparse()
        aligned = S1 == S2 and len(pairs) == S1 and bool(np.all(pairs[:, 0] == pairs[:, 1]))
        if complete:
            lower = point = upper = self._solve("lower", m1, m2, gamma, tol, 0.0)
        elif point_only:
            if aligned:
                D1, D2 = real.dense(), twin.dense()
                c1 = SparseMDP.from_dense(*_complete(R1, D1, R2, D2))
                c2 = SparseMDP.from_dense(*_complete(R2, D2, R1, D1))
                lower = point = upper = self._solve("point", c1, c2, gamma, tol, 0.0)
            else:
                lower = point = upper = self._solve("lower", m1, m2, gamma, tol, 0.0)
        else:
            lower = self._solve("lower", m1, m2, gamma, tol, 0.0)
            upper = self._solve("upper", m1, m2, gamma, tol, upper_value)
            if aligned:
                D1, D2 = real.dense(), twin.dense()
                c1 = SparseMDP.from_dense(*_complete(R1, D1, R2, D2))
                c2 = SparseMDP.from_dense(*_complete(R2, D2, R1, D1))
                point = self._solve("point", c1, c2, gamma, tol, 0.0)
            else:
                point = lower

        def worst(d: np.ndarray) -> float:
            return float(d[pairs[:, 0], pairs[:, 1]].max()) if len(pairs) else 0.0

        fps = (lower,) if complete or point_only else (lower, upper, point)
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
    point_only: bool = False,
) -> DTBSMResult:
    """DT-BSM between a real MDP (R (S, A), P (S, A, S)) and a twin (R' (S', A), P' (S', A, S')).

    A row of P that is all zero marks a state-action with no data. `.d` is within `tol` (sup norm) of the exact
    fixed point; `.mismatch` = max over shared state labels of d(s, s) (labels default to the state indices, so
    with S = S' it is max_s d(s, s)); `.mismatch_lower` / `.mismatch_upper` bound it under missing data.
    """
    return DTBSMSolver().solve(
        R_real, P_real, R_twin, P_twin, gamma, tol,
        labels_real=labels_real, labels_twin=labels_twin, reward_range=reward_range, point_only=point_only,
    )  # fmt: skip
