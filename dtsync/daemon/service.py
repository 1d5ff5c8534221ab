"""`dtsync run`: live telemetry in, per-twin DT-BSM out, resync events delivered at least once.

One asyncio loop owns all state. Per message: decode (contract), then for each transition the same steps
`dtsync replay` takes (CellMonitor.add, then `due`), so a recorded trace and the same trace received live give
the same mismatch timeline. A due evaluation is snapshotted on the loop and computed in a worker process
(dtsync.daemon.compute), at most one in flight per twin; a twin that becomes due meanwhile is picked up by
the next transition or tick after its computation lands. The trigger decision runs back on the loop.

Events go to the SQLite outbox before the first publish and leave it on PUBACK; the outbox is flushed after
every (re)connect, so broker outages and restarts lose nothing. Statuses are retained and re-published after
every reconnect; the liveness topic says `online` on connect, `offline` by last will or on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
import uuid
from collections.abc import Collection, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import structlog

from dtsync import __version__
from dtsync.config import Config, ConfigError, load_config
from dtsync.contract import REJECT_REASONS, decode_payload
from dtsync.daemon.compute import ComputePool
from dtsync.daemon.metrics import DaemonMetrics, MetricsServer
from dtsync.daemon.mqtt import Client, PublishRefused, backoff, expiry_properties, make_client
from dtsync.daemon.notify import SystemdNotifier
from dtsync.daemon.outbox import Outbox, PendingEvent
from dtsync.daemon.topics import REAL, Topics
from dtsync.encoding import ENCODING_REASONS
from dtsync.logs import ReasonLimiter
from dtsync.monitor import CellMonitor, Figures, Report, Snapshot

log = structlog.get_logger("dtsync.daemon")

# Every reason a message or transition can be refused for: the fixed label set of dtsync_rejected_total.
REJECT_REASONS_ALL = (*REJECT_REASONS, *ENCODING_REASONS, "too_many_labels", "unknown_stream", "internal_error")

TICK_SECONDS = 1.0  # time-based schedule checks, staleness, watchdog
STOP_FLUSH_SECONDS = 2.0  # on SIGTERM: time left to deliver pending events before saying offline
PUBLISH_TIMEOUT = 10.0
_JSON = msgspec.json.Encoder()


class Daemon:
    """The service for the cells of one config; `await run()` until `stop()` (or SIGTERM)."""

    def __init__(
        self, config: Config, config_path: Path | None = None, *, notifier: SystemdNotifier | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.mqtt = config.mqtt  # connection and daemon settings are fixed for the life of the process
        self.daemon_settings = config.daemon
        self.instance = self.daemon_settings.instance
        self.topics = Topics(config.mqtt.topic_prefix)
        self.namespace = uuid.uuid4()  # event ids never repeat across restarts
        self.monitors = {cell: CellMonitor(cell, config, self.namespace) for cell in config.cells}
        self.metrics = DaemonMetrics(self.instance)
        for cell, monitor in self.monitors.items():
            self.metrics.declare(cell, list(monitor.twins), REJECT_REASONS_ALL, time.time())
        self.metrics.schedule_seconds.set(config.schedule.every_seconds or 0)
        self.outbox = Outbox(config.daemon.outbox_file())
        self.metrics.outbox_pending.set(len(self.outbox))
        self.notifier = notifier or SystemdNotifier()
        self.rejects = ReasonLimiter("telemetry rejected", interval=60.0)
        self._pool = ComputePool(config.daemon.workers)
        self._status: dict[tuple[str, str], dict[str, Any]] = {}
        self._last_event: dict[tuple[str, str], str] = {}
        self._last_seen: dict[tuple[str, str], float] = {}  # (cell, stream) -> monotonic time
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._clock: dict[str, tuple[float, float]] = {}  # cell -> (stream time, monotonic time it was seen)
        self._client: Client | None = None
        self._sending: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._started = time.monotonic()
        self._ready_sent = False
        self._summary = ""
        self.server: MetricsServer | None = None

    # --- life cycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped: metrics endpoint, broker connection (with reconnects), schedule ticks."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        m = self.config.metrics
        self.server = MetricsServer(m.host, m.port, self.metrics.registry, self.health)
        self.server.start()
        cells = {c: list(mon.twins) for c, mon in self.monitors.items()}
        log.info("started", version=__version__, instance=self.instance, metrics=f"http://{m.listen}/metrics",
                 cells=cells, outbox=str(self.outbox.path))  # fmt: skip
        ticker = asyncio.create_task(self._ticker())
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self._pool.warm_up()))
            # Everything allocated so far lives as long as the process: keep it out of the collector's scans,
            # and collect the young generation less often. Under a burst, aiomqtt queues messages in-process,
            # and default GC settings then spent ~50 us per message re-scanning them (measured by
            # benchmarks/bench_daemon.py's profile: GC 59 -> 9 us per message).
            gc.freeze()
            gc.set_threshold(100_000, 50, 1000)
            await self._connection_loop()
        finally:
            ticker.cancel()
            self.notifier.stopping()
            self._pool.shutdown()
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
        fixed = [k for k in ("mqtt", "metrics", "daemon", "max_states") if getattr(new, k) != getattr(self.config, k)]
        if fixed:
            log.warning("reload: these sections change only on restart", sections=fixed)
        for cell in [c for c in self.monitors if c not in new.cells]:
            for twin in self.monitors.pop(cell).twins:
                self._forget_twin(cell, twin)
            self._spawn(self._subscribe(cell, subscribe=False))
        for cell in new.cells:
            mon = self.monitors.get(cell)
            if mon is None:
                self.monitors[cell] = CellMonitor(cell, new, self.namespace)
                self.metrics.declare(cell, list(new.cells[cell].twins), (), time.time())
                self._spawn(self._subscribe(cell, subscribe=True))
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
        self.metrics.schedule_seconds.set(new.schedule.every_seconds or 0)
        log.info("reloaded", cells={c: list(mon.twins) for c, mon in self.monitors.items()})
        self.notifier.ready()

    # --- broker connection --------------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delays = backoff(self.mqtt.reconnect_min_seconds, self.mqtt.reconnect_max_seconds)
        liveness = self.topics.daemon_status(self.instance)
        will = aiomqtt.Will(liveness, b"offline", qos=1, retain=True)
        while not self._stop.is_set():
            client = make_client(self.mqtt, client_id=self.mqtt.client_id or f"dtsync-{self.instance}", will=will)
            try:
                async with client:
                    self._client = client
                    await self._on_connect(client, liveness)
                    delays = backoff(self.mqtt.reconnect_min_seconds, self.mqtt.reconnect_max_seconds)
                    await self._consume(client)
                    await self._goodbye(client, liveness)
                    return
            except aiomqtt.MqttError as e:
                log.warning("broker connection lost" if self._ready_sent else "broker unreachable",
                            host=self.mqtt.host, port=self.mqtt.port, error=str(e))  # fmt: skip
            finally:
                self._client = None
                self.metrics.mqtt_connected.set(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), next(delays))

    async def _on_connect(self, client: Client, liveness: str) -> None:
        await client.publish(liveness, b"online", qos=1, retain=True)
        for cell in self.monitors:
            for topic in self.topics.telemetry_filters(cell):
                await client.subscribe(topic, qos=1)
        self.metrics.mqtt_connected.set(1)
        self.metrics.mqtt_connects.inc()
        log.info("connected", host=self.mqtt.host, port=self.mqtt.port, protocol=self.mqtt.protocol)
        for cell in self.monitors:
            self._publish_initial_status(cell)
        for key, status in self._status.items():
            self._spawn(self._publish_status(*key, status))
        self._spawn(self._flush_outbox())
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready()

    async def _consume(self, client: Client) -> None:
        """Handle messages until stopped (returns) or the connection breaks (MqttError)."""
        consume = asyncio.create_task(self._handle_all(client))
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({consume, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consume, stop):
            task.cancel()
        if consume in done:
            consume.result()  # re-raises the MqttError that ended it

    async def _handle_all(self, client: Client) -> None:
        async for message in client.messages:
            try:
                self.handle(message.topic.value, message.payload)  # type: ignore[arg-type]
            except Exception:  # a bug must not stop the service: count it, log it (rate-limited), go on
                self.metrics.rejected.labels("internal_error").inc()
                if self.rejects.log(log, "internal_error", topic=message.topic.value):
                    log.exception("message handling failed")

    async def _goodbye(self, client: Client, liveness: str) -> None:
        """Clean stop: give pending events a short chance, then say offline (the will is not sent)."""
        with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
            await asyncio.wait_for(self._flush_outbox(), STOP_FLUSH_SECONDS)
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(liveness, b"offline", qos=1, retain=True, timeout=1.0)

    async def _subscribe(self, cell: str, *, subscribe: bool) -> None:
        client = self._client
        if client is None:
            return  # the next connect subscribes from self.monitors
        with contextlib.suppress(aiomqtt.MqttError):
            for topic in self.topics.telemetry_filters(cell):
                await (client.subscribe(topic, qos=1) if subscribe else client.unsubscribe(topic))

    # --- telemetry ------------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes | bytearray) -> None:
        """One telemetry message: decode, add each transition to its window, evaluate what became due."""
        parsed = self.topics.parse_telemetry(topic)
        monitor = self.monitors.get(parsed[0]) if parsed else None
        if parsed is None or monitor is None or (parsed[1] != REAL and parsed[1] not in monitor.twins):
            self._reject("unknown_stream", topic=topic)
            return
        cell, stream = parsed
        transitions, rejections = decode_payload(
            bytes(payload), max_bytes=self.mqtt.max_payload_bytes, max_batch=self.mqtt.max_batch
        )
        for rej in rejections:
            self._reject(rej.reason, topic=topic, detail=rej.detail, item=rej.index)
        wall = time.time()
        refused: list[tuple[int, str]] = []
        for t, due in monitor.ingest(stream, transitions, wall, refused):
            for twin in due:
                self._evaluate(monitor, twin, t)
        for _, reason in refused:
            self._reject(reason, topic=topic)
        accepted = len(transitions) - len(refused)
        if accepted:
            last = transitions[-1].t
            received, last_seen = self._stream_metrics(cell, stream)
            received.inc(accepted)
            last_seen.set(wall)
            mono = time.monotonic()
            self._last_seen[(cell, stream)] = mono
            self._advance_clock(cell, wall if last is None else last, mono)

    def _stream_metrics(self, cell: str, stream: str) -> tuple[Any, Any]:
        """The per-stream metric children, looked up once (labels() costs microseconds per message)."""
        key = (cell, stream)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.metrics.transitions.labels(cell, stream),
                                              self.metrics.last_transition.labels(cell, stream))  # fmt: skip
        return children

    def _reject(self, reason: str, **fields: Any) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.rejects.log(log, reason, **fields)

    def _stream_time(self, cell: str) -> float:
        """The cell's clock: the newest transition time seen, advanced by the wall time elapsed since."""
        t, seen = self._clock.get(cell, (time.time(), time.monotonic()))
        return t + (time.monotonic() - seen)

    def _advance_clock(self, cell: str, t: float, mono: float) -> None:
        """Re-anchor the cell's clock at stream time t unless t is behind where the clock already is."""
        last = self._clock.get(cell)
        if last is None or t >= last[0] + (mono - last[1]):
            self._clock[cell] = (t, mono)

    # --- evaluation -------------------------------------------------------------------------------------------

    def _evaluate(self, monitor: CellMonitor, twin: str, t: float) -> None:
        key = (monitor.cell, twin)
        snap = monitor.snapshot(twin, t)
        monitor.hold(twin)  # never two computations of one twin at once
        future = self._pool.submit(key, monitor.twins[twin].settings, snap)
        loop = asyncio.get_running_loop()

        def back_on_the_loop(f: Future[Figures]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: we are stopping
                loop.call_soon_threadsafe(self._computed, monitor, twin, snap, f)

        future.add_done_callback(back_on_the_loop)

    def _computed(self, monitor: CellMonitor, twin: str, snap: Snapshot, future: Future[Figures]) -> None:
        key = (monitor.cell, twin)
        monitor.release(twin)
        every = monitor.config.schedule.every_transitions
        tm = monitor.twins.get(twin)
        if tm is not None and every is not None and tm.new_transitions >= every:
            self.metrics.evaluations_deferred.labels(*key).inc()  # it became due while this one computed
        if future.cancelled() or self.monitors.get(monitor.cell) is not monitor or twin not in monitor.twins:
            return  # stopping, or the cell/twin was removed by a reload meanwhile
        error = future.exception()
        if error is not None:
            log.error("metric computation failed", cell=monitor.cell, twin=twin, error=repr(error))
            return
        report = monitor.decide(twin, snap.t, future.result())
        self.metrics.record(report)
        if report.fired and report.event_id is not None:
            self._raise_event(report)
        status = self._status_payload(report)
        self._status[key] = status
        self._spawn(self._publish_status(monitor.cell, twin, status))

    def _raise_event(self, report: Report) -> None:
        now = time.time()
        expires = now + self.mqtt.event_expiry_seconds
        payload = {**report.record(), "time": now, "expires_at": expires, "instance": self.instance}
        assert report.event_id is not None
        event = PendingEvent(report.event_id, self.topics.resync(report.cell, report.twin), _JSON.encode(payload),
                             expires)  # fmt: skip
        self.outbox.add(event)
        self.metrics.outbox_pending.set(len(self.outbox))
        self._last_event[(report.cell, report.twin)] = report.event_id
        log.warning("resync event", cell=report.cell, twin=report.twin, event_id=report.event_id,
                    mismatch=report.figures.mismatch, reason=report.reason)  # fmt: skip
        self._spawn(self._send(event))

    # --- publishing -------------------------------------------------------------------------------------------

    async def _send(self, event: PendingEvent) -> None:
        """Publish one outbox event at QoS 1; it leaves the outbox only on PUBACK (or when expired)."""
        client = self._client
        if client is None or event.event_id in self._sending:
            return
        self._sending.add(event.event_id)
        try:
            remaining = event.expires_at - time.time()
            if remaining <= 0:
                self.outbox.remove(event.event_id)
                self.metrics.events_expired.inc()
                log.warning("resync event expired unsent", event_id=event.event_id, topic=event.topic)
                return
            props = expiry_properties(self.mqtt, remaining)
            await client.publish_acked(event.topic, event.payload, properties=props, timeout=PUBLISH_TIMEOUT)
            self.outbox.remove(event.event_id)
        except PublishRefused as e:
            log.error("resync event refused by the broker; kept in the outbox (check the broker ACL)",
                      event_id=event.event_id, error=str(e))  # fmt: skip
        except aiomqtt.MqttError as e:
            log.warning("resync event not acknowledged yet; kept in the outbox", event_id=event.event_id,
                        error=str(e))  # fmt: skip
        finally:
            self._sending.discard(event.event_id)
            self.metrics.outbox_pending.set(len(self.outbox))

    async def _flush_outbox(self) -> None:
        for event in self.outbox.pending():
            if self._client is None:
                return
            await self._send(event)

    def _status_payload(self, report: Report) -> dict[str, Any]:
        f = report.figures
        return {
            "cell": report.cell, "twin": report.twin, "state": report.state, "t": report.t, "time": time.time(),
            "mismatch": f.mismatch, "mismatch_lower": f.mismatch_lower, "mismatch_upper": f.mismatch_upper,
            "noise_floor": f.noise_floor, "threshold": report.threshold, "samples_real": f.samples_real,
            "samples_twin": f.samples_twin, "coverage": f.coverage, "reason": report.reason, **report.evidence(),
            "last_event_id": self._last_event.get((report.cell, report.twin)), "instance": self.instance,
        }  # fmt: skip

    def _publish_initial_status(self, cell: str, skip: Collection[str] = ()) -> None:
        """`warming` for twins with no evaluation yet, except those in `skip` (after a reload: the old twins)."""
        for twin in self.monitors[cell].twins:
            if (cell, twin) in self._status or twin in skip:
                continue
            status = {"cell": cell, "twin": twin, "state": "warming", "mismatch": None, "last_event_id": None,
                      "time": time.time(), "instance": self.instance}  # fmt: skip
            self._spawn(self._publish_status(cell, twin, status))

    async def _publish_status(self, cell: str, twin: str, status: dict[str, Any] | None) -> None:
        """Retained status (None clears it: a removed twin). Lost if disconnected: reconnect re-publishes."""
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            payload = b"" if status is None else _JSON.encode(status)
            await client.publish(self.topics.status(cell, twin), payload, qos=1, retain=True)

    def _forget_twin(self, cell: str, twin: str) -> None:
        self._pool.forget((cell, twin))
        self._status.pop((cell, twin), None)
        self.metrics.forget_twin(cell, twin)
        self._spawn(self._publish_status(cell, twin, None))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- ticks, health, systemd -----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        """Once a second: time-based schedule, outbox gauge, watchdog and a one-line systemd status."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            for cell, monitor in self.monitors.items():
                now = self._stream_time(cell)
                for twin in monitor.due(now):
                    self._evaluate(monitor, twin, now)
            self.metrics.outbox_pending.set(len(self.outbox))
            self.notifier.watchdog()
            summary = self._one_line()
            if summary != self._summary:
                self._summary = summary
                self.notifier.status(summary)

    def _one_line(self) -> str:
        link = "connected" if self._client is not None else "broker unreachable"
        twins = ", ".join(
            f"{c}/{t} {s['state']}" + (f" {s['mismatch']:.3g}" if s.get("mismatch") is not None else "")
            for (c, t), s in sorted(self._status.items())
        )  # fmt: skip
        return f"{link}; {twins or 'no evaluation yet'}; outbox {len(self.outbox)}"

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz (metrics thread): healthy when connected and no configured stream is stale."""
        now = time.monotonic()
        limit = self.daemon_settings.stale_seconds
        stale = []
        for cell, monitor in list(self.monitors.items()):
            for stream in (REAL, *list(monitor.twins)):
                if now - self._last_seen.get((cell, stream), self._started) > limit:
                    stale.append(f"{cell}/{stream}")
        connected = self._client is not None
        return connected and not stale, {"mqtt_connected": connected, "stale_streams": stale}
