"""State snapshots: round trip, crash at any moment of a write, truncated and flipped files (never a crash)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from dtsync.config import parse_config
from dtsync.contract import Transition
from dtsync.daemon import state
from dtsync.monitor import CellMonitor

CONFIG = parse_config({"window": {"count": 500}, "schedule": {"every_transitions": 100},
                       "trigger": {"threshold": 0.1},
                       "cells": {"c": {"twins": {"a": {}, "b": {}}}}})  # fmt: skip


def fed_monitor(seed: int = 0, n: int = 800) -> CellMonitor:
    rng = random.Random(seed)
    mon = CellMonitor("c", CONFIG)
    for i in range(n):
        for stream in ("real", "a", "b"):
            s = rng.choice([0, "x", (1, 2)]) if stream != "b" else rng.randrange(5)
            mon.add(stream, Transition(s=s, a=rng.choice(["u", 3]), r=rng.random(), s_next=rng.randrange(3)), i * 0.1)
    mon.twins["a"].trigger.restore(False, 42.5)
    mon.twins["a"].evaluations = 7
    return mon


def test_round_trip_restores_windows_labels_triggers_and_makes_twins_due() -> None:
    mon = fed_monitor()
    ns = uuid.uuid4()
    saved = state.decode(state.encode(state.capture(ns, {"c": mon}, {"c": 80.0}, {("c", "a"): "ev-1"})))
    fresh = CellMonitor("c", CONFIG)
    clocks, last = state.apply(saved, {"c": fresh}, {})
    assert fresh.encoding.states.labels == mon.encoding.states.labels  # tuples come back as tuples
    assert fresh.encoding.actions.labels == mon.encoding.actions.labels
    for w0, w1 in [(mon.real, fresh.real)] + [(mon.twins[t].window, fresh.twins[t].window) for t in "ab"]:
        assert labelled(mon, w0) == labelled(fresh, w1)
        assert w0.arrivals == w1.arrivals
        S, A = len(mon.encoding.states), len(mon.encoding.actions)
        assert np.array_equal(w0.halves(S, A)[0].P, w1.halves(S, A)[0].P)  # same halves: same noise floor
    assert fresh.twins["a"].trigger.state() == (False, 42.5) and fresh.twins["a"].evaluations == 7
    assert fresh.twins["b"].trigger.state() == (True, None)
    assert fresh.event_namespace == ns and last == {("c", "a"): "ev-1"}
    assert clocks["c"] >= 80.0
    assert sorted(fresh.due(80.0)) == ["a", "b"]  # judged at once, no window to refill


def labelled(mon: CellMonitor, window: object) -> list[tuple[object, ...]]:
    states, actions = mon.encoding.states.labels, mon.encoding.actions.labels
    return [(states[s], actions[a], r, states[sn], t) for s, a, r, sn, t in window]  # type: ignore[attr-defined]


def test_labels_no_window_holds_are_dropped_on_restore() -> None:
    """A flood of junk labels that filled the cell's table is gone after a restart once the windows moved on."""
    config = parse_config({"window": {"count": 50}, "max_states": 40, "schedule": {"every_transitions": 100},
                           "cells": {"c": {"twins": {"a": {}}}}})  # fmt: skip
    mon = CellMonitor("c", config)

    def good(t: float) -> str | None:
        return mon.add("real", Transition(s=int(t) % 3, a=1, r=1.0, s_next=int(t + 1) % 3), t)

    assert [good(float(i)) for i in range(10)] == [None] * 10
    refused = [mon.add("real", Transition(s=f"junk{i}", a=0, r=0.0, s_next=f"junk{i}x"), 10.0 + i) for i in range(30)]
    assert refused.count("too_many_labels") > 0 and len(mon.encoding.states) == 40  # the table is full
    assert [good(40.0 + i) for i in range(60)] == [None] * 60  # known labels still flow; the junk leaves the window
    saved = state.encode(state.capture(uuid.uuid4(), {"c": mon}, {}, {}))  # the table still holds the junk
    before = labelled(mon, mon.real)
    assert len(mon.encoding.states) == 40
    fresh = CellMonitor("c", config)
    state.apply(state.decode(saved), {"c": fresh}, {})
    assert fresh.encoding.states.labels == [0, 1, 2] and fresh.encoding.actions.labels == [1]
    assert labelled(fresh, fresh.real) == before
    assert fresh.add("real", Transition(s="new", a=1, r=1.0, s_next=0), 100.0) is None
    # The running monitor frees them too, without a restart, once a new label needs the room (CellMonitor.free_labels)
    assert mon.add("real", Transition(s="new", a=1, r=1.0, s_next=0), 99.0) is None
    assert mon.encoding.states.labels == [0, 1, 2, "new"]


def test_an_event_still_in_the_outbox_counts_as_fired_after_restore() -> None:
    mon = fed_monitor()
    saved = state.capture(uuid.uuid4(), {"c": mon}, {}, {})
    fresh = CellMonitor("c", CONFIG)
    _, last = state.apply(saved, {"c": fresh}, {("c", "b"): [{"t": 79.0, "event_id": "late", "cell": "c"}]})
    assert fresh.twins["b"].trigger.state() == (False, 79.0) and last[("c", "b")] == "late"


def test_a_changed_encoder_or_a_removed_twin_is_skipped_not_fatal() -> None:
    saved = state.capture(uuid.uuid4(), {"c": fed_monitor()}, {}, {})
    other = parse_config({**CONFIG.model_dump(exclude_unset=True), "encoder": {"bins": [[0.5]]},
                          "cells": {"c": {"twins": {"a": {}}}}})  # fmt: skip
    fresh = CellMonitor("c", other)
    state.apply(saved, {"c": fresh}, {})
    assert len(fresh.real) == 0  # encoder changed: the cell starts fresh


def _write_two(path: Path) -> tuple[state.DaemonState, state.DaemonState]:
    one = state.capture(uuid.uuid4(), {"c": fed_monitor(1, 300)}, {}, {})
    two = state.capture(uuid.uuid4(), {"c": fed_monitor(2, 600)}, {}, {})
    state.write(path, one)
    state.write(path, two)
    return one, two


def test_truncated_or_flipped_snapshots_fall_back_to_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "s.snapshot"
    one, two = _write_two(path)
    good = path.read_bytes()
    rng = random.Random(0)
    for trial in range(400):
        data = bytearray(good)
        if trial % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        got = state.read(path)
        assert got is not None and got.namespace in (one.namespace, two.namespace)
        if got.namespace == two.namespace:
            assert bytes(data) == good  # a damaged file is never taken for good
    path.write_bytes(b"junk")
    state.previous(path).write_bytes(b"")
    assert state.read(path) is None  # nothing usable: a fresh start, not an exception


_WRITER = """
import sys, uuid
from pathlib import Path
from tests.test_daemon_state import fed_monitor
from dtsync.daemon import state
path = Path(sys.argv[1])
states = [state.capture(uuid.UUID(int=k), {"c": fed_monitor(k, 200 + 50 * k)}, {}, {}) for k in range(3)]
state.write(path, states[0])  # one complete snapshot first: the claim is that a good one *remains*
print("ready", flush=True)
k = 1
while True:
    state.write(path, states[k % 3])
    k += 1
"""


def test_killed_at_any_moment_of_a_write_a_good_snapshot_remains(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites the snapshot in a loop, at random moments: every restart finds one."""
    root = Path(__file__).resolve().parent.parent
    path = tmp_path / "s.snapshot"
    rng = random.Random(1)
    valid = {str(uuid.UUID(int=k)) for k in range(3)}
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=root, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        got = state.read(path)
        assert got is not None and got.namespace in valid


@pytest.mark.parametrize("bad", [b"", b"DTSYNC-STATE\n", state.MAGIC + b"\x02\x00\x00\x00" + b"\x00" * 40])
def test_decode_rejects_what_is_not_a_snapshot(bad: bytes) -> None:
    with pytest.raises(state.SnapshotError):
        state.decode(bad)
