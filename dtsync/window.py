"""Sliding-window empirical MDP: the last transitions of a stream, kept as counts ready for the metric.

Estimates (Tao et al., theory.md):  P_hat(x|s,a) = N(s,a,x) / N(s,a),  R_hat(s,a) = mean observed reward.

Storage: the window lives in five numpy columns (s, a, s', r, t; 40 bytes a sample) used as a queue: eviction
advances a head index; the live part is moved to the front when the buffer is full (and the buffer shrinks when
mostly empty), so memory stays proportional to the window. Beside it, dense counts N(s,a,s'), N(s,a) and reward
sums, grown as the state space grows (the size of the empirical model the metric needs anyway). Adding or evicting
a transition is an O(1) update of those counts, done by a compiled loop, so a batch of a thousand transitions costs
one call rather than a thousand Python steps.

Reward sums use Neumaier-compensated addition and subtraction and are reset to exactly 0 whenever an (s,a) pair
leaves the window, so long add/evict sequences do not accumulate drift (tests require 1e-9 against a fresh
recount, and 1e-12 after 1e12-sized rewards passed through). :meth:`SlidingWindow.halves` recounts from the
columns with ``np.bincount`` instead: vectorised, and drift-free by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["EmpiricalMDP", "SlidingWindow"]

_MIN_CAPACITY = 1024


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


@njit(cache=True, nogil=True)
def _count(s, a, sn, r, lo, hi, sign, n_sas, n_sa, rsum, rcomp):  # type: ignore[no-untyped-def]
    """Add (sign=+1) or remove (sign=-1) samples lo..hi-1 of the columns from the counts.

    Reward sums are Neumaier-compensated; an (s, a) whose count reaches 0 is reset to exactly 0.
    """
    for i in range(lo, hi):
        si = s[i]
        ai = a[i]
        n_sas[si, ai, sn[i]] += sign
        n = n_sa[si, ai] + sign
        n_sa[si, ai] = n
        if n == 0:
            rsum[si, ai] = 0.0
            rcomp[si, ai] = 0.0
        else:
            x = sign * r[i]
            old = rsum[si, ai]
            total = old + x
            if abs(old) >= abs(x):
                rcomp[si, ai] += (old - total) + x
            else:
                rcomp[si, ai] += (x - total) + old
            rsum[si, ai] = total


@njit(cache=True, nogil=True)
def _first_not_older(t, head, end, cutoff):  # type: ignore[no-untyped-def]
    """Index of the first sample from `head` on that is not older than `cutoff` (eviction is in arrival order)."""
    while head < end and t[head] < cutoff:
        head += 1
    return head


class SlidingWindow:
    """The most recent transitions of one stream, bounded by count, by age, or both.

    Eviction is in arrival order. Age is measured against the newest time seen so far (a late, out-of-order
    sample never moves the clock back): a sample is evicted once its ``t < newest - max_seconds``, so a
    sample exactly ``max_seconds`` old is kept. A straggler older than that is evicted when it reaches the
    head of the queue. Adding a batch with :meth:`extend` leaves the same window as adding it one by one.
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
        self._alloc_columns(_MIN_CAPACITY)
        self._head = 0  # buffer index of the oldest live sample
        self._end = 0  # buffer index after the newest
        self._base = 0  # arrival number of buffer index 0 (fixes each sample's half, see halves())
        self._now = -math.inf
        self._n_sas = np.zeros((0, 0, 0), dtype=np.int64)
        self._n_sa = np.zeros((0, 0), dtype=np.int64)
        self._rsum = np.zeros((0, 0))
        self._rcomp = np.zeros((0, 0))

    def _alloc_columns(self, capacity: int) -> None:
        self._s = np.empty(capacity, dtype=np.int64)
        self._a = np.empty(capacity, dtype=np.int64)
        self._sn = np.empty(capacity, dtype=np.int64)
        self._r = np.empty(capacity, dtype=np.float64)
        self._t = np.empty(capacity, dtype=np.float64)

    def __len__(self) -> int:
        return self._end - self._head

    def __iter__(self) -> Iterator[tuple[int, int, float, int, float]]:
        """(s, a, r, s_next, t) of the samples in the window, oldest first."""
        for i in range(self._head, self._end):
            yield int(self._s[i]), int(self._a[i]), float(self._r[i]), int(self._sn[i]), float(self._t[i])

    @property
    def first_time(self) -> float | None:
        """Time of the oldest sample in the window (None if empty)."""
        return float(self._t[self._head]) if len(self) else None

    @property
    def last_time(self) -> float | None:
        """Time of the newest sample in the window (None if empty)."""
        return float(self._t[self._end - 1]) if len(self) else None

    def add(self, s: int, a: int, r: float, s_next: int, t: float) -> None:
        """Append one transition, then evict beyond ``max_count`` and older than ``max_seconds``.

        The same update as :meth:`extend` on one item, in plain Python: for a single transition that is
        several times cheaper than handing arrays to the compiled loop.
        """
        if s < 0 or a < 0 or s_next < 0:
            raise ValueError("state and action indices must be >= 0")
        self._make_room(1)
        i = self._end
        self._s[i], self._a[i], self._sn[i], self._r[i], self._t[i] = s, a, s_next, r, t
        self._grow_model(max(s, s_next) + 1, a + 1)
        self._n_sas[s, a, s_next] += 1
        n = int(self._n_sa[s, a]) + 1
        self._n_sa[s, a] = n
        old = float(self._rsum[s, a])
        total = old + r
        if abs(old) >= abs(r):
            self._rcomp[s, a] += (old - total) + r
        else:
            self._rcomp[s, a] += (r - total) + old
        self._rsum[s, a] = total
        self._end = i + 1
        if t > self._now:
            self._now = t
        if self.max_seconds is not None or self._end - self._head > self.max_count:  # type: ignore[operator]
            self._evict()

    def extend(
        self, s: Sequence[int], a: Sequence[int], r: Sequence[float], s_next: Sequence[int], t: Sequence[float]
    ) -> None:
        """Append transitions (column-wise, oldest first), then evict: the same result as adding one by one."""
        n = len(s)
        if n == 0:
            return
        if min(min(s), min(a), min(s_next)) < 0:
            raise ValueError("state and action indices must be >= 0")
        self._make_room(n)
        lo, hi = self._end, self._end + n
        self._s[lo:hi] = s
        self._a[lo:hi] = a
        self._sn[lo:hi] = s_next
        self._r[lo:hi] = r
        self._t[lo:hi] = t
        self._grow_model(max(max(s), max(s_next)) + 1, max(a) + 1)
        _count(self._s, self._a, self._sn, self._r, lo, hi, 1, self._n_sas, self._n_sa, self._rsum, self._rcomp)
        self._end = hi
        newest = float(self._t[lo:hi].max())
        if newest > self._now:
            self._now = newest
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
        """Dense MDP from the counts, O(S * A * S); ``n_states``/``n_actions`` may exceed the indices seen
        (the state space grows), never fall short of them (ValueError)."""
        S, A = n_states, n_actions
        n_sa = self._n_sa
        if n_sa[S:].any() or n_sa[:, A:].any():
            raise ValueError(f"indices outside {n_states} states x {n_actions} actions")
        s_cap, a_cap = min(S, n_sa.shape[0]), min(A, n_sa.shape[1])
        N = np.zeros((S, A), dtype=np.int64)
        N[:s_cap, :a_cap] = n_sa[:s_cap, :a_cap]
        if self._n_sas[:s_cap, :a_cap, S:].any():
            raise ValueError(f"indices outside {n_states} states x {n_actions} actions")
        known = N > 0
        sums = np.zeros((S, A))
        sums[:s_cap, :a_cap] = self._rsum[:s_cap, :a_cap] + self._rcomp[:s_cap, :a_cap]
        R = np.divide(sums, N, out=np.zeros((S, A)), where=known)
        P = np.zeros((S, A, S))
        P[:s_cap, :a_cap, :s_cap] = self._n_sas[:s_cap, :a_cap, :s_cap]
        np.divide(P, N[:, :, None], out=P, where=known[:, :, None])
        if not len(self):
            return EmpiricalMDP(R, P, N, 0, math.nan, math.nan)
        rewards = self._r[self._head : self._end]
        return EmpiricalMDP(R, P, N, len(self), float(rewards.min()), float(rewards.max()))

    def halves(self, n_states: int, n_actions: int) -> tuple[EmpiricalMDP, EmpiricalMDP]:
        """Two MDPs from the even- and odd-numbered samples (by arrival number) of the window.

        The halves are disjoint, cover the window and, being interleaved, span the same time, so their
        distance estimates the metric's sampling noise floor. Parity is by arrival number, not by position
        in the window, so a sample stays in the same half as the window slides.
        """
        live = slice(self._head, self._end)
        s, a, r, sn = self._s[live], self._a[live], self._r[live], self._sn[live]
        start = (self._base + self._head) % 2  # offset of the first even-numbered sample
        even = slice(start, None, 2)
        odd = slice(1 - start, None, 2)
        return (
            _mdp_from_columns(s[even], a[even], r[even], sn[even], n_states, n_actions),
            _mdp_from_columns(s[odd], a[odd], r[odd], sn[odd], n_states, n_actions),
        )

    def reward_variance(self, n_states: int, n_actions: int) -> np.ndarray:
        """(S, A) population variance of the rewards of each state-action in the window (0 where unseen): what
        the permutation test and the bootstrap need beside the means. Recounted from the columns, like halves()."""
        live = slice(self._head, self._end)
        s, a, r = self._s[live], self._a[live], self._r[live]
        sa = s * n_actions + a
        size = n_states * n_actions
        n = np.bincount(sa, minlength=size)
        mean = np.divide(np.bincount(sa, weights=r, minlength=size), n, out=np.zeros(size), where=n > 0)
        dev = r - mean[sa]  # two-pass: no cancellation for large rewards
        var = np.divide(np.bincount(sa, weights=dev * dev, minlength=size), n, out=np.zeros(size), where=n > 0)
        return var.reshape(n_states, n_actions)

    def _make_room(self, n: int) -> None:
        """Ensure n free slots after the end: move the live part to the front, growing or shrinking the buffer
        so that it stays within a small factor of the window."""
        capacity = len(self._s)
        if self._end + n <= capacity:
            return
        live = len(self)
        new_capacity = max(_MIN_CAPACITY, 1 << (2 * (live + n) - 1).bit_length())
        columns = [col[self._head : self._end].copy() for col in (self._s, self._a, self._sn, self._r, self._t)]
        if new_capacity != capacity:
            self._alloc_columns(new_capacity)
        for col, data in zip((self._s, self._a, self._sn, self._r, self._t), columns, strict=True):
            col[:live] = data
        self._base += self._head
        self._head, self._end = 0, live

    def _grow_model(self, n_states: int, n_actions: int) -> None:
        """Grow the dense counts (doubling) to cover state index n_states - 1 and action n_actions - 1."""
        s_cap, a_cap = self._n_sa.shape
        if n_states <= s_cap and n_actions <= a_cap:
            return
        S = max(s_cap, 1 << (n_states - 1).bit_length()) if n_states > s_cap else s_cap
        A = max(a_cap, 1 << (n_actions - 1).bit_length()) if n_actions > a_cap else a_cap
        n_sas = np.zeros((S, A, S), dtype=np.int64)
        n_sas[:s_cap, :a_cap, :s_cap] = self._n_sas
        self._n_sas = n_sas
        for name in ("_n_sa", "_rsum", "_rcomp"):
            old = getattr(self, name)
            new = np.zeros((S, A), dtype=old.dtype)
            new[:s_cap, :a_cap] = old
            setattr(self, name, new)

    def _evict(self) -> None:
        head, end = self._head, self._end
        new_head = head
        if self.max_count is not None and end - new_head > self.max_count:
            new_head = end - self.max_count
        if self.max_seconds is not None:
            new_head = _first_not_older(self._t, new_head, end, self._now - self.max_seconds)
        if new_head > head:
            _count(self._s, self._a, self._sn, self._r, head, new_head, -1,
                   self._n_sas, self._n_sa, self._rsum, self._rcomp)  # fmt: skip
            self._head = new_head
        if self._head == self._end:
            self._base += self._head
            self._head = self._end = 0


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
