"""Evaluation-in-the-loop synchronisation against fixed schedules (``dtsync study sync``).

The claim (Tao, Xu, You, arXiv 2502.17983, Sec. VI): re-synchronising a twin when its measured DT-BSM says it
drifted keeps it as faithful as a fixed resync schedule at a fraction of the resyncs, because a real network
changes regime at random, rarely, and a schedule must resync often to catch each change soon.

Setup, all on the reference testbed's simulator:

- **The real network** changes regime at random times (exponential gaps, mean ``regime_windows`` windows):
  at each change either its channel (every UE's rates scaled by a factor drawn log-uniformly in
  ``CHANNEL_FACTORS``) or its traffic (every arrival rate scaled by a factor in ``TRAFFIC_FACTORS``) is redrawn;
  factors are relative to the base parameters, so regimes stay in one bounded family.
- **A resync** refits the twin (:func:`dtsync.testbed.variants.fitted`) from ``fit_samples`` measured steps of
  the real network's *current* regime and restarts the twin's telemetry: a fresh twin window, a fresh trigger
  (:meth:`CellMonitor.resynced`, what an acknowledgement does in the daemon). Resyncs are instant; policies
  that refit at the same step get the same fit.
- **Triggered**: the real and twin telemetry stream through the same :class:`dtsync.monitor.CellMonitor` the
  daemon runs (default evidence rule), evaluated every ``eval_every`` steps; a fired event is a resync.
- **Periodic(P)**: a resync every P steps, whatever the twin's state (no monitor needed).

Each policy is scored on the *exact* DT-BSM between the real network's current exact MDP and the twin's
(piecewise constant between regime changes and resyncs): its time average, and the share of time it spends
above the threshold. The best periodic schedule is the one with the fewest resyncs whose time-averaged exact
mismatch is at most the triggered policy's; the goal is 5x fewer resyncs for the triggered policy.

The default cell is the reference testbed with two buffer levels per UE and the first four schemes (32 states,
4 actions): at a window of 10,000 transitions every state-action sees ~80 samples, enough for the evidence
rule to judge most states, and one evaluation costs ~0.1-0.4 s, so hours of simulated traffic run in minutes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import Any

import numba
import numpy as np

from dtsync.config import parse_config
from dtsync.contract import Transition
from dtsync.metric import dtbsm
from dtsync.monitor import REAL, CellMonitor
from dtsync.testbed.model import TestbedMDP, exact_mdp
from dtsync.testbed.params import TestbedParams, parse_params
from dtsync.testbed.presets import preset
from dtsync.testbed.simulate import transitions
from dtsync.testbed.variants import fitted

__all__ = [
    "CHANNEL_FACTORS",
    "TRAFFIC_FACTORS",
    "PolicyResult",
    "PooledRow",
    "Regime",
    "SyncSetup",
    "SyncStudyResult",
    "plot_sync_study",
    "pooled",
    "regime",
    "refit",
    "regimes",
    "run_seeds",
    "run_sync_study",
    "study_cell",
]

CHANNEL_FACTORS = (0.5, 1.5)  # log-uniform range of the factor on every channel rate
TRAFFIC_FACTORS = (0.4, 1.6)  # the same on every arrival rate (1.6: events stay within one per step)
CELL, TWIN = "study", "twin"


def study_cell() -> TestbedParams:
    """The reference testbed's three UEs with two buffer levels each and its first four schemes (32 states)."""
    data = preset("real").model_dump()
    data["schemes"] = dict(list(data["schemes"].items())[:4])
    for ue in data["ues"]:
        if ue["buffer_levels"] > 1:
            ue["buffer_levels"] = 2
            ue["traffic"] = {"kind": "batch", "rate": ue["traffic"]["rate"], "sizes": [1.0]}
    return parse_params(data, source="study cell")


@dataclass(frozen=True)
class SyncSetup:
    """Everything a run depends on; steps are telemetry steps of ``step_seconds`` each."""

    steps: int = 2_000_000
    window: int = 10_000
    regime_windows: float = 20.0  # mean time between regime changes, in windows
    eval_every: int = 2_500
    periods_windows: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    fit_samples: int = 30_000
    threshold: float = 0.75
    gamma: float = 0.9
    step_seconds: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 100 or self.steps < self.window:
            raise ValueError("window must be >= 100 and steps >= window")
        if self.eval_every < 1 or self.regime_windows <= 0 or self.fit_samples < 1:
            raise ValueError("eval_every, regime_windows and fit_samples must be positive")
        if not self.periods_windows or min(self.periods_windows) <= 0:
            raise ValueError("periods must be positive")
        if not 0.0 < self.gamma < 1.0 or self.threshold <= 0:
            raise ValueError("gamma must lie in (0, 1) and threshold be positive")

    def monitor_config(self) -> dict[str, Any]:
        """The daemon's configuration for the triggered policy: the defaults apart from the window and the
        threshold (re-arming below half of it)."""
        return {
            "gamma": self.gamma,
            "window": {"count": self.window},
            "schedule": {"every_seconds": 1e9},  # evaluations are called explicitly, every eval_every steps
            "trigger": {"threshold": self.threshold, "rearm_below": 0.5 * self.threshold,
                        "min_samples": self.window // 10},  # fmt: skip
            "cells": {CELL: {"twins": {TWIN: {}}}},
        }


@dataclass(frozen=True)
class Regime:
    start: int  # first step of the regime
    kind: str  # "base", "channel" or "traffic": what changed at its start
    channel: float
    traffic: float
    params: TestbedParams = field(repr=False)


def regime(base: TestbedParams, start: int, channel: float = 1.0, traffic: float = 1.0) -> Regime:
    """The real network from step ``start`` on: ``base`` with every channel rate times ``channel`` and every
    arrival rate times ``traffic``."""
    kind = "channel" if channel != 1.0 else "traffic"
    return Regime(start, kind, channel, traffic, _scaled(base, channel, traffic))


def _scaled(base: TestbedParams, channel: float, traffic: float) -> TestbedParams:
    data = base.model_dump()
    for ue in data["ues"]:
        ue["channel"]["rates"] = [r * channel for r in ue["channel"]["rates"]]
        if "rate" in ue["traffic"]:
            ue["traffic"]["rate"] = min(1.0, ue["traffic"]["rate"] * traffic)
    return TestbedParams.model_validate(data)


def regimes(base: TestbedParams, setup: SyncSetup, rng: np.random.Generator) -> list[Regime]:
    """The real network's regimes over the run: exponential gaps, one of channel or traffic redrawn each time."""
    out = [Regime(0, "base", 1.0, 1.0, base)]
    t = 0
    while True:
        t += max(1, round(rng.exponential(setup.regime_windows * setup.window)))
        if t >= setup.steps:
            return out
        last = out[-1]
        kind = str(rng.choice(("channel", "traffic")))
        lo, hi = CHANNEL_FACTORS if kind == "channel" else TRAFFIC_FACTORS
        factor = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        channel, traffic = (factor, last.traffic) if kind == "channel" else (last.channel, factor)
        out.append(Regime(t, kind, channel, traffic, _scaled(base, channel, traffic)))


@dataclass(frozen=True)
class PolicyResult:
    """One policy's score: resync steps, time-averaged exact DT-BSM, share of time above the threshold."""

    policy: str
    period_steps: int | None
    resyncs: list[int]
    mean_mismatch: float
    time_above: float
    timeline: list[tuple[int, float]] = field(repr=False)  # (step, exact mismatch from then on)


@dataclass(frozen=True)
class SyncStudyResult:
    setup: SyncSetup
    regimes: list[Regime]
    triggered: PolicyResult
    periodic: list[PolicyResult]
    false_resyncs: int  # triggered resyncs with no regime change since the previous resync
    seconds: float

    def best_periodic(self) -> PolicyResult | None:
        """The periodic schedule with the fewest resyncs at equal or better fidelity (None: none is as good)."""
        good = [p for p in self.periodic if p.mean_mismatch <= self.triggered.mean_mismatch]
        return min(good, key=lambda p: len(p.resyncs)) if good else None

    def ratio(self) -> float | None:
        """Resyncs of the best periodic schedule per triggered resync (None: no schedule is as faithful)."""
        best = self.best_periodic()
        if best is None:
            return None
        return len(best.resyncs) / max(1, len(self.triggered.resyncs))

    def record(self) -> dict[str, Any]:
        """JSON-ready: the setup, the regimes, each policy's figures and the goal's comparison."""
        best = self.best_periodic()

        def policy(p: PolicyResult) -> dict[str, Any]:
            return {"policy": p.policy, "period_steps": p.period_steps, "resyncs": len(p.resyncs),
                    "resync_steps": p.resyncs, "mean_mismatch": p.mean_mismatch,
                    "time_above": p.time_above}  # fmt: skip

        return {
            "setup": asdict(self.setup),
            "regimes": [{"start": r.start, "kind": r.kind, "channel": r.channel, "traffic": r.traffic}
                        for r in self.regimes],  # fmt: skip
            "policies": [policy(self.triggered), *(policy(p) for p in self.periodic)],
            "false_resyncs": self.false_resyncs,
            "best_periodic": None if best is None else best.policy,
            "resync_ratio": self.ratio(),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class PooledRow:
    """One policy over several seeds: total resyncs, and time-averaged figures averaged over the seeds."""

    policy: str
    resyncs: int
    mean_mismatch: float
    time_above: float


def pooled(results: list[SyncStudyResult]) -> tuple[PooledRow, list[PooledRow], float | None]:
    """(triggered, periodic rows, ratio) over seeds run with the same setup: the ratio compares the triggered
    policy with the periodic schedule of fewest resyncs whose seed-averaged exact mismatch is at most its own."""

    def row(policies: list[PolicyResult]) -> PooledRow:
        return PooledRow(policies[0].policy, sum(len(p.resyncs) for p in policies),
                         float(np.mean([p.mean_mismatch for p in policies])),
                         float(np.mean([p.time_above for p in policies])))  # fmt: skip

    triggered = row([r.triggered for r in results])
    periodic = [row([r.periodic[i] for r in results]) for i in range(len(results[0].periodic))]
    good = [p for p in periodic if p.mean_mismatch <= triggered.mean_mismatch]
    ratio = min(p.resyncs for p in good) / max(1, triggered.resyncs) if good else None
    return triggered, periodic, ratio


class _Exact:
    """Exact DT-BSM of (regime, fit) pairs, each solved once. Keyed by identity, so the cache holds the
    parameter objects too: an id is only unique while its object lives."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        self._mdps: dict[int, tuple[TestbedParams, TestbedMDP]] = {}
        self._pairs: dict[tuple[int, int], float] = {}

    def _mdp(self, params: TestbedParams) -> TestbedMDP:
        if id(params) not in self._mdps:
            self._mdps[id(params)] = (params, exact_mdp(params))
        return self._mdps[id(params)][1]

    def mismatch(self, real: TestbedParams, twin: TestbedParams) -> float:
        key = (id(real), id(twin))
        if key not in self._pairs:
            a, b = self._mdp(real), self._mdp(twin)
            self._pairs[key] = dtbsm(a.R, a.P, b.R, b.P, self.gamma).mismatch
        return self._pairs[key]


def _score(policy: str, period: int | None, resyncs: list[int], fits: list[TestbedParams], regs: list[Regime],
           setup: SyncSetup, exact: _Exact) -> PolicyResult:  # fmt: skip
    """Integrate the exact mismatch over the run: it changes only at regime changes and resyncs."""
    changes = sorted({0, *resyncs, *(r.start for r in regs)})
    timeline, total, above = [], 0.0, 0
    for i, start in enumerate(changes):
        end = changes[i + 1] if i + 1 < len(changes) else setup.steps
        regime = _regime_at(regs, start)
        fit = fits[sum(1 for s in resyncs if s <= start)]
        m = exact.mismatch(regime.params, fit)
        timeline.append((start, m))
        total += m * (end - start)
        above += (end - start) if m > setup.threshold else 0
    return PolicyResult(policy, period, resyncs, total / setup.steps, above / setup.steps, timeline)


def refit(regime: Regime, setup: SyncSetup, k: int) -> TestbedParams:
    """The twin refitted at step k (seeded by the regime and k: policies that refit at the same step get the
    same twin)."""
    return fitted(regime.params, setup.fit_samples, np.random.default_rng([setup.seed, regime.start, k]))


def _regime_at(regs: list[Regime], step: int) -> Regime:
    return next(r for r in reversed(regs) if r.start <= step)


def _periodic(period: int, regs: list[Regime], first: TestbedParams, setup: SyncSetup,
              exact: _Exact) -> PolicyResult:  # fmt: skip
    resyncs = list(range(period, setup.steps, period))
    fits = [first, *(refit(_regime_at(regs, s), setup, s) for s in resyncs)]
    return _score(f"every {period * setup.step_seconds:g} s", period, resyncs, fits, regs, setup, exact)


def _stream(params: TestbedParams, start: int, steps: int, seed: int, step_seconds: float) -> Iterator[Transition]:
    """The simulator from step ``start`` on, stamped with the run's time."""
    return transitions(params, steps=steps, seed=seed, start_time=start * step_seconds, step_seconds=step_seconds)


def _triggered(regs: list[Regime], first: TestbedParams, setup: SyncSetup, exact: _Exact,
               progress: Callable[[int], None] | None) -> PolicyResult:  # fmt: skip
    """Stream both networks through the daemon's monitor; every fired event refits the twin."""
    monitor = CellMonitor(CELL, parse_config(setup.monitor_config()))
    resyncs: list[int] = []
    fits = [first]
    seeds = np.random.default_rng([setup.seed, 1]).integers(2**31, size=len(regs) + 1).tolist()
    real: Iterator[Transition] = iter(())
    twin = _stream(first, 0, setup.steps, seeds[-1], setup.step_seconds)
    rejected: list[tuple[int, str]] = []
    step = 0
    while step < setup.steps:
        nxt = next((r.start for r in regs if r.start > step), setup.steps)
        chunk = min(setup.eval_every - step % setup.eval_every, nxt - step)
        if any(r.start == step for r in regs):
            i = next(i for i, r in enumerate(regs) if r.start == step)
            real = _stream(regs[i].params, step, setup.steps - step, seeds[i], setup.step_seconds)
        for stream, source in ((REAL, real), (TWIN, twin)):
            for _ in monitor.ingest(stream, list(islice(source, chunk)), 0.0, rejected):
                pass  # the schedule never comes due: evaluations happen below, every eval_every steps
        step += chunk
        if rejected:
            raise RuntimeError(f"the monitor rejected study telemetry: {rejected[:3]}")
        if progress:
            progress(chunk)
        if step % setup.eval_every or step >= setup.steps:
            continue
        now = step * setup.step_seconds
        report = monitor.evaluate(TWIN, now)
        if report.fired:  # the controller refits and acknowledges at once: what an ack does in the daemon
            resyncs.append(step)
            fits.append(refit(_regime_at(regs, step), setup, step))
            monitor.resynced(TWIN, now, cause="ack", version=f"v{len(resyncs)}", event_id=report.event_id,
                             event_t=report.t, latency=0.0)  # fmt: skip
            twin = _stream(fits[-1], step, setup.steps - step, seeds[-1] + len(resyncs), setup.step_seconds)
    return _score("triggered (dtsync)", None, resyncs, fits, regs, setup, exact)


def run_sync_study(setup: SyncSetup, base: TestbedParams | None = None, *, changes: list[Regime] | None = None,
                   progress: Callable[[int], None] | None = None) -> SyncStudyResult:  # fmt: skip
    """Run the triggered policy and every periodic schedule on one draw of regimes (``setup.seed``), or on
    the given ``changes`` (regimes after the first, which is ``base``)."""
    started = time.perf_counter()
    base = base or study_cell()
    if changes is None:
        regs = regimes(base, setup, np.random.default_rng([setup.seed, 0]))
    else:
        regs = [Regime(0, "base", 1.0, 1.0, base), *changes]
    exact = _Exact(setup.gamma)
    first = refit(regs[0], setup, 0)
    triggered = _triggered(regs, first, setup, exact, progress)
    periods = sorted({max(1, round(p * setup.window)) for p in setup.periods_windows})
    periodic = [_periodic(p, regs, first, setup, exact) for p in periods]
    starts = [r.start for r in regs[1:]]
    previous = [0, *triggered.resyncs]
    false = sum(1 for a, b in zip(previous, triggered.resyncs, strict=False) if not any(a < c <= b for c in starts))
    return SyncStudyResult(setup, regs, triggered, periodic, false, time.perf_counter() - started)


def _one_seed(setup: SyncSetup) -> SyncStudyResult:
    numba.set_num_threads(1)  # the processes already fill the cores
    return run_sync_study(setup)


def run_seeds(setup: SyncSetup, seeds: list[int], workers: int,
              done: Callable[[], None] | None = None) -> list[SyncStudyResult]:  # fmt: skip
    """:func:`run_sync_study` for each seed (same setup otherwise), on ``workers`` processes, in seed order."""
    setups = [replace(setup, seed=seed) for seed in seeds]
    if workers <= 1 or len(setups) == 1:
        results = []
        for st in setups:
            results.append(run_sync_study(st))
            if done:
                done()
        return results
    ctx = multiprocessing.get_context("spawn")  # numba and fork do not mix
    with ProcessPoolExecutor(max_workers=min(workers, len(setups)), mp_context=ctx) as pool:
        futures = {pool.submit(_one_seed, st): st.seed for st in setups}
        by_seed = {}
        for future in as_completed(futures):
            by_seed[futures[future]] = future.result()
            if done:
                done()
    return [by_seed[seed] for seed in seeds]


def plot_sync_study(result: SyncStudyResult, path: str | os.PathLike[str]) -> bool:
    """Exact mismatch over time for the triggered policy and the best periodic schedule, regime changes and
    resyncs marked; False (nothing written) when matplotlib, an optional extra, is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    setup = result.setup
    hours = setup.step_seconds / 3600
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    shown = [result.triggered]
    best = result.best_periodic() or min(result.periodic, key=lambda p: p.mean_mismatch)
    shown.append(best)
    for p, colour in zip(shown, ("tab:red", "tab:blue"), strict=True):
        xs = [s * hours for s, _ in p.timeline] + [setup.steps * hours]
        ys = [m for _, m in p.timeline]
        ax.stairs(ys, xs, color=colour, lw=1.2,
                  label=f"{p.policy}: {len(p.resyncs)} resyncs, mean {p.mean_mismatch:.3f}")  # fmt: skip
        if p is result.triggered:
            for s in p.resyncs:
                ax.axvline(s * hours, color=colour, lw=0.6, ls=":")
    for r in result.regimes[1:]:
        ax.axvline(r.start * hours, color="0.3", lw=1.0, ls="--")
    ax.axhline(setup.threshold, color="k", lw=0.8, label=f"threshold {setup.threshold:g}")
    ax.set_xlabel("time (h); dashed: regime changes of the real network, dotted: triggered resyncs")
    ax.set_ylabel("exact DT-BSM of the twin")
    ratio = result.ratio()
    ax.set_title("triggered vs periodic sync" + (f": {ratio:.1f}x fewer resyncs" if ratio else ""))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
