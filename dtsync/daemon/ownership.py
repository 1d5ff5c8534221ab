"""Which cells this daemon instance owns, when several instances share one list of cells through ZooKeeper.

The partitioning is kazoo's ``SetPartitioner`` recipe (public API only): every instance joins a party under
``<path>/party``, the set of cells is split among the live members, and each member takes a ZooKeeper lock per
cell it is given (``<path>/locks/<cell>``). When a member comes or goes (or its session is lost) every member is
told to release its locks, and the set is split again once the party has been stable for ``time_boundary``.

Safety rule, the reason for the two callbacks: an instance evaluates a cell only while it holds that cell's lock.
``on_release(cells)`` is called *before* the locks are given up, and must return only once the daemon has stopped
evaluating those cells and written their final snapshot; ``on_acquire(cells)`` is called once the new locks are
held. A member that loses its connection is told to release at once (kazoo moves the partitioner to RELEASE on
SUSPENDED), so two instances can evaluate one cell together only when a frozen process wakes after its session
expired and before it notices; the daemon's stable event ids turn that case into a duplicate event, never a lost
one.

Everything here runs on one driver thread (kazoo's API blocks); the callbacks run on it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError

log = structlog.get_logger("dtsync.ownership")

Cells = frozenset[str]


@dataclass(frozen=True)
class ZooKeeperSettings:
    """Where the party lives: `hosts` is a kazoo connection string ("zk1:2181,zk2:2181,zk3:2181")."""

    hosts: str
    path: str = "/dtsync"
    session_timeout: float = 10.0  # seconds: how long a dead instance keeps its cells before others take them
    time_boundary: float = 1.0  # seconds the party must be stable before the set is split again


class CellOwnership:
    """This instance's share of `cells`; see the module docstring for the release-before-acquire contract."""

    def __init__(
        self,
        settings: ZooKeeperSettings,
        cells: Iterable[str],
        identifier: str,
        on_acquire: Callable[[Cells], None],
        on_release: Callable[[Cells], None],
    ) -> None:
        self.settings = settings
        self.identifier = identifier
        self._cells = frozenset(cells)
        self._on_acquire, self._on_release = on_acquire, on_release
        self._owned: Cells = frozenset()
        self.changes = 0  # acquire or release steps that changed the owned set (exported as a counter)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by kazoo on every partitioner state change, and by stop()/set_cells()
        self._lock = threading.Lock()
        self._cells_changed = False
        self._thread: threading.Thread | None = None
        self._client = KazooClient(
            hosts=settings.hosts, timeout=settings.session_timeout, connection_retry={"max_tries": -1, "max_delay": 2}
        )

    @property
    def connected(self) -> bool:
        """True while the ZooKeeper session is up (kazoo's public state)."""
        return bool(self._client.connected)

    @property
    def owned(self) -> Cells:
        """Cells whose locks are held now (empty while connecting or rebalancing)."""
        return self._owned

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drive, name="dtsync-ownership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Release every cell (final snapshots through on_release), leave the party, close the session."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.session_timeout + 5)

    def set_cells(self, cells: Iterable[str]) -> None:
        """A reload changed the shared list of cells: release everything and split the new set."""
        with self._lock:
            self._cells = frozenset(cells)
            self._cells_changed = True
        self._wake.set()

    # --- driver thread ---------------------------------------------------------------------------------------

    def _drive(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._connect():
                    continue
                self._run_party()
        finally:
            self._give_up()
            try:
                self._client.stop()
                self._client.close()
            except KazooException:  # pragma: no cover - closing a dead session
                pass

    def _connect(self) -> bool:
        if self._client.connected:
            return True
        try:
            self._client.start(timeout=self.settings.session_timeout)
            log.info("zookeeper_connected", hosts=self.settings.hosts, identifier=self.identifier)
            return True
        except KazooTimeoutError:
            log.warning("zookeeper_unreachable", hosts=self.settings.hosts, retry_seconds=1.0)
            self._stop.wait(1.0)
            return False

    def _run_party(self) -> None:
        """One partitioner's life: allocate, hold, release on every party change, until it fails or we stop."""
        with self._lock:
            cells, self._cells_changed = self._cells, False
        self._wake.clear()
        p = self._client.SetPartitioner(
            path=self.settings.path,
            set=sorted(cells),
            identifier=self.identifier,
            time_boundary=self.settings.time_boundary,
            state_change_event=self._wake,
        )
        try:
            while not self._stop.is_set() and not self._cells_changed:
                if p.failed:
                    log.warning("ownership_lost", cells=len(self._owned), reason="zookeeper session lost")
                    self._give_up()
                    return
                if p.release:
                    self._give_up()
                    p.release_set()
                elif p.acquired:
                    self._take(frozenset(p))
                self._wake.wait(0.5)
                self._wake.clear()
        finally:
            self._give_up()
            p.finish()

    def _take(self, cells: Cells) -> None:
        if cells != self._owned:
            self._owned = cells
            self.changes += 1
            log.info("cells_acquired", cells=sorted(cells), identifier=self.identifier)
            self._on_acquire(cells)

    def _give_up(self) -> None:
        """Stop evaluating (on_release) before any lock is released: the order is the safety rule."""
        if self._owned:
            cells, self._owned = self._owned, frozenset()
            self.changes += 1
            log.info("cells_released", cells=sorted(cells), identifier=self.identifier)
            self._on_release(cells)
