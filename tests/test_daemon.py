"""The daemon end to end: real Mosquitto, real `dtsync run` process, real `dtsync publish`."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_harness import DaemonProcess, Mosquitto, Subscriber, daemon_config, publish_cli, wait_for

from dtsync.config import parse_config
from dtsync.contract import encode_transition
from dtsync.offline.replay import merged, replay
from dtsync.offline.sample import write_samples

CHANGE_AT = 100.0  # write_samples: 20,000 steps of 0.01 s, dynamics change at the midpoint
EVENT_KEYS = {"event_id", "time", "cell", "twin", "mismatch", "mismatch_lower", "mismatch_upper", "noise_floor",
              "threshold", "tv_bound", "regret_bound", "regret_estimate", "samples_real", "samples_twin",
              "coverage", "top_states", "reason", "expires_at"}  # fmt: skip


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"), seed=7)


def test_drift_raises_exactly_one_event_and_a_faithful_twin_none(
    broker: Mosquitto, samples: dict[str, Path], tmp_path: Path
) -> None:
    sub = Subscriber(broker.port, ["dtsync/#"])
    daemon = DaemonProcess(tmp_path, daemon_config(broker.port, tmp_path))
    watch = subprocess.Popen([sys.executable, "-m", "dtsync.cli", "watch", "--host", "127.0.0.1", "--port",
                              str(broker.port), "--events", "1"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        daemon.wait_connected()
        streams = {name: samples[name] for name in ("real", "faithful", "drifting")}
        publish_cli(broker.port, "cell-1", streams, "--batch", "20", "--qos", "1")
        wait_for(lambda: daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream="drifting")
                 == 20_000, 60, "all transitions to arrive")  # fmt: skip
        last_t = (20_000 - 1) * 0.01
        wait_for(lambda: {s["twin"] for s in sub.statuses() if s.get("t", 0) >= last_t} == {"faithful", "drifting"},
                 30, "evaluations of the whole trace")  # fmt: skip
        events = sub.on("/resync")
        assert [m.topic for m in events] == ["dtsync/cell-1/twin/drifting/resync"]
        event = json.loads(events[0].payload)
        assert EVENT_KEYS <= event.keys()
        assert event["twin"] == "drifting" and event["cell"] == "cell-1" and event["t"] > CHANGE_AT
        assert event["mismatch_lower"] <= event["mismatch"] <= event["mismatch_upper"]
        assert event["mismatch"] - event["noise_floor"] >= event["threshold"]
        assert not events[0].retain
        assert events[0].expiry is not None and 0 < events[0].expiry <= 300
        assert abs(event["expires_at"] - event["time"] - 300) < 1e-6
        assert daemon.metric("dtsync_resync_events_total", cell="cell-1", twin="drifting") == 1
        assert daemon.metric("dtsync_resync_events_total", cell="cell-1", twin="faithful") == 0  # declared at start
        assert daemon.metric("dtsync_outbox_pending") == 0
        last = {s["twin"]: s for s in sub.statuses()}
        assert last["drifting"]["state"] == "drifted" and last["drifting"]["last_event_id"] == event["event_id"]
        assert last["faithful"]["state"] == "ok" and last["faithful"]["last_event_id"] is None
        # `dtsync watch` printed the liveness, statuses and the event for a person, then exited after 1 event.
        printed, _ = watch.communicate(timeout=10)
        assert watch.returncode == 0
        assert "DAEMON test: online" in printed and "STATUS cell-1/faithful: ok, mismatch" in printed
        assert f"RESYNC cell-1/drifting: mismatch {event['mismatch']:.4g}" in printed and event["event_id"] in printed
    finally:
        watch.kill()
        sub.close()
        assert daemon.stop() == 0


def test_live_timeline_equals_replay(broker: Mosquitto, samples: dict[str, Path], tmp_path: Path) -> None:
    """The same trace, replayed offline and published live in the same order, gives the same evaluations.

    The publisher waits for each evaluation to land before sending the transition after it: the daemon never
    runs two computations of one twin at once, so a faster feed would (by design) coalesce evaluations.
    """
    short = {}
    for name in ("real", "faithful", "drifting"):
        short[name] = tmp_path / f"{name}.jsonl"
        short[name].write_text("".join(samples[name].read_text().splitlines(keepends=True)[:3000]))
    schedule = {"every_transitions": 300, "every_seconds": None}
    config = daemon_config(broker.port, tmp_path, window={"count": 1000}, schedule=schedule)
    offline = replay(parse_config(config).for_replay(["faithful", "drifting"]), short["real"],
                     {"faithful": short["faithful"], "drifting": short["drifting"]})  # fmt: skip
    expected = [(r.twin, r.t, r.figures.mismatch, r.figures.noise_floor) for r in offline.reports[:-2]]
    sub = Subscriber(broker.port, ["dtsync/cell-1/twin/+/status"])
    daemon = DaemonProcess(tmp_path, config)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    try:
        daemon.wait_connected()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        topics = {"real": "dtsync/cell-1/real", "faithful": "dtsync/cell-1/twin/faithful",
                  "drifting": "dtsync/cell-1/twin/drifting"}  # fmt: skip

        def evaluated() -> list[tuple[str, float, float, float]]:
            return [(s["twin"], s["t"], s["mismatch"], s["noise_floor"]) for s in sub.statuses() if "t" in s]

        for t, stream, item in merged(short):
            due = sum(1 for e in expected if e[1] < t)
            if len(evaluated()) < due:
                wait_for(lambda due=due: len(evaluated()) >= due, 20, f"{due} evaluations")
            client.publish(topics[stream], encode_transition(item), qos=1).wait_for_publish(5)
        wait_for(lambda: len(evaluated()) >= len(expected), 20, "the last evaluations")
        live = sorted(evaluated()[: len(expected)], key=lambda e: (e[1], e[0]))
        want = sorted(expected, key=lambda e: (e[1], e[0]))
        assert [(e[0], e[1]) for e in live] == [(e[0], e[1]) for e in want]
        # Same windows, same fixed points: equal to the solver tolerance (warm starts differ in history).
        gaps = [abs(a - b) for x, y in zip(live, want, strict=True) for a, b in zip(x[2:], y[2:], strict=True)]
        assert max(gaps) < 1e-7
    finally:
        client.loop_stop()
        client.disconnect()
        sub.close()
        daemon.stop()


def test_a_recorded_trace_published_as_is_passes_the_default_clock_check(
    broker: Mosquitto, samples: dict[str, Path], tmp_path: Path
) -> None:
    # The trace's t runs from 0 (1970): sent as recorded, the default check (300 s) would reject every line;
    # `dtsync publish` stamps the time of sending instead unless --keep-time.
    config = daemon_config(broker.port, tmp_path, daemon={"max_clock_skew_seconds": 300})
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected()
        publish_cli(broker.port, "cell-1", {"real": samples["real"]}, "--batch", "100", keep_time=False)
        wait_for(lambda: daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream="real") == 20_000,
                 60, "every transition of the trace kept")  # fmt: skip
        assert not daemon.metric("dtsync_rejected_total", reason="clock_skew")
        publish_cli(broker.port, "cell-1", {"real": samples["real"]}, "--batch", "100")  # --keep-time: refused
        wait_for(lambda: daemon.metric("dtsync_rejected_total", reason="clock_skew") == 20_000, 60, "clock_skew")
    finally:
        assert daemon.stop() == 0


def test_status_and_liveness_topics(broker: Mosquitto, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, daemon_config(broker.port, tmp_path))
    daemon.wait_connected()
    late = Subscriber(broker.port, ["dtsync/#"])  # joins after the daemon: sees only retained messages
    try:
        wait_for(lambda: len(late.on("/status")) >= 3, 10, "retained status and liveness")
        assert {(m.topic, m.payload, m.retain) for m in late.on("_daemon/test/status")} == {
            ("dtsync/_daemon/test/status", b"online", True)
        }
        warming = {s["twin"]: s["state"] for s in late.statuses()}
        assert warming == {"faithful": "warming", "drifting": "warming"}
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 5.0
        wait_for(lambda: late.on("_daemon/test/status")[-1].payload == b"offline", 5, "offline on clean stop")
    finally:
        late.close()


def test_last_will_says_offline_when_the_daemon_dies(broker: Mosquitto, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, daemon_config(broker.port, tmp_path))
    daemon.wait_connected()
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(10)
    sub = Subscriber(broker.port, ["dtsync/_daemon/test/status"])
    try:
        wait_for(lambda: sub.on("/status") and sub.on("/status")[-1].payload == b"offline", 10, "the last will")
    finally:
        sub.close()


def _pending_event(outbox: Path, event_id: str, expires_at: float) -> None:
    db = sqlite3.connect(outbox)
    db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL "
               "UNIQUE, topic TEXT NOT NULL, payload BLOB NOT NULL, expires_at REAL NOT NULL)")  # fmt: skip
    payload = json.dumps({"event_id": event_id, "expires_at": expires_at}).encode()
    db.execute("INSERT INTO events (event_id, topic, payload, expires_at) VALUES (?, ?, ?, ?)",
               (event_id, "dtsync/cell-1/twin/drifting/resync", payload, expires_at))  # fmt: skip
    db.commit()
    db.close()


def test_outbox_survives_restart_and_outage(broker: Mosquitto, samples: dict[str, Path], tmp_path: Path) -> None:
    """Events left unacknowledged by a previous run are sent after start; expired ones are dropped; during a
    broker outage the metrics endpoint answers, healthz says 503, and pending events go out on reconnect."""
    outbox = tmp_path / "outbox.sqlite"
    _pending_event(outbox, "left-by-crash", time.time() + 600)
    _pending_event(outbox, "too-late", time.time() - 1)
    sub = Subscriber(broker.port, ["dtsync/+/twin/+/resync"])
    # Reconnect attempts 1-2 s apart: after the outage, the test's subscriber is back before the daemon.
    config = daemon_config(broker.port, tmp_path, mqtt={"reconnect_min_seconds": 2.0, "reconnect_max_seconds": 2.0})
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected()
        wait_for(lambda: sub.on("/resync"), 10, "the pending event")
        wait_for(lambda: daemon.metric("dtsync_outbox_pending") == 0, 10, "an empty outbox")
        assert [json.loads(m.payload)["event_id"] for m in sub.on("/resync")] == ["left-by-crash"]
        assert daemon.metric("dtsync_events_expired_total") == 1

        sub.close()
        broker.stop()
        wait_for(lambda: daemon.metric("dtsync_mqtt_connected") == 0, 10, "the daemon to notice the outage")
        status, body = daemon.get("/healthz")
        assert status == 503 and json.loads(body)["mqtt_connected"] is False
        _pending_event(outbox, "raised-during-outage", time.time() + 600)  # as if fired while away
        broker.start()
        sub = Subscriber(broker.port, ["dtsync/+/twin/+/resync"])
        daemon.wait_connected()
        wait_for(lambda: sub.on("/resync"), 10, "the event after reconnect")
        assert json.loads(sub.on("/resync")[0].payload)["event_id"] == "raised-during-outage"
        assert daemon.metric("dtsync_mqtt_connects_total") == 2
        # and telemetry flows again after the restart: the daemon re-subscribed
        publish_cli(broker.port, "cell-1", {"real": samples["real"]}, "--batch", "100", "--qos", "1")
        wait_for(lambda: daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream="real") == 20_000,
                 20, "telemetry after the broker restart")  # fmt: skip
    finally:
        sub.close()
        daemon.stop()


def test_bad_input_is_counted_and_never_fatal(broker: Mosquitto, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, daemon_config(broker.port, tmp_path))
    daemon.wait_connected()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    bad = [
        ("dtsync/cell-1/real", b"not json", "invalid_json"),
        ("dtsync/cell-1/real", b'{"s": 1, "a": 0, "r": 1e999, "s_next": 2}', "non_finite"),
        ("dtsync/cell-1/real", b'{"s": 1, "a": 0, "s_next": 2}', "missing_field"),
        ("dtsync/cell-1/real", b'{"s": true, "a": 0, "r": 1, "s_next": 2}', "wrong_type"),
        ("dtsync/cell-1/real", b"[]", "empty_batch"),
        ("dtsync/cell-1/real", b'{"s": [1.5], "a": 0, "r": 1, "s_next": [2.5]}', "no_encoder"),
        ("dtsync/cell-1/real", b" " * 2_000_000, "oversized"),
        ("dtsync/cell-1/twin/nobody", b'{"s": 1, "a": 0, "r": 1, "s_next": 2}', "unknown_stream"),
    ]
    try:
        for topic, payload, _ in bad:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        client.publish("dtsync/cell-1/real", b'[{"s": 1, "a": 0, "r": 1, "s_next": 2}, {"s": 1}]', qos=1)
        for _, _, reason in bad:
            wait_for(lambda reason=reason: daemon.metric("dtsync_rejected_total", reason=reason), 10, reason)
        wait_for(lambda: daemon.metric("dtsync_rejected_total", reason="missing_field") == 2, 10, "batch item")
        wait_for(lambda: daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream="real") == 1, 5,
                 "the good item of the batch")  # fmt: skip
        daemon.alive_or_raise()
        log = daemon.log.read_text()
        assert log.count('"reason": "invalid_json"') == 1  # logged once per reason, not per message
    finally:
        client.loop_stop()
        client.disconnect()
        daemon.stop()


def test_sighup_reloads_thresholds_and_twins_without_dropping_windows(
    broker: Mosquitto, samples: dict[str, Path], tmp_path: Path
) -> None:
    config = daemon_config(broker.port, tmp_path)
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected()
        head = {n: tmp_path / f"{n}.jsonl" for n in ("real", "faithful", "drifting")}
        for name, path in head.items():
            path.write_text("".join(samples[name].read_text().splitlines(keepends=True)[:1000]))
        publish_cli(broker.port, "cell-1", head, "--batch", "100", "--qos", "1")
        wait_for(lambda: daemon.metric("dtsync_window_samples", cell="cell-1", twin="faithful", window="real"),
                 20, "a first evaluation")  # fmt: skip
        assert daemon.metric("dtsync_threshold", cell="cell-1", twin="faithful") == 0.5
        config["cells"]["cell-1"]["twins"] = {"faithful": {"trigger": {"threshold": 0.9}}, "extra": {}}
        daemon.write_config(config)
        daemon.signal(signal.SIGHUP)
        publish_cli(broker.port, "cell-1", {"real": head["real"], "faithful": head["faithful"]}, "--batch", "100",
                    "--qos", "1")  # fmt: skip
        wait_for(lambda: daemon.metric("dtsync_threshold", cell="cell-1", twin="faithful") == 0.9, 20, "reload")
        wait_for(lambda: daemon.metric("dtsync_window_samples", cell="cell-1", twin="faithful", window="real")
                 == 2000, 20, "windows kept across the reload")  # fmt: skip
        assert daemon.metric("dtsync_mismatch", cell="cell-1", twin="drifting") is None  # removed twin forgotten
        # ... stream series included, so its staleness alert cannot fire forever
        assert daemon.metric("dtsync_last_transition_timestamp_seconds", cell="cell-1", stream="drifting") is None
        assert daemon.metric("dtsync_last_transition_timestamp_seconds", cell="cell-1", stream="extra") is not None
        daemon.write_config({**config, "window": {"count": "many"}})
        daemon.signal(signal.SIGHUP)  # an invalid file keeps the running config
        time.sleep(0.5)
        daemon.alive_or_raise()
        assert "reload failed" in daemon.log.read_text()
    finally:
        daemon.stop()


def test_mqtt_311_mode_and_systemd_notify(broker: Mosquitto, samples: dict[str, Path], tmp_path: Path) -> None:
    """On MQTT 3.1.1 events carry no expiry property but the same deadline in `expires_at`; under systemd the
    daemon says READY=1 once subscribed, pings the watchdog and says STOPPING=1."""
    import socket

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    config = daemon_config(broker.port, tmp_path, mqtt={"protocol": "3.1.1"})
    sub = Subscriber(broker.port, ["dtsync/+/twin/+/resync"], protocol=paho.MQTTv311)
    daemon = DaemonProcess(tmp_path, config, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"})
    try:
        seen: list[str] = []
        while "READY=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        assert daemon.metric("dtsync_mqtt_connected") == 1
        while "WATCHDOG=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
        publish_cli(broker.port, "cell-1", {"real": samples["real"], "drifting": samples["drifting"]},
                    "--batch", "50", "--qos", "1")  # fmt: skip
        wait_for(lambda: sub.on("/resync"), 60, "a resync event")
        event = json.loads(sub.on("/resync")[0].payload)
        assert sub.on("/resync")[0].expiry is None and event["expires_at"] > event["time"]
        assert daemon.stop() == 0
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().splitlines()
    finally:
        sub.close()
        sock.close()
        daemon.stop()
