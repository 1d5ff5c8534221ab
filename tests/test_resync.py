"""dtsync.resync in the monitor: a resync (ack or version change) drops the twin's window, re-arms its trigger,
and the twin is `resyncing` until judged on fresh data; the record carries the mismatch before and after."""

from __future__ import annotations

import random

from dtsync.config import parse_config
from dtsync.contract import Transition, decode_payload
from dtsync.monitor import REAL, CellMonitor

CONFIG = {
    "window": {"count": 2000},
    "schedule": {"every_transitions": 500},
    "trigger": {"threshold": 0.5, "rearm_below": 0.3, "cooldown_seconds": 1e9, "min_samples": 500, "act_on": "point"},
    "cells": {"c": {"twins": {"tw": {}}}},
}


def _step(rng: random.Random, flip: bool) -> tuple[int, int, float, int]:
    """A 3-state chain: action a moves to (s + a) % 3; `flip` swaps the effect of the two actions."""
    s, a = rng.randrange(3), rng.randrange(2)
    return s, a, float(s == 0), (s + (1 - a if flip else a)) % 3


def feed(mon: CellMonitor, t0: float, n: int, *, flip: bool, v: str | None = None, seed: int = 0) -> list[str]:
    """n real and n twin transitions (the twin flipped or not), evaluating whatever becomes due; the states."""
    rng = random.Random(seed)
    states = []
    for i in range(n):
        t = t0 + i * 0.001
        for stream, flipped, version in ((REAL, False, None), ("tw", flip, v)):
            s, a, r, sn = _step(rng, flipped)
            assert mon.add(stream, Transition(s, a, r, sn, t=t, v=version), t) is None
            for twin in mon.due(t):
                states.append(mon.evaluate(twin, t).state)
    return states


def test_version_change_starts_a_fresh_window_and_the_twin_recovers_through_resyncing() -> None:
    mon = CellMonitor("c", parse_config(CONFIG))
    before = feed(mon, 0.0, 3000, flip=True, v="1")
    assert before[-1] == "drifted" and mon.version("tw") == "1"
    drifted = mon.twins["tw"].trigger
    assert not drifted.armed
    # the twin's new model (version 2) behaves like the real network: the window starts afresh at once
    rng = random.Random(9)
    s, a, r, sn = _step(rng, False)
    assert mon.add("tw", Transition(s, a, r, sn, t=3.0, v="2"), 3.0) is None
    assert len(mon.twins["tw"].window) == 1 and drifted.armed and mon.version("tw") == "2"
    report = mon.evaluate("tw", 3.0)  # one fresh transition: not enough to judge
    assert report.state == "resyncing" and report.resync is not None and report.resync.cause == "version"
    after = feed(mon, 3.1, 1500, flip=False, v="2", seed=3)
    assert after[0] == "resyncing" and "ok" in after
    first_ok = after.index("ok")
    assert set(after[:first_ok]) == {"resyncing"} and "drifted" not in after
    rec = mon.evaluate("tw", 5.0).record()
    assert rec["version"] == "2" and rec["resync"]["mismatch_before"] > 0.5 > rec["resync"]["mismatch_after"]
    # transitions of the superseded version are refused: they belong to the old model
    assert mon.add("tw", Transition(0, 0, 0.0, 0, t=5.1, v="1"), 5.1) == "stale_version"


def test_ack_drops_the_window_once_even_when_the_new_version_came_first() -> None:
    mon = CellMonitor("c", parse_config(CONFIG))
    feed(mon, 0.0, 3000, flip=True, v="1")
    fired = [r for r in [mon.evaluate("tw", 3.0)]]
    assert fired[0].state == "drifted"
    feed(mon, 3.1, 100, flip=False, v="2", seed=4)  # the controller restarted the twin's telemetry first
    assert len(mon.twins["tw"].window) == 100
    assert not mon.resynced("tw", 3.3, cause="ack", version="2", event_id="e1", event_t=2.0, latency=1.5)
    assert len(mon.twins["tw"].window) == 100  # kept: it already holds only version 2
    assert mon.twins["tw"].sync.resync is not None and mon.twins["tw"].sync.resync.event_id == "e1"
    # an ack without a version change of the telemetry (the twin's stream carries no v) drops the window
    assert mon.resynced("tw", 3.4, cause="ack", version="3", event_id="e2", event_t=3.35, latency=0.1)
    assert len(mon.twins["tw"].window) == 0 and mon.version("tw") == "3"


def test_a_computation_on_the_dropped_window_is_not_a_judgement() -> None:
    mon = CellMonitor("c", parse_config(CONFIG))
    feed(mon, 0.0, 3000, flip=True)
    snap = mon.snapshot("tw", 3.0)
    figures = mon.twins["tw"].computer.compute(snap)
    mon.resynced("tw", 3.0, cause="ack", version="2", event_id="e", latency=0.5)
    report = mon.decide("tw", snap.t, figures)  # landed after the resync: saw the old model
    assert report.state == "resyncing" and not report.fired and mon.twins["tw"].trigger.armed


def test_a_batch_with_a_version_change_matches_one_by_one() -> None:
    rng = random.Random(5)
    items = [Transition(*_step(rng, False), t=i * 0.01, v="a" if i < 700 else "b") for i in range(1500)]
    single, batched = CellMonitor("c", parse_config(CONFIG)), CellMonitor("c", parse_config(CONFIG))
    for tr in items:
        assert single.add("tw", tr, 0.0) is None
    rejected: list[tuple[int, str]] = []
    for i in range(0, len(items), 400):
        list(batched.ingest("tw", items[i : i + 400], 0.0, rejected))
    assert not rejected
    for mon in (single, batched):
        assert len(mon.twins["tw"].window) == 800 and mon.version("tw") == "b"
    stale = [Transition(0, 0, 0.0, 1, t=20.0, v="b"), Transition(0, 0, 0.0, 1, t=20.0, v="a")]
    list(batched.ingest("tw", stale, 0.0, rejected))
    assert rejected == [(1, "stale_version")]


def test_version_on_the_wire() -> None:
    good, bad = decode_payload(b'{"s": 0, "a": 0, "r": 0, "s_next": 1, "v": "twin-7"}')
    assert good[0].v == "twin-7" and not bad
    for v in (b"3", b'""', b'"' + b"x" * 65 + b'"'):
        good, bad = decode_payload(b'{"s": 0, "a": 0, "r": 0, "s_next": 1, "v": ' + v + b"}")
        assert not good and bad[0].reason == "wrong_type"
