"""Cells shared among instances through a real ZooKeeper (Debian's package, on a free loopback port)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_harness import wait_for
from zookeeper_harness import ZooKeeper

from dtsync.daemon.ownership import CellOwnership, ZooKeeperSettings

CELLS = [f"cell-{i:02d}" for i in range(30)]
SESSION = 2.0  # seconds; the test server's tickTime of 200 ms allows 0.4-20 s
BOUNDARY = 0.5


@pytest.fixture
def zookeeper(tmp_path: Path) -> Iterator[ZooKeeper]:
    zk = ZooKeeper(tmp_path)
    zk.start()
    yield zk
    zk.stop()


class Ledger:
    """Who evaluates what, as the callbacks say; records any moment a cell would have two owners."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.conflicts: list[str] = []
        self.lock = threading.Lock()

    def member(self, zk: ZooKeeper, name: str, cells: list[str] = CELLS) -> CellOwnership:
        def acquire(got: frozenset[str]) -> None:
            with self.lock:
                for cell in got:
                    if self.owner.get(cell, name) != name:
                        self.conflicts.append(f"{cell}: {name} acquired while {self.owner[cell]} evaluates")
                    self.owner[cell] = name

        def release(lost: frozenset[str]) -> None:
            with self.lock:
                for cell in lost:
                    if self.owner.get(cell) == name:
                        del self.owner[cell]

        settings = ZooKeeperSettings(hosts=zk.hosts, path="/dtsync-test", session_timeout=SESSION,
                                     time_boundary=BOUNDARY)  # fmt: skip
        m = CellOwnership(settings, cells, name, on_acquire=acquire, on_release=release)
        m.start()
        return m


def _partition_complete(members: list[CellOwnership]) -> bool:
    owned = [c for m in members for c in m.owned]
    return sorted(owned) == CELLS


def test_three_instances_own_each_of_30_cells_exactly_once(zookeeper: ZooKeeper) -> None:
    ledger = Ledger()
    members = [ledger.member(zookeeper, f"dtsync-{i}") for i in range(3)]
    try:
        wait_for(lambda: _partition_complete(members), 30, "30 cells split among 3 instances")
        assert all(len(m.owned) == 10 for m in members), [len(m.owned) for m in members]
        assert ledger.conflicts == []
    finally:
        for m in members:
            m.stop()
    assert ledger.owner == {}  # every cell was released (final snapshot point) on stop


def test_a_stopped_instance_hands_its_cells_over_without_overlap(zookeeper: ZooKeeper) -> None:
    ledger = Ledger()
    members = [ledger.member(zookeeper, f"dtsync-{i}") for i in range(3)]
    try:
        wait_for(lambda: _partition_complete(members), 30, "initial split")
        members[0].stop()
        started = time.monotonic()
        wait_for(lambda: _partition_complete(members[1:]), 30, "the two others own all 30 cells")
        took = time.monotonic() - started
        assert took < SESSION + 5 * BOUNDARY + 3, took
        back = ledger.member(zookeeper, "dtsync-0")
        members[0] = back
        wait_for(lambda: _partition_complete(members) and all(len(m.owned) == 10 for m in members), 30,
                 "rebalanced over 3 again")  # fmt: skip
        assert ledger.conflicts == []
    finally:
        for m in members:
            m.stop()


def test_kill_9_of_an_instance_gives_its_cells_to_the_others_within_the_session_timeout(
    zookeeper: ZooKeeper, tmp_path: Path
) -> None:
    ledger = Ledger()
    members = [ledger.member(zookeeper, f"dtsync-{i}") for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    victim = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "ownership_member.py"), zookeeper.hosts, "/dtsync-test",
         "dtsync-victim", str(len(CELLS)), str(SESSION)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        victim_cells: list[str] = []

        def victim_holds_ten() -> bool:
            nonlocal victim_cells
            assert victim.stdout is not None
            line = victim.stdout.readline()
            if line.startswith("OWNED "):  # other lines are the child's logs
                victim_cells = json.loads(line.removeprefix("OWNED "))
            return len(victim_cells) == 10

        wait_for(victim_holds_ten, 60, "the victim process owning 10 cells")
        wait_for(lambda: sorted([*victim_cells, *members[0].owned, *members[1].owned]) == CELLS, 30, "full split")
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: _partition_complete(members), SESSION + 15, "the survivors own all 30 cells")
        took = time.monotonic() - killed
        assert took < SESSION + 5 * BOUNDARY + 3, f"failover took {took:.1f} s"
        assert ledger.conflicts == []
    finally:
        victim.kill()
        victim.wait()
        for m in members:
            m.stop()
