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
hold -1. The DT-BSM solver keeps one such basis per transport problem between sweeps (`dtsync.metric.bellman`).
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

    Tree nodes are rows 0..k-1 and columns K..K+k'-1, so one array holds both potentials: `u` and `v` are its
    two halves.
    """

    tmp: np.ndarray  # (2K-1) int32: the next basis order while re-peeling after a pivot
    mark: np.ndarray  # (K*K) int8: basic cells
    flow: np.ndarray  # (2K-1) float: flow of each basis cell, in peeling order
    u: np.ndarray  # (K) float: row potentials (pot[:K])
    v: np.ndarray  # (K) float: column potentials (pot[K:])
    rs: np.ndarray  # (K) float: row supply left
    rd: np.ndarray  # (K) float: column demand left
    row_on: np.ndarray  # (K) bool: row not yet crossed out (greedy basis)
    col_on: np.ndarray  # (K) bool: column not yet crossed out
    order: np.ndarray  # (K*K) int64: cells sorted by cost (greedy basis)
    tag: np.ndarray  # (2K) int8: a node's side of the leaving cell while re-peeling
    path: np.ndarray  # (2K) int64: nodes of the path whose cells change direction while re-peeling
    parent_edge: np.ndarray  # (2K) int64: basis position of the edge to a node's parent
    parent_node: np.ndarray  # (2K) int64: parent of a node in the rooted basis tree
    depth: np.ndarray  # (2K) int64: depth in the rooted basis tree
    pot: np.ndarray  # (2K) float: potential of each node
    costs: np.ndarray  # (K*K) float: the current problem's cost matrix, row-major k x k'


@njit(cache=True, nogil=True)
def scratch(K: int) -> Scratch:
    nb = 2 * K - 1
    pot = np.empty(2 * K, np.float64)
    return Scratch(
        np.empty(nb, np.int32), np.empty(K * K, np.int8), np.empty(nb, np.float64), pot[:K], pot[K:],
        np.empty(K, np.float64), np.empty(K, np.float64), np.empty(K, np.bool_), np.empty(K, np.bool_),
        np.empty(K * K, np.int64), np.empty(2 * K, np.int8), np.empty(2 * K, np.int64), np.empty(2 * K, np.int64),
        np.empty(2 * K, np.int64), np.empty(2 * K, np.int64), pot, np.empty(K * K, np.float64),
    )  # fmt: skip


@njit(cache=True, nogil=True, inline="always")
def _flows(codes, n, p, q, rs, rd, flow) -> bool:
    for i in range(p.shape[0]):
        rs[i] = p[i]
    for j in range(q.shape[0]):
        rd[j] = q[j]
    ok = True
    for pos in range(n):
        code = codes[pos]
        c = code >> 1
        i = c >> STRIDE_BITS
        j = c & (STRIDE - 1)
        f = rs[i] if (code & 1) else rd[j]
        ok &= f >= -FLOW_EPS
        flow[pos] = f
        rs[i] -= f
        rd[j] -= f
    return ok


@njit(cache=True, nogil=True)
def flows(codes, n, p, q, w) -> bool:
    """Flows of a tree basis from the marginals into `w.flow`; False if any is negative (not primal feasible)."""
    return _flows(codes, n, p, q, w.rs, w.rd, w.flow)


@njit(cache=True, nogil=True, inline="always")
def _potentials(codes, n, C, kk, K, pot) -> None:
    """Dual potentials u_i + v_j = C_ij on the tree cells, in reverse peeling order (each cell's leaf end from
    its other end, branch-free: node i for row i, K + j for column j)."""
    last = codes[n - 1] >> 1
    i = last >> STRIDE_BITS
    j = last & (STRIDE - 1)
    pot[K + j] = 0.0
    pot[i] = C[i * kk + j]
    for pos in range(n - 2, -1, -1):
        code = codes[pos]
        c = code >> 1
        i = c >> STRIDE_BITS
        j = c & (STRIDE - 1)
        row_leaf = (code & 1) != 0
        child = i if row_leaf else K + j
        par = K + j if row_leaf else i
        pot[child] = C[i * kk + j] - pot[par]


@njit(cache=True, nogil=True)
def _repeel(n, K, codes, leave, ie, je, enter_leaf, w) -> None:
    """Peeling order of the basis after the pivot in which cell `leave` (a position) left and (ie, je) entered,
    from the current order in O(n), without incidence lists; needs `w.parent_node`, `w.parent_edge` of the old
    tree.

    Rooted at the last cell's other end, the old tree loses the subtree T2 below the leaving cell's leaf end c
    and regains it through the entering cell, whose leaf end `enter_leaf` (its end inside T2) becomes T2's new
    root: only the cells on T2's path from `enter_leaf` to c change direction. A cell may come once every cell
    below its leaf end has, so this order peels: T2's other cells in their old order, the path's cells from c's
    end down (leaf end flipped), the entering cell, then the rest of the tree in its old order.
    """
    pn, pe, tag, path, tmp = w.parent_node, w.parent_edge, w.tag, w.path, w.tmp
    code = codes[leave]
    cl = code >> 1
    c = cl >> STRIDE_BITS if code & 1 else K + (cl & (STRIDE - 1))
    # tag: 0 outside T2, 1 in T2, 2 on T2's path from the entering cell to c (c excluded); root first
    last = codes[n - 1]
    cl = last >> 1
    tag[K + (cl & (STRIDE - 1)) if last & 1 else cl >> STRIDE_BITS] = 0
    for pos in range(n - 1, -1, -1):
        code = codes[pos]
        cl = code >> 1
        i = cl >> STRIDE_BITS
        j = K + (cl & (STRIDE - 1))
        row_leaf = (code & 1) != 0
        child = i if row_leaf else j
        par = j if row_leaf else i
        tag[child] = 1 if (child == c or tag[par] != 0) else 0
    m = 0
    z = enter_leaf
    while z != c:
        tag[z] = 2
        path[m] = z
        m += 1
        z = pn[z]
    out = 0
    for pos in range(n):
        code = codes[pos]
        cl = code >> 1
        if pos != leave and tag[cl >> STRIDE_BITS if code & 1 else K + (cl & (STRIDE - 1))] == 1:
            tmp[out] = code
            out += 1
    for t in range(m - 1, -1, -1):
        tmp[out] = codes[pe[path[t]]] ^ 1
        out += 1
    tmp[out] = ((ie * STRIDE + je) << 1) | (1 if enter_leaf == ie else 0)
    out += 1
    for pos in range(n):
        code = codes[pos]
        cl = code >> 1
        if tag[cl >> STRIDE_BITS if code & 1 else K + (cl & (STRIDE - 1))] == 0:
            tmp[out] = code
            out += 1
    for pos in range(n):
        codes[pos] = tmp[pos]


@njit(cache=True, nogil=True)
def greedy_basis(k, kk, p, q, C, codes, w) -> None:
    """Minimum-cost greedy starting basis, written straight into `codes` in leaf-peeling order.

    Each allocation crosses out exactly one line (the last one closes both), so the cells form a spanning tree
    and every cell is the only one left on its crossed-out line among the cells after it: greedy order is a
    peeling order, with the crossed-out line telling which end is the leaf.
    """
    order, rs, rd, row_on, col_on = w.order, w.rs, w.rd, w.row_on, w.col_on
    m = k * kk
    for t in range(m):  # insertion sort of the cells by cost (m <= K * K, small)
        c = C[t]
        pos = t
        while pos > 0 and C[order[pos - 1]] > c:
            order[pos] = order[pos - 1]
            pos -= 1
        order[pos] = t
    for i in range(k):
        rs[i] = p[i]
        row_on[i] = True
    for j in range(kk):
        rd[j] = q[j]
        col_on[j] = True
    rows_left = k
    cols_left = kk
    n = 0
    for t in range(m):
        cell = order[t]
        i = cell // kk
        j = cell % kk
        if not (row_on[i] and col_on[j]):
            continue
        f = min(rs[i], rd[j])
        rs[i] -= f
        rd[j] -= f
        code = (i * STRIDE + j) << 1
        if rows_left == 1 and cols_left == 1:
            codes[n] = code | 1
            n += 1
            break
        if (rs[i] <= rd[j] and rows_left > 1) or cols_left == 1:
            row_on[i] = False
            rows_left -= 1
            codes[n] = code | 1
        else:
            col_on[j] = False
            cols_left -= 1
            codes[n] = code
        n += 1
    for pos in range(n, codes.shape[0]):
        codes[pos] = -1


@njit(cache=True, nogil=True)
def optimize(k, kk, p, q, C, codes, w, max_pivots):
    """Transportation simplex from the primal-feasible tree basis `codes` (its flows already in `w.flow`).

    Returns (value, pivots, status, slack). status 0: optimal, slack = smallest reduced cost of a non-basic cell
    (+inf when every cell is basic). status 1: `max_pivots` reached; value is a feasible coupling's (>= W1) and
    slack its duality gap value - L >= value - W1. `codes` and `w.flow` hold the final basis and its flows.
    One branch-free pass over the cells per iteration gives the smallest reduced cost and the slack together,
    so proving a basis still optimal costs the potentials, that pass and the value.
    """
    n = k + kk - 1
    flow, pot, mark, rs, rd = w.flow, w.pot, w.mark, w.rs, w.rd
    K = pot.shape[0] // 2
    if n == k * kk:  # a single row or column: every cell is basic, the only coupling
        value = 0.0
        for pos in range(n):
            c = codes[pos] >> 1
            value += flow[pos] * C[(c >> STRIDE_BITS) * kk + (c & (STRIDE - 1))]
        return value, 0, 0, np.inf
    m = k * kk
    for t in range(m):
        mark[t] = 0
    for pos in range(n):
        c = codes[pos] >> 1
        mark[(c >> STRIDE_BITS) * kk + (c & (STRIDE - 1))] = 1
    cmax = 0.0
    for t in range(m):
        cmax = max(cmax, C[t])
    eps = 1e-12 * max(1.0, cmax)
    pivots = 0
    status = 0
    depth, pe, pn = w.depth, w.parent_edge, w.parent_node
    while True:
        _potentials(codes, n, C, kk, K, pot)
        # Smallest reduced cost over all cells and over the non-basic ones (the slack), without branches
        best = np.inf
        slack = np.inf
        for i in range(k):
            ui = pot[i]
            for j in range(kk):
                r = C[i * kk + j] - ui - pot[K + j]
                best = min(best, r)
                slack = min(slack, r if mark[i * kk + j] == 0 else np.inf)
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
        for t in range(m):
            i = t // kk
            j = t - i * kk
            r = C[t] - pot[i] - pot[K + j]
            if (r == best) if dantzig else (r < -eps):
                ie = i
                je = j
                break
        pivots += 1
        # Cycle: entering cell + the tree path between column je and row ie, signs alternating (- first) from
        # either end. The peeling order roots the tree: each cell's leaf end is a child of its other end, and the
        # last cell's other end is the root; walk both ends up to their common ancestor.
        for pos in range(n - 1, -1, -1):
            code = codes[pos]
            c = code >> 1
            i = c >> STRIDE_BITS
            j = K + (c & (STRIDE - 1))
            row_leaf = (code & 1) != 0
            child = i if row_leaf else j
            par = j if row_leaf else i
            if pos == n - 1:
                depth[par] = 0
            pe[child] = pos
            pn[child] = par
            depth[child] = depth[par] + 1
        theta = np.inf
        leave = -1
        leave_cell = 0
        leave_col_side = False
        x = K + je
        y = ie
        minus_x = True
        minus_y = True
        while x != y:
            col_side = depth[x] >= depth[y]
            if col_side:
                e = pe[x]
                minus = minus_x
                minus_x = not minus_x
                x = pn[x]
            else:
                e = pe[y]
                minus = minus_y
                minus_y = not minus_y
                y = pn[y]
            if minus:
                cell = codes[e] >> 1
                f = flow[e]
                if f < theta - 1e-15 or (f <= theta + 1e-15 and cell < leave_cell):
                    theta = f
                    leave = e
                    leave_cell = cell
                    leave_col_side = col_side
        mark[(leave_cell >> STRIDE_BITS) * kk + (leave_cell & (STRIDE - 1))] = 0
        mark[ie * kk + je] = 1
        _repeel(n, K, codes, leave, ie, je, K + je if leave_col_side else ie, w)
        _flows(codes, n, p, q, rs, rd, flow)

    value = 0.0
    for pos in range(n):
        c = codes[pos] >> 1
        f = flow[pos]
        value += f * C[(c >> STRIDE_BITS) * kk + (c & (STRIDE - 1))] if f > 0.0 else 0.0
    if status == 1:
        lower = 0.0
        for i in range(k):
            lower += p[i] * pot[i]
        for j in range(kk):
            vj = np.inf
            for i in range(k):
                vj = min(vj, C[i * kk + j] - pot[i])
            lower += q[j] * vj
        slack = max(0.0, value - lower)
    elif slack < 0.0:
        slack = 0.0
    return value, pivots, status, slack


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
