"""Sliding-window empirical MDP: the last transitions of a stream, kept as counts ready for the metric.

Estimates (Tao et al., theory.md):  P_hat(x|s,a) = N(s,a,x) / N(s,a),  R_hat(s,a) = mean observed reward.

Storage: the window itself lives in five typed columns (``array.array``, 40 bytes a sample) used as a
queue: eviction advances a head index and the dead prefix is dropped once it is at least half of the buffer,
so add/evict are O(1) amortised (measured ~51 bytes a sample including slack and counts, against ~88 for a
bare deque of tuples). Beside it, sparse counts N(s,a,s') (zero entries deleted) and per-(s,a) count and
reward sum are updated on every add/evict, so :meth:`SlidingWindow.to_mdp` does no Python work per sample.

Reward sums use Neumaier-compensated addition and subtraction and are reset to exactly 0 whenever an (s,a)
pair leaves the window, so long add/evict sequences do not accumulate drift (observed error ~1e-15
relative; tests require 1e-9 against a fresh recount). :meth:`SlidingWindow.halves` recounts from the
raw columns with ``np.bincount`` instead: vectorised, and drift-free by construction.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["EmpiricalMDP", "SlidingWindow"]

_COMPACT_MIN = 1024  # do not bother compacting tiny dead prefixes


@dataclass(frozen=True, eq=False)
class EmpiricalMDP:
    """Dense empirical MDP over ``S`` states and ``A`` actions (arrays are shared: treat them as read-only).

    ``R[s,a]``: mean reward (0 where unknown); ``P[s,a,:]``: next-state frequencies (sums to 1 where known,
    all 0 where unknown); ``N[s,a]``: sample counts; ``reward_min``/``reward_max``: range of the raw rewards
    (nan when there are no samples).
    """

    R: np.ndarray
    P: np.ndarray
    N: np.ndarray
    samples: int
    reward_min: float
    reward_max: float

    @property
    def known(self) -> np.ndarray:
        """(S, A) mask of the pairs observed at least once."""
        return self.N > 0

    @classmethod
    def from_transitions(
        cls, transitions: Iterable[tuple[int, int, float, int]], n_states: int, n_actions: int
    ) -> EmpiricalMDP:
        """Build directly from (s, a, r, s_next) tuples: the reference the window's counts must match."""
        rows = list(transitions)
        s, a, r, sn = (list(col) for col in zip(*rows, strict=True)) if rows else ([], [], [], [])
        return _mdp_from_columns(
            np.asarray(s, dtype=np.int64),
            np.asarray(a, dtype=np.int64),
            np.asarray(r, dtype=np.float64),
            np.asarray(sn, dtype=np.int64),
            n_states,
            n_actions,
        )


class SlidingWindow:
    """The most recent transitions of one stream, bounded by count, by age, or both.

    Eviction is in arrival order. Age is measured against the newest time seen so far (a late, out-of-order
    sample never moves the clock back): a sample is evicted once its ``t < newest - max_seconds``, so a
    sample exactly ``max_seconds`` old is kept. A straggler older than that is evicted when it reaches the
    head of the queue.
    """

    def __init__(self, max_count: int | None = None, max_seconds: float | None = None) -> None:
        if max_count is None and max_seconds is None:
            raise ValueError("give max_count, max_seconds or both")
        if max_count is not None and max_count < 1:
            raise ValueError("max_count must be >= 1")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError("max_seconds must be > 0")
        self.max_count = max_count
        self.max_seconds = max_seconds
        self._s = array("q")
        self._a = array("q")
        self._sn = array("q")
        self._r = array("d")
        self._t = array("d")
        self._head = 0  # buffer index of the oldest live sample
        self._base = 0  # arrival number of buffer index 0 (fixes each sample's half, see halves())
        self._now = -math.inf
        self._sas: dict[tuple[int, int, int], int] = {}
        # (s, a) -> [count, reward sum, Neumaier compensation]
        self._sa: dict[tuple[int, int], list[float]] = {}

    def __len__(self) -> int:
        return len(self._s) - self._head

    def __iter__(self) -> Iterator[tuple[int, int, float, int, float]]:
        """(s, a, r, s_next, t) of the samples in the window, oldest first."""
        for i in range(self._head, len(self._s)):
            yield self._s[i], self._a[i], self._r[i], self._sn[i], self._t[i]

    @property
    def first_time(self) -> float | None:
        """Time of the oldest sample in the window (None if empty)."""
        return self._t[self._head] if len(self) else None

    @property
    def last_time(self) -> float | None:
        """Time of the newest sample in the window (None if empty)."""
        return self._t[-1] if len(self) else None

    def add(self, s: int, a: int, r: float, s_next: int, t: float) -> None:
        """Append one transition, then evict beyond ``max_count`` and older than ``max_seconds``."""
        self._s.append(s)
        self._a.append(a)
        self._sn.append(s_next)
        self._r.append(r)
        self._t.append(t)
        if t > self._now:
            self._now = t
        key = (s, a, s_next)
        self._sas[key] = self._sas.get(key, 0) + 1
        rec = self._sa.get((s, a))
        if rec is None:
            self._sa[(s, a)] = [1, r, 0.0]
        else:
            rec[0] += 1
            _neumaier_add(rec, r)
        self._evict()

    def advance(self, now: float) -> None:
        """Move the clock to ``now`` (if later) and evict by age without adding: keeps a quiet stream's
        window honest about how old its data is."""
        if now > self._now:
            self._now = now
        self._evict()

    def resize(self, max_count: int | None, max_seconds: float | None) -> None:
        """Change the bounds in place (config reload) and evict what no longer fits; the rest is kept."""
        if max_count is None and max_seconds is None:
            raise ValueError("give max_count, max_seconds or both")
        self.max_count = max_count
        self.max_seconds = max_seconds
        self._evict()

    def to_mdp(self, n_states: int, n_actions: int) -> EmpiricalMDP:
        """Dense MDP from the sparse counts: O(distinct (s,a,s')) numpy scatter plus an O(window) C-level
        min/max of the rewards. ``n_states``/``n_actions`` may exceed the indices seen (state space grows)."""
        R = np.zeros((n_states, n_actions))
        P = np.zeros((n_states, n_actions, n_states))
        N = np.zeros((n_states, n_actions), dtype=np.int64)
        if not self._sas:
            return EmpiricalMDP(R, P, N, 0, math.nan, math.nan)
        keys = np.array(list(self._sas), dtype=np.int64)
        counts = np.fromiter(self._sas.values(), dtype=np.int64, count=len(self._sas))
        s, a, sn = keys[:, 0], keys[:, 1], keys[:, 2]
        _check_bounds(s, a, sn, n_states, n_actions)
        recs = list(self._sa.values())
        sa = np.array(list(self._sa), dtype=np.int64)
        n_sa = np.fromiter((rec[0] for rec in recs), dtype=np.int64, count=len(recs))
        sums = np.fromiter((rec[1] + rec[2] for rec in recs), dtype=np.float64, count=len(recs))
        N[sa[:, 0], sa[:, 1]] = n_sa
        R[sa[:, 0], sa[:, 1]] = sums / n_sa
        P[s, a, sn] = counts / N[s, a]
        rewards = self._live(self._r)
        return EmpiricalMDP(R, P, N, len(self), float(rewards.min()), float(rewards.max()))

    def halves(self, n_states: int, n_actions: int) -> tuple[EmpiricalMDP, EmpiricalMDP]:
        """Two MDPs from the even- and odd-numbered samples (by arrival number) of the window.

        The halves are disjoint, cover the window and, being interleaved, span the same time, so their
        distance estimates the metric's sampling noise floor. Parity is by arrival number, not by position
        in the window, so a sample stays in the same half as the window slides.
        """
        s, a, r, sn = (self._live(col) for col in (self._s, self._a, self._r, self._sn))
        start = (self._base + self._head) % 2  # offset of the first even-numbered sample
        even = slice(start, None, 2)
        odd = slice(1 - start, None, 2)
        return (
            _mdp_from_columns(s[even], a[even], r[even], sn[even], n_states, n_actions),
            _mdp_from_columns(s[odd], a[odd], r[odd], sn[odd], n_states, n_actions),
        )

    def _live(self, col: array) -> np.ndarray:
        """Copy of the live part of a column. A copy, not a view: while a numpy view exports the buffer
        the array.array cannot grow, and add() would fail."""
        return np.frombuffer(col, dtype=col.typecode)[self._head :].copy()

    def _evict(self) -> None:
        head, end = self._head, len(self._s)
        if self.max_count is not None and end - head > self.max_count:
            for i in range(head, end - self.max_count):
                self._forget(i)
            head = end - self.max_count
        if self.max_seconds is not None:
            cutoff = self._now - self.max_seconds
            t = self._t
            while head < end and t[head] < cutoff:
                self._forget(head)
                head += 1
        self._head = head
        if head == end or (head >= _COMPACT_MIN and 2 * head >= end):
            for col in (self._s, self._a, self._sn, self._r, self._t):
                del col[:head]
            self._base += head
            self._head = 0

    def _forget(self, i: int) -> None:
        """Remove sample at buffer index ``i`` from the counts."""
        s, a = self._s[i], self._a[i]
        key = (s, a, self._sn[i])
        c = self._sas[key] - 1
        if c:
            self._sas[key] = c
        else:
            del self._sas[key]
        rec = self._sa[(s, a)]
        if rec[0] == 1:
            del self._sa[(s, a)]  # exact reset: no drift survives an (s, a) leaving the window
        else:
            rec[0] -= 1
            _neumaier_add(rec, -self._r[i])


def _neumaier_add(rec: list[float], x: float) -> None:
    """rec[1] += x with the rounding error accumulated in rec[2] (Neumaier's variant of Kahan summation)."""
    total = rec[1] + x
    if abs(rec[1]) >= abs(x):
        rec[2] += (rec[1] - total) + x
    else:
        rec[2] += (x - total) + rec[1]
    rec[1] = total


def _check_bounds(s: np.ndarray, a: np.ndarray, sn: np.ndarray, n_states: int, n_actions: int) -> None:
    if s.size and (
        min(s.min(), a.min(), sn.min()) < 0 or max(s.max(), sn.max()) >= n_states or a.max() >= n_actions
    ):
        raise ValueError(f"indices outside {n_states} states x {n_actions} actions")


def _mdp_from_columns(
    s: np.ndarray, a: np.ndarray, r: np.ndarray, sn: np.ndarray, n_states: int, n_actions: int
) -> EmpiricalMDP:
    """Recount from raw columns with bincount (vectorised, and drift-free since it sums from scratch)."""
    _check_bounds(s, a, sn, n_states, n_actions)
    S, A = n_states, n_actions
    sa = s * A + a
    N = np.bincount(sa, minlength=S * A).reshape(S, A).astype(np.int64)
    sums = np.bincount(sa, weights=r, minlength=S * A).reshape(S, A)
    P = np.bincount(sa * S + sn, minlength=S * A * S).reshape(S, A, S).astype(np.float64)
    known = N > 0
    R = np.divide(sums, N, out=np.zeros((S, A)), where=known)
    np.divide(P, N[:, :, None], out=P, where=known[:, :, None])
    if r.size == 0:
        return EmpiricalMDP(R, P, N, 0, math.nan, math.nan)
    return EmpiricalMDP(R, P, N, int(r.size), float(r.min()), float(r.max()))
