"""Compiled kernels for the DT-BSM fixed point: small transport problems and the linear evaluation step.

One sweep of the metric solves |S| * |S'| * |A| transport problems between next-state distributions with
supports of a few states each. A general LP solver called from Python costs tens of microseconds per problem;
here each problem is solved by the transportation simplex (MODI method) in compiled code, and its optimal basis
(a spanning tree of k + k' - 1 cells) is *kept* between sweeps. When d moves a little, the old basis is almost
always still optimal, so most problems cost one pass: potentials along the tree, then a reduced-cost check.

A basis is stored as int32 codes, one per cell, in leaf-peeling order: code = ((i * STRIDE + j) << 1) | row_is_leaf.
That order gives the flows (from the marginals) and the potentials (from the costs) in one linear pass each.
Unused slots hold -1; a basis that does not fit the current problem (supports changed, flows went negative after
the window moved) is rebuilt by the minimum-cost greedy rule, which is close to optimal to begin with.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

STRIDE = 4096  # support positions are < STRIDE; codes stay within int32
_FLOW_EPS = 1e-12  # a flow above -this is feasible (round-off of probabilities that sum to 1)
_BLAND_AFTER = 50  # pivots with Dantzig's rule before switching to Bland's rule (anti-cycling)
MAX_PIVOTS = 10_000  # per problem and sweep; a problem that reaches it keeps its basis and resumes next sweep


@njit(cache=True, nogil=True)
def _peel(cells, n, k, kk, out_codes, deg, used, start, adj, queue) -> bool:
    """Order basis cells `cells[:n]` (i * STRIDE + j) by leaf peeling into `out_codes`; False if not a spanning tree.

    Linear time: incidence lists (`start`, `adj`, counting sort by node), then a queue of the nodes of degree 1.
    """
    nodes = k + kk
    for v in range(nodes + 1):
        start[v] = 0
    for e in range(n):
        c = cells[e]
        i = c // STRIDE
        j = c % STRIDE
        if c < 0 or i >= k or j >= kk:
            return False
        start[i + 1] += 1
        start[k + j + 1] += 1
        used[e] = False
    for v in range(nodes):
        deg[v] = start[v + 1]
        if deg[v] == 0:
            return False
        start[v + 1] += start[v]
    for v in range(nodes):
        queue[v] = start[v]  # fill pointers
    for e in range(n):
        c = cells[e]
        i = c // STRIDE
        j = k + c % STRIDE
        adj[queue[i]] = e
        queue[i] += 1
        adj[queue[j]] = e
        queue[j] += 1
    tail = 0
    for v in range(nodes):
        if deg[v] == 1:
            queue[tail] = v
            tail += 1
    head = 0
    pos = 0
    while head < tail:
        v = queue[head]
        head += 1
        if deg[v] != 1:
            continue
        e = -1
        for t in range(start[v], start[v + 1]):
            if not used[adj[t]]:
                e = adj[t]
                break
        c = cells[e]
        i = c // STRIDE
        j = k + c % STRIDE
        used[e] = True
        out_codes[pos] = (c << 1) | 1 if v < k else c << 1
        pos += 1
        deg[i] -= 1
        deg[j] -= 1
        other = j if v < k else i
        if deg[other] == 1:
            queue[tail] = other
            tail += 1
    return pos == n


@njit(cache=True, nogil=True)
def _flows(codes, n, p, q, rs, rd, flow) -> bool:
    """Flows of a tree basis from the marginals; False if any is negative (basis not primal feasible)."""
    k = p.shape[0]
    kk = q.shape[0]
    for i in range(k):
        rs[i] = p[i]
    for j in range(kk):
        rd[j] = q[j]
    ok = True
    for pos in range(n):
        code = codes[pos]
        c = code >> 1
        i = c // STRIDE
        j = c % STRIDE
        f = rs[i] if (code & 1) else rd[j]
        if f < -_FLOW_EPS:
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
def _greedy_basis(k, kk, p, q, C, codes, order, rs, rd, row_on, col_on) -> None:
    """Minimum-cost greedy starting basis, written straight into `codes` in leaf-peeling order.

    Each allocation crosses out exactly one line (the last one closes both), so the cells form a spanning tree
    and every cell is the only one left on its crossed-out line among the cells after it: greedy order is a
    peeling order, with the crossed-out line telling which end is the leaf.
    """
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
        # Cross out exactly one line per allocation (the last pair closes both) so the cells form a tree.
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
def _corner_value(codes, s, s2, a, k, kk, p1, p2, idx1, idx2, cr, cd, rs, rd, flow, d) -> float:
    """North-west corner basis (cost-blind, no cost read) of problem (s, s2, a), written in leaf-peeling order like
    `_greedy_basis`; in the same pass its flows (as `_coupling_value` derives them) into `flow` and its value
    <pi, d>, returned. Indexes the big arrays directly, like `_coupling_value`."""
    for i in range(k):
        cr[i] = p1[s, a, i]
        rs[i] = cr[i]
    for j in range(kk):
        cd[j] = p2[s2, a, j]
        rd[j] = cd[j]
    i = 0
    j = 0
    n = k + kk - 1
    value = 0.0
    for pos in range(n):
        f = min(cr[i], cd[j])
        cr[i] -= f
        cd[j] -= f
        code = (i * STRIDE + j) << 1
        # Cross out the row (leaf end: row) unless it is the last row, else the column; the last cell closes both.
        row_leaf = pos == n - 1 or ((cr[i] <= cd[j] and i < k - 1) or j == kk - 1)
        g = rs[i] if row_leaf else rd[j]
        flow[pos] = g
        rs[i] -= g
        rd[j] -= g
        value += g * d[idx1[s, a, i], idx2[s2, a, j]]
        if row_leaf:
            codes[s, s2, a, pos] = code | 1
            i = min(i + 1, k - 1)
        else:
            codes[s, s2, a, pos] = code
            j += 1
    for pos in range(n, codes.shape[3]):
        codes[s, s2, a, pos] = -1
    return value


@njit(cache=True, nogil=True)
def _basis_fits(codes, n, k, kk) -> bool:
    """A stored basis has exactly n cells inside the current k x kk problem."""
    if codes[0] < 0 or (codes.shape[0] > n and codes[n] >= 0):
        return False
    for pos in range(n):
        code = codes[pos]
        c = code >> 1
        if code < 0 or c // STRIDE >= k or c % STRIDE >= kk:
            return False
    return True


@njit(cache=True, nogil=True)
def _coupling_value(codes, s, s2, a, k, kk, p1, p2, idx1, idx2, rs, rd, flow, d) -> float:
    """Value <pi, d> of problem (s, s2, a)'s stored basis, its flows into `flow`, in one pass; NaN if the basis
    does not fit the problem or is not primal feasible. Indexes the big arrays directly: no array views, so
    no reference counting in the hot loop."""
    n = k + kk - 1
    if codes.shape[3] > n and codes[s, s2, a, n] >= 0:
        return np.nan
    for i in range(k):
        rs[i] = p1[s, a, i]
    for j in range(kk):
        rd[j] = p2[s2, a, j]
    value = 0.0
    for pos in range(n):
        code = codes[s, s2, a, pos]
        c = code >> 1
        i = c // STRIDE
        j = c % STRIDE
        if code < 0 or i >= k or j >= kk:
            return np.nan
        f = rs[i] if (code & 1) else rd[j]
        if f < -_FLOW_EPS:
            return np.nan
        flow[pos] = f
        rs[i] -= f
        rd[j] -= f
        value += f * d[idx1[s, a, i], idx2[s2, a, j]]
    return value


@njit(cache=True, nogil=True)
def _optimize(k, kk, p, q, C, codes, w, max_pivots):
    """Transportation simplex from the primal-feasible tree basis `codes` (its flows already in w[2]).

    Returns (value, pivots, status, slack): status 0 optimal, slack = smallest reduced cost of a non-basic cell
    at the optimum (+inf when every cell is basic); status 1 pivot limit hit: value is that of a feasible
    coupling (>= W1) and slack is the duality gap value - L >= value - W1, with L the dual bound of the
    current potentials made feasible (v_j = min_i C_ij - u_i).
    """
    n = k + kk - 1
    cells, mark, flow, u, v, rs, rd, deg, used, row_on, col_on, pe, pn, stack, order, depth, start, adj = w
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
    while True:
        _potentials(codes, n, C, kk, u, v)
        # Entering cell: most negative reduced cost (Dantzig), or the first negative one (Bland) once long.
        best = -eps
        ie = -1
        je = -1
        bland = pivots >= _BLAND_AFTER
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
        a = k + je
        b = ie
        minus_a = True
        minus_b = True
        while a != b:
            if depth[a] >= depth[b]:
                e = pe[a]
                minus = minus_a
                minus_a = not minus_a
                a = pn[a]
            else:
                e = pe[b]
                minus = minus_b
                minus_b = not minus_b
                b = pn[b]
            if minus:
                cell = codes[e] >> 1
                f = flow[e]
                if f < theta - 1e-15 or (f <= theta + 1e-15 and cell < leave_cell):
                    theta = f
                    leave = e
                    leave_cell = cell
        for e in range(n):
            cells[e] = codes[e] >> 1
        cells[leave] = ie * STRIDE + je
        _peel(cells, n, k, kk, codes, deg, used, start, adj, stack)
        _flows(codes, n, p, q, rs, rd, flow)

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
    elif n < k * kk:
        # Smallest reduced cost off the tree: how far the costs may move before this basis can stop being optimal.
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
def solve_transport(k, kk, p, q, C, codes, w):
    """W1 = min_pi <pi, C> for marginals p (k), q (kk), costs C (row-major k x kk), warm-started from `codes`.

    Returns (value, pivots, status): status 0 optimal, 1 pivot limit hit (value is a feasible upper bound).
    `codes` (length >= k + kk - 1) is updated in place to the optimal basis.
    """
    n = k + kk - 1
    if not (_basis_fits(codes, n, k, kk) and _flows(codes, n, p, q, w[5], w[6], w[2])):
        _greedy_basis(k, kk, p, q, C, codes, w[14], w[5], w[6], w[9], w[10])
        _flows(codes, n, p, q, w[5], w[6], w[2])
    value, pivots, status, slack = _optimize(k, kk, p, q, C, codes, w, MAX_PIVOTS)
    return value, pivots, status


@njit(cache=True, nogil=True)
def _workspace(K):
    nb = 2 * K - 1
    return (
        np.empty(nb, np.int64),  # cells
        np.empty(K * K, np.int8),  # mark (basic cells)
        np.empty(nb, np.float64),  # flow
        np.empty(K, np.float64),  # u
        np.empty(K, np.float64),  # v
        np.empty(K, np.float64),  # rs
        np.empty(K, np.float64),  # rd
        np.empty(2 * K, np.int64),  # deg
        np.empty(nb, np.bool_),  # used
        np.empty(K, np.bool_),  # row_on
        np.empty(K, np.bool_),  # col_on
        np.empty(2 * K, np.int64),  # parent edge
        np.empty(2 * K, np.int64),  # parent node
        np.empty(2 * K, np.int64),  # queue (peeling)
        np.empty(K * K, np.int64),  # order (greedy)
        np.empty(2 * K, np.int64),  # depth in the basis tree
        np.empty(2 * K + 1, np.int64),  # incidence list offsets
        np.empty(4 * K, np.int64),  # incidence lists
    )


@njit(cache=True, nogil=True)
def _pair_missing(s, s2, n1, n2) -> bool:
    """Some action of pair (s, s2) has no data on one side: its term is the unknown constant."""
    for a in range(n1.shape[1]):
        if n1[s, a] == 0 or n2[s2, a] == 0:
            return True
    return False


@njit(cache=True, nogil=True)
def _action_bounds(s, s2, R1, n1, R2, n2, gamma, wb, Pr, margin, U) -> bool:
    """Upper bounds U[a] on every action's term for pair (s, s2) (-inf if unknown); True if any is unknown."""
    missing = False
    for a in range(n1.shape[1]):
        if n1[s, a] == 0 or n2[s2, a] == 0:
            missing = True
            U[a] = -np.inf
        else:
            U[a] = abs(R1[s, a] - R2[s2, a]) + gamma * (wb[s, s2, a] + Pr[s, a]) + margin
    return missing


@njit(cache=True, nogil=True)
def _sweep_row(
    s, d, cum, Pr, Z, exact, R1, idx1, p1, n1, R2, idx2, p2, n2, gamma, unknown_value,
    codes, wb, ex, G, exa, F, act, tgt, flw, stats, gaps, max_pivots,
):  # fmt: skip
    """Row s of `sweep`."""
    S1, A = n1.shape
    S2 = n2.shape[0]
    K = max(idx1.shape[2], idx2.shape[2])
    nb = codes.shape[3]
    margin = 1e-12 * (1.0 + cum)
    w = _workspace(K)
    flow = w[2]
    C = np.empty(K * K, np.float64)
    U = np.empty(A, np.float64)
    best_t = np.empty(nb, np.int64)
    best_f = np.empty(nb, np.float64)
    problems = 0
    pivots = 0
    failures = 0
    dots = 0
    flat = d.reshape(S1 * S2)
    for s2 in range(S2):
        a = act[s, s2]
        if 0 <= a < A and G[s, s2] < np.inf and (not exact or cum < exa[s, s2]):
            # Fast path, sequential memory only: the previous choice's coupling (tgt/flw hold its basis, still
            # optimal when exact) and, if its value beats the bound on every competitor, nothing else.
            value = 0.0
            for pos in range(nb):
                t = tgt[s, s2, pos]
                if t < 0:
                    break
                value += flw[s, s2, pos] * flat[t]
            total = abs(R1[s, a] - R2[s2, a]) + gamma * value
            # G bounds the known competitors only; the unknown term depends on the mode (lower, upper) that
            # reads the same workspace, so it is checked here, at this solve's value.
            if total >= G[s, s2] + gamma * Z[s] + margin and (
                total >= unknown_value + margin or not _pair_missing(s, s2, n1, n2)
            ):
                F[s, s2] = total
                dots += 1
                continue
        missing = _action_bounds(s, s2, R1, n1, R2, n2, gamma, wb, Pr, margin, U)
        best = -1.0
        best_a = -1
        best_n = 0
        if a >= A or (a >= 0 and U[a] == -np.inf):  # else the previous choice first: it usually stays the
            a = -1  # maximum and prunes the rest
        while True:
            if a < 0:
                top = best
                for b in range(A):
                    if U[b] > top:
                        top = U[b]
                        a = b
                if a < 0:
                    break
            U[a] = -np.inf
            k = n1[s, a]
            kk = n2[s2, a]
            n = k + kk - 1
            value = _coupling_value(codes, s, s2, a, k, kk, p1, p2, idx1, idx2, w[5], w[6], flow, d)
            fits = not np.isnan(value)
            if not fits and not exact:
                # A placeholder coupling (cost-blind, cheap); ex = -inf marks it for a greedy rebuild.
                value = _corner_value(codes, s, s2, a, k, kk, p1, p2, idx1, idx2, w[3], w[4], w[5], w[6], flow, d)
                ex[s, s2, a] = -np.inf
            # Solve to optimality only if it may win: the stored coupling's value bounds W1 from above, so an
            # action it already puts at or below the best exact term found is dominated as it stands.
            dominated = fits and abs(R1[s, a] - R2[s2, a]) + gamma * value <= best
            if exact and (not fits or not cum < ex[s, s2, a]) and not dominated:
                cb = codes[s, s2, a]
                pa = p1[s, a, :k]
                qa = p2[s2, a, :kk]
                ix = idx1[s, a]
                iy = idx2[s2, a]
                for i in range(k):
                    row = d[ix[i]]
                    for j in range(kk):
                        C[i * kk + j] = row[iy[j]]
                if not fits or (ex[s, s2, a] == -np.inf and n < k * kk):  # a single row or column: the one basis
                    _greedy_basis(k, kk, pa, qa, C, cb, w[14], w[5], w[6], w[9], w[10])
                    _flows(cb, n, pa, qa, w[5], w[6], flow)
                value, piv, status, slack = _optimize(k, kk, pa, qa, C, cb, w, max_pivots)
                problems += 1
                pivots += piv
                failures += status
                if status == 0:
                    ex[s, s2, a] = cum + slack / (2 * min(k, kk)) - margin
                else:  # expired, basis kept: the next exact sweep resumes the simplex where this one stopped
                    ex[s, s2, a] = -1.0
                    gap = gamma * slack
                    if gap > gaps[s]:
                        gaps[s] = gap
            else:
                dots += 1
            wb[s, s2, a] = value - Pr[s, a]
            total = abs(R1[s, a] - R2[s2, a]) + gamma * value
            if total > best:
                best = total
                best_a = a
                best_n = n
                for pos in range(n):
                    c = codes[s, s2, a, pos] >> 1
                    best_t[pos] = idx1[s, a, c // STRIDE] * S2 + idx2[s2, a, c % STRIDE]
                    best_f[pos] = flow[pos]
            a = -1
        if missing and unknown_value > best:
            best = unknown_value
            best_a = -1
            best_n = 0
        if best < 0.0:  # no action known on either side
            best = unknown_value
        F[s, s2] = best
        act[s, s2] = best_a
        # The known competitors' bound, anchored like wb (add gamma * Z[s] to read it): every known action but
        # the chosen one. Not the unknown term: its value is the caller's (0 lower, Rbar / (1 - gamma) upper).
        g = -np.inf
        for b in range(A):
            if b != best_a and n1[s, b] > 0 and n2[s2, b] > 0:
                g = max(g, abs(R1[s, b] - R2[s2, b]) + gamma * (wb[s, s2, b] + Pr[s, b]))
        G[s, s2] = g - gamma * Z[s]
        exa[s, s2] = ex[s, s2, best_a] if best_a >= 0 else -np.inf
        for pos in range(nb):
            if pos < best_n:
                tgt[s, s2, pos] = best_t[pos]
                flw[s, s2, pos] = best_f[pos]
            else:
                tgt[s, s2, pos] = -1
                flw[s, s2, pos] = 0.0
    stats[s, 0] += problems
    stats[s, 1] += pivots
    stats[s, 2] += failures
    stats[s, 3] += dots


@njit(cache=True, nogil=True, parallel=True)
def sweep(
    d, cum, Pr, Z, exact, R1, idx1, p1, n1, R2, idx2, p2, n2, gamma, unknown_value,
    codes, wb, ex, G, exa, F, act, tgt, flw, stats, gaps, max_pivots,
):  # fmt: skip
    """One application of the operator, F = max_a |dR| + gamma * W_a, in parallel over s, pruned by bounds.

    Every transport problem (s, s', a) keeps a tree basis `codes` (always primal feasible once built) and two
    numbers that stay valid while d moves, with `cum` an upper bound on the sup-norm distance travelled by d
    since a fixed origin:
      wb: the value of its coupling at some earlier d, minus the row clock Pr[s, a] then. The coupling has row
          marginal P(.|s, a), so over one change of d its value rose by at most sum_x P(x|s, a) max_y (change
          of d(x, y)) (signed), the change of Pr[s, a]; W1 is at most that coupling's value: wb + Pr[s, a]
          bounds both from above now.
      G[s, s']: the best competitor's bound then, minus Z[s] then; Z[s] rises by at least every Pr[s, .].
      ex: the basis was proved optimal with smallest off-tree reduced cost `slack`; a cost change of at most
          delta moves a reduced cost by at most 2 min(k, k') delta (the cell plus its tree path), so the basis
          stays optimal while cum < ex = cum_then + slack / (2 min(k, k')).
    Per pair, actions are visited from the largest bound down (the previous choice first) and the visit stops
    once no bound exceeds the best value found, so the maximum is exact while dominated actions cost O(1).

    exact=True: each visited problem is solved to optimality (a basis still known optimal only needs its
    value: a dot product over its k + k' - 1 cells); F is the exact operator F(d).
    exact=False: visited problems are evaluated with their current couplings, no pivoting; F is T_pi(d) for
    the stored couplings pi (an upper bound on F(d)) and `act` its greedy action: the improvement step of
    policy iteration for the maximising player.

    A state-action missing in either model contributes `unknown_value`. act[s, s'] is the maximising action
    (-1 when the unknown term wins), tgt/flw its coupling as (target pair index, mass) lists.
    stats[s] accumulates (problems optimised, pivots, pivot-limit failures, values by dot product); gaps[s] is
    raised to gamma times the duality gap of every problem that reached `max_pivots` pivots, so the computed F
    lies in [F(d), F(d) + max(gaps)] (exact=True).
    """
    for s in prange(n1.shape[0]):
        _sweep_row(
            s, d, cum, Pr, Z, exact, R1, idx1, p1, n1, R2, idx2, p2, n2, gamma, unknown_value,
            codes, wb, ex, G, exa, F, act, tgt, flw, stats, gaps, max_pivots,
        )  # fmt: skip


@njit(cache=True, nogil=True)
def sweep_serial(
    d, cum, Pr, Z, exact, R1, idx1, p1, n1, R2, idx2, p2, n2, gamma, unknown_value,
    codes, wb, ex, G, exa, F, act, tgt, flw, stats, gaps, max_pivots,
):  # fmt: skip
    """`sweep` on the calling thread only: for small problems, where waking the thread pool costs more."""
    for s in range(n1.shape[0]):
        _sweep_row(
            s, d, cum, Pr, Z, exact, R1, idx1, p1, n1, R2, idx2, p2, n2, gamma, unknown_value,
            codes, wb, ex, G, exa, F, act, tgt, flw, stats, gaps, max_pivots,
        )  # fmt: skip


@njit(cache=True, nogil=True)
def evaluate_couplings(x, base, tgt, flw, gamma, tol, max_sweeps):
    """Gauss-Seidel solve of x = base + gamma * Pi x for fixed actions and couplings; returns sweeps used.

    `base` holds |dR| of the chosen action (or the constant of an unknown term, with no couplings).
    The pair chain is gamma-discounted, so each sweep contracts the error by at least gamma.
    """
    S1, S2 = x.shape
    nb = tgt.shape[2]
    flat = x.reshape(S1 * S2)
    for sweep in range(1, max_sweeps + 1):
        delta = 0.0
        for s in range(S1):
            for s2 in range(S2):
                acc = 0.0
                for pos in range(nb):
                    t = tgt[s, s2, pos]
                    if t < 0:
                        break
                    acc += flw[s, s2, pos] * flat[t]
                new = base[s, s2] + gamma * acc
                diff = abs(new - flat[s * S2 + s2])
                if diff > delta:
                    delta = diff
                flat[s * S2 + s2] = new
        if delta <= tol:
            return sweep
    return max_sweeps


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
