"""Durable resync events: written to SQLite before they are published, deleted only after the broker's PUBACK.

An event that was raised is never lost to a broker outage or a restart: on every (re)connect the daemon sends
what is still pending, oldest first. An event past its deadline (`expires_at`) is dropped instead of sent,
because a controller must not act on a stale resync request; the daemon counts those.

SQLite in WAL mode with synchronous=FULL: a committed insert survives a crash or power loss. Each call is one
small transaction (well under a millisecond), so the daemon runs them on its event loop.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    expires_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class PendingEvent:
    """An event waiting for its PUBACK."""

    event_id: str
    topic: str
    payload: bytes
    expires_at: float


class Outbox:
    """The on-disk queue of events not yet acknowledged by the broker."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def add(self, event: PendingEvent) -> None:
        """Persist an event (idempotent on event_id: a re-add keeps the first copy)."""
        self._db.execute(
            "INSERT OR IGNORE INTO events (event_id, topic, payload, expires_at) VALUES (?, ?, ?, ?)",
            (event.event_id, event.topic, event.payload, event.expires_at),
        )

    def pending(self) -> list[PendingEvent]:
        """Every event still waiting, oldest first."""
        rows = self._db.execute("SELECT event_id, topic, payload, expires_at FROM events ORDER BY seq")
        return [PendingEvent(eid, topic, bytes(payload), exp) for eid, topic, payload, exp in rows]

    def remove(self, event_id: str) -> None:
        """Forget an event: acknowledged by the broker, or expired."""
        self._db.execute("DELETE FROM events WHERE event_id = ?", (event_id,))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        self._db.close()
