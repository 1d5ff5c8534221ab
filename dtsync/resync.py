"""Closing the loop: what happens to a twin when it is re-synchronised, and what the resync achieved.

A twin is re-synchronised (its model refitted from the real network) by a controller, after a resync event or on
its own schedule. dtsync learns of it in one of two ways: an acknowledgement naming the event it answers
(`dtsync.daemon.acks`), or a change of the version ``v`` its telemetry carries. Either way the twin's window
still holds the old model's behaviour, which would keep it `drifted` for a whole window and leave its trigger
waiting on hysteresis. So a resync

- drops the twin's window (unless it already holds only the new version's transitions) and re-arms its trigger;
- marks the twin `resyncing` until the fresh window holds enough evidence to judge (the trigger's warming rules);
- records the mismatch before (the last judgement on the old model) and after (the first on fresh data).

No I/O and no clock: the monitor holds one :class:`TwinSync` per twin, and the evaluation record carries the
latest :class:`Resync` (Report.record()), from which the timeline, status and metrics are derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Cause = Literal["ack", "version"]
RESYNCING = "resyncing"
_PAST_VERSIONS = 64  # superseded versions remembered per twin (their late transitions are refused)


@dataclass(frozen=True)
class Resync:
    """One resynchronisation of a twin, from its fresh window to the first judgement on it."""

    cause: Cause  # "ack": a controller acknowledged an event; "version": the telemetry's version changed
    t: float  # stream time the fresh window began
    version: str | None  # the twin's version from then on (None: not stated)
    event_id: str | None = None  # the resync event it answers (acknowledged), if any
    latency_seconds: float | None = None  # event raised -> acknowledgement received (wall clock)
    mismatch_before: float | None = None  # last judgement on the old model (None: never judged)
    mismatch_after: float | None = None  # first judgement on fresh data (None: still resyncing)
    judged_t: float | None = None  # when that first judgement was made


@dataclass
class TwinSync:
    """Per-twin resync bookkeeping: the current version, the latest resync, and which window a computation saw."""

    version: str | None = None
    past_versions: list[str] = field(default_factory=list)
    resync: Resync | None = None
    judged_mismatch: float | None = None  # the last judged (ok / drifted) mismatch
    generation: int = 0  # bumped whenever the window is dropped
    computing: int = 0  # the generation the computation in flight was snapshotted from

    @property
    def resyncing(self) -> bool:
        return self.resync is not None and self.resync.mismatch_after is None

    def superseded(self, version: str) -> bool:
        """A version this twin has left behind: its late transitions belong to the old model."""
        return version in self.past_versions

    def changes(self, version: str | None, window_empty: bool) -> bool:
        """Whether a transition of `version` starts a fresh window (a first version on an empty one does not)."""
        return version is not None and version != self.version and not (self.version is None and window_empty)

    def start(self, resync: Resync) -> None:
        """A fresh window begins (the caller drops the window and re-arms the trigger)."""
        self._set_version(resync.version)
        self.resync = replace(resync, mismatch_before=self.judged_mismatch)
        self.generation += 1

    def attach(self, event_id: str, latency: float | None, version: str | None, event_t: float) -> bool:
        """An acknowledgement of a resync already under way for this version (its telemetry came first): it is
        the same resync, now with its event. False if there is none (the caller starts one)."""
        r = self.resync
        if r is None or r.event_id is not None or version is None or r.version != version or r.t < event_t:
            return False
        self.resync = replace(r, cause="ack", event_id=event_id, latency_seconds=latency)
        return True

    def judged(self, state: str, mismatch: float, t: float) -> tuple[str, bool]:
        """The state to report for a judgement the trigger made, and whether it completes a resync."""
        if state not in ("ok", "drifted"):
            return (RESYNCING if self.resyncing else state), False
        completes = self.resyncing
        if completes:
            assert self.resync is not None
            self.resync = replace(self.resync, mismatch_after=mismatch, judged_t=t)
        self.judged_mismatch = mismatch
        return state, completes

    def first_version(self, version: str | None) -> None:
        if version is not None and self.version is None:
            self.version = version

    def _set_version(self, version: str | None) -> None:
        if version is None or version == self.version:
            return
        if self.version is not None:
            self.past_versions = [*self.past_versions, self.version][-_PAST_VERSIONS:]
        self.version = version
