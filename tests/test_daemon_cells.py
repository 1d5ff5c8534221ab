"""Per-cell snapshots (`daemon.state_dir`) and stable event ids: one instance's cell restored by another.

The daemons here are built in-process and never run (no broker): what is tested is what one writes and what
another restores from the shared directory.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dtsync.config import Config, parse_config
from dtsync.contract import Transition
from dtsync.daemon import state
from dtsync.daemon.service import Daemon
from dtsync.daemon.snapshots import cell_file
from dtsync.monitor import CellMonitor, Report

BASE: dict[str, Any] = {"window": {"count": 400}, "schedule": {"every_transitions": 100},
                        "trigger": {"threshold": 0.5, "act_on": "point", "rearm_below": 0.2, "cooldown_seconds": 0},
                        "noise_floor": False}  # fmt: skip


def _config(tmp_path: Path, instance: str, cells: list[str], **daemon: Any) -> Config:
    return parse_config({**BASE, "cells": {c: {"twins": {"tw": {}}} for c in cells},
                         "daemon": {"instance": instance, "outbox_path": str(tmp_path / f"{instance}.sqlite"),
                                    "workers": 1, **daemon}})  # fmt: skip


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.pool.shutdown()
        d.outbox.close()


def _feed(mon: CellMonitor, n: int, drifted: bool, t0: float = 0.0, seed: int = 0) -> float:
    """Real: a coin flip between states 0/1, reward 0; twin alike, or rewarded 1 everywhere (drifted)."""
    rng = random.Random(seed)
    t = t0
    for _ in range(n):
        t += 0.01
        mon.add("real", Transition(s=rng.randrange(2), a=0, r=0.0, s_next=rng.randrange(2)), t)
        mon.add("tw", Transition(s=rng.randrange(2), a=0, r=1.0 if drifted else 0.0, s_next=rng.randrange(2)), t)
    return t


def test_each_cell_gets_its_own_file_and_another_instance_restores_one_cell(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    shared = tmp_path / "cells"
    a = Daemon(_config(tmp_path, "a", ["c1", "c2"], state_dir=str(shared)))
    daemons.append(a)
    assert sorted(p.name for p in shared.iterdir() if p.suffix == ".snapshot") == ["c1.snapshot", "c2.snapshot"]
    _feed(a.monitors["c1"], 300, drifted=False)
    a.monitors["c1"].twins["tw"].trigger.restore(False, 2.5)
    a.monitors["c1"].twins["tw"].episodes = 3
    a.save_state()
    b = Daemon(_config(tmp_path, "b", ["c1"], state_dir=str(shared)))  # only c1 moves to b
    daemons.append(b)
    got, had = b.monitors["c1"], a.monitors["c1"]
    assert len(got.real) == len(had.real) == 300 and len(got.twins["tw"].window) == 300  # samples continue
    assert got.twins["tw"].trigger.state() == (False, 2.5) and got.twins["tw"].episodes == 3
    assert got.event_namespace == had.event_namespace  # the cell's namespace, not b's
    assert got.event_namespace != b.namespace
    assert got.due(10.0) == ["tw"]  # judged at once, no warm-up


def test_the_same_episode_gets_the_same_event_id_on_any_instance(tmp_path: Path, daemons: list[Daemon]) -> None:
    shared = tmp_path / "cells"
    a = Daemon(_config(tmp_path, "a", ["c1"], state_dir=str(shared)))
    daemons.append(a)
    t = _feed(a.monitors["c1"], 300, drifted=False)
    assert not a.monitors["c1"].evaluate("tw", t).fired
    a.save_state()  # the last snapshot before a's death
    t = _feed(a.monitors["c1"], 300, drifted=True, t0=t, seed=1)
    first = a.monitors["c1"].evaluate("tw", t)
    assert first.fired and first.event_id is not None
    # b takes c1 over from the snapshot taken before the event and sees the same drift: same episode, same id.
    b = Daemon(_config(tmp_path, "b", ["c1"], state_dir=str(shared)))
    daemons.append(b)
    _feed(b.monitors["c1"], 300, drifted=True, t0=t, seed=2)
    dup = b.monitors["c1"].evaluate("tw", t + 3)
    assert dup.fired and dup.event_id == first.event_id
    # After re-arming, the next episode is another event with another id.
    mon = b.monitors["c1"]
    t = _feed(mon, 400, drifted=False, t0=t + 3, seed=3)
    assert not mon.evaluate("tw", t).fired and mon.twins["tw"].trigger.state()[0]
    t = _feed(mon, 400, drifted=True, t0=t, seed=4)
    second = mon.evaluate("tw", t)
    assert second.fired and second.event_id not in (None, first.event_id)


def test_an_unacknowledged_event_travels_with_its_cell(tmp_path: Path, daemons: list[Daemon]) -> None:
    """An event raised on a (then dead) instance is in its cell's snapshot before its outbox: the next owner
    re-sends it under the same id, and its restored trigger does not raise the episode again."""
    shared = tmp_path / "cells"
    a = Daemon(_config(tmp_path, "a", ["c1"], state_dir=str(shared)))
    daemons.append(a)
    mon = a.monitors["c1"]
    t = _feed(mon, 400, drifted=True)
    report = mon.evaluate("tw", t)
    assert report.fired

    async def raise_it(d: Daemon, r: Report) -> None:
        d._on_report(r)  # what the scheduler does with a decided report (no broker: nothing is published)

    asyncio.run(raise_it(a, report))
    saved = state.read(cell_file(shared, "c1"))
    assert saved is not None and [e.event_id for e in saved.cells["c1"].pending] == [report.event_id]
    b = Daemon(_config(tmp_path, "b", ["c1"], state_dir=str(shared)))
    daemons.append(b)
    assert [e.event_id for e in b.outbox.pending()] == [report.event_id]
    assert json.loads(b.outbox.pending()[0].payload)["instance"] == "a"
    again = b.monitors["c1"]
    _feed(again, 400, drifted=True, t0=t, seed=1)
    assert not again.evaluate("tw", t + 5).fired  # the same episode: disarmed
    assert b.board.last_event[("c1", "tw")] == report.event_id


def test_the_next_owner_accepts_the_acknowledgement_of_an_event_raised_before_the_failover(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """An event delivered (gone from the outbox) but not yet acknowledged when its instance died: the cell's
    snapshot names it, so the controller's ack reaches the next owner as a resync, not as an unknown event."""
    shared = tmp_path / "cells"
    a = Daemon(_config(tmp_path, "a", ["c1"], state_dir=str(shared)))
    daemons.append(a)
    t = _feed(a.monitors["c1"], 400, drifted=True)
    report = a.monitors["c1"].evaluate("tw", t)
    assert report.fired and report.event_id is not None

    async def raise_it(d: Daemon, r: Report) -> None:
        d._on_report(r)

    asyncio.run(raise_it(a, report))
    a.outbox.remove(report.event_id)  # the broker had it: delivered
    a.save_state()
    b = Daemon(_config(tmp_path, "b", ["c1"], state_dir=str(shared)))
    daemons.append(b)
    assert len(b.outbox) == 0 and len(b.monitors["c1"].twins["tw"].window) > 0
    ack = json.dumps({"event_id": report.event_id, "twin_version": "v2"}).encode()
    b.acks.handle(b.topics.resynced("c1", "tw"), ack)
    assert not b.metrics.registry.get_sample_value("dtsync_rejected_total", {"reason": "ack_unknown_event"})
    assert len(b.monitors["c1"].twins["tw"].window) == 0 and b.monitors["c1"].version("tw") == "v2"


def test_switching_from_state_path_to_state_dir_keeps_the_windows(tmp_path: Path, daemons: list[Daemon]) -> None:
    single = tmp_path / "single.snapshot"
    old = Daemon(_config(tmp_path, "a", ["c1", "c2"], state_path=str(single)))
    daemons.append(old)
    _feed(old.monitors["c2"], 250, drifted=False)
    old.save_state()
    assert single.exists() and not (tmp_path / "cells").exists()
    new = Daemon(_config(tmp_path, "a", ["c1", "c2"], state_path=str(single), state_dir=str(tmp_path / "cells")))
    daemons.append(new)
    assert len(new.monitors["c2"].real) == 250 and new.monitors["c2"].event_namespace == old.namespace
    assert (tmp_path / "cells" / "c2.snapshot").exists()  # from now on the cell's own file is the one read


def test_a_corrupt_cell_file_starts_that_cell_fresh_and_keeps_the_others(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    shared = tmp_path / "cells"
    a = Daemon(_config(tmp_path, "a", ["c1", "c2"], state_dir=str(shared)))
    daemons.append(a)
    for cell in ("c1", "c2"):
        _feed(a.monitors[cell], 200, drifted=False)
    a.save_state()
    a.save_state()  # twice: .prev is a full snapshot too
    for p in (cell_file(shared, "c1"), state.previous(cell_file(shared, "c1"))):
        p.write_bytes(p.read_bytes()[:100])
    b = Daemon(_config(tmp_path, "b", ["c1", "c2"], state_dir=str(shared)))
    daemons.append(b)
    assert len(b.monitors["c1"].real) == 0 and len(b.monitors["c2"].real) == 200
    assert state.read(cell_file(shared, "c1")) is not None  # rewritten at once: its namespace is on disk


def test_a_cell_moved_by_hand_between_two_reloads_keeps_its_windows(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Without ZooKeeper: remove the cell from one daemon (SIGHUP), then add it to another (SIGHUP)."""
    import yaml

    shared = str(tmp_path / "cells")

    def config_file(instance: str, cells: list[str]) -> Path:
        path = tmp_path / f"{instance}.yaml"
        path.write_text(yaml.safe_dump(_config(tmp_path, instance, cells, state_dir=shared).model_dump(
            mode="json", exclude_unset=True)))  # fmt: skip
        return path

    a = Daemon(_config(tmp_path, "a", ["c1", "c2"], state_dir=shared), config_file("a", ["c1", "c2"]))
    b = Daemon(_config(tmp_path, "b", ["c3"], state_dir=shared), config_file("b", ["c3"]))
    daemons += [a, b]
    _feed(a.monitors["c2"], 250, drifted=False)

    async def move() -> None:
        config_file("a", ["c1"])
        a.reload()
        config_file("b", ["c3", "c2"])
        b.reload()

    asyncio.run(move())
    assert sorted(a.monitors) == ["c1"] and sorted(b.monitors) == ["c2", "c3"]
    assert len(b.monitors["c2"].real) == 250
