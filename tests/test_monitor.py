"""CellMonitor: a batch gives the same evaluations as its transitions one by one."""

from __future__ import annotations

import random

from dtsync.config import parse_config
from dtsync.contract import Transition
from dtsync.monitor import REAL, CellMonitor
from dtsync.window import SlidingWindow


def _stream(seed: int, n: int) -> list[tuple[str, Transition]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        stream = rng.choice([REAL, REAL, "a", "b"])
        s = rng.choice([0, 1, 2, "x", "y"])
        s_next = rng.choice([0, 1, 2, "x", "y", (1.5,)])  # a vector: rejected (no encoder), counted
        out.append((stream, Transition(s, rng.randrange(3), rng.random(), s_next, t=i * 0.01)))
    return out


def test_ingest_of_batches_matches_add_then_due_one_by_one() -> None:
    config = parse_config({
        "window": {"count": 400, "seconds": 3.0},
        "schedule": {"every_transitions": 97, "every_seconds": 1.3},
        "cells": {"c": {"twins": {"a": {}, "b": {}}}},
    })  # fmt: skip
    events = _stream(1, 3000)
    single, batched = CellMonitor("c", config), CellMonitor("c", config)
    want, got = [], []
    rejected_single = 0
    for stream, tr in events:
        if single.add(stream, tr, 0.0) is not None:
            rejected_single += 1
            continue
        for twin in single.due(tr.t):
            single.snapshot(twin, tr.t)
            want.append((twin, tr.t))
    rejected: list[tuple[int, str]] = []
    rng = random.Random(2)
    i = 0
    while i < len(events):  # runs of one stream, cut at random lengths, as batched payloads would be
        j = i + 1
        limit = i + rng.randrange(1, 60)
        while j < min(limit, len(events)) and events[j][0] == events[i][0]:
            j += 1
        for t, due in batched.ingest(events[i][0], [tr for _, tr in events[i:j]], 0.0, rejected):
            for twin in due:
                batched.snapshot(twin, t)
                got.append((twin, t))
        i = j
    assert got == want and len(want) > 30
    assert len(rejected) == rejected_single > 0 and {r for _, r in rejected} == {"no_encoder"}
    for twin in ("a", "b"):
        x, y = single.snapshot(twin, 99.0), batched.snapshot(twin, 99.0)
        assert (x.real.N == y.real.N).all() and (x.twin.P == y.twin.P).all()


def test_ingest_with_a_time_only_schedule_and_a_busy_twin() -> None:
    """No count criterion (and a twin whose computation is in flight) leaves no count bound: still exact."""
    config = parse_config({"window": {"count": 100}, "schedule": {"every_seconds": 0.5},
                           "cells": {"c": {"twins": {"a": {}, "b": {}}}}})  # fmt: skip
    monitor = CellMonitor("c", config)
    monitor.hold("b")
    batch = [Transition(i % 3, 0, 1.0, (i + 1) % 3, t=i * 0.01) for i in range(300)]
    due = []
    for t, names in monitor.ingest(REAL, batch, 0.0, []):
        due.append((round(t, 2), names))
        for name in names:
            monitor.snapshot(name, t)
    assert due == [(t, ["a"]) for t in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)]
    monitor.release("b")
    assert monitor.due(2.8) == ["b"]


def _monitor(**trigger: object) -> CellMonitor:
    config = parse_config({"window": {"count": 300}, "schedule": {"every_transitions": 10_000},
                           "trigger": {"threshold": 0.5, **trigger}, "cells": {"c": {"twins": {"a": {}}}}})  # fmt: skip
    return CellMonitor("c", config)


def test_a_twin_that_sent_nothing_is_warming_not_ok() -> None:
    monitor = _monitor()
    for i in range(200):
        assert monitor.add(REAL, Transition(i % 3, 0, 1.0, (i + 1) % 3, t=float(i)), 0.0) is None
    report = monitor.evaluate("a", 200.0)
    assert report.state == "warming" and report.reason == "warming: the twin window is empty"
    assert report.record()["state"] == "warming" and not report.fired


def test_missing_data_bounds_are_taken_over_labels_present_now() -> None:
    """A label seen once at the start and gone from both windows must not pin the pessimistic bound."""
    monitor = _monitor()
    for stream in (REAL, "a"):
        monitor.add(stream, Transition("rare", 0, 0.0, 0, t=0.0), 0.0)
    rng = random.Random(5)
    for i in range(1, 1000):  # both windows (300) forget "rare"
        for stream in (REAL, "a"):
            s = rng.randrange(3)
            monitor.add(stream, Transition(s, rng.randrange(2), float(s), (s + rng.randrange(2)) % 3, t=float(i)), 0.0)
    assert "rare" in monitor.encoding.states.labels  # until the next snapshot frees it
    report = monitor.evaluate("a", 1000.0)
    f = report.figures
    assert "rare" not in monitor.encoding.states.labels
    assert f.coverage == 1.0 and f.mismatch_lower == f.mismatch == f.mismatch_upper
    assert all(top.state != "rare" for top in f.top_states)


def test_the_record_carries_the_evidence_and_each_top_state_its_counts() -> None:
    monitor = _monitor(min_state_samples=50)
    rng = random.Random(6)
    for i in range(1000):
        for stream in (REAL, "a"):
            s = 0 if rng.random() < 0.97 else 1  # state 1 is thin: a handful of visits in each window
            r = float(s) + (0.5 if stream == "a" and s == 0 else 0.0)  # the twin's rewards are off in state 0
            monitor.add(stream, Transition(s, 0, r, 0 if rng.random() < 0.97 else 1, t=float(i)), 0.0)
    report = monitor.evaluate("a", 1000.0)
    rec = report.record()
    assert rec["p_value"] is not None and rec["p_value"] <= 0.01
    assert rec["interval_low"] is not None and rec["interval_low"] <= rec["mismatch"] <= rec["interval_high"]
    assert rec["interval_level"] == 0.98 and report.fired and report.state == "drifted"
    tops = {row["state"]: row for row in rec["top_states"]}
    assert tops[0]["supported"] and tops[0]["n_real"] + tops[1]["n_real"] == 300
    assert not tops[1]["supported"] and tops[1]["n_twin"] < 50
    assert rec["mismatch_supported"] == tops[0]["d"]
    assert report.status()["p_value"] == rec["p_value"]


def _decoded(monitor: CellMonitor, window: SlidingWindow) -> list[tuple[object, object, float, object]]:
    states, actions = monitor.encoding.states.labels, monitor.encoding.actions.labels
    return [(states[s], actions[a], r, states[sn]) for s, a, r, sn, _ in window]


def test_labels_that_left_every_window_are_freed_so_the_caps_bound_the_live_set() -> None:
    """Fresh state and action labels every 30 transitions, 50 times, against caps of 8 states and 4 actions:
    without freeing the tables fill after a few phases and the rest is refused. Batches of 25 make twins due
    mid-batch, so labels are freed while part of a batch (with its new labels) is not in the window yet."""
    config = parse_config({"max_states": 8, "max_actions": 4, "window": {"count": 20},
                           "schedule": {"every_transitions": 10}, "cells": {"c": {"twins": {"a": {}}}}})  # fmt: skip
    monitor = CellMonitor("c", config)
    sent: dict[str, list[Transition]] = {REAL: [], "a": []}
    rng = random.Random(3)
    for phase in range(50):
        for stream in (REAL, "a"):
            for _ in range(30):
                k = phase + rng.randrange(2)
                sent[stream].append(Transition(f"s{k}", f"a{phase}", float(k % 2), f"s{k + 1}", t=len(sent[stream])))
    rejected: list[tuple[int, str]] = []
    snapshots, peak = 0, (0, 0)
    for start in range(0, 1500, 25):
        for stream in (REAL, "a"):
            for t, due in monitor.ingest(stream, sent[stream][start : start + 25], 0.0, rejected):
                for twin in due:
                    monitor.snapshot(twin, t)
                    snapshots += 1
            peak = max(peak, (len(monitor.encoding.states), len(monitor.encoding.actions)))
    assert rejected == [] and snapshots > 100
    assert peak[0] <= 8 and peak[1] <= 4
    for stream, window in ((REAL, monitor.real), ("a", monitor.twins["a"].window)):
        assert _decoded(monitor, window) == [(tr.s, tr.a, tr.r, tr.s_next) for tr in sent[stream][-20:]]
    held = {x for w in (monitor.real, monitor.twins["a"].window) for row in _decoded(monitor, w) for x in row[::3]}
    assert held <= set(monitor.encoding.states.labels)  # what left since the windows last turned over waits
    before = len(monitor.encoding.states) + len(monitor.encoding.actions)
    freed = monitor.free_labels()
    assert set(monitor.encoding.states.labels) == held and monitor.encoding.actions.labels == ["a49"]
    assert freed == before - len(held) - 1


def test_freeing_labels_leaves_the_evaluation_as_a_fresh_monitor_sees_the_same_windows() -> None:
    """The renumbered windows judge exactly like a monitor that only ever saw their content."""
    config = parse_config({"window": {"count": 200}, "schedule": {"every_transitions": 50},
                           "cells": {"c": {"twins": {"a": {}}}}})  # fmt: skip
    churned, fresh = CellMonitor("c", config), CellMonitor("c", config)
    rng = random.Random(8)
    for i in range(2000):
        base = i // 100  # the visited states drift: early labels leave both windows
        for stream, shift in ((REAL, 0.0), ("a", 0.3)):
            s, s_next = base + rng.randrange(4), base + rng.randrange(4)
            churned.add(stream, Transition(s, rng.randrange(2), s % 3 + shift, s_next, t=float(i)), 0.0)
            if churned.twins["a"].new_transitions >= 50:
                churned.snapshot("a", float(i))
    assert len(churned.encoding.states) <= 8  # the labels live in the windows, not the 23 seen
    for stream, window in ((REAL, churned.real), ("a", churned.twins["a"].window)):
        for s, a, r, sn in _decoded(churned, window):
            fresh.add(stream, Transition(s, a, r, sn, t=1999.0), 0.0)
    one, other = churned.evaluate("a", 2000.0).figures, fresh.evaluate("a", 2000.0).figures
    for name in ("mismatch", "mismatch_lower", "mismatch_upper", "coverage", "tv_bound"):
        assert abs(getattr(one, name) - getattr(other, name)) < 1e-6, name
    assert (one.samples_real, one.samples_twin) == (other.samples_real, other.samples_twin) == (200, 200)
    assert {t.state for t in one.top_states} == {t.state for t in other.top_states}


def test_a_full_table_frees_what_left_the_windows_before_refusing_between_evaluations() -> None:
    """No evaluation runs (count schedule far away): a full table is freed on demand, one by one and in
    batches; labels all still held are refused, so the caps bound the live set."""
    config = parse_config({"max_states": 8, "max_actions": 4, "window": {"count": 2},
                           "schedule": {"every_transitions": 10**9}, "cells": {"c": {"twins": {"a": {}}}}})  # fmt: skip
    monitor = CellMonitor("c", config)
    assert [monitor.add(REAL, Transition(f"f{i}", i % 3, 0.0, f"g{i}"), 0.0) for i in range(100)] == [None] * 100
    rejected: list[tuple[int, str]] = []
    for i in range(30):
        batch = [Transition(f"h{i}.{j}", j, 0.0, f"k{i}.{j}") for j in range(2)]
        assert list(monitor.ingest(REAL, batch, 0.0, rejected)) == []
    assert rejected == [] and len(monitor.encoding.states) <= 8
    assert _decoded(monitor, monitor.real) == [(f"h29.{j}", j, 0.0, f"k29.{j}") for j in range(2)]
    config = parse_config({"max_states": 8, "window": {"count": 100}, "cells": {"c": {"twins": {"a": {}}}}})
    live = CellMonitor("c", config)
    results = [live.add(REAL, Transition(f"f{i}", 0, 0.0, f"g{i}"), 0.0) for i in range(6)]
    assert results == [None] * 4 + ["too_many_labels"] * 2
