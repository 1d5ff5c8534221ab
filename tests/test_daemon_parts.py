"""Daemon pieces without a broker: topic layout, the outbox, the metrics endpoint, check-config."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from typer.testing import CliRunner

from dtsync.cli import app
from dtsync.daemon.metrics import MetricsServer
from dtsync.daemon.mqtt import backoff
from dtsync.daemon.outbox import Outbox, PendingEvent
from dtsync.daemon.topics import Topics

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "topic, parsed",
    [
        ("dt/x/cell-1/real", ("cell-1", "real")),
        ("dt/x/cell-1/twin/t1", ("cell-1", "t1")),
        ("dt/x/cell-1/twin/t1/resync", None),
        ("dt/x/cell-1/twin/t1/status", None),
        ("dt/x/cell-1/twin/real", None),
        ("dt/x/cell-1/twin/", None),
        ("dt/x/_daemon/a/status", None),
        ("other/cell-1/real", None),
        ("dt/xcell-1/real", None),
    ],
)
def test_topic_parsing(topic: str, parsed: tuple[str, str] | None) -> None:
    assert Topics("dt/x").parse_telemetry(topic) == parsed


def test_topic_layout() -> None:
    t = Topics("dtsync")
    assert t.resync("c", "w") == "dtsync/c/twin/w/resync" and t.status("c", "w") == "dtsync/c/twin/w/status"
    assert t.daemon_status("i") == "dtsync/_daemon/i/status"
    assert t.telemetry_filters("c") == ["dtsync/c/real", "dtsync/c/twin/+", "dtsync/c/twin/+/resynced"]
    assert t.resynced("c", "w") == "dtsync/c/twin/w/resynced" and t.parse_ack("dtsync/c/twin/w/resynced") == ("c", "w")
    assert t.parse_ack("dtsync/c/twin/w") is None and t.parse_ack("dtsync/c/w/resynced") is None


def test_outbox_persists_in_order_and_forgets_on_ack(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite"
    box = Outbox(path)
    for i in range(3):
        box.add(PendingEvent(f"e{i}", "t", b"{}", 100.0 + i))
    box.add(PendingEvent("e0", "t", b"changed", 1.0))  # a re-add keeps the first copy
    box.remove("e1")
    box.close()
    reopened = Outbox(path)  # as after a restart
    assert [(e.event_id, e.payload) for e in reopened.pending()] == [("e0", b"{}"), ("e2", b"{}")]
    assert len(reopened) == 2


def test_backoff_grows_with_jitter_and_caps() -> None:
    import random

    delays = backoff(0.5, 4.0, random.Random(1))
    got = [next(delays) for _ in range(8)]
    caps = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(c / 2 <= d <= c for d, c in zip(got, caps, strict=True))
    assert len(set(got)) == len(got)


def test_metrics_server_serves_metrics_and_health() -> None:
    registry = CollectorRegistry()
    Gauge("dtsync_probe", "probe", registry=registry).set(3)
    state = {"ok": True}
    server = MetricsServer("127.0.0.1", 0, registry, lambda: (state["ok"], {"why": "test"}))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert "dtsync_probe 3.0" in urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert json.loads(urllib.request.urlopen(base + "/healthz", timeout=5).read()) == {"ok": True, "why": "test"}
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert err.value.code == 503
    finally:
        server.stop()


def test_check_config(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", "--config", str(ROOT / "config.yaml")])
    assert ok.exit_code == 0 and "cell-1  twin-b  0.95" in ok.output
    for text, key in (("mqtt: {port: 0}", "mqtt.port"),
                      ("cells: {c: {twins: {t: {trigger: {threshold: -1}}}}}", "cells.c.twins.t.trigger.threshold"),
                      ("mqtt: {password_file: /nonexistent/pw}", "mqtt.password_file: cannot read")):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(text + "\n")
        out = runner.invoke(app, ["check-config", "--config", str(bad)])
        assert out.exit_code == 2 and key in out.output, out.output


def test_run_refuses_a_config_without_cells(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("gamma: 0.9\n")
    out = CliRunner().invoke(app, ["run", "--config", str(empty)])
    assert out.exit_code == 2 and "no cells configured" in out.output


def test_configured_series_exist_before_any_data(tmp_path: Path) -> None:
    """A first event must show as an increase from 0, and a silent stream as old, not as a missing series."""
    import asyncio

    from dtsync.config import parse_config
    from dtsync.daemon.ingest import REJECT_REASONS_ALL
    from dtsync.daemon.service import Daemon

    config = parse_config({"cells": {"c": {"twins": {"t": {}}}},
                           "daemon": {"outbox_path": str(tmp_path / "o.sqlite")}})  # fmt: skip

    async def make() -> Daemon:
        return Daemon(config)

    daemon = asyncio.run(make())
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'dtsync_resync_events_total{cell="c",twin="t"} 0.0' in text
    assert 'dtsync_transitions_received_total{cell="c",stream="real"} 0.0' in text
    assert 'dtsync_twin_state{cell="c",dtsync_twin_state="warming",twin="t"} 1.0' in text
    assert all(f'dtsync_rejected_total{{reason="{r}"}} 0.0' in text for r in REJECT_REASONS_ALL)
    assert 'dtsync_last_transition_timestamp_seconds{cell="c",stream="t"}' in text
    assert 'dtsync_last_evaluation_timestamp_seconds{cell="c",twin="t"}' in text
    assert "dtsync_worker_restarts_total 0.0" in text
    daemon.outbox.close()
    daemon.pool.shutdown()


def test_a_worker_runs_numba_on_one_thread() -> None:
    """Each daemon worker is one of `workers` processes (one per core by default): numba must not fan out."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import numba

    from dtsync.daemon.compute import init_worker

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=init_worker, initargs=(os.getpid(),)) as pool:
        assert pool.submit(numba.get_num_threads).result(timeout=60) == 1
