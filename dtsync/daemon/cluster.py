"""Cells shared among instances (``coordination:``): the daemon evaluates only the cells ZooKeeper gives it.

:class:`~dtsync.daemon.ownership.CellOwnership` decides, on its own thread, which cells this instance holds;
this module carries each decision onto the daemon's loop and waits for it there, which is what makes the
safety rule hold (a cell is evaluated by at most one instance at a time):

- **release** (a member came or went, the session was lost, the cell list changed, stop): the cells' final
  snapshots are written to ``daemon.state_dir``, their monitors leave the daemon (no evaluation starts, and one
  in flight is discarded when it lands), their topics are unsubscribed — all before ZooKeeper's locks go;
- **acquire** (locks held): each cell's latest snapshot is restored (windows, triggers, its event namespace,
  its unacknowledged events), its topics subscribed, and a restored cell is evaluated at once.

When ZooKeeper is unreachable the partitioner gives every cell up, so the instance evaluates nothing rather
than risk a second owner; ``/healthz`` then answers 503 with ``zookeeper_connected: false``, the systemd status
line says so and ``dtsync_zookeeper_connected`` is 0: never a silent stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from dtsync.config import CoordinationSettings
from dtsync.daemon.ingest import REJECT_REASONS_ALL
from dtsync.daemon.ownership import CellOwnership, Cells, ZooKeeperSettings
from dtsync.daemon.topics import REAL
from dtsync.monitor import CellMonitor

if TYPE_CHECKING:
    from dtsync.daemon.service import Daemon

log = structlog.get_logger("dtsync.cluster")


class Cluster:
    """One daemon's membership: `await run()` inside the daemon's task group."""

    def __init__(self, daemon: Daemon, settings: CoordinationSettings) -> None:
        assert daemon.cell_snapshots is not None, "coordination needs daemon.state_dir (checked by the config)"
        self.daemon = daemon
        self.snapshots = daemon.cell_snapshots
        zk = settings.zookeeper
        self.ownership = CellOwnership(ZooKeeperSettings(zk.hosts, zk.path, zk.session_timeout),
                                       daemon.config.cells, daemon.instance, self._acquired,
                                       self._released)  # fmt: skip
        self._loop: asyncio.AbstractEventLoop | None = None
        daemon.board.extra = self.health
        daemon.metrics.zookeeper_connected.set_function(lambda: float(self.ownership.connected))
        daemon.ingest.elsewhere = frozenset(daemon.config.cells)
        for reason in REJECT_REASONS_ALL:  # declared at start, as without coordination (no cell is held yet)
            daemon.metrics.rejected.labels(reason)

    # --- on the loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Join the party until cancelled; then give every cell up (final snapshots) and leave."""
        self._loop = asyncio.get_running_loop()
        self.ownership.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.ownership.stop)

    def set_cells(self, cells: list[str]) -> None:
        """A reload changed the shared list: every cell is given up and the new list split again."""
        self.daemon.ingest.elsewhere = frozenset(cells)
        self.ownership.set_cells(cells)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: red while ZooKeeper is unreachable (this instance then evaluates nothing)."""
        connected = self.ownership.connected
        return connected, {"zookeeper_connected": connected, "owned_cells": sorted(self.daemon.monitors)}

    def attach(self, cells: Cells) -> None:
        """Take `cells`: restore each from its snapshot, subscribe, declare its series."""
        d = self.daemon
        for cell in sorted(cells):
            if cell in d.monitors or cell not in d.config.cells:
                continue  # already ours, or removed by a reload meanwhile (the next split leaves it out)
            d.monitors[cell] = CellMonitor(cell, d.config, d.namespace)
            restored = self.snapshots.restore(cell)
            d.board.since[cell] = time.monotonic()
            d.metrics.declare(cell, list(d.monitors[cell].twins), (), time.time())
            d._spawn(d.link.subscribe(d.topics.telemetry_filters(cell), subscribe=True))
            if not restored:
                d._publish_initial_status(cell)  # a restored cell keeps its last owner's status until judged
        d.metrics.ownership_changes.labels("acquired").inc(len(cells))
        d.metrics.owned_cells.set(len(d.monitors))
        log.info("cells taken", cells=sorted(cells), owned=len(d.monitors))

    def detach(self, cells: Cells) -> None:
        """Give `cells` up: final snapshot first, then stop evaluating and unsubscribe (status stays retained)."""
        d = self.daemon
        held = [c for c in sorted(cells) if c in d.monitors]
        self.snapshots.save(held)
        for cell in held:
            monitor = d.monitors.pop(cell)
            for twin in monitor.twins:
                d.pool.forget((cell, twin))
                d.board.forget(cell, twin)
                d.scheduler.forget(cell, twin)
                d.metrics.forget_twin(cell, twin)
            for stream in (REAL, *monitor.twins):
                d.ingest.forget(cell, stream)
                d.metrics.forget_stream(cell, stream)
            d.ingest.clock.pop(cell, None)
            d._spawn(d.link.subscribe(d.topics.telemetry_filters(cell), subscribe=False))
        d.metrics.ownership_changes.labels("released").inc(len(held))
        d.metrics.owned_cells.set(len(d.monitors))
        log.info("cells given up", cells=held, owned=len(d.monitors))

    # --- on the ownership thread --------------------------------------------------------------------------

    def _acquired(self, cells: Cells) -> None:
        self._on_loop(self.attach, cells)

    def _released(self, cells: Cells) -> None:
        self._on_loop(self.detach, cells)

    def _on_loop(self, fn: Callable[[Cells], None], cells: Cells) -> None:
        """Run `fn(cells)` on the loop and return only once it has run: the locks are given up after this.
        If the loop is gone the daemon is stopping and evaluates nothing, so returning is safe."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def call() -> None:
            try:
                fn(cells)
                done.set_result(None)
            except BaseException as e:  # a bug: stop loudly rather than run on with a half-done change
                log.critical("ownership change failed; stopping", change=fn.__name__, error=repr(e))
                self.daemon.stop()
                done.set_exception(e)

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # closed meanwhile
            return
        while not loop.is_closed():
            try:
                done.result(timeout=1.0)
                return
            except concurrent.futures.TimeoutError:
                continue
            except Exception:
                return
