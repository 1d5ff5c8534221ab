"""Turn contract labels and vectors into the contiguous integer indices the empirical MDPs are built on.

A cell's real stream and all of its twins share one :class:`CellEncoding`, so state index ``i`` names the
same label in every MDP of that cell and the DT-BSM diagonal ``d(s, s)`` compares like with like.

Labels that no window holds any more are freed (:meth:`CellEncoding.free`, driven by the cell's monitor), so
the caps bound the labels live now, not every label ever seen. Freeing renumbers the survivors densely, in
their first-seen order, and returns the old -> new maps the windows are rewritten with in the same step.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Hashable, Sequence

import numpy as np

from dtsync.contract import State, Transition
from dtsync.episodes import TERMINAL

__all__ = ["ENCODING_REASONS", "CapacityError", "CellEncoding", "EncodingError", "Indexer", "StateEncoder"]

ENCODING_REASONS: tuple[str, ...] = ("no_encoder", "wrong_dimension")


class EncodingError(ValueError):
    """A state could not be encoded; ``reason`` is one of ENCODING_REASONS (usable as a metric label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CapacityError(RuntimeError):
    """An Indexer is full: refusing a new label bounds memory under a flood of distinct labels."""


class Indexer:
    """Map hashable labels to 0..n-1 in first-seen order; only :meth:`compact` renumbers them."""

    def __init__(self, max_size: int | None = None) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._ids: dict[Hashable, int] = {}
        self.labels: list[Hashable] = []

    def index(self, label: Hashable) -> int:
        """Index of ``label``, adding it if new; raises CapacityError when a new label does not fit."""
        i = self._ids.get(label)
        if i is None:
            i = len(self.labels)
            if self.max_size is not None and i >= self.max_size:
                raise CapacityError(f"indexer full ({self.max_size} labels); refusing {label!r}")
            self._ids[label] = i
            self.labels.append(label)
        return i

    def restore(self, labels: Sequence[Hashable]) -> None:
        """Start over with `labels` as indices 0..n-1 (a state snapshot); ValueError if they do not fit."""
        if self.max_size is not None and len(labels) > self.max_size:
            raise ValueError(f"{len(labels)} labels do not fit in {self.max_size}")
        ids = {label: i for i, label in enumerate(labels)}
        if len(ids) != len(labels):
            raise ValueError("repeated labels")
        self._ids, self.labels = ids, list(labels)

    def compact(self, keep: np.ndarray) -> np.ndarray:
        """Drop the labels whose `keep` entry is False and renumber the rest 0..k-1 in their order; returns the
        old -> new index map (-1 for a dropped label), to rewrite every index held elsewhere."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self.labels),):
            raise ValueError(f"keep has {keep.size} entries for {len(self.labels)} labels")
        mapping = np.where(keep, np.cumsum(keep) - 1, -1)
        self.labels = [label for label, k in zip(self.labels, keep.tolist(), strict=True) if k]
        self._ids = {label: i for i, label in enumerate(self.labels)}
        return mapping

    def get(self, label: Hashable) -> int | None:
        """Index of ``label`` or None, without adding it."""
        return self._ids.get(label)

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self._ids


class StateEncoder:
    """Map a contract STATE to a hashable discrete label.

    Integers and strings pass through unchanged (so ``3`` and ``"3"`` stay distinct labels). A vector is
    discretised feature by feature: component ``x_j`` gets bin ``numpy.searchsorted(bins[j], x_j,
    side="right")``, i.e. the number of edges ``<= x_j``; a value equal to an edge falls in the bin above it.
    With ``k`` edges a feature has ``k + 1`` bins, ``0..k``. The label is the tuple of bin indices.
    """

    def __init__(self, bins: Sequence[Sequence[float]] | None = None) -> None:
        if bins is not None:
            for j, edges in enumerate(bins):
                if not all(math.isfinite(e) for e in edges) or any(
                    not lo < hi for lo, hi in zip(edges, edges[1:], strict=False)
                ):
                    raise ValueError(f"bin edges of feature {j} must be finite and strictly increasing")
        self.bins: list[list[float]] | None = None if bins is None else [list(map(float, e)) for e in bins]

    def encode(self, state: State) -> Hashable:
        """Discrete label for ``state``; raises EncodingError for a vector this encoder cannot bin."""
        if not isinstance(state, tuple):
            return state
        if self.bins is None:
            raise EncodingError("no_encoder", "vector state but no bins configured")
        if len(state) != len(self.bins):
            raise EncodingError("wrong_dimension", f"got {len(state)} features, bins for {len(self.bins)}")
        # bisect_right == searchsorted(side="right"), and faster than numpy for a handful of features.
        return tuple(bisect_right(edges, x) for edges, x in zip(self.bins, state, strict=True))


class CellEncoding:
    """State/action indexers of one cell, shared by its real stream and all of its twins."""

    def __init__(
        self,
        state_encoder: StateEncoder | None = None,
        *,
        max_states: int | None = None,
        max_actions: int | None = None,
    ) -> None:
        self.state_encoder = state_encoder if state_encoder is not None else StateEncoder()
        self.states = Indexer(max_states)
        self.actions = Indexer(max_actions)

    def free(self, used_states: np.ndarray, used_actions: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Forget the labels not marked used (one bool per index): the (state, action) old -> new index maps,
        or None if every label is used (nothing changes). Whoever holds indices must apply the maps at once."""
        if bool(used_states.all()) and bool(used_actions.all()):
            return None
        return self.states.compact(used_states), self.actions.compact(used_actions)

    def encode(self, tr: Transition) -> tuple[int, int, int]:
        """(s, a, s_next) indices; new labels are added, so the state space grows while running.

        Both states are discretised before anything is indexed, so an EncodingError registers nothing. A
        CapacityError may leave ``s`` or ``a`` registered (harmless: indices stay consistent). The next state of a
        ``done`` transition is the cell's absorbing state (dtsync.episodes), after its own label was checked.
        """
        encode = self.state_encoder.encode
        s_label, sn_label = encode(tr.s), encode(tr.s_next)
        if tr.done:
            sn_label = TERMINAL
        return self.states.index(s_label), self.actions.index(tr.a), self.states.index(sn_label)

    def encode_many(
        self, transitions: Sequence[Transition]
    ) -> tuple[list[int], list[int], list[int], list[int], list[tuple[int, str]]]:
        """Encode a batch: (s, a, s_next, positions kept, [(position, reason)] rejected).

        Known discrete labels take a dictionary look-up each; anything else (a vector, a new label, a full
        indexer) goes through :meth:`encode`, so the result is the same as encoding one by one.
        """
        state_ids, action_ids = self.states._ids, self.actions._ids
        if self.state_encoder.bins is None:  # labels only: a look-up each, in C-level loops
            ss_ = [state_ids.get(tr.s) for tr in transitions]
            aa_ = [action_ids.get(tr.a) for tr in transitions]
            nn_ = [state_ids.get(TERMINAL if tr.done else tr.s_next) for tr in transitions]
            if None not in ss_ and None not in aa_ and None not in nn_:
                return ss_, aa_, nn_, list(range(len(transitions))), []  # type: ignore[return-value]
        ss: list[int] = []
        aa: list[int] = []
        nn: list[int] = []
        kept: list[int] = []
        rejected: list[tuple[int, str]] = []
        for i, tr in enumerate(transitions):
            s, a, sn = state_ids.get(tr.s), action_ids.get(tr.a), state_ids.get(TERMINAL if tr.done else tr.s_next)
            if s is None or a is None or sn is None or type(tr.s) is tuple or type(tr.s_next) is tuple:
                try:
                    s, a, sn = self.encode(tr)
                except EncodingError as e:
                    rejected.append((i, e.reason))
                    continue
                except CapacityError:
                    rejected.append((i, "too_many_labels"))
                    continue
            ss.append(s)
            aa.append(a)
            nn.append(sn)
            kept.append(i)
        return ss, aa, nn, kept, rejected
