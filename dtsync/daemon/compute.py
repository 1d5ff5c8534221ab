"""Metric computations in worker processes, so ingestion never waits for them; a dead worker is replaced.

A thread would share the event loop's GIL: the compiled kernels release it, but the numpy and Python around
them (validation, the TV bound, the regret estimate) do not, and under load the loop then gets a fraction of
the interpreter and the broker starts dropping messages for the slow subscriber. Worker processes share
nothing with the loop but the snapshot they are sent.

Each twin always goes to the same worker, which keeps that twin's `MetricComputer` (its warm-started solvers)
between evaluations; the daemon keeps at most one computation in flight per twin.

Supervision: a worker killed by the OOM killer or a crash breaks its executor (`BrokenProcessPool` on every
pending and later future). The pool then replaces that executor with a fresh worker, so the twins pinned to it
are evaluated again (cold, on the next schedule tick) instead of never. Each worker runs numba's parallel
sweep on one thread (the daemon already runs one worker per core), and exits by itself within a second of
its parent's death, so a daemon killed with SIGKILL outside systemd does not leave workers behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import structlog

from dtsync.config import TwinSettings
from dtsync.monitor import Figures, MetricComputer, Snapshot

log = structlog.get_logger("dtsync.daemon")

_COMPUTERS: dict[tuple[str, str], MetricComputer] = {}  # in a worker process: one per twin it serves
PARENT_POLL_SECONDS = 0.5


def init_worker(parent: int) -> None:
    """Worker start-up: Ctrl-C is the daemon's to handle (it reaches the whole process group), numba uses one
    thread, and a watchdog thread ends the worker once `parent` is gone (its parent pid changes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import numba

    numba.set_num_threads(1)

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch_parent, name="dtsync-parent-watch", daemon=True).start()


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
        self._context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._pools = [self._executor() for _ in range(workers)]
        self._lock = threading.Lock()  # futures' callbacks run in the executors' threads
        self.replaced = 0  # workers replaced after dying (exported as dtsync_worker_restarts_total)

    def _executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=self._context, initializer=init_worker, initargs=(os.getpid(),))

    def _index(self, key: tuple[str, str]) -> int:
        return zlib.crc32("/".join(key).encode()) % len(self._pools)

    def _submit(self, index: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Submit to worker `index`, replacing it first if it is already known to be dead."""
        executor = self._pools[index]
        try:
            return executor.submit(fn, *args)
        except BrokenProcessPool:
            return self._replace(index, executor).submit(fn, *args)

    def _replace(self, index: int, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        with self._lock:
            if self._pools[index] is broken:  # else already replaced: several futures of one worker report it
                broken.shutdown(wait=False, cancel_futures=True)
                fresh = self._pools[index] = self._executor()
                fresh.submit(_warm_up)
                self.replaced += 1
                log.error("metric worker died; replaced by a fresh one", worker=index)
            return self._pools[index]

    def submit(self, key: tuple[str, str], settings: TwinSettings, snap: Snapshot) -> Future[Figures]:
        """Compute one evaluation in the twin's worker. If that worker dies meanwhile, the future fails with
        BrokenProcessPool and the worker is replaced: the caller releases the twin and asks again later."""
        index = self._index(key)
        future: Future[Figures] = self._submit(index, _compute, key, settings, snap)
        executor = self._pools[index]

        def replace_if_broken(f: Future[Figures]) -> None:
            if not f.cancelled() and isinstance(f.exception(), BrokenProcessPool):
                self._replace(index, executor)

        future.add_done_callback(replace_if_broken)
        return future

    def warm_up(self) -> list[Future[None]]:
        """Start every worker and load the kernels there (a few seconds, once, before the first evaluation)."""
        return [self._submit(i, _warm_up) for i in range(len(self._pools))]

    def forget(self, key: tuple[str, str]) -> None:
        """Drop a removed twin's solvers in its worker."""
        self._submit(self._index(key), _forget, key)

    def shutdown(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
