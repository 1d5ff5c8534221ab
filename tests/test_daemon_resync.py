"""Closing the loop live: a real Mosquitto, the real `dtsync run`, acknowledgements on `.../resynced`.

The streams are a 3-state chain (action a moves s to s + a mod 3, reward 1 in state 0); the drifted twin swaps
the two actions' effects. Transitions are deterministic, so the drifted twin's mismatch is far above the
threshold and a faithful one's is exactly 0 whatever the window: the tests' outcomes do not hang on noise.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from mqtt_harness import DaemonProcess, Mosquitto, Subscriber, daemon_config, wait_for

from dtsync.contract import Transition, encode_batch

TWIN = "drifting"
PREFIX = "dtsync/cell-1"


class Producer:
    """Publishes the real stream and the twin's, in alternating batches, with a continuous time base."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.rng = random.Random(1)
        self.t = 1000.0

    def stream(self, n: int, *, flip: bool, v: str | None) -> None:
        for _ in range(n // 100):
            for topic, flipped, version in ((f"{PREFIX}/real", False, None), (f"{PREFIX}/twin/{TWIN}", flip, v)):
                batch = []
                for _ in range(100):
                    s, a = self.rng.randrange(3), self.rng.randrange(2)
                    sn = (s + (1 - a if flipped else a)) % 3
                    self.t += 0.001
                    batch.append(Transition(s, a, float(s == 0), sn, t=round(self.t, 6), v=version))
                self.client.publish(topic, encode_batch(batch), qos=1).wait_for_publish(10)

    def ack(self, payload: Any, twin: str = TWIN) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"{PREFIX}/twin/{twin}/resynced", body, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _config(broker: Mosquitto, workdir: Path) -> dict[str, Any]:
    return daemon_config(broker.port, workdir, schedule={"every_transitions": 500, "every_seconds": 1.0})


def _statuses(sub: Subscriber) -> list[dict[str, Any]]:
    return [s for s in sub.statuses() if s["twin"] == TWIN]


def _drift_until_event(producer: Producer, sub: Subscriber) -> dict[str, Any]:
    producer.stream(3000, flip=True, v="1")
    wait_for(lambda: sub.on(f"/{TWIN}/resync"), 60, "the resync event")
    return json.loads(sub.on(f"/{TWIN}/resync")[0].payload)


def test_ack_resets_the_window_and_the_twin_is_ok_on_fresh_data_even_after_a_restart(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = _config(broker, tmp_path)
    sub = Subscriber(broker.port, ["dtsync/#"])
    producer = Producer(broker.port)
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected(90)
        event = _drift_until_event(producer, sub)
        assert event["twin"] == TWIN and event["version"] == "1"
        assert daemon.stop() == 0  # the ack arrives after a restart: the daemon still knows the event it raised
        daemon = DaemonProcess(tmp_path, config)
        daemon.wait_connected(90)
        seen = len(_statuses(sub))
        producer.ack({"event_id": event["event_id"], "twin_version": "2", "time": time.time()})
        labels = {"cell": "cell-1", "twin": TWIN}
        wait_for(lambda: daemon.metric("dtsync_resync_latency_seconds_count", **labels) == 1, 20, "the ack")
        assert daemon.metric("dtsync_twin_version_info", **labels, version="2") == 1
        assert daemon.metric("dtsync_twin_version_info", **labels, version="1") is None  # one series per twin
        assert daemon.metric("dtsync_resync_unanswered_since_timestamp_seconds", **labels) == 0
        producer.stream(3000, flip=False, v="2")  # the resynchronised twin behaves like the real network
        wait_for(lambda: [s for s in _statuses(sub)[seen:] if s["state"] == "ok"], 60, "the twin back to ok")
        after = _statuses(sub)[seen:]
        states = [s["state"] for s in after]
        first_ok = states.index("ok")
        assert "resyncing" in states[:first_ok] and "drifted" not in states[states.index("resyncing") :]
        fresh = next(s for s in after if s["state"] == "resyncing" and s["samples_twin"] > 0)
        assert fresh["samples_twin"] < 2000 < 3000 <= fresh["samples_real"]  # the window started afresh (min_samples)
        done = after[first_ok]
        r = done["resync"]
        assert done["resynced"] and done["version"] == "2" and r["cause"] == "ack"
        assert r["event_id"] == event["event_id"] and r["latency_seconds"] > 0
        assert r["mismatch_before"] > 0.5 > r["mismatch_after"]
        assert daemon.metric("dtsync_resync_mismatch_after", **labels) == r["mismatch_after"]
        assert daemon.metric("dtsync_resync_mismatch_before", **labels) == r["mismatch_before"]
        assert daemon.metric("dtsync_resyncs_total", **labels, cause="ack") == 1
        assert len(sub.on(f"/{TWIN}/resync")) == 1  # no second event
    finally:
        producer.close()
        sub.close()
        assert daemon.stop() == 0


def test_version_change_without_ack_starts_a_fresh_window(broker: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, ["dtsync/#"])
    producer = Producer(broker.port)
    daemon = DaemonProcess(tmp_path, _config(broker, tmp_path))
    labels = {"cell": "cell-1", "twin": TWIN}
    try:
        daemon.wait_connected(90)
        _drift_until_event(producer, sub)
        assert daemon.metric("dtsync_resync_unanswered_since_timestamp_seconds", **labels) > 0
        seen = len(_statuses(sub))
        producer.stream(3000, flip=False, v="2")  # resynchronised by a controller that never acks
        wait_for(lambda: [s for s in _statuses(sub)[seen:] if s["state"] == "ok"], 60, "the twin back to ok")
        states = [s["state"] for s in _statuses(sub)[seen:]]
        assert "resyncing" in states[: states.index("ok")]
        done = next(s for s in _statuses(sub)[seen:] if s["state"] == "ok")
        assert done["resync"]["cause"] == "version" and done["resync"]["event_id"] is None
        assert done["resync"]["mismatch_before"] > 0.5 > done["resync"]["mismatch_after"]
        assert daemon.metric("dtsync_resyncs_total", **labels, cause="version") == 1
        assert daemon.metric("dtsync_resync_latency_seconds_count", **labels) == 0
        # the version change answered the event: the no-ack alert's series is back to 0
        assert daemon.metric("dtsync_resync_unanswered_since_timestamp_seconds", **labels) == 0
    finally:
        producer.close()
        sub.close()
        assert daemon.stop() == 0


def test_bad_acks_are_rejected_counted_and_change_nothing(broker: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, ["dtsync/#"])
    producer = Producer(broker.port)
    daemon = DaemonProcess(tmp_path, _config(broker, tmp_path))

    def rejected(reason: str) -> float | None:
        return daemon.metric("dtsync_rejected_total", reason=reason)

    try:
        daemon.wait_connected(90)
        event = _drift_until_event(producer, sub)
        good = {"event_id": event["event_id"], "twin_version": "2", "time": time.time()}
        for reason in ("ack_invalid", "ack_unknown_twin", "ack_unknown_event", "ack_duplicate"):
            assert rejected(reason) == 0  # declared at start
        producer.ack(b"not json")
        producer.ack({"event_id": event["event_id"]})  # no twin_version
        producer.ack({**good, "twin_version": 2})
        producer.ack(good, twin="undeclared")
        producer.ack(good, twin="faithful")  # an event of another twin
        producer.ack({**good, "event_id": "not-an-event-of-ours"})
        wait_for(lambda: rejected("ack_unknown_event") == 2, 20, "the unknown events counted")
        assert rejected("ack_invalid") == 3 and rejected("ack_unknown_twin") == 1
        assert daemon.metric("dtsync_resync_latency_seconds_count", cell="cell-1", twin=TWIN) == 0
        producer.stream(600, flip=True, v="1")  # still the old model: the window was not dropped, still drifted
        wait_for(lambda: (_statuses(sub)[-1]["samples_twin"] == 3600), 30, "an evaluation of the whole window")
        assert _statuses(sub)[-1]["state"] == "drifted"
        producer.ack(good)
        producer.ack(good)  # QoS 1 may deliver twice: the second is a duplicate, not a second resync
        wait_for(lambda: rejected("ack_duplicate") == 1, 20, "the duplicate counted")
        assert daemon.metric("dtsync_resync_latency_seconds_count", cell="cell-1", twin=TWIN) == 1
        log = daemon.log.read_text()
        assert "resync acknowledgement rejected" in log and "ack_unknown_event" in log
    finally:
        producer.close()
        sub.close()
        assert daemon.stop() == 0
