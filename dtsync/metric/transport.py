"""Exact optimal transport between two small discrete distributions: the transportation simplex (MODI method).

    W1(p, q; C) = min { <pi, C> : pi >= 0, pi 1 = p, pi^T 1 = q },   p (k), q (k'), C (k x k')

A basic solution is a spanning tree of k + k' - 1 cells of the bipartite graph rows x columns; its flows follow
from the marginals and its dual potentials (u_i + v_j = C_ij on the tree) from the costs, each in one pass along
the tree. A non-basic cell with negative reduced cost C_ij - u_i - v_j enters; the cycle it closes with the tree
carries flow until the first cell on it empties, which leaves (Dantzig, "Linear Programming and Extensions",
1963, ch. 15; Ahuja, Magnanti, Orlin, "Network Flows", 1993, ch. 11). Entering cells follow Dantzig's rule, then
Bland's rule (first negative cell) after `BLAND_AFTER` pivots, which cannot cycle. At the optimum every reduced
cost is >= 0; the smallest off-tree one (`slack`) says how far the costs may move before the basis can stop
being optimal. If the pivot limit is reached first, the feasible potentials v_j = min_i (C_ij - u_i) give the
dual bound L = <p, u> + <q, v> <= W1, so the current coupling's value exceeds W1 by at most its gap value - L.

Basis encoding: int32 codes, one per cell, in leaf-peeling order: code = ((i * STRIDE + j) << 1) | row_is_leaf.
Peeling order gives the flows (forward) and the potentials (backward) in one linear pass each; unused slots
hold -1. After a pivot the new order follows from the old one in a few linear passes (`_repeel`). The DT-BSM
solver keeps one such basis per transport problem between sweeps (`dtsync.metric.bellman`), so most calls only
re-prove a stored basis: potentials, one pass over the cells for the smallest reduced cost and the slack
together, the value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

STRIDE_BITS = 12
STRIDE = 1 << STRIDE_BITS  # support positions are < STRIDE; codes stay within int32
FLOW_EPS = 1e-12  # a flow above -this is feasible (round-off of probabilities that sum to 1)
BLAND_AFTER = 50  # pivots with Dantzig's rule before switching to Bland's rule (anti-cycling)
MAX_PIVOTS = 10_000  # per call; a problem that reaches it can resume from the basis it stopped at


class Scratch(NamedTuple):
    """Working arrays of one simplex run for problems up to K x K (allocated once per thread by `scratch`).

    The kernels address two packed arrays, `fw` and `iw`, at fixed offsets: every array a compiled function
    receives costs it a reference-count increment and decrement (atomic), which for problems of a few cells
    cost more than the simplex itself. The named fields are views of them, for callers.

    fw (float): node potentials [0, 2K) (rows 0..k-1, columns K..K+k'-1), row supply left [2K, 3K), column
    demand left [3K, 4K), flow of each basis cell in peeling order [4K, 6K-1), each row's cheapest open cost
    (greedy basis) [6K-1, 7K-1).
    iw (int): basic-cell marks [0, K*K), each row's cheapest open column (greedy basis) [K*K, K*K+K), then from
    B = 2K*K per node: depth [B, B+2K), basis position of the edge to the parent [B+2K, B+4K), parent
    [B+4K, B+6K), side of the leaving cell [B+6K, B+8K), path of reversed cells [B+8K, B+10K), next basis order
    [B+10K, B+12K-1); the greedy basis keeps its open rows and columns in the depth slots.
    """

    fw: np.ndarray
    iw: np.ndarray
    flow: np.ndarray  # (2K-1) float: flow of each basis cell, in peeling order
    u: np.ndarray  # (K) float: row potentials
    v: np.ndarray  # (K) float: column potentials
    rs: np.ndarray  # (K) float: row supply left
    rd: np.ndarray  # (K) float: column demand left
    costs: np.ndarray  # (K*K) float: the current problem's cost matrix, row-major k x k'


@njit(cache=True, nogil=True)
def scratch(K: int) -> Scratch:
    fw = np.empty(7 * K - 1, np.float64)
    iw = np.empty(2 * K * K + 12 * K, np.int64)
    return Scratch(fw, iw, fw[4 * K : 6 * K - 1], fw[:K], fw[K : 2 * K], fw[2 * K : 3 * K], fw[3 * K : 4 * K],
                   np.empty(K * K, np.float64))  # fmt: skip


@njit(cache=True, nogil=True, inline="always")
def _flows(codes, n, p, q, fw, K) -> bool:
    RS = 2 * K
    RD = 3 * K
    FL = 4 * K
    for i in range(p.shape[0]):
        fw[RS + i] = p[i]
    for j in range(q.shape[0]):
        fw[RD + j] = q[j]
    ok = True
    for pos in range(n):
        code = codes[pos]
        c = code >> 1
        i = RS + (c >> STRIDE_BITS)
        j = RD + (c & (STRIDE - 1))
        f = fw[i] if (code & 1) else fw[j]
        ok &= f >= -FLOW_EPS
        fw[FL + pos] = f
        fw[i] -= f
        fw[j] -= f
    return ok


@njit(cache=True, nogil=True)
def _flows_of(codes, n, p, q, fw, K) -> bool:
    return _flows(codes, n, p, q, fw, K)


@njit(cache=True, nogil=True, inline="always")
def flows(codes, n, p, q, w) -> bool:
    """Flows of a tree basis from the marginals into `w.flow`; False if any is negative (not primal feasible)."""
    return _flows_of(codes, n, p, q, w.fw, w.u.shape[0])


@njit(cache=True, nogil=True, inline="always")
def _ends(code, K):
    """(leaf end, other end) of a basis cell as tree nodes: row i is node i, column j node K + j. In peeling order
    the leaf end is the child, the other end its parent."""
    c = code >> 1
    i = c >> STRIDE_BITS
    j = K + (c & (STRIDE - 1))
    return (i, j) if code & 1 else (j, i)


@njit(cache=True, nogil=True, inline="always")
def _potentials(codes, n, C, kk, K, fw) -> None:
    """Dual potentials u_i + v_j = C_ij on the tree cells, in reverse peeling order: each cell's leaf end from
    its other end, pot(leaf) = C_ij - pot(other), without branches."""
    last = codes[n - 1] >> 1
    i = last >> STRIDE_BITS
    j = last & (STRIDE - 1)
    fw[K + j] = 0.0
    fw[i] = C[i * kk + j]
    for pos in range(n - 2, -1, -1):
        code = codes[pos]
        c = code >> 1
        i = c >> STRIDE_BITS
        j = c & (STRIDE - 1)
        row_leaf = (code & 1) != 0
        child = i if row_leaf else K + j
        par = K + j if row_leaf else i
        fw[child] = C[i * kk + j] - fw[par]


@njit(cache=True, nogil=True, inline="always")
def _scan(k, kk, C, fw, iw, K):
    """(smallest reduced cost of all cells, of the non-basic ones (the slack), largest cost), branch-free."""
    best = np.inf
    slack = np.inf
    cmax = 0.0
    for i in range(k):
        ui = fw[i]
        for j in range(kk):
            cij = C[i * kk + j]
            r = cij - ui - fw[K + j]
            best = min(best, r)
            slack = min(slack, r if iw[i * kk + j] == 0 else np.inf)
            cmax = max(cmax, cij)
    return best, slack, cmax


@njit(cache=True, nogil=True, inline="always")
def _mark(k, kk, codes, n, iw) -> None:
    for t in range(k * kk):
        iw[t] = 0
    for pos in range(n):
        c = codes[pos] >> 1
        iw[(c >> STRIDE_BITS) * kk + (c & (STRIDE - 1))] = 1


@njit(cache=True, nogil=True, inline="always")
def _value(codes, n, C, kk, fw, K) -> float:
    """<pi, C> over the basis cells that carry flow."""
    value = 0.0
    for pos in range(n):
        c = codes[pos] >> 1
        f = fw[4 * K + pos]
        value += f * C[(c >> STRIDE_BITS) * kk + (c & (STRIDE - 1))] if f > 0.0 else 0.0
    return value


@njit(cache=True, nogil=True, inline="always")
def _repeel(n, K, codes, leave, ie, je, enter_leaf, iw) -> None:
    """Peeling order of the basis after the pivot in which cell `leave` (a position) left and (ie, je) entered,
    from the current order in O(n), without incidence lists; needs the old tree's parents and parent edges.

    Rooted at the last cell's other end, the old tree loses the subtree T2 below the leaving cell's leaf end c
    and regains it through the entering cell, whose leaf end `enter_leaf` (its end inside T2) becomes T2's new
    root: only the cells on T2's path from `enter_leaf` to c change direction. A cell may come once every cell
    below its leaf end has, so this order peels: T2's other cells in their old order, the path's cells from c's
    end down (leaf end flipped), the entering cell, then the rest of the tree in its old order.
    """
    B = iw.shape[0] - 12 * K
    PE = B + 2 * K
    PN = B + 4 * K
    TAG = B + 6 * K
    PATH = B + 8 * K
    TMP = B + 10 * K
    c = _ends(codes[leave], K)[0]
    # tag: 0 outside T2, 1 in T2, 2 on T2's path from the entering cell to c (c excluded); root first
    iw[TAG + _ends(codes[n - 1], K)[1]] = 0
    for pos in range(n - 1, -1, -1):
        child, par = _ends(codes[pos], K)
        iw[TAG + child] = 1 if (child == c or iw[TAG + par] != 0) else 0
    m = 0
    z = enter_leaf
    while z != c:
        iw[TAG + z] = 2
        iw[PATH + m] = z
        m += 1
        z = iw[PN + z]
    out = TMP  # branch-free: every cell is written, the pointer moves past the ones that belong here
    for pos in range(n):
        iw[out] = codes[pos]
        out += pos != leave and iw[TAG + _ends(codes[pos], K)[0]] == 1
    for t in range(m - 1, -1, -1):
        iw[out] = codes[iw[PE + iw[PATH + t]]] ^ 1
        out += 1
    iw[out] = ((ie * STRIDE + je) << 1) | (1 if enter_leaf == ie else 0)
    out += 1
    for pos in range(n):
        iw[out] = codes[pos]
        out += iw[TAG + _ends(codes[pos], K)[0]] == 0
    for pos in range(n):
        codes[pos] = iw[TMP + pos]


@njit(cache=True, nogil=True, inline="always")
def _row_min(a, kk, C, iw, COL):
    """(cost, column) of row a's cheapest cell on a column not crossed out, the first among equal costs."""
    best = np.inf
    arg = -1
    for b in range(kk):
        c = C[a * kk + b]
        take = iw[COL + b] != 0 and (c < best or arg < 0)
        best = c if take else best
        arg = b if take else arg
    return best, arg


@njit(cache=True, nogil=True)
def _greedy(k, kk, p, q, C, codes, fw, iw, K) -> None:
    RS = 2 * K
    RD = 3 * K
    RMIN = 6 * K - 1
    RARG = K * K
    ROW = 2 * K * K
    COL = ROW + K
    for j in range(kk):
        fw[RD + j] = q[j]
        iw[COL + j] = 1
    for i in range(k):
        fw[RS + i] = p[i]
        iw[ROW + i] = 1
        fw[RMIN + i], iw[RARG + i] = _row_min(i, kk, C, iw, COL)
    rows_left = k
    cols_left = kk
    for n in range(k + kk - 1):
        # The cheapest cell on lines not crossed out, the first in row-major order among equal costs (the next
        # one a stable sort by cost would reach), from each open row's cheapest open cell.
        best = np.inf
        i = -1
        for a in range(k):
            take = iw[ROW + a] != 0 and (fw[RMIN + a] < best or i < 0)
            best = fw[RMIN + a] if take else best
            i = a if take else i
        j = iw[RARG + i]
        f = min(fw[RS + i], fw[RD + j])
        fw[RS + i] -= f
        fw[RD + j] -= f
        code = (i * STRIDE + j) << 1
        if (fw[RS + i] <= fw[RD + j] and rows_left > 1) or cols_left == 1:  # the last cell closes both
            iw[ROW + i] = 0
            rows_left -= 1
            codes[n] = code | 1
        else:
            iw[COL + j] = 0
            cols_left -= 1
            codes[n] = code
            for a in range(k):
                if iw[ROW + a] != 0 and iw[RARG + a] == j:
                    fw[RMIN + a], iw[RARG + a] = _row_min(a, kk, C, iw, COL)
    for pos in range(k + kk - 1, codes.shape[0]):
        codes[pos] = -1


@njit(cache=True, nogil=True, inline="always")
def greedy_basis(k, kk, p, q, C, codes, w) -> None:
    """Minimum-cost greedy starting basis, written straight into `codes` in leaf-peeling order.

    Each allocation crosses out exactly one line (the last one closes both), so the cells form a spanning tree
    and every cell is the only one left on its crossed-out line among the cells after it: greedy order is a
    peeling order, with the crossed-out line telling which end is the leaf.
    """
    _greedy(k, kk, p, q, C, codes, w.fw, w.iw, w.u.shape[0])


@njit(cache=True, nogil=True)
def _simplex(k, kk, p, q, C, codes, fw, iw, K, max_pivots, best, slack, cmax):
    """The pivots of `optimize`, from a basis whose marks, potentials and `_scan` (best, slack, cmax) it made."""
    n = k + kk - 1
    B = iw.shape[0] - 12 * K
    DEPTH = B
    PE = B + 2 * K
    PN = B + 4 * K
    FL = 4 * K
    pivots = 0
    status = 0
    eps = 1e-12 * max(1.0, cmax)
    while True:
        if best >= -eps:
            break
        if pivots >= max_pivots:
            status = 1
            break
        # Entering cell: the first with the smallest reduced cost (Dantzig), or the first negative one (Bland)
        # once long, which cannot cycle
        dantzig = pivots < BLAND_AFTER
        ie = -1
        je = -1
        for t in range(k * kk):
            i = t // kk
            j = t - i * kk
            r = C[t] - fw[i] - fw[K + j]
            if (r == best) if dantzig else (r < -eps):
                ie = i
                je = j
                break
        pivots += 1
        # Cycle: entering cell + the tree path between column je and row ie, signs alternating (- first) from
        # either end. The peeling order roots the tree: each cell's leaf end is a child of its other end, and the
        # last cell's other end is the root; walk both ends up to their common ancestor.
        for pos in range(n - 1, -1, -1):
            child, par = _ends(codes[pos], K)
            if pos == n - 1:
                iw[DEPTH + par] = 0
            iw[PE + child] = pos
            iw[PN + child] = par
            iw[DEPTH + child] = iw[DEPTH + par] + 1
        theta = np.inf
        leave = -1
        leave_cell = 0
        leave_col_side = False
        x = K + je
        y = ie
        minus_x = True
        minus_y = True
        while x != y:
            col_side = iw[DEPTH + x] >= iw[DEPTH + y]
            if col_side:
                e = iw[PE + x]
                minus = minus_x
                minus_x = not minus_x
                x = iw[PN + x]
            else:
                e = iw[PE + y]
                minus = minus_y
                minus_y = not minus_y
                y = iw[PN + y]
            if minus:
                cell = codes[e] >> 1
                f = fw[FL + e]
                if f < theta - 1e-15 or (f <= theta + 1e-15 and cell < leave_cell):
                    theta = f
                    leave = e
                    leave_cell = cell
                    leave_col_side = col_side
        iw[(leave_cell >> STRIDE_BITS) * kk + (leave_cell & (STRIDE - 1))] = 0
        iw[ie * kk + je] = 1
        _repeel(n, K, codes, leave, ie, je, K + je if leave_col_side else ie, iw)
        _flows(codes, n, p, q, fw, K)
        _potentials(codes, n, C, kk, K, fw)
        best, slack, cmax = _scan(k, kk, C, fw, iw, K)

    value = _value(codes, n, C, kk, fw, K)
    if status == 1:
        lower = 0.0
        for i in range(k):
            lower += p[i] * fw[i]
        for j in range(kk):
            vj = np.inf
            for i in range(k):
                vj = min(vj, C[i * kk + j] - fw[i])
            lower += q[j] * vj
        slack = max(0.0, value - lower)
    else:
        slack = max(slack, 0.0)
    return value, pivots, status, slack


@njit(cache=True, nogil=True)
def _coupling(codes, n, C, kk, fw, K) -> float:
    value = 0.0
    for pos in range(n):
        c = codes[pos] >> 1
        value += fw[4 * K + pos] * C[(c >> STRIDE_BITS) * kk + (c & (STRIDE - 1))]
    return value


@njit(cache=True, nogil=True)
def _prove(k, kk, C, codes, fw, iw, K):
    """The common case, apart: (value, slack, smallest reduced cost, largest cost) of the starting basis, with
    the value only when the basis is optimal (smallest reduced cost >= -eps); marks and potentials in fw, iw."""
    n = k + kk - 1
    _mark(k, kk, codes, n, iw)
    _potentials(codes, n, C, kk, K, fw)
    best, slack, cmax = _scan(k, kk, C, fw, iw, K)
    value = _value(codes, n, C, kk, fw, K) if best >= -1e-12 * max(1.0, cmax) else np.nan
    return value, slack, best, cmax


@njit(cache=True, nogil=True, inline="always")
def optimize(k, kk, p, q, C, codes, w, max_pivots):
    """Transportation simplex from the primal-feasible tree basis `codes` (its flows already in `w.flow`).

    Returns (value, pivots, status, slack). status 0: optimal, slack = smallest reduced cost of a non-basic cell
    (+inf when every cell is basic). status 1: `max_pivots` reached; value is a feasible coupling's (>= W1) and
    slack its duality gap value - L >= value - W1. `codes` and `w.flow` hold the final basis and its flows.
    A small wrapper inlined into its caller, so that the kernels receive the two packed arrays rather than the
    whole scratch tuple; proving a basis still optimal, the common case, is one call of four arrays.
    """
    fw = w.fw
    iw = w.iw
    K = w.u.shape[0]
    if k + kk - 1 == k * kk:  # a single row or column: every cell is basic, the only coupling
        return _coupling(codes, k + kk - 1, C, kk, fw, K), 0, 0, np.inf
    value, slack, best, cmax = _prove(k, kk, C, codes, fw, iw, K)
    if not np.isnan(value):
        return value, 0, 0, max(slack, 0.0)
    return _simplex(k, kk, p, q, C, codes, fw, iw, K, max_pivots, best, slack, cmax)


@njit(cache=True, nogil=True)
def emd(p, q, M, max_pivots=MAX_PIVOTS):
    """W1 of marginals p (k), q (k') under costs M (k x k') from a greedy start: (value, pivots, status).

    The single-problem entry point (POT's `ot.emd2` on one small problem); status 1 means the pivot limit was
    reached and value is then only an upper bound.
    """
    k, kk = M.shape
    w = scratch(max(k, kk))
    C = w.costs
    for i in range(k):
        for j in range(kk):
            C[i * kk + j] = M[i, j]
    codes = np.full(2 * max(k, kk) - 1, -1, np.int32)
    greedy_basis(k, kk, p, q, C, codes, w)
    flows(codes, k + kk - 1, p, q, w)
    value, pivots, status, _slack = optimize(k, kk, p, q, C, codes, w, max_pivots)
    return value, pivots, status
