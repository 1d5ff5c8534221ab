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
        K = max(1, int((P > 0).sum(axis=-1).max(initial=0)))
        idx, mass, n = sparse_rows(np.ascontiguousarray(P, dtype=np.float64), K)
        return cls(np.ascontiguousarray(R, dtype=np.float64), idx, mass, n)

    @property
    def known(self) -> np.ndarray:
        return self.n > 0


@njit(cache=True, nogil=True)
def sparse_rows(P, K):
    """Supports of the rows of P (S, A, S'): indices and masses padded to K, and support sizes (0 = unknown)."""
    S, A, S2 = P.shape
    idx = np.zeros((S, A, K), np.int64)
    mass = np.zeros((S, A, K), np.float64)
    n = np.zeros((S, A), np.int64)
    for s in range(S):
        for a in range(A):
            m = 0
            for x in range(S2):
                if P[s, a, x] > 0.0:
                    idx[s, a, m] = x
                    mass[s, a, m] = P[s, a, x]
                    m += 1
            n[s, a] = m
    return idx, mass, n
