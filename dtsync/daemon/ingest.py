"""Telemetry in: one MQTT message -> decoded transitions -> time-checked -> the cell's windows -> due twins.

For each transition the same steps `dtsync replay` takes (CellMonitor.ingest, then `due`), so a recorded trace
and the same trace received live give the same timeline. Input is hostile in every field, time included: a
transition whose own `t` is further than `daemon.max_clock_skew_seconds` from the receive clock is rejected
(`clock_skew`) before it can move a window's clock, the cell's clock, the schedule or a cooldown into the
future (or the past). Offline replay has no receive clock and keeps the traces' own time base.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from dtsync.config import MqttSettings
from dtsync.contract import REJECT_REASONS, Transition, decode_payload
from dtsync.daemon.acks import ACK_REASONS
from dtsync.daemon.metrics import DaemonMetrics
from dtsync.daemon.topics import REAL, Topics
from dtsync.encoding import ENCODING_REASONS
from dtsync.logs import ReasonLimiter
from dtsync.monitor import CellMonitor

log = structlog.get_logger("dtsync.daemon")

# Every reason a message or transition can be refused for: the fixed label set of dtsync_rejected_total.
REJECT_REASONS_ALL = (*REJECT_REASONS, *ENCODING_REASONS, "too_many_labels", "clock_skew", "unknown_stream",
                      "not_owned", "stale_version", *ACK_REASONS, "internal_error")  # fmt: skip

Evaluate = Callable[[CellMonitor, str, float], None]


class Ingest:
    """Routes telemetry to the cell monitors and keeps each cell's clock and each stream's last-seen time."""

    def __init__(self, monitors: dict[str, CellMonitor], topics: Topics, mqtt: MqttSettings,
                 max_skew: float | None, metrics: DaemonMetrics, evaluate: Evaluate) -> None:  # fmt: skip
        self.monitors = monitors
        self.topics = topics
        self.mqtt = mqtt
        self.max_skew = max_skew
        self.metrics = metrics
        self.evaluate = evaluate
        self.rejects = ReasonLimiter("telemetry rejected", interval=60.0)
        self.last_seen: dict[tuple[str, str], float] = {}  # (cell, stream) -> monotonic time
        self.clock: dict[str, tuple[float, float]] = {}  # cell -> (stream time, monotonic time it was seen)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.elsewhere: frozenset[str] = frozenset()  # configured cells another instance owns (coordination)

    def handle(self, topic: str, payload: bytes | bytearray) -> None:
        """One telemetry message: decode, add each transition to its window, evaluate what became due."""
        parsed = self.topics.parse_telemetry(topic)
        monitor = self.monitors.get(parsed[0]) if parsed else None
        if parsed is None or monitor is None or (parsed[1] != REAL and parsed[1] not in monitor.twins):
            # A cell just given up can still deliver until the unsubscribe lands: its new owner has those.
            self.reject("not_owned" if parsed and parsed[0] in self.elsewhere else "unknown_stream", topic=topic)
            return
        cell, stream = parsed
        transitions, rejections = decode_payload(
            bytes(payload), max_bytes=self.mqtt.max_payload_bytes, max_batch=self.mqtt.max_batch
        )
        for rej in rejections:
            self.reject(rej.reason, topic=topic, detail=rej.detail, item=rej.index)
        wall = time.time()
        transitions = self._in_time(transitions, wall, topic)
        refused: list[tuple[int, str]] = []
        for t, due in monitor.ingest(stream, transitions, wall, refused):
            for twin in due:
                self.evaluate(monitor, twin, t)
        for _, reason in refused:
            self.reject(reason, topic=topic)
        accepted = len(transitions) - len(refused)
        if accepted:
            last = transitions[-1].t
            received, last_seen = self._stream_metrics(cell, stream)
            received.inc(accepted)
            last_seen.set(wall)
            mono = time.monotonic()
            self.last_seen[(cell, stream)] = mono
            self.advance_clock(cell, wall if last is None else last, mono)

    def _in_time(self, transitions: list[Transition], wall: float, topic: str) -> list[Transition]:
        """Drop (and count as `clock_skew`) the transitions stamped too far from the receive time."""
        skew = self.max_skew
        if skew is None or not transitions:
            return transitions
        lo, hi = wall - skew, wall + skew
        kept = [tr for tr in transitions if tr.t is None or lo <= tr.t <= hi]
        if len(kept) < len(transitions):
            bad = next(tr for tr in transitions if not (tr.t is None or lo <= tr.t <= hi))
            self.metrics.rejected.labels("clock_skew").inc(len(transitions) - len(kept))
            self.rejects.log(log, "clock_skew", topic=topic, t=bad.t, receive_time=round(wall, 3),
                             max_skew_seconds=skew, items=len(transitions) - len(kept))  # fmt: skip
        return kept

    def _stream_metrics(self, cell: str, stream: str) -> tuple[Any, Any]:
        """The per-stream metric children, looked up once (labels() costs microseconds per message)."""
        key = (cell, stream)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.metrics.transitions.labels(cell, stream),
                                              self.metrics.last_transition.labels(cell, stream))  # fmt: skip
        return children

    def forget(self, cell: str, stream: str) -> None:
        """A reload removed this stream: its cached series children and last-seen time go too."""
        self._children.pop((cell, stream), None)
        self.last_seen.pop((cell, stream), None)

    def reject(self, reason: str, **fields: Any) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.rejects.log(log, reason, **fields)

    def stream_time(self, cell: str) -> float:
        """The cell's clock: the newest transition time seen, advanced by the wall time elapsed since."""
        t, seen = self.clock.get(cell, (time.time(), time.monotonic()))
        return t + (time.monotonic() - seen)

    def advance_clock(self, cell: str, t: float, mono: float) -> None:
        """Re-anchor the cell's clock at stream time t unless t is behind where the clock already is."""
        last = self.clock.get(cell)
        if last is None or t >= last[0] + (mono - last[1]):
            self.clock[cell] = (t, mono)
