"""Sliding-window empirical MDP: the last transitions of a stream, turned into the arrays the metric needs.

Estimates (Tao et al.):  P_hat(x|s,a) = N(s,a,x) / N(s,a),  R_hat(s,a) = mean observed reward.

Storage is the transitions themselves and nothing else: five numpy columns (s, a, s', r, t; 40 bytes a sample)
used as a queue. Eviction advances a head index; the live part is moved to the front when the buffer is full
(and the buffer shrinks when mostly empty), so memory follows the transitions held — at most about 4 x 40 bytes
per sample of the bound — however many distinct labels they carry. (Dense counts N(s,a,s') beside the queue
cost states x actions x states whatever the window held: 4,096 fresh action labels made one 128 MiB.)

Counts are taken when the metric needs them (:meth:`SlidingWindow.to_mdp`, :meth:`SlidingWindow.halves`), by
``np.bincount`` over the live columns: O(window + S * A * S) per evaluation — the dense output the metric
takes anyway — vectorised, and drift-free by construction (reward sums are recomputed from the rewards held,
so values that passed through the window leave no rounding behind).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["EmpiricalMDP", "SlidingWindow"]

_MIN_CAPACITY = 1024


class EmpiricalMDP:
    """Dense empirical MDP over ``S`` states and ``A`` actions (arrays are shared: treat them as read-only).

    ``R[s,a]``: mean reward (0 where unknown); ``P[s,a,:]``: next-state frequencies (sums to 1 where known,
    all 0 where unknown); ``N[s,a]``: sample counts; ``reward_min``/``reward_max``: range of the raw rewards
    (nan when there are no samples).

    One taken from a window holds the window's transitions and counts them into the dense arrays only when
    they are first read; pickled (to a worker process) it carries the transitions, not the arrays: 32 bytes a
    transition instead of 8 * S * A * S bytes (8 MiB at 256 states x 16 actions, per array).
    """

    def __init__(self, R: np.ndarray, P: np.ndarray, N: np.ndarray, samples: int, reward_min: float,
                 reward_max: float) -> None:  # fmt: skip
        self._R, self._P, self._N = R, P, N
        self._columns: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int] | None = None
        self.samples = samples
        self.reward_min = reward_min
        self.reward_max = reward_max

    @classmethod
    def _counted(cls, s: np.ndarray, a: np.ndarray, r: np.ndarray, sn: np.ndarray, n_states: int,
                 n_actions: int) -> EmpiricalMDP:  # fmt: skip
        """An MDP of these transitions (copied), counted on first use."""
        _check_bounds(s, a, sn, n_states, n_actions)
        mdp = cls.__new__(cls)
        mdp._R = mdp._P = mdp._N = None  # type: ignore[assignment]
        mdp._columns = (s.copy(), a.copy(), r.copy(), sn.copy(), n_states, n_actions)
        mdp.samples = int(r.size)
        mdp.reward_min = float(r.min()) if r.size else math.nan
        mdp.reward_max = float(r.max()) if r.size else math.nan
        return mdp

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._R is None:
            assert self._columns is not None
            self._R, self._P, self._N = _count(*self._columns)
        return self._R, self._P, self._N

    @property
    def R(self) -> np.ndarray:
        return self._arrays()[0]

    @property
    def P(self) -> np.ndarray:
        return self._arrays()[1]

    @property
    def N(self) -> np.ndarray:
        return self._arrays()[2]

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if self._columns is not None:  # the transitions travel; the worker counts them
            state["_R"] = state["_P"] = state["_N"] = None
        return state

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


def _first_not_older(t: np.ndarray, head: int, end: int, cutoff: float) -> int:
    """Index of the first sample from `head` on that is not older than `cutoff` (eviction is in arrival order)."""
    if head >= end or t[head] >= cutoff:
        return head
    older = np.flatnonzero(t[head:end] >= cutoff)
    return head + int(older[0]) if older.size else end


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
    def nbytes(self) -> int:
        """Memory held by the window: its columns (40 bytes a slot, at most ~4 slots per transition held)."""
        return sum(col.nbytes for col in (self._s, self._a, self._sn, self._r, self._t))

    @property
    def first_time(self) -> float | None:
        """Time of the oldest sample in the window (None if empty)."""
        return float(self._t[self._head]) if len(self) else None

    @property
    def last_time(self) -> float | None:
        """Time of the newest sample in the window (None if empty)."""
        return float(self._t[self._end - 1]) if len(self) else None

    def add(self, s: int, a: int, r: float, s_next: int, t: float) -> None:
        """Append one transition, then evict beyond ``max_count`` and older than ``max_seconds``."""
        if s < 0 or a < 0 or s_next < 0:
            raise ValueError("state and action indices must be >= 0")
        self._make_room(1)
        i = self._end
        self._s[i], self._a[i], self._sn[i], self._r[i], self._t[i] = s, a, s_next, r, t
        self._end = i + 1
        if t > self._now:
            self._now = t
        if self.max_seconds is not None or self._end - self._head > self.max_count:  # type: ignore[operator]
            self._evict()

    def extend(self, s: Sequence[int] | np.ndarray, a: Sequence[int] | np.ndarray, r: Sequence[float],
               s_next: Sequence[int] | np.ndarray, t: Sequence[float]) -> None:  # fmt: skip
        """Append transitions (column-wise, oldest first), then evict: the same result as adding one by one."""
        n = len(s)
        if n == 0:
            return
        ss, aa, nn = (np.asarray(col, dtype=np.int64) for col in (s, a, s_next))
        if min(int(ss.min()), int(aa.min()), int(nn.min())) < 0:
            raise ValueError("state and action indices must be >= 0")
        self._make_room(n)
        lo, hi = self._end, self._end + n
        self._s[lo:hi] = ss
        self._a[lo:hi] = aa
        self._sn[lo:hi] = nn
        self._r[lo:hi] = r
        self._t[lo:hi] = t
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
        """Dense MDP counted from the window, O(window + S * A * S); ``n_states``/``n_actions`` may exceed the
        indices held (the state space grows), never fall short of them (ValueError)."""
        live = slice(self._head, self._end)
        return _mdp_from_columns(self._s[live], self._a[live], self._r[live], self._sn[live], n_states, n_actions)

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

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the live (s, a, s_next, r, t) columns, oldest first (for state snapshots)."""
        live = slice(self._head, self._end)
        return tuple(col[live].copy() for col in (self._s, self._a, self._sn, self._r, self._t))  # type: ignore[return-value]

    @property
    def arrivals(self) -> int:
        """Arrival number of the oldest sample held (fixes each sample's half across a snapshot/restore)."""
        return self._base + self._head

    def mark_used(self, states: np.ndarray, actions: np.ndarray) -> None:
        """Set ``states[i]`` for every state index held (as s or s') and ``actions[j]`` for every action index."""
        live = slice(self._head, self._end)
        states[self._s[live]] = True
        states[self._sn[live]] = True
        actions[self._a[live]] = True

    def relabel(self, state_map: np.ndarray, action_map: np.ndarray) -> None:
        """Rewrite the indices held through old -> new maps (the cell's labels were renumbered); every index
        held must map to one >= 0 (ValueError otherwise, and nothing is changed)."""
        live = slice(self._head, self._end)
        s, sn, a = state_map[self._s[live]], state_map[self._sn[live]], action_map[self._a[live]]
        if s.size and min(int(s.min()), int(sn.min()), int(a.min())) < 0:
            raise ValueError("relabel would drop an index the window holds")
        self._s[live], self._sn[live], self._a[live] = s, sn, a

    def restore(self, s: np.ndarray, a: np.ndarray, s_next: np.ndarray, r: np.ndarray, t: np.ndarray,
                arrivals: int, now: float) -> None:  # fmt: skip
        """Replace the content with saved columns (see :meth:`columns`), then evict to the current bounds."""
        n = len(s)
        if not len(a) == len(s_next) == len(r) == len(t) == n:
            raise ValueError("columns of unequal length")
        if n and min(int(s.min()), int(a.min()), int(s_next.min())) < 0:
            raise ValueError("state and action indices must be >= 0")
        self._alloc_columns(max(_MIN_CAPACITY, 1 << (2 * n).bit_length()))
        for col, data in zip((self._s, self._a, self._sn, self._r, self._t), (s, a, s_next, r, t), strict=True):
            col[:n] = data
        self._head, self._end, self._base = 0, n, int(arrivals)
        self._now = max(float(now), float(t.max()) if n else -math.inf)
        self._evict()

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

    def _evict(self) -> None:
        head, end = self._head, self._end
        new_head = head
        if self.max_count is not None and end - new_head > self.max_count:
            new_head = end - self.max_count
        if self.max_seconds is not None:
            new_head = _first_not_older(self._t, new_head, end, self._now - self.max_seconds)
        if new_head > head:
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
    """The MDP of these transitions (bounds checked now, counted on first use)."""
    return EmpiricalMDP._counted(s, a, r, sn, n_states, n_actions)


def _count(
    s: np.ndarray, a: np.ndarray, r: np.ndarray, sn: np.ndarray, n_states: int, n_actions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R, P, N by bincount from raw columns (vectorised, and drift-free since it sums from scratch)."""
    S, A = n_states, n_actions
    sa = s * A + a
    N = np.bincount(sa, minlength=S * A).reshape(S, A).astype(np.int64)
    sums = np.bincount(sa, weights=r, minlength=S * A).reshape(S, A)
    P = np.bincount(sa * S + sn, minlength=S * A * S).reshape(S, A, S).astype(np.float64)
    known = N > 0
    R = np.divide(sums, N, out=np.zeros((S, A)), where=known)
    np.divide(P, N[:, :, None], out=P, where=known[:, :, None])
    return R, P, N
