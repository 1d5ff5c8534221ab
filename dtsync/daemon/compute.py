"""Metric computations in worker processes, so ingestion never waits for them.

A thread would share the event loop's GIL: the compiled kernels release it, but the numpy and Python around
them (validation, the TV bound, the regret estimate) do not, and under load the loop then gets a fraction of
the interpreter and the broker starts dropping messages for the slow subscriber. Worker processes share
nothing with the loop but the snapshot they are sent.

Each twin always goes to the same worker, which keeps that twin's `MetricComputer` (its warm-started solvers)
between evaluations; the daemon keeps at most one computation in flight per twin.
"""

from __future__ import annotations

import multiprocessing
import signal
import zlib
from concurrent.futures import Future, ProcessPoolExecutor

from dtsync.config import TwinSettings
from dtsync.monitor import Figures, MetricComputer, Snapshot

_COMPUTERS: dict[tuple[str, str], MetricComputer] = {}  # in a worker process: one per twin it serves


def _ignore_interrupts() -> None:
    """Ctrl-C at a terminal reaches the whole process group; the daemon, not its workers, handles it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _compute(key: tuple[str, str], settings: TwinSettings, snap: Snapshot) -> Figures:
    computer = _COMPUTERS.get(key)
    if computer is None:
        computer = _COMPUTERS[key] = MetricComputer(settings)
    computer.settings = settings  # a reload may have changed gamma or the tolerance: warm starts stay sound
    return computer.compute(snap)


def _warm_up() -> None:
    """Import the engine and load its compiled kernels (numba cache) before the first real evaluation."""
    import numpy as np

    from dtsync.metric import dtbsm

    R, P = np.zeros((2, 1)), np.full((2, 1, 2), 0.5)
    dtbsm(R, P, R + 1.0, P, 0.5)


def _forget(key: tuple[str, str]) -> None:
    _COMPUTERS.pop(key, None)


class ComputePool:
    """`workers` single-process executors; a twin is pinned to one by a stable hash of its name."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._pools = [
            ProcessPoolExecutor(1, mp_context=context, initializer=_ignore_interrupts) for _ in range(workers)
        ]

    def _pool(self, key: tuple[str, str]) -> ProcessPoolExecutor:
        return self._pools[zlib.crc32("/".join(key).encode()) % len(self._pools)]

    def submit(self, key: tuple[str, str], settings: TwinSettings, snap: Snapshot) -> Future[Figures]:
        return self._pool(key).submit(_compute, key, settings, snap)

    def warm_up(self) -> list[Future[None]]:
        """Start every worker and load the kernels there (a few seconds, once, before the first evaluation)."""
        return [pool.submit(_warm_up) for pool in self._pools]

    def forget(self, key: tuple[str, str]) -> None:
        """Drop a removed twin's solvers in its worker."""
        self._pool(key).submit(_forget, key)

    def shutdown(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
