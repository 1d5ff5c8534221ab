"""Evaluation scheduling: due twins are snapshotted on the loop, computed in a worker, decided back on the loop.

At most one computation is in flight per twin (`CellMonitor.hold`); a twin that becomes due meanwhile is
picked up by the next transition or tick after its computation lands. Whatever happens to a computation —
it lands, raises, its worker dies (the pool replaces the worker), or the submit itself fails — the twin is
released, and after a failure it is due again at once, so it is re-evaluated on the next tick instead of
never; after a second failure in a row it waits for its normal schedule (a computation that crashes its worker
every time then costs one worker restart per period, not one a second). The time of each twin's last
evaluation feeds `/healthz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Future

import structlog

from dtsync.daemon.compute import ComputePool
from dtsync.daemon.metrics import DaemonMetrics
from dtsync.monitor import CellMonitor, Figures, Report, Snapshot

log = structlog.get_logger("dtsync.daemon")

OnReport = Callable[[Report], None]


class Scheduler:
    """Sends due evaluations to the worker pool and hands each decided Report to `on_report`."""

    def __init__(self, pool: ComputePool, metrics: DaemonMetrics, monitors: dict[str, CellMonitor],
                 on_report: OnReport) -> None:  # fmt: skip
        self.pool = pool
        self.metrics = metrics
        self.monitors = monitors
        self.on_report = on_report
        self.last_evaluated: dict[tuple[str, str], float] = {}  # (cell, twin) -> monotonic time
        self._failures: dict[tuple[str, str], int] = {}  # consecutive failures per twin

    def evaluate(self, monitor: CellMonitor, twin: str, t: float) -> None:
        """Snapshot `twin`'s windows at `t` and compute in its worker; never raises (a failure is logged)."""
        key = (monitor.cell, twin)
        snap = monitor.snapshot(twin, t)
        monitor.hold(twin)  # never two computations of one twin at once
        try:
            future = self.pool.submit(key, monitor.twins[twin].settings, snap)
        except Exception as e:  # the pool could not take it (shut down, a worker that cannot start): retry later
            self._failed(monitor, twin, e)
            return
        loop = asyncio.get_running_loop()

        def back_on_the_loop(f: Future[Figures]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: we are stopping
                loop.call_soon_threadsafe(self._computed, monitor, twin, snap, f)

        future.add_done_callback(back_on_the_loop)

    def _failed(self, monitor: CellMonitor, twin: str, error: BaseException) -> None:
        key = (monitor.cell, twin)
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        monitor.release(twin)
        again = "on the next tick" if failures == 1 else "on its schedule"
        if failures == 1 and twin in monitor.twins:
            monitor.retry(twin)
        log.error(f"metric computation failed; the twin is evaluated again {again}", cell=monitor.cell,
                  twin=twin, failures_in_a_row=failures, error=repr(error))  # fmt: skip

    def _computed(self, monitor: CellMonitor, twin: str, snap: Snapshot, future: Future[Figures]) -> None:
        key = (monitor.cell, twin)
        current = self.monitors.get(monitor.cell) is monitor and twin in monitor.twins
        if future.cancelled() or not current:
            monitor.release(twin)
            return  # stopping, or the cell/twin was removed by a reload meanwhile
        error = future.exception()
        if error is not None:
            self._failed(monitor, twin, error)
            return
        monitor.release(twin)
        self._failures.pop(key, None)
        every = monitor.config.schedule.every_transitions
        tm = monitor.twins[twin]
        if every is not None and tm.new_transitions >= every:
            self.metrics.evaluations_deferred.labels(*key).inc()  # it became due while this one computed
        report = monitor.decide(twin, snap.t, future.result())
        self.last_evaluated[key] = time.monotonic()
        self.metrics.record(report)
        self.on_report(report)

    def tick(self, stream_time: Callable[[str], float]) -> None:
        """The time-based schedule: evaluate every twin due at its cell's clock."""
        for cell, monitor in list(self.monitors.items()):
            now = stream_time(cell)
            for twin in monitor.due(now):
                self.evaluate(monitor, twin, now)

    def forget(self, cell: str, twin: str) -> None:
        self.last_evaluated.pop((cell, twin), None)
        self._failures.pop((cell, twin), None)
