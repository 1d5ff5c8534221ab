"""deploy/controller_example.py: its de-duplication and expiry rules, and the script against a real broker."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import paho.mqtt.client as paho
from mqtt_harness import Mosquitto, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_deploy_prometheus import DEPLOY

SCRIPT = DEPLOY / "controller_example.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("controller_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["controller_example"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ctl = load_example()
NOW = 1_800_000_000.0


def event(event_id: str, expires_at: float = NOW + 300, **extra: object) -> bytes:
    return json.dumps({"event_id": event_id, "expires_at": expires_at, "cell": "cell-1", "twin": "t", **extra}).encode()


def test_a_second_copy_of_an_event_is_a_duplicate() -> None:
    f = ctl.EventFilter()
    assert f.check(event("a"), now=NOW).reason == "new"
    assert f.check(event("a"), now=NOW + 1).reason == "duplicate"
    assert f.check(event("b"), now=NOW + 1).accept
    assert not f.check(event("b"), now=NOW + 2, expiry_interval=100).accept


def test_expiry_by_payload_deadline_and_by_mqtt_message_expiry() -> None:
    f = ctl.EventFilter()
    assert f.check(event("late", expires_at=NOW - 0.001), now=NOW).reason == "expired"
    assert f.check(event("edge", expires_at=NOW), now=NOW).reason == "expired"
    # v5: the broker said 5 s were left when it handed the message over, 6 s ago (a slow local queue)
    held = f.check(event("held"), now=NOW, received_at=NOW - 6, expiry_interval=5)
    assert held.reason == "expired" and held.event["event_id"] == "held"
    assert f.check(event("fresh"), now=NOW, received_at=NOW - 4, expiry_interval=5).reason == "new"
    # an expired event is not remembered, so it never shadows anything
    assert "late" not in f.seen and "held" not in f.seen


def test_invalid_payloads_are_refused_not_fatal() -> None:
    f = ctl.EventFilter()
    assert f.check(b"not json", now=NOW).reason == "invalid: not JSON"
    assert f.check(b"\xff\xfe", now=NOW).reason == "invalid: not JSON"
    assert f.check(b"[1]", now=NOW).reason == "invalid: no event_id"
    assert f.check(b'{"event_id": 3, "expires_at": 1}', now=NOW).reason == "invalid: no event_id"
    assert f.check(b'{"event_id": "x"}', now=NOW).reason == "invalid: no expires_at"
    assert f.check(b'{"event_id": "x", "expires_at": true}', now=NOW).reason == "invalid: no expires_at"


def test_memory_is_bounded_by_deadlines_and_by_max_ids() -> None:
    f = ctl.EventFilter(max_ids=3)
    for i in range(5):
        assert f.check(event(f"e{i}", expires_at=NOW + 10 + i), now=NOW).accept
    assert list(f.seen) == ["e2", "e3", "e4"]  # the oldest forgotten first
    assert f.check(event("later"), now=NOW + 13).accept  # e2 (NOW+12) and e3 (NOW+13) have expired
    assert list(f.seen) == ["e4", "later"]
    # a forgotten id comes back only after its deadline, when it is rejected as expired anyway
    assert f.check(event("e2", expires_at=NOW + 12), now=NOW + 13).reason == "expired"


def _publish(port: int, messages: list[tuple[str, bytes, int | None]]) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    for topic, payload, expiry in messages:
        props = None
        if expiry is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
        client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _controller(port: int, tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
    err = tmp_path / f"{name}.log"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cell",
        "cell-1",
        "--client-id",
        "ctl-test",
        *args,
    ]
    with err.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    wait_for(lambda: '"connected"' in err.read_text() or proc.poll() is not None, 20, "the controller to connect")
    time.sleep(0.3)  # its SUBSCRIBE follows the CONNACK
    return proc, err


def test_script_acts_once_per_fresh_event_across_a_restart(broker: Mosquitto, tmp_path: Path) -> None:
    """The controller's persistent session keeps events raised while it is down; the broker drops the one whose
    MQTT expiry passed meanwhile; duplicates and past-deadline events are logged and skipped."""
    topic = "dtsync/cell-1/twin/t/resync"
    first, _ = _controller(broker.port, tmp_path, "first")
    first.send_signal(signal.SIGTERM)  # subscribed once: the broker now keeps its session
    assert first.wait(10) == 0
    now = time.time()
    _publish(
        broker.port,
        [
            (topic, event("kept", expires_at=now + 300), 300),
            (topic, event("gone", expires_at=now + 300), 1),  # its message expiry passes while the controller is down
            ("dtsync/cell-2/twin/t/resync", event("other-cell", expires_at=now + 300), 300),
        ],
    )
    time.sleep(2.2)
    second, err = _controller(broker.port, tmp_path, "second", "--exit-after", "2")
    _publish(
        broker.port,
        [
            (topic, event("kept", expires_at=now + 300), 300),  # re-sent, as after a daemon restart
            (topic, event("stale", expires_at=now - 1), 300),
            (topic, b"garbage", None),
            (topic, event("fresh", expires_at=now + 300), 300),
        ],
    )
    out, _ = second.communicate(timeout=20)
    assert second.returncode == 0
    actions = [json.loads(line) for line in out.splitlines()]
    assert [(a["action"], a["event_id"], a["cell"]) for a in actions] == [
        ("resync", "kept", "cell-1"),
        ("resync", "fresh", "cell-1"),
    ]
    logs = [json.loads(line) for line in err.read_text().splitlines()]
    ignored = {(entry["reason"], entry.get("event_id")) for entry in logs if entry["log"] == "event ignored"}
    assert ignored == {("duplicate", "kept"), ("expired", "stale"), ("invalid: not JSON", None)}
    assert [entry["session_present"] for entry in logs if entry["log"] == "connected"] == [True]


def test_testbed_controller_refits_only_its_own_twins_and_acks_with_the_new_version() -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)  # never connected: nothing is sent
    twins = ctl.TestbedTwins(client, "dtsync", "cell-1", ["t"], rate=1000, fit_steps=30000, seed=0, start=NOW,
                             stale_after=10.0, stale_preset="misestimated-channel")  # fmt: skip
    assert twins.streams["t"][0] == "v0"
    raised = json.loads(event("e1"))
    assert twins.resync({**raised, "twin": "other"}) is None and twins.resync({**raised, "cell": "cell-2"}) is None
    before = time.time()
    assert twins.resync(raised) == "v1" and twins.resync(raised) == "v2"
    version, _, first = twins.streams["t"]
    assert version == "v2" and first.t >= before  # restarted now, from the refitted parameters
    ack = json.loads(ctl.ack_payload(raised, "v2", NOW))
    assert ack == {"event_id": "e1", "twin_version": "v2", "time": NOW}
