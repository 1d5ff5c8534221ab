"""Hostile input through the daemon's whole ingest path: decode -> validate -> time check -> encode -> window.

Hypothesis generates thousands of payloads (valid transitions, near misses in every field, arbitrary JSON,
raw bytes); each goes through the daemon's real `Ingest.handle` with real metrics, and every due twin is
snapshotted (the windows' counts turned into MDP arrays), exactly as the live loop does short of the metric.
Nothing may raise, and nothing may vanish: each payload is accepted, rejected with a reason, or both; and
whatever got into the windows survives a state snapshot and its restore.
"""

from __future__ import annotations

import json
import math
import time
import tracemalloc
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from dtsync.config import parse_config
from dtsync.daemon import state
from dtsync.daemon.ingest import REJECT_REASONS_ALL, Ingest
from dtsync.daemon.metrics import DaemonMetrics
from dtsync.daemon.topics import Topics
from dtsync.monitor import CellMonitor

CONFIG = parse_config({"window": {"count": 200, "seconds": 50.0}, "schedule": {"every_transitions": 25},
                       "max_states": 64, "max_actions": 8, "encoder": {"bins": [[0.0, 1.0], [5.0]]},
                       "mqtt": {"max_payload_bytes": 4096, "max_batch": 50},
                       "cells": {"c": {"twins": {"t": {}}}}})  # fmt: skip
TOPICS = ["dtsync/c/real", "dtsync/c/twin/t", "dtsync/c/twin/nobody", "dtsync/other/real", "dtsync/c/real/x"]

floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 0.0, -0.0, 1e-320])
now = time.time()
times = st.one_of(st.none(), floats, st.floats(now - 400, now + 400), st.just(now * 1000), st.just(now),
                  st.text(max_size=3), st.booleans())  # fmt: skip
labels = st.one_of(st.integers(-3, 70), st.integers(), st.text(max_size=4), st.booleans(), st.none(),
                   st.lists(floats, max_size=3), st.lists(st.integers(-2, 7), min_size=2, max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))  # fmt: skip
transition = st.fixed_dictionaries(
    {},
    optional={"s": labels, "a": labels, "r": st.one_of(floats, st.integers(), st.text(max_size=2), st.none()),
              "s_next": labels, "t": times, "seq": st.one_of(st.integers(), floats), "extra": labels},
)  # fmt: skip
scalars = st.none() | st.booleans() | floats | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
payloads = st.one_of(
    transition.map(lambda d: json.dumps(d).encode()),
    st.lists(transition, max_size=60).map(lambda items: json.dumps(items).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.binary(min_size=4090, max_size=4200),
)


def make_ingest() -> tuple[Ingest, DaemonMetrics, CellMonitor]:
    metrics = DaemonMetrics("fuzz")
    monitor = CellMonitor("c", CONFIG)
    monitors = {"c": monitor}
    metrics.declare("c", ["t"], REJECT_REASONS_ALL, now)

    def evaluate(mon: CellMonitor, twin: str, t: float) -> None:
        snap = mon.snapshot(twin, t)  # the counts -> arrays step the worker would get
        assert snap.real.P.shape[0] == len(mon.encoding.states) and math.isfinite(snap.t)

    ingest = Ingest(monitors, Topics("dtsync"), CONFIG.mqtt, 300.0, metrics, evaluate)
    return ingest, metrics, monitor


def totals(metrics: DaemonMetrics) -> tuple[float, float]:
    accepted = rejected = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "dtsync_transitions_received_total":
                accepted += sample.value
            elif sample.name == "dtsync_rejected_total":
                rejected += sample.value
    return accepted, rejected


INGEST, METRICS, MONITOR = make_ingest()


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from(TOPICS), payload=payloads)
def test_any_payload_is_accepted_or_rejected_never_raises(topic: str, payload: bytes) -> None:
    before = totals(METRICS)
    INGEST.handle(topic, payload)
    accepted, rejected = (a - b for a, b in zip(totals(METRICS), before, strict=True))
    assert accepted + rejected >= 1  # nothing silently disappears
    assert accepted <= CONFIG.mqtt.max_batch
    assert len(MONITOR.real) <= 200 and len(MONITOR.twins["t"].window) <= 200
    assert len(MONITOR.encoding.states) <= 64 and len(MONITOR.encoding.actions) <= 8
    # whatever got in survives a state snapshot and its restore
    saved = state.decode(state.encode(state.capture(uuid.UUID(int=1), {"c": MONITOR}, {}, {})))
    fresh = CellMonitor("c", CONFIG)
    state.apply(saved, {"c": fresh}, {})
    assert len(fresh.real) == len(MONITOR.real) and len(fresh.twins["t"].window) == len(MONITOR.twins["t"].window)


def test_a_flood_of_unknown_twin_topics_adds_no_series_and_little_memory() -> None:
    ingest, metrics, _ = make_ingest()
    body = b'{"s": 1, "a": 0, "r": 0.5, "s_next": 2}'
    for i in range(1000):  # warm up: caches, first rejection log line
        ingest.handle(f"dtsync/c/twin/warm{i}", body)
    series = generate_latest(metrics.registry).count(b"\n")
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for i in range(100_000):
        ingest.handle(f"dtsync/c/twin/unknown-{i}", body)
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert abs(generate_latest(metrics.registry).count(b"\n") - series) <= 10
    assert grown < 1_000_000, f"{grown} bytes kept after 100,000 unknown topics"
    assert metrics.registry.get_sample_value("dtsync_rejected_total", {"reason": "unknown_stream"}) == 101_000
