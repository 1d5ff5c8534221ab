"""Per-cell snapshots in one directory (``daemon.state_dir``): a crash-safe file per cell, ``<cell>.snapshot``.

Why per cell: under ``coordination`` a cell moves between instances, and its next owner must restore that cell
alone (windows, labels, triggers with their episode count, the cell's event namespace, the events raised
for it that were not yet delivered, and the events a controller may still acknowledge) from the file its last
owner wrote. Each file has the format and the
checks of :mod:`dtsync.daemon.state` (a ``DaemonState`` holding one cell), ``.prev`` fallback included.

Stable event ids: each cell has its own event namespace, drawn when the cell first gets a file and kept in it,
and an event's id is uuid5(namespace, cell/twin/episode). A cell with no file gets one at once (before it can
raise anything), so every later owner derives the same id for the same episode: a failover duplicate carries
the original's id, and a controller that de-duplicates on ``event_id`` drops it.

No lost event: a snapshot lists the cell's events still in this instance's outbox, and an event being raised
is written into its cell's snapshot *before* it enters the outbox. The cell's next owner (or this instance
after a restart) re-adds the unexpired ones to its own outbox: an event whose instance died before the broker
acknowledged it is still delivered, possibly twice, under one id.

Migration from ``daemon.state_path``: a cell with no file in the directory is restored from the single-file
snapshot if that holds it, so switching an existing daemon to ``state_dir`` keeps its windows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog

from dtsync.daemon import state
from dtsync.daemon.acks import Acks
from dtsync.daemon.delivery import Delivery
from dtsync.daemon.health import StatusBoard
from dtsync.daemon.ingest import Ingest
from dtsync.daemon.outbox import Outbox, PendingEvent
from dtsync.monitor import CellMonitor

log = structlog.get_logger("dtsync.daemon")


def cell_file(directory: Path, cell: str) -> Path:
    """A cell's snapshot (cell names are plain: letters, digits, '.', '_', '-')."""
    return directory / f"{cell}.snapshot"


def _pair_of(event: PendingEvent) -> tuple[str, str] | None:
    try:
        body = json.loads(event.payload)
        return str(body["cell"]), str(body["twin"])
    except (ValueError, KeyError, TypeError):
        return None


class CellSnapshots:
    """Restores and saves the cells in ``monitors`` one file each; the daemon's pieces are shared, not copied."""

    def __init__(self, directory: Path, legacy: Path, monitors: dict[str, CellMonitor], ingest: Ingest,
                 board: StatusBoard, outbox: Outbox, delivery: Delivery, acks: Acks,
                 observe: Callable[[float], None]) -> None:  # fmt: skip
        self.directory = directory
        self.legacy = legacy
        self.monitors = monitors
        self.ingest = ingest
        self.board = board
        self.outbox = outbox
        self.delivery = delivery
        self.acks = acks  # raised events travel with their cell: its next owner accepts their acknowledgements
        self.observe = observe  # seconds one snapshot took (the daemon's histogram)
        self._legacy: state.DaemonState | None | bool = False  # False: not read yet

    def restore(self, cell: str) -> bool:
        """Load `cell`'s latest snapshot into its (fresh) monitor; True if windows were restored. The cell's
        file is written at once either way, so its event namespace is on disk before any event."""
        mon = self.monitors[cell]
        saved = self._read(cell)
        restored = False
        if saved is not None:
            try:
                restored = self._apply(cell, mon, saved)
            except Exception as e:  # whatever is wrong with the file, this cell starts fresh
                log.error("cell snapshot not restored; the cell starts fresh", cell=cell, error=repr(e))
        self.save([cell])
        return restored

    def _read(self, cell: str) -> state.DaemonState | None:
        saved = state.read(cell_file(self.directory, cell))
        if saved is not None and cell in saved.cells:
            return saved
        if self._legacy is False:
            self._legacy = state.read(self.legacy) if self.legacy.exists() else None
        legacy = self._legacy
        if isinstance(legacy, state.DaemonState) and cell in legacy.cells:
            log.info("cell restored from the single-file snapshot (migration)", cell=cell, path=str(self.legacy))
            return state.DaemonState(legacy.saved_at, legacy.namespace, {cell: legacy.cells[cell]})
        return None

    def _apply(self, cell: str, mon: CellMonitor, saved: state.DaemonState) -> bool:
        now = time.time()
        for ev in saved.cells[cell].pending:  # events its last owner had not delivered: ours to deliver now
            if ev.expires_at > now:
                self.delivery.add(PendingEvent(ev.event_id, ev.topic, ev.payload, ev.expires_at))
        clocks, last_events = state.apply(saved, {cell: mon}, self.delivery.pending_by_twin())
        self.acks.restore([e for e in saved.raised if e.cell == cell], self.delivery.pending_by_twin())
        if not (len(mon.real) or any(len(tm.window) for tm in mon.twins.values())):
            return False  # skipped (encoder changed, bad content) or empty: fresh
        mono = time.monotonic()
        for c, t in clocks.items():
            self.ingest.clock[c] = (t, mono)
        self.board.last_event.update(last_events)
        log.info("cell restored", cell=cell, age_seconds=round(now - saved.saved_at, 1),
                 twins=sorted(saved.cells[cell].twins))  # fmt: skip
        return True

    def save(self, cells: Iterable[str] | None = None, raising: Sequence[PendingEvent] = ()) -> None:
        """Write the snapshots of `cells` (default: every cell held), `raising` included among their events."""
        started = time.perf_counter()
        pending: dict[str, list[state.EventState]] = {}
        last_events = dict(self.board.last_event)
        for ev in [*self.outbox.pending(), *raising]:
            pair = _pair_of(ev)
            if pair is not None:
                pending.setdefault(pair[0], []).append(state.EventState(ev.event_id, ev.topic, ev.payload,
                                                                        ev.expires_at))  # fmt: skip
        for ev in raising:  # the board learns of it just after: the snapshot must already name it
            pair = _pair_of(ev)
            if pair is not None:
                last_events[pair] = ev.event_id
        for cell in list(self.monitors) if cells is None else cells:
            mon = self.monitors.get(cell)
            if mon is None:
                continue
            clocks = {cell: self.ingest.stream_time(cell)} if cell in self.ingest.clock else {}
            raised = [e for e in self.acks.capture() if e.cell == cell]
            snap = state.capture(mon.event_namespace, {cell: mon}, clocks, last_events, pending, raised)
            try:
                state.write(cell_file(self.directory, cell), snap)
            except Exception as e:  # a full disk, an unreachable share: the service goes on, loudly
                log.error("cell snapshot not written", cell=cell, directory=str(self.directory), error=repr(e))
        self.observe(time.perf_counter() - started)

