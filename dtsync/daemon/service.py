"""`dtsync run`: live telemetry in, per-twin DT-BSM out, resync events delivered at least once.

One asyncio loop owns all state; this module wires the pieces and supervises them:

    connection.py   the broker link, reconnects, liveness
    ingest.py       telemetry -> time check -> windows -> due twins
    scheduling.py   due twins -> worker processes (compute.py) -> trigger decision
    delivery.py     resync events: outbox, publish, retry until PUBACK
    health.py       retained per-twin status, /healthz, the systemd status line

Every long-running task runs under one `asyncio.TaskGroup`: if any of them fails, the group cancels the
others and the daemon stops with the error logged and a non-zero exit (systemd restarts it), instead of
running on without, say, its schedule ticks.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
import uuid
from collections.abc import Collection, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import structlog

from dtsync import __version__
from dtsync.config import Config, ConfigError, load_config
from dtsync.daemon import state
from dtsync.daemon.acks import Acks
from dtsync.daemon.cluster import Cluster
from dtsync.daemon.compute import ComputePool
from dtsync.daemon.connection import Connection
from dtsync.daemon.delivery import Delivery
from dtsync.daemon.health import StatusBoard
from dtsync.daemon.ingest import REJECT_REASONS_ALL, Ingest
from dtsync.daemon.metrics import DaemonMetrics, MetricsServer
from dtsync.daemon.mqtt import Client
from dtsync.daemon.notify import SystemdNotifier
from dtsync.daemon.outbox import Outbox, PendingEvent
from dtsync.daemon.scheduling import Scheduler
from dtsync.daemon.snapshots import CellSnapshots
from dtsync.daemon.topics import REAL, Topics
from dtsync.monitor import CellMonitor, Report

log = structlog.get_logger("dtsync.daemon")

TICK_SECONDS = 1.0  # time-based schedule checks, staleness, watchdog
STOP_FLUSH_SECONDS = 2.0  # on SIGTERM: time left to deliver pending events before saying offline
_JSON = msgspec.json.Encoder()


class Daemon:
    """The service for the cells of one config; `await run()` until `stop()` (or SIGTERM)."""

    def __init__(
        self, config: Config, config_path: Path | None = None, *, notifier: SystemdNotifier | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.mqtt = config.mqtt  # connection and daemon settings are fixed for the life of the process
        settings = self.daemon_settings = config.daemon
        self.instance = settings.instance
        self.topics = Topics(config.mqtt.topic_prefix)
        self.namespace = uuid.uuid4()  # event ids never repeat across restarts
        # Under coordination the cells come from ZooKeeper (cluster.py), one share per instance.
        owned = config.cells if config.coordination is None else {}
        self.monitors = {cell: CellMonitor(cell, config, self.namespace) for cell in owned}
        self.metrics = DaemonMetrics(self.instance)
        started = time.time()
        for cell, monitor in self.monitors.items():
            self.metrics.declare(cell, list(monitor.twins), REJECT_REASONS_ALL, started)
        self.metrics.schedule_seconds.set(config.schedule.every_seconds or 0)
        self.notifier = notifier or SystemdNotifier()
        self._stop = asyncio.Event()
        self._ready_sent = False
        self._summary = ""
        self._restarts_seen = 0
        self.pool = ComputePool(settings.worker_count())
        self.scheduler = Scheduler(self.pool, self.metrics, self.monitors, self._on_report)
        self.ingest = Ingest(self.monitors, self.topics, config.mqtt, settings.max_clock_skew_seconds, self.metrics,
                             self.scheduler.evaluate)  # fmt: skip
        self.link = Connection(config.mqtt, self.instance, self.topics, self.metrics, self._on_connect,
                               self._handle, self._stop, self._flush_before_stop)  # fmt: skip
        self.board = StatusBoard(self.instance, self.monitors, settings.stale_seconds, self.ingest.last_seen,
                                 self.scheduler.last_evaluated, lambda: self.link.client is not None)  # fmt: skip
        self.outbox = Outbox(settings.outbox_file())
        self.delivery = Delivery(self.outbox, self.metrics, lambda: self.link.client, config.mqtt)
        self.state_path = settings.state_file()
        self.acks = Acks(self.monitors, self.topics, self.metrics, self.ingest.stream_time, self.save_state)
        self.metrics.resync_ack_timeout.set(settings.resync_ack_seconds)
        cell_dir = settings.state_directory()
        self.cell_snapshots = None if cell_dir is None else CellSnapshots(
            cell_dir, self.state_path, self.monitors, self.ingest, self.board, self.outbox, self.delivery,
            self.acks, self.metrics.snapshot_seconds.observe)  # fmt: skip
        self.cluster = None if config.coordination is None else Cluster(self, config.coordination)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.server: MetricsServer | None = None
        self._restore()

    # --- state snapshots ----------------------------------------------------------------------------------

    def _restore(self) -> None:
        """Windows, labels, triggers and the event namespace from the last good snapshot, if any."""
        if self.cell_snapshots is not None:
            for cell in list(self.monitors):
                self.cell_snapshots.restore(cell)
            return
        try:
            saved = state.read(self.state_path)
            if saved is None:
                return
            clocks, last_events = state.apply(saved, self.monitors, self.delivery.pending_by_twin())
        except Exception as e:  # whatever is wrong with the file, start fresh rather than crash-loop
            log.error("state snapshot not restored; starting fresh", path=str(self.state_path), error=repr(e))
            return
        self.namespace = uuid.UUID(saved.namespace)
        mono = time.monotonic()
        for cell, t in clocks.items():
            self.ingest.clock[cell] = (t, mono)
        self.board.last_event.update(last_events)
        self.acks.restore(saved.raised, self.delivery.pending_by_twin())
        log.info("state restored", path=str(self.state_path), age_seconds=round(time.time() - saved.saved_at, 1),
                 twins=[f"{c}/{t}" for c, t in state.restored_twins(self.monitors, saved)])  # fmt: skip

    def save_state(self) -> None:
        """Write a snapshot now (periodically, after an event is raised, and on a clean stop)."""
        if self.cell_snapshots is not None:
            self.cell_snapshots.save()
            return
        clocks = {cell: self.ingest.stream_time(cell) for cell in self.ingest.clock if cell in self.monitors}
        started = time.perf_counter()
        try:
            state.write(self.state_path, state.capture(self.namespace, self.monitors, clocks, self.board.last_event,
                                                       raised=self.acks.capture()))  # fmt: skip
        except Exception as e:  # a full disk, or a bug: the service goes on (the previous snapshot stays)
            log.error("state snapshot not written", path=str(self.state_path), error=repr(e))
            return
        self.metrics.snapshot_seconds.observe(time.perf_counter() - started)

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.daemon_settings.snapshot_seconds)
            self.save_state()

    # --- life cycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped: metrics endpoint, broker connection (with reconnects), schedule ticks."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        m = self.config.metrics
        self.server = MetricsServer(m.host, m.port, self.metrics.registry, self.board.health)
        self.server.start()
        cells = {c: list(mon.twins) for c, mon in self.monitors.items()}
        log.info("started", version=__version__, instance=self.instance, metrics=f"http://{m.listen}/metrics",
                 cells=cells, outbox=str(self.outbox.path), workers=self.daemon_settings.worker_count())  # fmt: skip
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self.pool.warm_up()))
            # Everything allocated so far lives as long as the process: keep it out of the collector's scans,
            # and collect the young generation less often. Under a burst, aiomqtt queues messages in-process,
            # and default GC settings then spent ~50 us per message re-scanning them (measured by
            # benchmarks/bench_daemon.py's profile: GC 59 -> 9 us per message).
            gc.freeze()
            gc.set_threshold(100_000, 50, 1000)
            async with asyncio.TaskGroup() as group:
                connection = group.create_task(self.link.run(), name="connection")
                background = [group.create_task(coro, name=name) for name, coro in (
                    ("ticker", self._ticker()), ("outbox-retry", self.delivery.retry_forever()),
                    ("liveness", self.link.liveness_forever()), ("snapshots", self._snapshots()))]  # fmt: skip
                if self.cluster is not None:
                    background.append(group.create_task(self.cluster.run(), name="cluster"))
                await connection  # returns once stopped (clean goodbye done)
                for task in background:
                    task.cancel()
            self.save_state()
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError | KeyboardInterrupt):
                log.critical("daemon task failed; stopping", error=repr(e))
            raise
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.notifier.stopping()
            self.pool.shutdown()
            self.server.stop()
            self.outbox.close()
            log.info("stopped")

    def stop(self) -> None:
        """Begin a graceful stop: deliver pending events (briefly), publish `offline`, disconnect."""
        if not self._stop.is_set():
            log.info("stopping")
            self.notifier.stopping()
            self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply cells, twins, thresholds, windows and schedule in place."""
        if self.config_path is None:
            log.warning("reload ignored: no config file")
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload failed; the running config stays", error=str(e))
            self.notifier.ready()
            return
        restart_only = ("mqtt", "metrics", "daemon", "coordination", "max_states", "max_actions")
        fixed = [k for k in restart_only if getattr(new, k) != getattr(self.config, k)]
        if fixed:
            log.warning("reload: these sections change only on restart", sections=fixed)
        for cell in [c for c in self.monitors if c not in new.cells]:
            if self.cell_snapshots is not None:
                self.cell_snapshots.save([cell])  # its next owner (a reload elsewhere) takes it from here
            for twin in self.monitors.pop(cell).twins:
                self._forget_twin(cell, twin)
            self.ingest.forget(cell, REAL)
            self.metrics.forget_stream(cell, REAL)
            self._spawn(self.link.subscribe(self.topics.telemetry_filters(cell), subscribe=False))
        for cell in new.cells if self.cluster is None else [c for c in new.cells if c in self.monitors]:
            mon = self.monitors.get(cell)
            if mon is None:
                self.monitors[cell] = CellMonitor(cell, new, self.namespace)
                if self.cell_snapshots is not None:
                    self.cell_snapshots.restore(cell)
                self.metrics.declare(cell, list(new.cells[cell].twins), (), time.time())
                self._spawn(self.link.subscribe(self.topics.telemetry_filters(cell), subscribe=True))
                self._publish_initial_status(cell)
                continue
            before = set(mon.twins)
            try:
                mon.reconfigure(new)
            except ValueError as e:
                log.error("reload: cell kept as it was", cell=cell, error=str(e))
                continue
            for twin in before - set(mon.twins):
                self._forget_twin(cell, twin)
            self.metrics.declare(cell, [t for t in mon.twins if t not in before], (), time.time())
            self._publish_initial_status(cell, skip=before)
        self.config = new
        if self.cluster is not None:
            self.cluster.set_cells(list(new.cells))
        self.metrics.schedule_seconds.set(new.schedule.every_seconds or 0)
        log.info("reloaded", cells={c: list(mon.twins) for c, mon in self.monitors.items()})
        self.notifier.ready()

    # --- wiring -------------------------------------------------------------------------------------------

    async def _on_connect(self, client: Client) -> None:
        for cell in self.monitors:
            for topic in self.topics.telemetry_filters(cell):
                await client.subscribe(topic, qos=1)
        for cell in self.monitors:
            self._publish_initial_status(cell)
        for (cell, twin), status in self.board.status.items():
            self._spawn(self.link.publish_retained(self.topics.status(cell, twin), _JSON.encode(status)))
        self._spawn(self.delivery.flush())
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready()

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            if self.topics.parse_ack(topic) is not None:
                self.acks.handle(topic, payload)
            else:
                self.ingest.handle(topic, payload)
        except Exception:  # a bug must not stop the service: count it, log it (rate-limited), go on
            self.metrics.rejected.labels("internal_error").inc()
            if self.ingest.rejects.log(log, "internal_error", topic=topic):
                log.exception("message handling failed")

    async def _flush_before_stop(self) -> None:
        await asyncio.wait_for(self.delivery.flush(), STOP_FLUSH_SECONDS)

    def _on_report(self, report: Report) -> None:
        self.acks.on_report(report)
        if report.fired and report.event_id is not None:
            self._raise_event(report)
        status = self.board.from_report(report)
        self._spawn(self.link.publish_retained(self.topics.status(report.cell, report.twin), _JSON.encode(status)))

    def _raise_event(self, report: Report) -> None:
        now = time.time()
        expires = now + self.mqtt.event_expiry_seconds
        payload = {**report.record(), "time": now, "expires_at": expires, "instance": self.instance}
        assert report.event_id is not None
        event = PendingEvent(report.event_id, self.topics.resync(report.cell, report.twin), _JSON.encode(payload),
                             expires)  # fmt: skip
        if self.cell_snapshots is not None:  # the cell's snapshot holds the event before the outbox does
            self.cell_snapshots.save([report.cell], raising=[event])
        self.delivery.add(event)
        if self.cell_snapshots is None:
            self.save_state()  # the trigger is now disarmed: a restart must not fire this episode again
        log.warning("resync event", cell=report.cell, twin=report.twin, event_id=report.event_id,
                    mismatch=report.figures.mismatch, reason=report.reason)  # fmt: skip
        self._spawn(self.delivery.send(event))

    def _publish_initial_status(self, cell: str, skip: Collection[str] = ()) -> None:
        """`warming` for twins with no evaluation yet, except those in `skip` (after a reload: the old twins)."""
        for twin in self.monitors[cell].twins:
            if (cell, twin) in self.board.status or twin in skip:
                continue
            status = self.board.warming(cell, twin)
            self._spawn(self.link.publish_retained(self.topics.status(cell, twin), _JSON.encode(status)))

    def _forget_twin(self, cell: str, twin: str) -> None:
        """A reload removed this twin: its solvers, status, metric series (stream ones too) and schedule go."""
        self.pool.forget((cell, twin))
        self.board.forget(cell, twin)
        self.scheduler.forget(cell, twin)
        self.ingest.forget(cell, twin)
        self.metrics.forget_twin(cell, twin)
        self.metrics.forget_stream(cell, twin)
        self._spawn(self.link.publish_retained(self.topics.status(cell, twin), b""))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A short fire-and-forget task (a publish); kept referenced until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- ticks --------------------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        """Once a second: time-based schedule, outbox gauge, watchdog and a one-line systemd status."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.scheduler.tick(self.ingest.stream_time)
            self.metrics.outbox_pending.set(len(self.outbox))
            self.metrics.owned_cells.set(len(self.monitors))
            restarts = self.pool.replaced - self._restarts_seen
            if restarts:
                self._restarts_seen += restarts
                self.metrics.worker_restarts.inc(restarts)
            self.notifier.watchdog()
            summary = self.board.one_line(len(self.outbox))
            if summary != self._summary:
                self._summary = summary
                self.notifier.status(summary)
