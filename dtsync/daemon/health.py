"""What the daemon says about itself: per-twin status payloads, `/healthz`, and the systemd one-liner.

`/healthz` answers 200 only when the broker link is up, every configured stream delivered within
`daemon.stale_seconds`, and every twin was evaluated within `daemon.stale_seconds` (counted from start, so a
twin whose computations keep failing, or that is never scheduled, turns health red rather than going quiet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dtsync.daemon.topics import REAL
from dtsync.monitor import CellMonitor, Report


class StatusBoard:
    """Latest status per twin (re-published after each reconnect) and the health verdict."""

    def __init__(self, instance: str, monitors: dict[str, CellMonitor], stale_seconds: float,
                 last_seen: dict[tuple[str, str], float], last_evaluated: dict[tuple[str, str], float],
                 connected: Callable[[], bool]) -> None:  # fmt: skip
        self.instance = instance
        self.monitors = monitors
        self.stale_seconds = stale_seconds
        self._last_seen = last_seen
        self._last_evaluated = last_evaluated
        self._connected = connected
        self.status: dict[tuple[str, str], dict[str, Any]] = {}
        self.last_event: dict[tuple[str, str], str] = {}
        self.started = time.monotonic()
        self.since: dict[str, float] = {}  # cell -> when this instance began watching it, if after start
        self.extra: Callable[[], tuple[bool, dict[str, Any]]] | None = None  # coordination's verdict

    def from_report(self, report: Report) -> dict[str, Any]:
        """The retained status after an evaluation (remembered for re-publishing)."""
        key = (report.cell, report.twin)
        if report.fired and report.event_id is not None:
            self.last_event[key] = report.event_id
        status = {**report.status(), "time": time.time(), "last_event_id": self.last_event.get(key),
                  "instance": self.instance}  # fmt: skip
        self.status[key] = status
        return status

    def warming(self, cell: str, twin: str) -> dict[str, Any]:
        """The status of a twin with no evaluation yet."""
        return {"cell": cell, "twin": twin, "state": "warming", "mismatch": None, "time": time.time(),
                "last_event_id": self.last_event.get((cell, twin)), "instance": self.instance}  # fmt: skip

    def forget(self, cell: str, twin: str) -> None:
        self.status.pop((cell, twin), None)
        self.last_event.pop((cell, twin), None)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz (metrics thread): connected, no stale stream, no twin left unevaluated too long."""
        now = time.monotonic()
        limit = self.stale_seconds
        stale, unevaluated = [], []
        for cell, monitor in list(self.monitors.items()):
            since = self.since.get(cell, self.started)
            for stream in (REAL, *list(monitor.twins)):
                if now - self._last_seen.get((cell, stream), since) > limit:
                    stale.append(f"{cell}/{stream}")
            for twin in list(monitor.twins):
                if now - self._last_evaluated.get((cell, twin), since) > limit:
                    unevaluated.append(f"{cell}/{twin}")
        connected = self._connected()
        ok = connected and not stale and not unevaluated
        body: dict[str, Any] = {"mqtt_connected": connected, "stale_streams": stale, "stale_evaluations": unevaluated}
        if self.extra is not None:
            extra_ok, more = self.extra()
            ok, body = ok and extra_ok, {**body, **more}
        return ok, body

    def one_line(self, outbox: int) -> str:
        link = "connected" if self._connected() else "broker unreachable"
        if self.extra is not None and not self.extra()[0]:
            link += ", zookeeper unreachable"
        twins = ", ".join(
            f"{c}/{t} {s['state']}" + (f" {s['mismatch']:.3g}" if s.get("mismatch") is not None else "")
            for (c, t), s in sorted(self.status.items())
        )  # fmt: skip
        return f"{link}; {twins or 'no evaluation yet'}; outbox {outbox}"
