"""An MDP in the form the kernels read: rewards and, per state-action, its next-state support."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit


class SparseMDP(NamedTuple):
    """Rewards and next-state supports of an MDP (a NamedTuple, so compiled kernels take it as it is)."""

    R: np.ndarray  # (S, A)
    idx: np.ndarray  # (S, A, K) next-state indices, padded with 0
    mass: np.ndarray  # (S, A, K) probabilities, padded with 0
    n: np.ndarray  # (S, A) support sizes; 0 = unknown state-action

    @classmethod
    def from_dense(cls, R: np.ndarray, P: np.ndarray) -> SparseMDP:
        """From P (S, A, S') whose rows sum to 1 or are all zero (unknown)."""
        P = np.ascontiguousarray(P, dtype=np.float64)
        sums, n, _finite, _nonneg = row_summary(P)
        return cls.from_rows(R, P, sums, n)

    @classmethod
    def from_rows(cls, R: np.ndarray, P: np.ndarray, sums: np.ndarray, n: np.ndarray) -> SparseMDP:
        """From P (S, A, S') and its `row_summary`: each known row is divided by its sum."""
        K = max(1, int(n.max(initial=0)))
        idx, mass, n = sparse_rows(P, sums, K)
        return cls(np.ascontiguousarray(R, dtype=np.float64), idx, mass, n)

    @property
    def known(self) -> np.ndarray:
        return self.n > 0


@njit(cache=True, nogil=True)
def row_summary(P):
    """One pass over P (S, A, S'): row sums, support sizes (entries > 0), and whether every entry is finite and
    whether every one is >= 0. (Validation and conversion used to take ten numpy passes over the dense P, about
    a tenth of a warm refresh at S=256, A=16.)"""
    S, A, S2 = P.shape
    sums = np.zeros((S, A))
    n = np.zeros((S, A), np.int64)
    finite = True
    nonneg = True
    for s in range(S):
        for a in range(A):
            acc = 0.0
            m = 0
            for x in range(S2):
                v = P[s, a, x]
                if not np.isfinite(v):
                    finite = False
                elif v < 0.0:
                    nonneg = False
                elif v > 0.0:
                    m += 1
                acc += v
            sums[s, a] = acc
            n[s, a] = m
    return sums, n, finite, nonneg


@njit(cache=True, nogil=True)
def sparse_rows(P, sums, K):
    """Supports of the rows of P (S, A, S'), each divided by its sum: indices and masses padded to K, and
    support sizes (0 = unknown)."""
    S, A, S2 = P.shape
    idx = np.zeros((S, A, K), np.int64)
    mass = np.zeros((S, A, K), np.float64)
    n = np.zeros((S, A), np.int64)
    for s in range(S):
        for a in range(A):
            m = 0
            total = sums[s, a]
            for x in range(S2):
                if P[s, a, x] > 0.0:
                    idx[s, a, m] = x
                    mass[s, a, m] = P[s, a, x] / total
                    m += 1
            n[s, a] = m
    return idx, mass, n
