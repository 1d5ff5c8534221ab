"""CellMonitor: a batch gives the same evaluations as its transitions one by one."""

from __future__ import annotations

import random

from dtsync.config import parse_config
from dtsync.contract import Transition
from dtsync.monitor import REAL, CellMonitor


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
