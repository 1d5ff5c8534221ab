"""Crash-safe snapshots of what the daemon has learnt: windows, label tables, triggers, event namespace.

Without them a restart forgets everything: windows warm up from nothing (a full window length without a
judgement) and a trigger that had fired re-arms, so a twin still drifted fires again under a new event id.
With them a restarted daemon judges at once, and the same drift episode keeps its one event.

File format (one file, ``daemon.state_path``, beside the outbox by default)::

    b"DTSYNC-STATE\\n" | version (u32 LE) | payload length (u64 LE) | SHA-256 of payload (32 bytes) | payload

the payload being msgpack of :class:`DaemonState`. Writing is crash-safe: the new snapshot goes to
``<file>.tmp``, is flushed and fsynced, the current file is renamed to ``<file>.prev`` (the previous one is
kept), the temporary file is renamed over ``<file>``, and the directory is fsynced. Reading checks the magic,
version, length and checksum, decodes into typed structures and checks every index against its label table;
a file failing any check is ignored and ``.prev`` is tried, then a fresh start — never a crash, so a bad file
cannot cause a crash loop. A restore keeps only the labels some window still holds (renumbered). What a
crash can lose: the telemetry received since the last snapshot (``daemon.snapshot_seconds``, default 30 s)
and evaluations made meanwhile; never an event (the outbox has those, and triggers are reconciled with it on
restore).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import structlog

from dtsync.daemon.acks import RaisedEvent
from dtsync.monitor import CellMonitor
from dtsync.resync import TwinSync
from dtsync.window import SlidingWindow

log = structlog.get_logger("dtsync.daemon")

MAGIC = b"DTSYNC-STATE\n"
VERSION = 1
_HEADER = struct.Struct("<IQ32s")
Label = int | str | list[int]


class SnapshotError(ValueError):
    """A snapshot file that cannot be used (missing, truncated, corrupt, another version, inconsistent)."""


class WindowState(msgspec.Struct, frozen=True):
    s: bytes
    a: bytes
    s_next: bytes
    r: bytes
    t: bytes
    arrivals: int
    now: float


class TwinState(msgspec.Struct, frozen=True):
    window: WindowState
    armed: bool
    last_fired_t: float | None
    evaluations: int
    last_event_id: str | None
    episodes: int = 0  # drift episodes fired so far: the next event's id is derived from episodes + 1
    sync: TwinSync | None = None  # version and latest resync (dtsync.resync)


class EventState(msgspec.Struct, frozen=True):
    """A raised event not yet acknowledged when the snapshot was taken (per-cell snapshots only)."""

    event_id: str
    topic: str
    payload: bytes
    expires_at: float


class CellState(msgspec.Struct, frozen=True):
    bins: list[list[float]] | None
    states: list[Label]
    actions: list[int | str]
    clock: float | None  # the cell's stream time at `saved_at`
    real: WindowState
    twins: dict[str, TwinState]
    pending: list[EventState] = msgspec.field(default_factory=list)


class DaemonState(msgspec.Struct, frozen=True):
    saved_at: float
    namespace: str
    cells: dict[str, CellState]
    raised: list[RaisedEvent] = []  # events raised, for acknowledgements (dtsync.daemon.acks)


def _window_state(window: SlidingWindow) -> WindowState:
    s, a, sn, r, t = window.columns()
    now = window.last_time
    return WindowState(s.astype("<i8").tobytes(), a.astype("<i8").tobytes(), sn.astype("<i8").tobytes(),
                       r.astype("<f8").tobytes(), t.astype("<f8").tobytes(), window.arrivals,
                       -1e300 if now is None else now)  # fmt: skip


def _label(label: Hashable) -> Label:
    return list(label) if isinstance(label, tuple) else label  # type: ignore[return-value]


def capture(namespace: uuid.UUID, monitors: dict[str, CellMonitor], clocks: dict[str, float],
            last_events: dict[tuple[str, str], str], pending: dict[str, list[EventState]] | None = None,
            raised: Iterable[RaisedEvent] = ()) -> DaemonState:  # fmt: skip
    """Everything a restart needs, read from the monitors (cheap: copies of the live columns)."""
    cells = {}
    for cell, mon in monitors.items():
        twins = {}
        for name, tm in mon.twins.items():
            armed, fired = tm.trigger.state()
            twins[name] = TwinState(_window_state(tm.window), armed, fired, tm.evaluations,
                                    last_events.get((cell, name)), tm.episodes, tm.sync)  # fmt: skip
        bins = mon.encoder_bins()
        cells[cell] = CellState(
            bins=None if bins is None else [list(b) for b in bins],
            states=[_label(x) for x in mon.encoding.states.labels],
            actions=list(mon.encoding.actions.labels),  # type: ignore[arg-type]
            clock=clocks.get(cell),
            real=_window_state(mon.real),
            twins=twins,
            pending=(pending or {}).get(cell, []),
        )
    return DaemonState(time.time(), str(namespace), cells, list(raised))


def encode(state: DaemonState) -> bytes:
    payload = msgspec.msgpack.encode(state)
    return MAGIC + _HEADER.pack(VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def decode(data: bytes) -> DaemonState:
    """The state in a snapshot file's bytes; SnapshotError if anything is off."""
    head = len(MAGIC) + _HEADER.size
    if len(data) < head or not data.startswith(MAGIC):
        raise SnapshotError("not a dtsync state snapshot (or truncated header)")
    version, length, digest = _HEADER.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise SnapshotError(f"snapshot version {version}, this daemon reads {VERSION}")
    payload = data[head:]
    if len(payload) != length:
        raise SnapshotError(f"truncated: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("checksum mismatch")
    try:
        return msgspec.msgpack.decode(payload, type=DaemonState)
    except msgspec.ValidationError as e:
        raise SnapshotError(f"unexpected content: {e}") from None


def write(path: Path, state: DaemonState) -> None:
    """Atomically replace the snapshot at `path`, keeping the previous one as `<path>.prev`."""
    data = encode(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, previous(path))
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def read(path: Path) -> DaemonState | None:
    """The newest usable snapshot: `path`, else `<path>.prev`; None (logged) if neither can be used."""
    for candidate in (path, previous(path)):
        try:
            return decode(candidate.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, SnapshotError) as e:
            log.error("state snapshot unusable; trying the previous one", path=str(candidate), error=str(e))
    return None


Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # s, a, s_next, r, t


def _columns(w: WindowState, n_states: int, n_actions: int) -> Columns:
    try:
        s, a, sn = (np.frombuffer(b, dtype="<i8").astype(np.int64) for b in (w.s, w.a, w.s_next))
        r, t = (np.frombuffer(b, dtype="<f8").astype(np.float64) for b in (w.r, w.t))
    except ValueError as e:
        raise SnapshotError(f"window columns: {e}") from None
    if not len(s) == len(a) == len(sn) == len(r) == len(t):
        raise SnapshotError("window columns of unequal length")
    if len(s) and (min(s.min(), a.min(), sn.min()) < 0 or max(s.max(), sn.max()) >= n_states
                   or a.max() >= n_actions):  # fmt: skip
        raise SnapshotError("window indices outside the saved label tables")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(t))):
        raise SnapshotError("non-finite reward or time in a window")
    return s, a, sn, r, t


def _as_label(x: Label) -> Hashable:
    return tuple(x) if isinstance(x, list) else x


Pending = dict[tuple[str, str], list[dict[str, Any]]]


def apply(state: DaemonState, monitors: dict[str, CellMonitor],
          pending: Pending) -> tuple[dict[str, float], dict[tuple[str, str], str]]:  # fmt: skip
    """Load a snapshot into freshly built monitors; returns (cell stream clocks now, last event id per twin).

    Cells and twins no longer configured are skipped; a cell whose encoder changed starts fresh (indices would
    change meaning). Every restored twin is due at once. Triggers are reconciled with the events still in the
    outbox (`pending`, by (cell, twin)): one raised after the snapshot was taken counts as fired (a fired
    episode: the next event's id must not repeat its id).
    A SnapshotError leaves that cell untouched (the others are restored).
    """
    namespace = uuid.UUID(state.namespace)
    elapsed = max(0.0, time.time() - state.saved_at)
    clocks: dict[str, float] = {}
    last_events: dict[tuple[str, str], str] = {}
    for cell, saved in state.cells.items():
        mon = monitors.get(cell)
        if mon is None:
            continue
        bins = mon.encoder_bins()
        if (None if bins is None else [list(b) for b in bins]) != saved.bins:
            log.warning("state snapshot: encoder changed, cell starts fresh", cell=cell)
            continue
        try:
            _apply_cell(mon, saved)
        except (SnapshotError, ValueError) as e:
            log.error("state snapshot: cell starts fresh", cell=cell, error=str(e))
            continue
        mon.event_namespace = namespace
        if saved.clock is not None:
            clocks[cell] = saved.clock + elapsed
        for name, twin in saved.twins.items():
            if name not in mon.twins:
                continue
            trigger = mon.twins[name].trigger
            if twin.last_event_id is not None:
                last_events[(cell, name)] = twin.last_event_id
            for event in pending.get((cell, name), []):
                t = event.get("t")
                if isinstance(t, int | float) and (trigger.last_fired_t is None or t > trigger.last_fired_t):
                    trigger.restore(False, float(t))
                    mon.twins[name].episodes += 1
                    last_events[(cell, name)] = str(event.get("event_id"))
    return clocks, last_events


def _apply_cell(mon: CellMonitor, saved: CellState) -> None:
    """Restore one cell. Labels no window holds any more are dropped and the rest renumbered in first-seen
    order (the workers start cold after a restart, so no warm start depends on the old numbers): a flood of
    junk labels that filled the cell's table is gone once it has left the windows, after one restart."""
    states = [_as_label(x) for x in saved.states]
    n_s, n_a = len(states), len(saved.actions)
    windows = {"": _columns(saved.real, n_s, n_a)}
    windows.update({name: _columns(t.window, n_s, n_a) for name, t in saved.twins.items() if name in mon.twins})
    used_s = np.zeros(n_s, dtype=bool)
    used_a = np.zeros(n_a, dtype=bool)
    for s, a, sn, _, _ in windows.values():
        used_s[s] = used_s[sn] = True
        used_a[a] = True
    new_s = np.cumsum(used_s) - 1
    new_a = np.cumsum(used_a) - 1
    mon.encoding.states.restore([x for x, keep in zip(states, used_s, strict=True) if keep])
    mon.encoding.actions.restore([x for x, keep in zip(saved.actions, used_a, strict=True) if keep])
    for name, (s, a, sn, r, t) in windows.items():
        cols = (new_s[s], new_a[a], new_s[sn], r, t)
        if name == "":
            mon.real.restore(*cols, saved.real.arrivals, saved.real.now)
            continue
        tm, twin = mon.twins[name], saved.twins[name]
        tm.window.restore(*cols, twin.window.arrivals, twin.window.now)
        tm.trigger.restore(twin.armed, twin.last_fired_t)
        tm.evaluations = twin.evaluations
        tm.episodes = twin.episodes
        if twin.sync is not None:
            tm.sync = twin.sync
        mon.retry(name)  # due at once: a restarted daemon judges without waiting for a window to fill


def restored_twins(monitors: dict[str, CellMonitor], state: DaemonState) -> Iterable[tuple[str, str]]:
    """(cell, twin) pairs the snapshot held that are still configured (for the start-up log)."""
    return [(c, t) for c, cs in state.cells.items() if c in monitors for t in cs.twins if t in monitors[c].twins]
