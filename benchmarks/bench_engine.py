"""DT-BSM engine benchmark: every goal of the engine, measured in one run, against the naive POT baseline.

Run: .venv/bin/python benchmarks/bench_engine.py [--quick]

The naive baseline is plain fixed-point iteration from d = 0 with one POT `ot.emd2` call per (s, s', a) per sweep
(`dtsync.metric.naive`). It is *measured* where it finishes in seconds (section 1); elsewhere it is *modelled*:
seconds per `ot.emd2` call, measured in this run on problems drawn from the case itself, times the calls per sweep
(S * S' * A), times the sweeps plain iteration needs (log(stop / Rbar) / log(gamma), stop = tol (1-gamma)/gamma;
section 1 prints this model beside the measured naive run to check it).

Sections: (0) JIT compile; (1) engine vs measured naive at S=32; (2) cold S=256 A=16 supports <= 8 on one core,
median and worst of 5 random instances; (3) structured sparse MDPs (queue and grid, S=500-1024), time per transport
problem beside the arithmetic floor; (4) warm refresh after one window step at S=256 A=16; (5) gamma 0.99 / 0.9;
(6) peak memory of one solve at S=1024 A=8 against the documented bound.

Every timing is of a warmed-up engine: both sweep kernels (serial and parallel) are compiled or loaded before any
clock starts. (The 15.66 s one-thread S=256 line once printed by `make bench` was that compile: the warm-up ran a
4-state problem, which only loads the serial kernel, so the parallel one compiled inside the timed region, about
12 s of CPU with an empty numba cache.) Times are process CPU (this process's threads, all cores) and wall; the
machine is shared, so the load average is printed with each section.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import numba
import numpy as np
import ot
from numba import njit

from dtsync.metric import bellman
from dtsync.metric.dtbsm import DTBSMSolver, dtbsm
from dtsync.metric.naive import dtbsm_naive
from dtsync.metric.sparse import SparseMDP

SEED = 20250224
TOL = 1e-8

Arrays = tuple[np.ndarray, np.ndarray]


# --- MDPs ----------------------------------------------------------------------------------------------------


def random_mdp(rng: np.random.Generator, S: int, A: int, k_max: int, k_min: int | None = None) -> Arrays:
    """Rewards uniform in [0, 1]; each row puts random mass on k random next states (k in [k_min, k_max])."""
    k_min = k_max if k_min is None else k_min
    R = rng.random((S, A))
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            k = int(rng.integers(k_min, k_max + 1))
            P[s, a, rng.choice(S, size=k, replace=False)] = rng.random(k) + 1e-3
    return R, P / P.sum(axis=2, keepdims=True)


def perturb(rng: np.random.Generator, R: np.ndarray, P: np.ndarray, scale: float = 0.1) -> Arrays:
    """A twin: the real MDP with independent noise on rewards and on the probabilities of each row."""
    R2 = np.clip(R + scale * rng.standard_normal(R.shape), 0.0, 1.0)
    P2 = np.where(P > 0, P * np.exp(scale * rng.standard_normal(P.shape)), 0.0)
    return R2, P2 / P2.sum(axis=2, keepdims=True)


def queue_mdp(S: int, A: int, deterministic: bool, load: float = 0.0) -> Arrays:
    """Queue length 0..S-1; action a serves at rate mu_a. Real: up, down or stay (3 next states); the twin's
    fluid model: deterministic drift (1 next state). Reward: minus the backlog and the service effort."""
    R = np.zeros((S, A))
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            mu = 0.2 + 0.6 * a / max(A - 1, 1)
            lam = 0.5 + load
            R[s, a] = -s / S - 0.1 * a
            up, down = min(S - 1, s + 1), max(0, s - 1)
            if deterministic:
                P[s, a, up if lam * (1 - mu) > 0.5 * mu else down] = 1.0
            else:
                P[s, a, up] += lam * (1 - mu)
                P[s, a, down] += 0.5 * mu
                P[s, a, s] += 1.0 - lam * (1 - mu) - 0.5 * mu
    return R, P


_MOVES4 = [(-1, 0), (0, 1), (1, 0), (0, -1)]
_MOVES8 = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]


def grid_mdp(side: int, A: int, slip: float) -> Arrays:
    """side x side grid, A in {4, 8} moves; the intended move w.p. 1 - slip, each of the two neighbouring
    directions w.p. slip / 2 (a wall keeps the agent in place: supports of 1-3 states). Reward 1 at the goal
    corner, a small cost per move elsewhere."""
    moves = _MOVES4 if A == 4 else _MOVES8
    S = side * side
    R = np.full((S, A), -0.01)
    R[S - 1] = 1.0
    P = np.zeros((S, A, S))
    for r in range(side):
        for c in range(side):
            for a in range(A):
                for da, p in ((0, 1.0 - slip), (-1, slip / 2), (1, slip / 2)):
                    if p > 0.0:
                        dr, dc = moves[(a + da) % A]
                        rr, cc = min(side - 1, max(0, r + dr)), min(side - 1, max(0, c + dc))
                        P[r * side + c, a, rr * side + cc] += p
    return R, P


# --- measuring ------------------------------------------------------------------------------------------------


def cpu_timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def fmt_time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, name: str, goal: str, measured: str, met: bool | None) -> None:
        self.rows.append((name, goal, measured, "-" if met is None else ("yes" if met else "NO")))

    def print(self) -> None:
        header = ("benchmark", "goal", "measured", "met?")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        for row in [header, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def pot_seconds_per_call(R: np.ndarray, P: np.ndarray, R2: np.ndarray, P2: np.ndarray, calls: int = 3000) -> float:
    """Seconds per `ot.emd2` call on problems drawn from this pair (its supports, a random cost matrix), as the
    naive baseline calls it (slicing, normalising and the cost matrix included)."""
    rng = np.random.default_rng(SEED)
    S, A = R.shape
    S2 = R2.shape[0]
    d = rng.random((S, S2))
    picks = [(int(rng.integers(S)), int(rng.integers(S2)), int(rng.integers(A))) for _ in range(calls)]
    start = time.process_time()
    for s, t, a in picks:
        x, y = np.flatnonzero(P[s, a]), np.flatnonzero(P2[t, a])
        p, q = P[s, a, x], P2[t, a, y]
        ot.emd2(p / p.sum(), q / q.sum(), np.ascontiguousarray(d[np.ix_(x, y)]))
    return (time.process_time() - start) / calls


def plain_sweeps(R: np.ndarray, R2: np.ndarray, gamma: float) -> int:
    """Sweeps plain iteration from 0 needs: its step n is at most gamma^(n-1) Rbar (Rbar = the first step)."""
    rbar = float(np.abs(R[:, None, :] - R2[None, :, :]).max())
    stop = TOL * (1.0 - gamma) / gamma
    return 1 + max(0, math.ceil(math.log(stop / rbar) / math.log(gamma)))


def modelled_naive(R: np.ndarray, P: np.ndarray, R2: np.ndarray, P2: np.ndarray, gamma: float) -> float:
    return pot_seconds_per_call(R, P, R2, P2) * R.shape[0] * R2.shape[0] * R.shape[1] * plain_sweeps(R, R2, gamma)


@njit(cache=True)
def _corner_dots(d, real, twin) -> float:
    """The arithmetic floor: for every problem, the value of one coupling with the fewest cells (north-west
    corner, k + k' - 1 cells), a dot product over those cells; what an exact sweep costs at best."""
    S1, A = real.n.shape
    S2 = twin.n.shape[0]
    cr = np.empty(real.idx.shape[2])
    cd = np.empty(twin.idx.shape[2])
    acc = 0.0
    for s in range(S1):
        for s2 in range(S2):
            for a in range(A):
                k, kk = real.n[s, a], twin.n[s2, a]
                for i in range(k):
                    cr[i] = real.mass[s, a, i]
                for j in range(kk):
                    cd[j] = twin.mass[s2, a, j]
                i = 0
                j = 0
                while i < k and j < kk:
                    f = min(cr[i], cd[j])
                    acc += f * d[real.idx[s, a, i], twin.idx[s2, a, j]]
                    cr[i] -= f
                    cd[j] -= f
                    if cr[i] <= cd[j]:
                        i += 1
                    else:
                        j += 1
    return acc


def floor_seconds(R: np.ndarray, P: np.ndarray, R2: np.ndarray, P2: np.ndarray) -> float:
    m1, m2 = SparseMDP.from_dense(R, P), SparseMDP.from_dense(R2, P2)
    d = np.random.default_rng(0).random((R.shape[0], R2.shape[0]))
    _corner_dots(d, m1, m2)
    best = np.inf
    for _ in range(3):
        start = time.process_time()
        _corner_dots(d, m1, m2)
        best = min(best, time.process_time() - start)
    return best


# --- sections -------------------------------------------------------------------------------------------------

_FIRST_CALL = """
import time, numpy as np
from dtsync.metric.dtbsm import dtbsm
rng = np.random.default_rng(0)
R = rng.random((4, 2)); P = rng.random((4, 2, 4)); P /= P.sum(axis=2, keepdims=True)
t0 = time.perf_counter(); dtbsm(R, P, R[::-1], P[::-1], 0.9)
t1 = time.perf_counter(); dtbsm(R, P, R[::-1], P[::-1], 0.9)
t2 = time.perf_counter()
print((t1 - t0) - (t2 - t1))
"""


def first_call_overhead(cache_dir: str | None) -> float:
    """Extra cost of the first engine call in a fresh process; with an empty numba cache, a full compile."""
    env = dict(os.environ, **({"NUMBA_CACHE_DIR": cache_dir} if cache_dir else {}))
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def warm_up() -> None:
    """Compile or load both sweep kernels (the parallel one is only picked for large problems, so a small
    `dtbsm` call alone would leave it to compile inside the first large timing)."""
    rng = np.random.default_rng(SEED)
    R, P = random_mdp(rng, 6, 2, 2)
    R2, P2 = perturb(rng, R, P)
    dtbsm(R, P, R2, P2, 0.9, tol=TOL)
    m1, m2 = SparseMDP.from_dense(R, P), SparseMDP.from_dense(R2, P2)
    ws = bellman.Workspace()
    ws.prepare(m1, m2)
    d = np.zeros((6, 6))
    ws.observe(d)
    out = bellman.SweepOutput(np.empty((6, 6)), np.zeros((6, 4), np.int64), np.zeros(6))
    bellman.sweep(d, ws.cum, m1, m2, ws.state(), 0.9, 0.0, True, 10, out)


def bench_compile(table: Table) -> None:
    print("(0) JIT compile in a fresh process ...", flush=True)
    with tempfile.TemporaryDirectory() as cache:  # empty, then holding what the first process compiled
        compile_time = first_call_overhead(cache)
        warm_time = first_call_overhead(cache)
    table.add("(0) JIT compile, empty numba cache (once per install)", "report", fmt_time(compile_time), None)
    table.add("(0) first call, numba cache warm", "report", fmt_time(warm_time), None)
    _w, cpu, _ = cpu_timed(warm_up)
    print(f"    in-process warm-up of both sweep kernels {fmt_time(cpu)} CPU; "
          f"numba threading layer: {numba.threading_layer()}")


def bench_vs_naive(table: Table, S: int) -> None:
    rng = np.random.default_rng(SEED + 1)
    R, P = random_mdp(rng, S, 4, 3)
    R2, P2 = perturb(rng, R, P)
    print(f"(1) measured naive baseline at S={S}, A=4, 3-point supports ({load()}) ...", flush=True)
    _w, t_naive, (d_naive, sweeps) = cpu_timed(lambda: dtbsm_naive(R, P, R2, P2, 0.9, tol=TOL))
    runs = [cpu_timed(lambda: dtbsm(R, P, R2, P2, 0.9, tol=TOL)) for _ in range(5)]
    t_engine = float(np.median([c for _w, c, _r in runs]))
    res = runs[0][2]
    model = modelled_naive(R, P, R2, P2, 0.9)
    err = float(np.max(np.abs(res.d - d_naive)))
    print(f"    naive {fmt_time(t_naive)} CPU ({sweeps} sweeps; model {fmt_time(model)}, "
          f"{plain_sweeps(R, R2, 0.9)} sweeps), engine {fmt_time(t_engine)} CPU (median of 5)")
    table.add(f"(1) speed-up vs measured naive, S={S} A=4 g=0.9", ">= 1000x", f"{t_naive / t_engine:,.0f}x "
              f"(naive {fmt_time(t_naive)}, model {fmt_time(model)})", t_naive / t_engine >= 1000)
    table.add("(1) max |d_engine - d_naive|", "<= 1e-6", f"{err:.1e}", err <= 1e-6)


def bench_cold_large(table: Table, S: int, instances: int) -> None:
    """One core: numba's pool set to 1 thread (the engine then runs its serial kernel). Then all threads."""
    threads = numba.get_num_threads()
    print(f"(2) cold S={S}, A=16, supports 1..8, {instances} random instances, 1 thread ({load()}) ...", flush=True)
    cpus, walls, pairs = [], [], []
    numba.set_num_threads(1)
    try:
        for i in range(instances):
            rng = np.random.default_rng(SEED + 2 + i)
            R, P = random_mdp(rng, S, 16, 8, k_min=1)
            R2, P2 = perturb(rng, R, P)
            wall, cpu, res = cpu_timed(lambda R=R, P=P, R2=R2, P2=P2: dtbsm(R, P, R2, P2, 0.9, tol=TOL))
            cpus.append(cpu)
            walls.append(wall)
            pairs.append((R, P, R2, P2))
            print(f"    instance {i}: {fmt_time(cpu)} CPU, {fmt_time(wall)} wall, {res.iterations} sweeps, "
                  f"{res.pivots} pivots", flush=True)
    finally:
        numba.set_num_threads(threads)
    median, worst = float(np.median(cpus)), max(cpus)
    model = modelled_naive(*pairs[0], 0.9)
    table.add(f"(2) cold S={S} A=16 k<=8, 1 core, median of {instances}", "< 1 s",
              f"{fmt_time(median)} CPU (wall {fmt_time(float(np.median(walls)))})", median < 1.0)
    table.add("(2) same, worst instance", "report", fmt_time(worst), None)
    table.add("(2) modelled naive, instance 0", "report", f"{fmt_time(model)} ({model / cpus[0]:,.0f}x)", None)
    if threads > 1:
        wall, cpu, _ = cpu_timed(lambda: dtbsm(*pairs[0], 0.9, tol=TOL))
        table.add(f"(2) instance 0, {threads} threads", "report", f"{fmt_time(wall)} wall ({fmt_time(cpu)} CPU)",
                  None)


def structured_cases(quick: bool) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    if quick:
        return [("queue S=200 A=6, 3 x 1", (*queue_mdp(200, 6, False), *queue_mdp(200, 6, True)))]
    return [
        ("queue S=500 A=6, 3 x 1", (*queue_mdp(500, 6, False), *queue_mdp(500, 6, True))),
        ("queue S=1000 A=8, 3 x 1", (*queue_mdp(1000, 8, False), *queue_mdp(1000, 8, True, load=0.1))),
        ("grid S=900 A=4, 1-3 x 1-3", (*grid_mdp(30, 4, 0.2), *grid_mdp(30, 4, 0.3))),
    ]


def bench_structured(table: Table, quick: bool) -> None:
    numba.set_num_threads(1)
    try:
        for name, (R, P, R2, P2) in structured_cases(quick):
            R2 = R2 + 0.05  # the twin's reward model is slightly off too
            print(f"(3) structured {name}, 1 thread ({load()}) ...", flush=True)
            wall, cpu, res = cpu_timed(lambda R=R, P=P, R2=R2, P2=P2: dtbsm(R, P, R2, P2, 0.9, tol=TOL))
            model = modelled_naive(R, P, R2, P2, 0.9)
            per_sweep = R.shape[0] * R2.shape[0] * R.shape[1]
            floor = floor_seconds(R, P, R2, P2) / per_sweep
            engine_per = cpu / (per_sweep * res.iterations)
            print(f"    {fmt_time(cpu)} CPU, {fmt_time(wall)} wall, {res.iterations} exact sweeps; naive model "
                  f"{fmt_time(model)}")
            table.add(f"(3) {name}: speed-up vs modelled naive", ">= 50,000x",
                      f"{model / cpu:,.0f}x ({fmt_time(cpu)} vs {fmt_time(model)})", model / cpu >= 50_000)
            table.add(f"(3) {name}: per problem per exact sweep, all costs / arithmetic floor", "report",
                      f"{engine_per * 1e9:.1f} ns / {floor * 1e9:.1f} ns", None)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def window_steps(rng: np.random.Generator, counts: np.ndarray, R: np.ndarray, steps: int) -> list[Arrays]:
    """Successive real MDPs as a sliding window moves: each step one transition leaves one row and a new
    one (to a next state in the row's support, or rarely a new one) arrives in the same row."""
    counts, R = counts.copy(), R.copy()
    S = counts.shape[0]
    out = []
    for _ in range(steps):
        s, a = int(rng.integers(S)), int(rng.integers(counts.shape[1]))
        row = counts[s, a]
        support = np.flatnonzero(row)
        row[rng.choice(support)] -= 1
        row[rng.choice(support) if rng.random() < 0.9 else rng.integers(S)] += 1
        if row.sum() == 0:  # never leave a row empty: the window keeps its one transition
            row[support[0]] += 1
        R[s, a] += (rng.random() - R[s, a]) / row.sum()
        out.append((R.copy(), counts / counts.sum(axis=2, keepdims=True)))
    return out


def bench_warm(table: Table, S: int, A: int, steps: int, colds: int) -> None:
    rng = np.random.default_rng(SEED + 3)
    R, P = random_mdp(rng, S, A, 8, k_min=1)
    R2, P2 = perturb(rng, R, P)
    counts = np.round(P * 20) + (P > 0)  # about 20 transitions per row, every support state seen
    sequence = window_steps(rng, counts, R, steps)
    print(f"(4) warm refresh S={S}, A={A}, {steps} window steps, 1 thread ({load()}) ...", flush=True)
    numba.set_num_threads(1)
    try:
        solver = DTBSMSolver()
        solver.solve(R, counts / counts.sum(axis=2, keepdims=True), R2, P2, 0.9, tol=TOL)
        cpu_times, wall_times, warm_d = [], [], []
        for Rs, Ps in sequence:
            wall, cpu, res = cpu_timed(lambda Rs=Rs, Ps=Ps: solver.solve(Rs, Ps, R2, P2, 0.9, tol=TOL))
            cpu_times.append(cpu)
            wall_times.append(wall)
            warm_d.append(res.d)
        cold_cpu, err = [], 0.0
        for i in np.linspace(0, steps - 1, colds).astype(int):
            Rs, Ps = sequence[i]
            _w, cpu, res = cpu_timed(lambda Rs=Rs, Ps=Ps: dtbsm(Rs, Ps, R2, P2, 0.9, tol=TOL))
            cold_cpu.append(cpu)
            err = max(err, float(np.max(np.abs(res.d - warm_d[i]))))
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    p50, p99 = np.percentile(cpu_times, [50, 99])
    w99 = float(np.percentile(wall_times, 99))
    print(f"    warm p50 {fmt_time(p50)}, p99 {fmt_time(p99)} CPU (wall p99 {fmt_time(w99)}); cold "
          f"{fmt_time(float(np.median(cold_cpu)))}; max |warm - cold| {err:.1e}")
    table.add(f"(4) warm refresh p99, S={S} A={A}, 1 core", "< 100 ms",
              f"{fmt_time(p99)} CPU (wall {fmt_time(w99)}), p50 {fmt_time(p50)}", p99 < 0.100)
    table.add(f"(4) cold recompute, median of {colds} of the steps", "report", fmt_time(float(np.median(cold_cpu))),
              None)
    table.add("(4) max |d_warm - d_cold|", "<= 2e-8", f"{err:.1e}", err <= 2 * TOL)


def bench_gamma(table: Table, quick: bool) -> None:
    rng = np.random.default_rng(SEED + 4)
    R, P = random_mdp(rng, 64, 8, 4, k_min=1)
    cases = [("random S=64 A=8 k<=4", (R, P, *perturb(rng, R, P)))]
    S = 100 if quick else 200
    cases.append((f"queue S={S} A=6 3 x 1", (*queue_mdp(S, 6, False), *queue_mdp(S, 6, True))))
    numba.set_num_threads(1)
    try:
        for name, pair in cases:
            print(f"(5) gamma 0.99 vs 0.9, {name} ({load()}) ...", flush=True)
            out = {}
            for g in (0.9, 0.99):
                runs = [cpu_timed(lambda g=g, pair=pair: dtbsm(*pair, g, tol=TOL)) for _ in range(3)]
                out[g] = (float(np.median([c for _w, c, _r in runs])), runs[0][2].iterations)
            ratio = out[0.99][0] / out[0.9][0]
            print(f"    g=0.9 {fmt_time(out[0.9][0])} ({out[0.9][1]} exact sweeps), g=0.99 {fmt_time(out[0.99][0])} "
                  f"({out[0.99][1]} exact sweeps)")
            table.add(f"(5) time g=0.99 / g=0.9, {name}", "<= 3x", f"{ratio:.1f}x", ratio <= 3.0)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def memory_bound(S1: int, S2: int, A: int, K1: int, K2: int) -> int:
    """Bytes one solve allocates at its peak, inputs excluded (README, Performance):

        S1 S2 A (4 nb + 24)  +  S1 S2 (16 nb + 224)  +  16 A (S1^2 + S2^2)  +  24 A (S1 K1 + S2 K2),
        nb = 2 max(K1, K2) - 1.

    Per transport problem an int32 tree basis of nb cells and three float anchors (wb, ex, eq); per pair the
    chosen coupling (int64 targets, float masses) and at most 28 float / int64 (S1, S2) arrays alive at once (the
    workspace's act, G, exa, eqa and last d; the loop's d, F and accepted F; the fixed points kept for warm starts
    and returned; the loop's temporaries; the evaluation's last change and backup, and the candidate's copy);
    the validated dense P of both sides (and their normalised copies when data is missing: the point estimate's
    completions) and the sparse supports (int64 indices, float masses, support sizes).
    Numba's per-thread scratch (a few K x K arrays) is not counted."""
    nb = 2 * max(K1, K2) - 1
    return S1 * S2 * A * (4 * nb + 24) + S1 * S2 * (16 * nb + 224) + 16 * A * (S1 * S1 + S2 * S2) + 24 * A * (
        S1 * K1 + S2 * K2
    )


def bench_memory(table: Table, side: int, A: int) -> None:
    """Peak of the Python and numpy heap during one cold solve (tracemalloc: numpy reports its buffers to it)."""
    S = side * side
    R, P = grid_mdp(side, A, 0.2)
    R2, P2 = grid_mdp(side, A, 0.0)
    print(f"(6) peak memory of one solve at S={S}, A={A} (grid, slip 0.2 vs a deterministic twin) ({load()}) ...",
          flush=True)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    _w, cpu, res = cpu_timed(lambda: dtbsm(R, P, R2, P2, 0.9, tol=TOL))
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    K1, K2 = int((P > 0).sum(-1).max()), int((P2 > 0).sum(-1).max())
    bound = memory_bound(S, S, A, K1, K2)
    mib = 1024 * 1024
    print(f"    {fmt_time(cpu)} CPU, {res.iterations} exact sweeps, supports <= {K1} / {K2}")
    table.add(f"(6) peak memory of one solve, S={S} A={A}", "<= formula", f"{peak / mib:,.0f} MiB (formula "
              f"{bound / mib:,.0f} MiB)", peak <= bound)


def profile_solve(name: str, pair: tuple[np.ndarray, ...], gamma: float) -> None:
    """Where one cold solve's CPU goes (`--profile`): each kernel call wrapped in a timer and counted, the rest
    (validation, workspace allocation, numpy between sweeps) as the remainder."""
    dtbsm_module = importlib.import_module("dtsync.metric.dtbsm")
    cpu: dict[str, float] = {"exact sweeps": 0.0, "evaluation sweeps": 0.0, "evaluations": 0.0, "workspace": 0.0}
    calls: dict[str, int] = dict.fromkeys(cpu, 0)
    counts = {"problems optimised": 0, "pivots": 0, "Gauss-Seidel passes": 0}
    sweep, evaluate, prepare = bellman.sweep_serial, dtbsm_module.evaluate_couplings, bellman.Workspace.prepare

    def timed_sweep(d, cum, m1, m2, st, g, unknown, exact, max_pivots, out):  # type: ignore[no-untyped-def]
        before = out.stats.sum(axis=0)
        start = time.process_time()
        sweep(d, cum, m1, m2, st, g, unknown, exact, max_pivots, out)
        key = "exact sweeps" if exact else "evaluation sweeps"
        cpu[key] += time.process_time() - start
        calls[key] += 1
        after = out.stats.sum(axis=0)
        counts["problems optimised"] += int(after[0] - before[0])
        counts["pivots"] += int(after[1] - before[1])

    def timed_evaluate(*args):  # type: ignore[no-untyped-def]
        start = time.process_time()
        passes = evaluate(*args)
        cpu["evaluations"] += time.process_time() - start
        calls["evaluations"] += 1
        counts["Gauss-Seidel passes"] += passes
        return passes

    def timed_prepare(self, m1, m2):  # type: ignore[no-untyped-def]
        start = time.process_time()
        prepare(self, m1, m2)
        cpu["workspace"] += time.process_time() - start
        calls["workspace"] += 1

    bellman.sweep_serial = timed_sweep
    dtbsm_module.evaluate_couplings = timed_evaluate
    bellman.Workspace.prepare = timed_prepare  # type: ignore[method-assign]
    numba.set_num_threads(1)
    try:
        _w, total, _res = cpu_timed(lambda: dtbsm(*pair, gamma, tol=TOL))
    finally:
        bellman.sweep_serial = sweep
        dtbsm_module.evaluate_couplings = evaluate
        bellman.Workspace.prepare = prepare  # type: ignore[method-assign]
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    parts = ", ".join(f"{k} {fmt_time(v)} ({calls[k]})" for k, v in cpu.items())
    print(f"  {name}, gamma {gamma}: {fmt_time(total)} CPU: {parts}, rest {fmt_time(total - sum(cpu.values()))}; "
          + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


def profile(quick: bool) -> None:
    rng = np.random.default_rng(SEED + 2)
    S = 64 if quick else 256
    R, P = random_mdp(rng, S, 16, 8, k_min=1)
    warm_up()
    print(f"profile of one cold solve per case, 1 thread ({load()}):")
    profile_solve(f"random S={S} A=16 k<=8", (R, P, *perturb(rng, R, P)), 0.9)
    Q = 100 if quick else 200
    queue = (*queue_mdp(Q, 6, False), *queue_mdp(Q, 6, True))
    for gamma in (0.9, 0.99):
        profile_solve(f"queue S={Q} A=6 3 x 1", queue, gamma)
    side = 10 if quick else 30
    R, P = grid_mdp(side, 4, 0.2)
    R2, P2 = grid_mdp(side, 4, 0.3)
    profile_solve(f"grid S={side * side} A=4 1-3 x 1-3", (R, P, R2 + 0.05, P2), 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run (about a minute)")
    parser.add_argument("--profile", action="store_true", help="only where the time of a cold solve goes")
    args = parser.parse_args()
    q = args.quick
    if args.profile:
        profile(q)
        return
    print(f"seed {SEED}, tol {TOL:g}, {os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}, {load()}; "
          f"times are process CPU unless marked wall")
    start = time.perf_counter()
    table = Table()
    bench_compile(table)
    bench_vs_naive(table, S=16 if q else 32)
    bench_cold_large(table, S=64 if q else 256, instances=5)
    bench_structured(table, q)
    bench_warm(table, S=64 if q else 256, A=16, steps=50 if q else 200, colds=3 if q else 5)
    bench_gamma(table, q)
    bench_memory(table, side=16 if q else 32, A=8)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nwhole run: {fmt_time(time.perf_counter() - start)} wall, {fmt_time(usage.ru_utime + usage.ru_stime)} "
          f"CPU; {load()}\n")
    table.print()


if __name__ == "__main__":
    main()
