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

STRIDE = 4096  # support positions are < STRIDE; codes stay within int32
FLOW_EPS = 1e-12  # a flow above -this is feasible (round-off of probabilities that sum to 1)
BLAND_AFTER = 50  # pivots with Dantzig's rule before switching to Bland's rule (anti-cycling)
MAX_PIVOTS = 10_000  # per call; a problem that reaches it can resume from the basis it stopped at


class Scratch(NamedTuple):
    """Working arrays of one simplex run for problems up to K x K (allocated once per thread by `scratch`)."""

    cells: np.ndarray  # (2K-1) int64: basis cells i * STRIDE + j while re-peeling after a pivot
    mark: np.ndarray  # (K*K) int8: basic cells, for the final slack scan
    flow: np.ndarray  # (2K-1) float: flow of each basis cell, in peeling order
    u: np.ndarray  # (K) float: row potentials
    v: np.ndarray  # (K) float: column potentials
    rs: np.ndarray  # (K) float: row supply left
    rd: np.ndarray  # (K) float: column demand left
    row_on: np.ndarray  # (K) bool: row not yet crossed out (greedy basis)
    col_on: np.ndarray  # (K) bool: column not yet crossed out
    order: np.ndarray  # (K*K) int64: cells sorted by cost (greedy basis)
    deg: np.ndarray  # (2K) int64: node degrees while peeling
    used: np.ndarray  # (2K-1) bool: cell already peeled
    start: np.ndarray  # (2K+1) int64: incidence-list offsets per node
    adj: np.ndarray  # (4K) int64: incidence lists (cells by node)
    queue: np.ndarray  # (2K) int64: leaf queue while peeling
    parent_edge: np.ndarray  # (2K) int64: basis position of the edge to a node's parent
    parent_node: np.ndarray  # (2K) int64: parent of a node in the rooted basis tree
    depth: np.ndarray  # (2K) int64: depth in the rooted basis tree
    costs: np.ndarray  # (K*K) float: the current problem's cost matrix, row-major k x k'


@njit(cache=True, nogil=True)
def scratch(K: int) -> Scratch:
    nb = 2 * K - 1
    return Scratch(
        np.empty(nb, np.int64), np.empty(K * K, np.int8), np.empty(nb, np.float64), np.empty(K, np.float64),
        np.empty(K, np.float64), np.empty(K, np.float64), np.empty(K, np.float64), np.empty(K, np.bool_),
        np.empty(K, np.bool_), np.empty(K * K, np.int64), np.empty(2 * K, np.int64), np.empty(nb, np.bool_),
        np.empty(2 * K + 1, np.int64), np.empty(4 * K, np.int64), np.empty(2 * K, np.int64),
        np.empty(2 * K, np.int64), np.empty(2 * K, np.int64), np.empty(2 * K, np.int64), np.empty(K * K, np.float64),
    )  # fmt: skip


@njit(cache=True, nogil=True)
def _peel(n, k, kk, codes, w) -> bool:
    """Order basis cells `w.cells[:n]` (i * STRIDE + j) by leaf peeling into `codes`; False if not a spanning tree.

    Linear time: incidence lists (`start`, `adj`, counting sort by node), then a queue of the nodes of degree 1.
    """
    cells, deg, used, start, adj, queue = w.cells, w.deg, w.used, w.start, w.adj, w.queue
    nodes = k + kk
    for x in range(nodes + 1):
        start[x] = 0
    for e in range(n):
        c = cells[e]
        i = c // STRIDE
        j = c % STRIDE
        if c < 0 or i >= k or j >= kk:
            return False
        start[i + 1] += 1
        start[k + j + 1] += 1
        used[e] = False
    for x in range(nodes):
        deg[x] = start[x + 1]
        if deg[x] == 0:
            return False
        start[x + 1] += start[x]
    for x in range(nodes):
        queue[x] = start[x]  # fill pointers
    for e in range(n):
        c = cells[e]
        i = c // STRIDE
        j = k + c % STRIDE
        adj[queue[i]] = e
        queue[i] += 1
        adj[queue[j]] = e
        queue[j] += 1
    tail = 0
    for x in range(nodes):
        if deg[x] == 1:
            queue[tail] = x
            tail += 1
    head = 0
    pos = 0
    while head < tail:
        x = queue[head]
        head += 1
        if deg[x] != 1:
            continue
        e = -1
        for t in range(start[x], start[x + 1]):
            if not used[adj[t]]:
                e = adj[t]
                break
        c = cells[e]
        i = c // STRIDE
        j = k + c % STRIDE
        used[e] = True
        codes[pos] = (c << 1) | 1 if x < k else c << 1
        pos += 1
        deg[i] -= 1
        deg[j] -= 1
        other = j if x < k else i
        if deg[other] == 1:
            queue[tail] = other
            tail += 1
    return pos == n


@njit(cache=True, nogil=True)
def flows(codes, n, p, q, w) -> bool:
    """Flows of a tree basis from the marginals into `w.flow`; False if any is negative (not primal feasible)."""
    rs, rd, flow = w.rs, w.rd, w.flow
    for i in range(p.shape[0]):
        rs[i] = p[i]
    for j in range(q.shape[0]):
        rd[j] = q[j]
    ok = True
    for pos in range(n):
        code = codes[pos]
        c = code >> 1
        i = c // STRIDE
        j = c % STRIDE
        f = rs[i] if (code & 1) else rd[j]
        if f < -FLOW_EPS:
            ok = False
        flow[pos] = f
        rs[i] -= f
        rd[j] -= f
    return ok


@njit(cache=True, nogil=True)
def _potentials(codes, n, C, kk, u, v) -> None:
    """Dual potentials u_i + v_j = C_ij on the tree cells, in reverse peeling order."""
    last = codes[n - 1] >> 1
    i = last // STRIDE
    j = last % STRIDE
    v[j] = 0.0
    u[i] = C[i * kk + j]
    for pos in range(n - 2, -1, -1):
        code = codes[pos]
        c = code >> 1
        i = c // STRIDE
        j = c % STRIDE
        if code & 1:
            u[i] = C[i * kk + j] - v[j]
        else:
            v[j] = C[i * kk + j] - u[i]


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
    """
    n = k + kk - 1
    flow, u, v = w.flow, w.u, w.v
    if n == k * kk:  # a single row or column: every cell is basic, the only coupling
        value = 0.0
        for pos in range(n):
            c = codes[pos] >> 1
            value += flow[pos] * C[(c // STRIDE) * kk + c % STRIDE]
        return value, 0, 0, np.inf
    cmax = 0.0
    for t in range(k * kk):
        if C[t] > cmax:
            cmax = C[t]
    eps = 1e-12 * max(1.0, cmax)
    pivots = 0
    status = 0
    slack = np.inf
    depth, pe, pn = w.depth, w.parent_edge, w.parent_node
    while True:
        _potentials(codes, n, C, kk, u, v)
        # Entering cell: most negative reduced cost (Dantzig), or the first negative one (Bland) once long.
        best = -eps
        ie = -1
        je = -1
        bland = pivots >= BLAND_AFTER
        for i in range(k):
            ui = u[i]
            for j in range(kk):
                r = C[i * kk + j] - ui - v[j]
                if r < best:
                    best = r
                    ie = i
                    je = j
                    if bland:
                        break
            if bland and ie >= 0:
                break
        if ie < 0:
            break
        if pivots >= max_pivots:
            status = 1
            break
        pivots += 1
        # Cycle: entering cell + the tree path between column je and row ie, signs alternating (- first) from
        # either end. The peeling order roots the tree: each cell's leaf end is a child of its other end, and the
        # last cell's other end is the root; walk both ends up to their common ancestor.
        for pos in range(n - 1, -1, -1):
            code = codes[pos]
            c = code >> 1
            i = c // STRIDE
            j = k + c % STRIDE
            if code & 1:
                child = i
                par = j
            else:
                child = j
                par = i
            if pos == n - 1:
                depth[par] = 0
            pe[child] = pos
            pn[child] = par
            depth[child] = depth[par] + 1
        theta = np.inf
        leave = -1
        leave_cell = 0
        x = k + je
        y = ie
        minus_x = True
        minus_y = True
        while x != y:
            if depth[x] >= depth[y]:
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
        for e in range(n):
            w.cells[e] = codes[e] >> 1
        w.cells[leave] = ie * STRIDE + je
        _peel(n, k, kk, codes, w)
        flows(codes, n, p, q, w)

    value = 0.0
    for pos in range(n):
        c = codes[pos] >> 1
        f = flow[pos]
        if f > 0.0:
            value += f * C[(c // STRIDE) * kk + c % STRIDE]
    if status == 1:
        lower = 0.0
        for i in range(k):
            lower += p[i] * u[i]
        for j in range(kk):
            vj = np.inf
            for i in range(k):
                vj = min(vj, C[i * kk + j] - u[i])
            lower += q[j] * vj
        slack = max(0.0, value - lower)
    else:
        # Smallest reduced cost off the tree: how far the costs may move before this basis can stop being optimal.
        mark = w.mark
        for t in range(k * kk):
            mark[t] = 0
        for pos in range(n):
            c = codes[pos] >> 1
            mark[(c // STRIDE) * kk + c % STRIDE] = 1
        for i in range(k):
            ui = u[i]
            for j in range(kk):
                if mark[i * kk + j] == 0:
                    r = C[i * kk + j] - ui - v[j]
                    if r < slack:
                        slack = r
        if slack < 0.0:
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
