"""Resync acknowledgements: a controller tells the daemon it re-synchronised a twin, answering one event.

    <prefix>/<cell>/twin/<twin>/resynced      QoS 1, published by controllers only (deploy/mosquitto ACL)
    {"event_id": "<the resync event answered>", "twin_version": "<the twin's new version>", "time": UNIX_SECONDS}

A valid acknowledgement re-synchronises the twin in its monitor (dtsync.resync: fresh window, trigger re-armed,
`resyncing` until judged on fresh data), records its version and the latency from the event to the ack. So the
daemon must know which events it raised: they are kept here, by id, in the state snapshot (written after every
event) and reconciled with the outbox on restart, so an ack that arrives after a restart is still accepted.

An ack is input like telemetry: whatever is wrong with it is rejected with a reason, counted in
dtsync_rejected_total{reason} and logged at a bounded rate, never acted on:
``ack_invalid`` (not JSON, missing or mistyped fields), ``ack_unknown_twin`` (a cell or twin not configured),
``ack_unknown_event`` (an event this daemon did not raise for that twin) and ``ack_duplicate`` (an event already
answered: QoS 1 may deliver an ack twice, and an ack for an event answers the twin's earlier ones too).
A twin whose telemetry version changes without an ack also answers its earlier events.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import msgspec
import structlog

from dtsync.contract import Version
from dtsync.daemon.metrics import DaemonMetrics
from dtsync.daemon.topics import Topics
from dtsync.logs import ReasonLimiter
from dtsync.monitor import CellMonitor, Report

log = structlog.get_logger("dtsync.daemon")

ACK_REASONS = ("ack_invalid", "ack_unknown_twin", "ack_unknown_event", "ack_duplicate")
MAX_EVENTS = 1024  # raised events remembered (answered ones too, to tell a duplicate from an unknown id)
MAX_ACK_BYTES = 4096


class Ack(msgspec.Struct, frozen=True):
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    twin_version: Version
    time: float | None = None


class RaisedEvent(msgspec.Struct):
    """An event this daemon raised, and whether it was answered (acknowledged, or the twin's version changed)."""

    event_id: str
    cell: str
    twin: str
    t: float  # evaluation (stream) time
    time: float  # wall clock when raised: the start of the ack latency
    answered: bool = False


_ACK = msgspec.json.Decoder(Ack)


class Acks:
    """The raised events and what acknowledgements do with them."""

    def __init__(self, monitors: dict[str, CellMonitor], topics: Topics, metrics: DaemonMetrics,
                 stream_time: Callable[[str], float], changed: Callable[[], None]) -> None:  # fmt: skip
        self.monitors = monitors
        self.topics = topics
        self.metrics = metrics
        self.stream_time = stream_time
        self.changed = changed  # state worth a snapshot now
        self.events: OrderedDict[str, RaisedEvent] = OrderedDict()
        self._seen: dict[tuple[str, str], float] = {}  # the start of the last version resync each twin reported
        self.rejects = ReasonLimiter("resync acknowledgement rejected", interval=60.0)

    def on_report(self, report: Report) -> None:
        """Remember a raised event; a resync by version change answers the events raised before it."""
        key = (report.cell, report.twin)
        r = report.resync
        if r is not None and r.cause == "version" and self._seen.get(key) != r.t:  # first report since that resync
            self._seen[key] = r.t
            self._answer(*key)  # every event raised so far came before it (a report raises after it is shown)
        if report.fired and report.event_id is not None:
            self._remember(RaisedEvent(report.event_id, report.cell, report.twin, report.t, time.time()))
        self._export(*key)

    def handle(self, topic: str, payload: bytes) -> None:
        """One acknowledgement message; never raises on bad input (rejected and counted)."""
        parsed = self.topics.parse_ack(topic)
        monitor = self.monitors.get(parsed[0]) if parsed else None
        if parsed is None or monitor is None or parsed[1] not in monitor.twins:
            self._reject("ack_unknown_twin", topic=topic)
            return
        cell, twin = parsed
        try:
            ack = _ACK.decode(payload) if len(payload) <= MAX_ACK_BYTES else None
        except (msgspec.DecodeError, RecursionError) as e:
            self._reject("ack_invalid", topic=topic, detail=str(e))
            return
        if ack is None:
            self._reject("ack_invalid", topic=topic, detail=f"{len(payload)} bytes > {MAX_ACK_BYTES}")
            return
        event = self.events.get(ack.event_id)
        if event is None or (event.cell, event.twin) != (cell, twin):
            self._reject("ack_unknown_event", topic=topic, event_id=ack.event_id)
            return
        if event.answered:
            self._reject("ack_duplicate", topic=topic, event_id=ack.event_id)
            return
        latency = max(0.0, time.time() - event.time)
        dropped = monitor.resynced(twin, self.stream_time(cell), cause="ack", version=ack.twin_version,
                                   event_id=event.event_id, event_t=event.t, latency=latency)  # fmt: skip
        self._answer(cell, twin, event)
        self.metrics.resync_latency.labels(cell, twin).observe(latency)
        self.metrics.twin_version_changed(cell, twin, ack.twin_version)
        self._export(cell, twin)
        log.info("resync acknowledged", cell=cell, twin=twin, event_id=event.event_id, version=ack.twin_version,
                 latency_seconds=round(latency, 3), window_dropped=dropped)  # fmt: skip
        self.changed()

    def unanswered_since(self, cell: str, twin: str) -> float | None:
        """Wall time of the oldest event of the twin still waiting for an answer (None: none)."""
        return min((e.time for e in self.events.values() if (e.cell, e.twin) == (cell, twin) and not e.answered),
                   default=None)  # fmt: skip

    def capture(self) -> list[RaisedEvent]:
        return list(self.events.values())

    def restore(self, saved: Iterable[RaisedEvent], pending: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        """From the snapshot, then the outbox's pending events (raised after it was taken, if any)."""
        for event in saved:
            self._remember(event)
        for (cell, twin), bodies in pending.items():
            for body in bodies:
                eid, t, wall = body.get("event_id"), body.get("t"), body.get("time")
                if isinstance(eid, str) and eid not in self.events and isinstance(t, int | float) \
                        and isinstance(wall, int | float):  # fmt: skip
                    self._remember(RaisedEvent(eid, cell, twin, float(t), float(wall)))
        for cell, monitor in self.monitors.items():
            for twin, tm in monitor.twins.items():
                if tm.sync.resync is not None:  # restored: its events were answered before the snapshot
                    self._seen[(cell, twin)] = tm.sync.resync.t
                self._export(cell, twin)

    def _remember(self, event: RaisedEvent) -> None:
        self.events[event.event_id] = event
        while len(self.events) > MAX_EVENTS:
            self.events.popitem(last=False)

    def _answer(self, cell: str, twin: str, upto: RaisedEvent | None = None) -> None:
        """Mark the twin's events answered: all of them, or those raised no later than `upto`."""
        for e in self.events.values():
            if (e.cell, e.twin) == (cell, twin) and (upto is None or e.time <= upto.time):
                e.answered = True

    def _export(self, cell: str, twin: str) -> None:
        since = self.unanswered_since(cell, twin)
        self.metrics.resync_unanswered_since.labels(cell, twin).set(0.0 if since is None else since)

    def _reject(self, reason: str, **fields: Any) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.rejects.log(log, reason, **fields)
