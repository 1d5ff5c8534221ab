"""Detection benchmark: false alarms, detection delay, interval coverage and p-value uniformity on known truth.

Every stream here is drawn from MDPs whose exact mismatch is known (solved on the exact MDPs), and evaluated by
the real monitor (`CellMonitor.evaluate`: windows, metric, evidence, trigger), the way `dtsync replay` and the
daemon do. In one run it prints:

1. False alarms per 10,000 evaluations on identical twins (exact mismatch 0) at several window sizes and state
   counts, each stream starting from empty windows (the first evaluations are included), for the default rule
   (`act_on: evidence`), the former shipped rule (`act_on: excess`) and River's detectors on the twin's stream
   (ADWIN and PageHinkley on rewards, KSWIN on next states; alarms per transition scaled to the same stream
   length). An evaluation looks at overlapping windows: these are multiple looks, counted as such.
2. Detection delay after a change of the twin (reward bias, dynamics drift, a flip of the dynamics that leaves
   state and reward frequencies unchanged), in twin transitions and in window lengths.
3. Coverage of the 98 % interval (the trigger's) against its nominal level on pairs with known exact mismatch,
   and how often the truth fell below its lower end (nominal 1 %).
4. Uniformity of the permutation test's p-values on identical twins.
5. The time the evidence adds to one evaluation, at 72 states (the demo) and 256 states.

    make bench-detection                       # the full run (about 15 minutes on 2 busy cores)
    python benchmarks/bench_detection.py --quick   # a few minutes, smaller counts

River is optional (`pip install 'dtsync[bench]'`); without it its rows say so.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from dtsync.config import parse_config
from dtsync.contract import Transition
from dtsync.metric import dtbsm
from dtsync.metric.evidence import WindowStats, bootstrap_interval, permutation_test, pool_thin, resample
from dtsync.monitor import CellMonitor, Snapshot, evaluation
from dtsync.offline.sample import random_mdp, shifted_actions
from dtsync.testbed import exact_mdp, preset
from dtsync.trigger import Trigger, TriggerRule
from dtsync.window import SlidingWindow

GAMMA = 0.9
THRESHOLD = 0.5  # the default
REWARD_NOISE = 0.05
MIN_STATE_SAMPLES = TriggerRule(threshold=THRESHOLD).min_state_samples  # the default


@njit(cache=True)
def _simulate(cum: np.ndarray, R: np.ndarray, noise: float, n: int, s0: int, seed: int):  # type: ignore[no-untyped-def]
    """n steps of the uniform behaviour policy from state s0: columns s, a, r, s'."""
    np.random.seed(seed)
    S, A = R.shape
    s_col = np.empty(n, np.int64)
    a_col = np.empty(n, np.int64)
    sn_col = np.empty(n, np.int64)
    r_col = np.empty(n)
    s = s0
    for i in range(n):
        a = np.random.randint(A)
        u = np.random.random()
        x = 0
        while x < S - 1 and cum[s, a, x] <= u:
            x += 1
        s_col[i], a_col[i], sn_col[i] = s, a, x
        r_col[i] = R[s, a] + noise * np.random.standard_normal()
        s = x
    return s_col, a_col, r_col, sn_col


@dataclass
class Chain:
    """A simulated stream of one MDP that can switch to another (same states and actions)."""

    R: np.ndarray
    P: np.ndarray
    noise: float
    seed: int
    state: int = 0
    steps: int = 0
    cum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.switch(self.R, self.P)

    def switch(self, R: np.ndarray, P: np.ndarray) -> None:
        self.R, self.P = R, P
        self.cum = np.ascontiguousarray(P.cumsum(axis=-1))

    def take(self, n: int) -> tuple[np.ndarray, ...]:
        cols = _simulate(self.cum, self.R, self.noise, n, self.state, self.seed * 1_000_003 + self.steps)
        self.state = int(cols[3][-1])
        self.steps += n
        return cols


def monitor_for(S: int, A: int, window: int, threshold: float) -> CellMonitor:
    config = parse_config({"gamma": GAMMA, "window": {"count": window}, "trigger": {"threshold": threshold},
                           "schedule": {"every_transitions": 10**9},
                           "cells": {"bench": {"twins": {"twin": {}}}}})  # fmt: skip
    monitor = CellMonitor("bench", config)
    for s in range(S):  # labels 0..S-1 and 0..A-1 map to the same indices
        for a in range(A):
            monitor.encoding.encode(Transition(s, a, 0.0, s))
    return monitor


@dataclass
class StreamResult:
    evaluations: int
    fired: dict[str, list[int]]  # rule -> twin steps at which it fired
    river: dict[str, list[int]]
    transitions: int
    river_transitions: int
    seconds: float


def run_stream(
    real: tuple[np.ndarray, np.ndarray],
    twin: tuple[np.ndarray, np.ndarray],
    *,
    window: int,
    every: int,
    evaluations: int,
    seed: int,
    threshold: float = THRESHOLD,
    after: tuple[np.ndarray, np.ndarray] | None = None,
    change_at: int | None = None,
    river_steps: int = 0,
    noise: float = REWARD_NOISE,
) -> StreamResult:
    """Feed `every` transitions of each stream between evaluations; the twin switches to `after` at `change_at`."""
    S, A = real[0].shape
    monitor = monitor_for(S, A, window, threshold)
    excess = Trigger(TriggerRule(threshold=threshold, act_on="excess"))
    real_chain, twin_chain = Chain(*real, noise, 2 * seed), Chain(*twin, noise, 2 * seed + 1)
    detectors = _river_detectors()
    fired: dict[str, list[int]] = {"evidence": [], "excess": []}
    river: dict[str, list[int]] = {name: [] for name in detectors}
    river_start = 0 if change_at is None else max(0, change_at - river_steps // 2)
    started = time.process_time()
    tm = monitor.twins["twin"]
    for k in range(evaluations):
        t = float(k + 1)
        for chain, win in ((real_chain, monitor.real), (twin_chain, tm.window)):
            n = every
            if chain is twin_chain and after is not None and change_at is not None:
                if chain.steps < change_at <= chain.steps + n:
                    first = change_at - chain.steps
                    cols = chain.take(first)
                    _extend(win, cols, t)
                    _feed_river(detectors, river, cols, chain.steps - first, river_start, river_steps)
                    chain.switch(*after)
                    n -= first
            if n:
                cols = chain.take(n)
                _extend(win, cols, t)
                if chain is twin_chain:
                    _feed_river(detectors, river, cols, chain.steps - n, river_start, river_steps)
        report = monitor.evaluate("twin", t)
        if report.fired:
            fired["evidence"].append(twin_chain.steps)
        if excess.update(evaluation(t, report.figures)).fired:
            fired["excess"].append(twin_chain.steps)
    fed = min(river_steps, max(0, twin_chain.steps - river_start))
    return StreamResult(k + 1, fired, river, twin_chain.steps, fed, time.process_time() - started)


def _extend(window: SlidingWindow, cols: tuple[np.ndarray, ...], t: float) -> None:
    s, a, r, sn = cols
    window.extend(s.tolist(), a.tolist(), r.tolist(), sn.tolist(), [t] * len(s))


def _river_detectors() -> dict[str, Callable[[], object]]:
    try:
        from river import drift
    except ImportError:
        return {}
    return {"ADWIN (rewards)": drift.ADWIN(), "PageHinkley (rewards)": drift.PageHinkley(),
            "KSWIN (next states)": drift.KSWIN(seed=1)}  # fmt: skip


def _feed_river(detectors: dict[str, object], alarms: dict[str, list[int]], cols: tuple[np.ndarray, ...],
                first_step: int, start: int, steps: int) -> None:  # fmt: skip
    """Feed the twin's transitions inside [start, start + steps) to each detector; note alarms by twin step."""
    lo, hi = max(0, start - first_step), min(len(cols[0]), start + steps - first_step)
    for i in range(lo, hi):
        for name, det in detectors.items():
            value = float(cols[3][i]) if name.startswith("KSWIN") else float(cols[2][i])
            det.update(value)  # type: ignore[attr-defined]
            if det.drift_detected:  # type: ignore[attr-defined]
                alarms[name].append(first_step + i)


# --- MDPs with known truth ----------------------------------------------------------------------------------


def small(seed: int, S: int = 8, A: int = 2, support: int = 3) -> tuple[np.ndarray, np.ndarray]:
    return random_mdp(np.random.default_rng(seed), S, A, support)


def testbed(name: str) -> tuple[np.ndarray, np.ndarray]:
    m = exact_mdp(preset(name))
    return m.R, m.P


def exact(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    return dtbsm(*a, *b, GAMMA).mismatch


def mixed(m: tuple[np.ndarray, np.ndarray], eps: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dynamics drift: P' = (1 - eps) P + eps Q, Q another random MDP's dynamics on the same states."""
    R, P = m
    _, Q = random_mdp(np.random.default_rng(seed + 1000), *R.shape, 3)
    return R, (1 - eps) * P + eps * Q


def biased(m: tuple[np.ndarray, np.ndarray], delta: float) -> tuple[np.ndarray, np.ndarray]:
    return m[0] + delta, m[1]


# --- the sections ---------------------------------------------------------------------------------------------


def false_alarms(quick: bool) -> None:
    print("\n1. Identical twins (exact mismatch 0): false alarms per 10,000 evaluations")
    print("   threshold 0.5, gamma 0.9; every stream starts from empty windows; looks every `every` transitions")
    header = ("case", "S x A", "window", "every", "evals", "evidence", "excess", "ADWIN", "PageHinkley", "KSWIN",
              "CPU ms/eval")  # fmt: skip
    rows = [header]
    cases = [
        ("random", small(0), 1000, 50, 2000 if quick else 10_000, 5),
        ("random", small(0), 5000, 250, 2000 if quick else 10_000, 5),
        ("random 12 states", small(1, 12, 2), 4000, 250, 1000 if quick else 5000, 5),
        ("random 32 states", small(2, 32, 4, 4), 5000, 250, 500 if quick else 3000, 3),
        ("testbed real", testbed("real"), 15000, 750, 100 if quick else 400, 2),
    ]
    river_steps = 2000 if quick else 20_000
    total_events = total_evals = 0
    for name, m, window, every, evals, restarts in cases:
        counts: dict[str, int] = {}
        river_fed = 0
        cpu = 0.0
        for r in range(restarts):
            res = run_stream(m, m, window=window, every=every, evaluations=evals // restarts, seed=100 + r,
                             river_steps=river_steps // restarts,
                             noise=0.0 if name.startswith("testbed") else REWARD_NOISE)  # fmt: skip
            for rule, fires in (*res.fired.items(), *res.river.items()):
                counts[rule] = counts.get(rule, 0) + len(fires)
            river_fed += res.river_transitions
            cpu += res.seconds
        n_evals = (evals // restarts) * restarts
        total_events += counts.get("evidence", 0)
        total_evals += n_evals
        per = 10_000 / n_evals
        river_per = 10_000 * every / river_fed if river_fed else math.nan  # alarms per 10,000 evaluations' data

        rows.append((name, f"{m[0].shape[0]}x{m[0].shape[1]}", str(window), str(every), str(n_evals),
                     _rate(counts, "evidence", per, n_evals), _rate(counts, "excess", per, n_evals),
                     *(_rate(counts, rule, river_per, river_fed) for rule in RIVER_RULES),
                     f"{1000 * cpu / n_evals:.1f}"))  # fmt: skip
        _table(rows[-1:], header, header=len(rows) == 2)
    print("   (evidence/excess: events per 10,000 evaluations (events/evaluations); River: alarms per 10,000 x every"
          " twin transitions (alarms/transitions fed))")
    # Per twin per day at the default schedule: one evaluation every 5 s at most (more often only past 100
    # transitions/s, every 500 transitions). With no event seen, the rule of three bounds the rate at 95 %.
    per_day = 86_400 / 5.0
    bound = (total_events if total_events else 3.0) / total_evals * per_day
    print(f"   default rule, all identical-twin streams: {total_events} events in {total_evals} evaluations = "
          f"{total_events / total_evals * per_day:.3g} per twin per day at one evaluation every 5 s "
          f"({per_day:,.0f} a day); {'95 % upper bound (rule of three)' if not total_events else 'point rate'}: "
          f"{bound:.3g} per twin per day")


RIVER_RULES = ("ADWIN (rewards)", "PageHinkley (rewards)", "KSWIN (next states)")


def _rate(counts: dict[str, int], rule: str, scale: float, n: int) -> str:
    """'rate (count/n)', or n/a when the detector is not installed."""
    if rule not in counts:
        return "n/a"
    return f"{counts[rule] * scale:.4g} ({counts[rule]}/{n})"


def delays(quick: bool) -> None:
    print("\n2. Drift of the twin: detection delay in twin transitions after the change (window lengths)")
    base = small(0)
    window, every = 5000, 250
    cases = [
        ("reward bias +0.1", base, biased(base, 0.1)),
        ("reward bias +0.075", base, biased(base, 0.075)),
        ("dynamics drift eps 0.5", base, mixed(base, 0.5, 0)),
        ("flip (frequencies kept)", base, (base[0], shifted_actions(base[1]))),
        ("reward bias +0.02 (below)", base, biased(base, 0.02)),
        ("testbed stale channel", testbed("real"), testbed("misestimated-channel")),
    ]
    header = ("case", "exact", "x threshold", "evidence", "excess", "ADWIN", "PageHinkley", "KSWIN")
    print_header = True
    seeds = 2 if quick else 5
    for name, m, m2 in cases:
        truth = exact(m, m2)
        w, e = (15000, 750) if name.startswith("testbed") else (window, every)
        change = 2 * w
        per_rule: dict[str, list[float]] = {}
        on_testbed = name.startswith("testbed")
        for seed in range((1 if quick else 2) if on_testbed else seeds):
            res = run_stream(m, m, window=w, every=e, evaluations=(change + 2 * w) // e, seed=200 + seed, after=m2,
                             change_at=change, river_steps=2000 if quick else 10_000,
                             noise=0.0 if on_testbed else REWARD_NOISE)  # fmt: skip
            for rule, fires in (*res.fired.items(), *res.river.items()):
                later = [f - change for f in fires if f > change]
                early = [f for f in fires if f <= change]
                per_rule.setdefault(rule, []).append(math.inf if early else (later[0] if later else math.inf))
        cells = [name, f"{truth:.3g}", f"{truth / THRESHOLD:.2g}"]
        for rule in ("evidence", "excess", *RIVER_RULES):
            cells.append(_delay_cell(per_rule.get(rule), w))
        _table([tuple(cells)], header, header=print_header)
        print_header = False
    print("   (median delay over seeds [worst]; 'missed' = not within 2 windows, or an alarm before the change;"
          " River fed 10,000 twin transitions around the change)")


def _delay_cell(values: list[float] | None, window: int) -> str:
    if not values:
        return "n/a"
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return f"missed ({len(values)}/{len(values)})"
    med = statistics.median(values) if len(finite) == len(values) else math.inf
    worst = max(values)
    text = f"{med:.0f} ({med / window:.2f} w)" if math.isfinite(med) else "missed in some"
    return text + (f" [{worst:.0f}]" if math.isfinite(worst) else f" [{len(values) - len(finite)} missed]")


def _window_stats(m: tuple[np.ndarray, np.ndarray], n: int, seed: int, noise: float = REWARD_NOISE) -> WindowStats:
    """n transitions of m as the sufficient statistics the evidence reads."""
    R, P = m
    S, A = R.shape
    s, a, r, sn = Chain(R, P, noise, seed).take(n)
    sa = s * A + a
    N = np.bincount(sa, minlength=S * A).reshape(S, A)
    counts = np.bincount(sa * S + sn, minlength=S * A * S).reshape(S, A, S)
    mean = np.divide(np.bincount(sa, weights=r, minlength=S * A).reshape(S, A), N, out=np.zeros((S, A)), where=N > 0)
    sq = np.divide(np.bincount(sa, weights=r * r, minlength=S * A).reshape(S, A), N, out=np.zeros((S, A)), where=N > 0)
    return WindowStats(counts, mean, np.maximum(sq - mean**2, 0.0))


def coverage(quick: bool, pooled: bool = True) -> None:
    print("\n3. Interval coverage (nominal 98 %, the trigger's) on pairs with known exact mismatch"
          + (f"; thin state-actions (< {MIN_STATE_SAMPLES}) pooled, as the trigger does" if pooled else "; no pooling"))
    base = small(0)
    other = small(5)
    cases = [
        ("identical, random 8x2", base, base, (1000, 5000), 40),
        ("reward bias +0.1", base, biased(base, 0.1), (1000, 5000), 40),
        ("flip", base, (base[0], shifted_actions(base[1])), (1000, 5000), 40),
        ("random pair", base, other, (1000, 5000), 40),
        ("identical, random 16x4", small(3, 16, 4), small(3, 16, 4), (5000,), 30),
        ("testbed identical", testbed("real"), testbed("real"), (15000, 45000), 12),
        ("testbed stale channel", testbed("real"), testbed("misestimated-channel"), (15000, 45000), 12),
    ]
    header = ("pair", "exact", "window", "trials", "coverage", "truth below lower end", "mean point", "mean interval")
    first = True
    totals = [0, 0, 0]
    for name, a, b, windows, trials in cases:
        truth = exact(a, b)
        for n in windows:
            k = max(4, trials // 3) if quick else trials
            inside = below = 0
            points, lows, highs = [], [], []
            noise = 0.0 if name.startswith("testbed") else REWARD_NOISE
            for trial in range(k):
                x, y = _window_stats(a, n, 7000 + 2 * trial, noise), _window_stats(b, n, 7001 + 2 * trial, noise)

                # What the trigger reads: thin state-actions pooled (README, "Rare states"), a warm solver.
                thin = MIN_STATE_SAMPLES if pooled else 1
                iv = bootstrap_interval(x, y, _resample_mismatch, level=0.98, thin_below=thin,
                                        rng=np.random.default_rng(trial))  # fmt: skip
                observed = _mismatch(*x.mdp(), *y.mdp())
                inside += iv.low <= truth <= iv.high
                below += truth < iv.low
                points.append(observed)
                lows.append(iv.low)
                highs.append(iv.high)
            totals[0] += inside
            totals[1] += below
            totals[2] += k
            _table([(name, f"{truth:.3g}", str(n), str(k), f"{inside / k:.0%}", f"{below / k:.0%}",
                     f"{np.mean(points):.3g}", f"[{np.mean(lows):.3g}, {np.mean(highs):.3g}]")], header,
                   header=first)  # fmt: skip
            first = False
    print(f"   all pairs: coverage {totals[0] / totals[2]:.1%} of {totals[2]} (nominal 98 %), "
          f"truth below the lower end {totals[1] / totals[2]:.1%} (nominal 1 %)")


def uniformity(quick: bool) -> None:
    print("\n4. Permutation-test p-values on identical twins (independent windows)")
    for label, m, n, count in (("random 8x2, window 2000", small(0), 2000, 100 if quick else 500),
                               ("testbed, window 15000", testbed("real"), 15000, 30 if quick else 150)):  # fmt: skip
        noise = 0.0 if label.startswith("testbed") else REWARD_NOISE
        pairs = ((_window_stats(m, n, 9000 + 2 * i, noise), _window_stats(m, n, 9001 + 2 * i, noise))
                 for i in range(count))  # fmt: skip
        p = np.array([permutation_test(x, y, rng=np.random.default_rng(i)).p_value for i, (x, y) in enumerate(pairs)])
        ks = _ks_uniform(p)
        cuts = ", ".join(f"P(p <= {q:g}) = {(p <= q).mean():.3f}" for q in (0.01, 0.05, 0.1, 0.5))
        print(f"   {label}: {count} pairs; {cuts}; KS distance to uniform {ks:.3f} "
              f"(1 % critical value {1.63 / math.sqrt(count):.3f})")


def _ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of the sample p to the uniform law on [0, 1]."""
    x = np.sort(p)
    n = len(x)
    return float(max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n)))


def cost(quick: bool) -> None:
    print("\n5. Time the evidence adds to one evaluation (process CPU; the test runs when the point mismatch reaches "
          "the re-arm level, the interval only when the test is significant)")
    header = ("case", "window", "evaluation without evidence", "+ test", "+ interval", "interval / evaluation",
              "previous interval (cold)")  # fmt: skip
    rows = []
    rng = np.random.default_rng(0)
    big = random_mdp(rng, 256, 16, 8)
    for name, m, n in (("testbed 72 x 6 (demo)", testbed("real"), 45000), ("random 256 x 16", big, 200_000)):
        S, A = m[0].shape
        monitor = monitor_for(S, A, n, THRESHOLD)
        noise = 0.0 if name.startswith("testbed") else REWARD_NOISE
        for seed, win in ((1, monitor.real), (2, monitor.twins["twin"].window)):
            cols = Chain(*m, noise, seed).take(n)
            _extend(win, cols, 0.0)
        snap: Snapshot = monitor.snapshot("twin", 1.0)
        computer = monitor.twins["twin"].computer
        computer.compute(snap)  # compile and warm
        reps = 2 if quick else 3
        base = _cpu(_compute_without_evidence, (computer, snap), reps)
        x = WindowStats.from_arrays(snap.real.P, snap.real.N, snap.real.R, snap.real_reward_var)
        y = WindowStats.from_arrays(snap.twin.P, snap.twin.N, snap.twin.R, snap.twin_reward_var)
        test = _cpu(lambda a, b: permutation_test(a, b, resamples=199, rng=np.random.default_rng(0)), (x, y), reps)
        interval = _cpu(lambda a, b: bootstrap_interval(a, b, _resample_mismatch, level=0.98,
                                                        thin_below=MIN_STATE_SAMPLES, rng=np.random.default_rng(0)),
                        (x, y), 1)  # fmt: skip
        cold = _cpu(_cold_resamples, pool_thin(x, y, MIN_STATE_SAMPLES), 1)
        rows.append((name, str(n), f"{base * 1000:.0f} ms", f"{test * 1000:.0f} ms", f"{interval * 1000:.0f} ms",
                     f"{interval / base:.1f}x", f"{cold * 1000:.0f} ms"))  # fmt: skip
        _table(rows[-1:], header, header=len(rows) == 1)
    print("   (interval: 2 + B + 3 C point-only solves, B = 20 resamples, C = 10 calibration draws; the previous"
          " interval: 1 + 20 solves of all three figures)")


def _cold_resamples(x: WindowStats, y: WindowStats) -> None:
    """The previous interval's solves: the pooled figure and 20 resamples, each with its missing-data bounds."""
    rng = np.random.default_rng(0)
    dtbsm(*x.mdp(), *y.mdp(), GAMMA, 1e-4)
    for _ in range(20):
        dtbsm(*resample(x, 1.0, rng), *resample(y, 1.0, rng), GAMMA, 1e-4)


def _compute_without_evidence(computer: object, snap: Snapshot) -> None:
    """The evaluation with the evidence gated off (threshold above anything the point can read)."""
    st = computer.settings  # type: ignore[attr-defined]
    saved = st.trigger
    object.__setattr__(st, "trigger", TriggerRule(threshold=1e9))
    try:
        computer.compute(snap)  # type: ignore[attr-defined]
    finally:
        object.__setattr__(st, "trigger", saved)


def _mismatch(R1: np.ndarray, P1: np.ndarray, R2: np.ndarray, P2: np.ndarray) -> float:
    return dtbsm(R1, P1, R2, P2, GAMMA, 1e-6).mismatch


def _resample_mismatch(R1: np.ndarray, P1: np.ndarray, R2: np.ndarray, P2: np.ndarray) -> float:
    """The mismatch as the monitor computes it for the interval: point estimate only, tolerance 1e-4, cold."""
    return dtbsm(R1, P1, R2, P2, GAMMA, 1e-4, point_only=True).mismatch


def _cpu(fn: Callable[..., object], args: tuple[object, ...], reps: int) -> float:
    """Best process CPU time of `reps` calls of fn(*args) (CPU, not wall: the machine is shared)."""
    best = math.inf
    for _ in range(reps):
        t = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - t)
    return best


def _table(rows: list[tuple[str, ...]], columns: tuple[str, ...], *, header: bool = True) -> None:
    """Rows printed as they come (a long run shows progress), aligned on the column names."""
    widths = [max(len(h), 12) for h in columns]
    if header:
        print("   " + "  ".join(h.ljust(w) for h, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("   " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a few minutes)")
    parser.add_argument("--only", choices=["alarms", "delays", "coverage", "coverage-unpooled", "uniformity", "cost"],
                        action="append")  # fmt: skip
    args = parser.parse_args()
    started, cpu = time.time(), time.process_time()
    sections = {"alarms": false_alarms, "delays": delays, "coverage": coverage, "uniformity": uniformity,
                "cost": cost, "coverage-unpooled": lambda quick: coverage(quick, pooled=False)}  # fmt: skip
    print(f"bench_detection{' --quick' if args.quick else ''}: gamma {GAMMA}, threshold {THRESHOLD}, reward noise "
          f"sd {REWARD_NOISE} (random MDPs; the testbed's rewards are exact)")
    for name in args.only or [name for name in sections if name != "coverage-unpooled"]:
        sections[name](args.quick)
    print(f"\ntotal {time.time() - started:.0f} s wall, {time.process_time() - cpu:.0f} s CPU", file=sys.stderr)


if __name__ == "__main__":
    main()
