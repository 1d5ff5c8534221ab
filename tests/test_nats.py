"""The daemon on NATS: Debian's nats-server with its MQTT gateway (MQTT 3.1.1, needs JetStream and a server name)
on free loopback ports, driven by the real `dtsync run`, `dtsync publish` and a paho subscriber.

Also pins down the differences from Mosquitto that deploy/nats/README.md documents, so the documentation fails
here if a nats-server upgrade changes them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from mqtt_harness import DaemonProcess, Subscriber, daemon_config, free_port, publish_cli, wait_for
from test_deploy_mosquitto import make_certificates

from dtsync.offline.sample import write_samples

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "nats"
PASSWORDS = {"dtsync": "daemon-secret", "cell-1": "cell-1-secret", "controller": "controller-secret"}


def nats_binary() -> str:
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK)
                                            else None)  # fmt: skip
    if found is None:
        raise RuntimeError("nats-server is not installed: apt-get install nats-server (.ci/system-deps does this)")
    return found


class NatsServer:
    """A private nats-server: MQTT on `port`, NATS clients on another free port, JetStream in `workdir`."""

    def __init__(self, workdir: Path, extra: str = "") -> None:
        self.port = free_port()
        self.conf = workdir / "nats.conf"
        store = workdir / "jetstream"
        self.conf.write_text(
            f"server_name: dtsync-test\nlisten: 127.0.0.1:{free_port()}\n"
            f'jetstream {{ store_dir: "{store}" }}\nmqtt {{ listen: 127.0.0.1:{self.port} }}\n{extra}'
        )
        self.log = workdir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([nats_binary(), "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for(self._accepts, 15, f"nats-server MQTT on port {self.port}")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited:\n{self.log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def nats(tmp_path: Path) -> Any:
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"), seed=7)


def nats_config(port: int, workdir: Path) -> dict[str, Any]:
    config = daemon_config(port, workdir)
    config["mqtt"]["protocol"] = "3.1.1"  # nats-server speaks MQTT 3.1.1 only
    return config


def retained(port: int, topic: str, seconds: float = 1.5) -> list[tuple[str, bytes]]:
    """What a fresh subscriber receives as retained on `topic` (a filter) within `seconds`."""
    got: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            with lock:
                got.append((msg.topic, bytes(msg.payload)))

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic, 1)
    time.sleep(seconds)
    client.loop_stop()
    client.disconnect()
    with lock:
        return list(got)


def test_daemon_on_nats_raises_the_event_keeps_retained_status_and_liveness(
    nats: NatsServer, samples: dict[str, Path], tmp_path: Path
) -> None:
    sub = Subscriber(nats.port, ["dtsync/#"], protocol=paho.MQTTv311)
    daemon = DaemonProcess(tmp_path, nats_config(nats.port, tmp_path))
    try:
        daemon.wait_connected()
        streams = {name: samples[name] for name in ("real", "faithful", "drifting")}
        out = publish_cli(nats.port, "cell-1", streams, "--config", str(daemon.config_path), "--batch", "20",
                          "--qos", "1")  # fmt: skip
        assert "published 60000 transitions" in out
        wait_for(lambda: daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream="drifting")
                 == 20_000, 60, "all transitions to arrive")  # fmt: skip
        last_t = (20_000 - 1) * 0.01
        wait_for(lambda: {s["twin"] for s in sub.statuses() if s.get("t", 0) >= last_t} == {"faithful", "drifting"},
                 30, "evaluations of the whole trace")  # fmt: skip
        events = sub.on("/resync")
        assert [m.topic for m in events] == ["dtsync/cell-1/twin/drifting/resync"]
        event = json.loads(events[0].payload)
        assert event["twin"] == "drifting" and event["t"] > 100.0 and event["event_id"]
        assert event["expires_at"] > event["time"]  # no MQTT v5 expiry on 3.1.1: consumers check this field
        assert events[0].expiry is None and not events[0].retain
        # A subscriber arriving now is handed each twin's current status and the daemon's liveness, retained.
        late = dict(retained(nats.port, "dtsync/#"))
        assert late["dtsync/_daemon/test/status"] == b"online"
        states = {t: json.loads(p)["state"] for t, p in late.items() if t.endswith("/status") and "/twin/" in t}
        assert states == {"dtsync/cell-1/twin/faithful/status": "ok", "dtsync/cell-1/twin/drifting/status": "drifted"}
    finally:
        sub.close()
        assert daemon.stop() == 0
    assert dict(retained(nats.port, "dtsync/_daemon/#"))["dtsync/_daemon/test/status"] == b"offline"  # clean stop


def test_last_will_says_offline_when_the_daemon_is_killed(nats: NatsServer, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, nats_config(nats.port, tmp_path))
    try:
        daemon.wait_connected()
        assert dict(retained(nats.port, "dtsync/_daemon/#"))["dtsync/_daemon/test/status"] == b"online"
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait(10)
        wait_for(lambda: dict(retained(nats.port, "dtsync/_daemon/#", 0.5)).get("dtsync/_daemon/test/status")
                 == b"offline", 20, "the will")  # fmt: skip
    finally:
        daemon.stop()


def test_publish_on_the_default_protocol_is_refused_at_once_with_the_reason(nats: NatsServer) -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "dtsync.cli", "publish", "--cell", "c", "--real",
                          str(ROOT / "tests" / "conftest.py"), "--host", "127.0.0.1", "--port", str(nats.port)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "refused" in out.stderr and "protocol" in out.stderr.lower(), out.stderr
    assert time.monotonic() - started < 8.0  # not the 10 s connect timeout: the CONNACK said no


def test_what_differs_from_mosquitto(nats: NatsServer) -> None:
    """QoS 2 publishes close the connection, QoS 2 subscriptions are granted QoS 1, MQTT v5 is refused; retained
    messages behave as the spec says (one per topic, an empty one deletes)."""
    granted: list[int] = []
    ready = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    sub.on_subscribe = lambda c, u, mid, codes, props: (granted.extend(int(r.value) for r in codes), ready.set())
    sub.connect("127.0.0.1", nats.port)
    sub.loop_start()
    sub.subscribe("probe/#", 2)
    assert ready.wait(10) and granted == [1]
    sub.loop_stop()
    sub.disconnect()

    dropped = threading.Event()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    pub.on_disconnect = lambda *a: dropped.set()
    pub.connect("127.0.0.1", nats.port)
    pub.loop_start()
    for topic, payload in (("probe/a", b"1"), ("probe/a", b"2"), ("probe/b", b"x"), ("probe/b", b"")):
        pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    pub.publish("probe/q2", b"2", qos=2)
    assert dropped.wait(10)  # the server closed the connection
    pub.loop_stop()
    assert "QoS=2 not supported" in nats.log.read_text()
    assert retained(nats.port, "probe/#") == [("probe/a", b"2")]

    refused: list[str] = []
    v5 = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    v5.on_connect = lambda c, u, f, rc, p: refused.append(str(rc))
    v5.connect("127.0.0.1", nats.port)
    v5.loop_start()
    wait_for(lambda: refused, 10, "the CONNACK")
    v5.loop_stop()
    assert refused == ["Unsupported protocol version"]


def deploy_server(workdir: Path) -> NatsServer:
    """deploy/nats/ as shipped, with only paths and ports rewritten and the passwords set; a test CA's certificate."""
    make_certificates(workdir)
    server = NatsServer(workdir)
    conf = (DEPLOY / "dtsync.conf").read_text()
    for old, new in (('"/var/lib/nats"', f'"{workdir}/jetstream"'), ("/etc/nats/certs/", f"{workdir}/"),
                     ("0.0.0.0:8883", f"127.0.0.1:{server.port}"), ("127.0.0.1:4222", f"127.0.0.1:{free_port()}"),
                     ("127.0.0.1:8222", f"127.0.0.1:{free_port()}")):  # fmt: skip
        assert old in conf, old
        conf = conf.replace(old, new)
    server.conf.write_text(conf)
    users = (DEPLOY / "dtsync-users.conf").read_text()
    for user, password in PASSWORDS.items():
        assert f'"CHANGE-ME-{user}"' in users, user
        users = users.replace(f'"CHANGE-ME-{user}"', f'"{password}"')
        (workdir / f"{user}.password").write_text(password + "\n")
    (workdir / "nats").mkdir()
    (workdir / "nats" / "dtsync-users.conf").write_text(users)  # the include is relative to the config's directory
    return server


def tls_client(port: int, workdir: Path, user: str, password: str) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"test-{user}", protocol=paho.MQTTv311)
    client.username_pw_set(user, password)
    client.tls_set(ca_certs=str(workdir / "ca.crt"))
    return client


def test_deploy_config_serves_the_daemon_with_tls_users_and_permissions(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    server = deploy_server(tmp_path)
    server.start()
    tls = {"tls": {"ca_file": str(tmp_path / "ca.crt")}, "protocol": "3.1.1", "host": "127.0.0.1", "port": server.port,
           "reconnect_min_seconds": 0.1, "reconnect_max_seconds": 0.5}  # fmt: skip
    config = daemon_config(server.port, tmp_path, cells={"cell-1": {"twins": {"faithful": {}, "drifting": {}}},
                                                         "cell-2": {"twins": {"faithful": {}}}})  # fmt: skip
    config["mqtt"] = {**tls, "username": "dtsync", "password_file": str(tmp_path / "dtsync.password")}
    producer = tmp_path / "producer.yaml"
    producer.write_text(json.dumps({"mqtt": {**tls, "username": "cell-1",
                                             "password_file": str(tmp_path / "cell-1.password")}}))  # fmt: skip
    granted: list[int] = []
    received: list[tuple[str, bytes]] = []
    subscribed = threading.Event()
    controller = tls_client(server.port, tmp_path, "controller", PASSWORDS["controller"])
    controller.on_message = lambda c, u, m: received.append((m.topic, bytes(m.payload)))
    controller.on_subscribe = lambda c, u, mid, rcs, p: (granted.extend(int(r.value) for r in rcs), subscribed.set())
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected()
        controller.connect("127.0.0.1", server.port)
        controller.loop_start()
        controller.subscribe([("dtsync/+/twin/+/resync", 1), ("dtsync/+/twin/+/status", 1), ("dtsync/+/real", 1)])
        assert subscribed.wait(10)
        assert granted == [1, 1, 0x80]  # a controller may not read telemetry
        streams = {name: samples[name] for name in ("real", "faithful", "drifting")}
        publish_cli(server.port, "cell-1", streams, "--config", str(producer), "--batch", "50", "--qos", "1")
        # cell-1's producer may not write cell-2's streams: the server drops it (and logs a violation).
        publish_cli(server.port, "cell-2", {"real": samples["real"]}, "--config", str(producer), "--batch", "500")
        wait_for(lambda: any(t.endswith("/drifting/resync") for t, _ in received), 90, "the resync event")
        assert not any(t.endswith("/real") for t, _ in received)
        assert daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream="real") == 20_000
        assert daemon.metric("dtsync_transitions_received_total", cell="cell-2", stream="real") == 0
        assert 'Publish Violation - User "cell-1", Subject "dtsync.cell-2.real"' in server.log.read_text()
        wrong = tls_client(server.port, tmp_path, "controller", "wrong")
        codes: list[str] = []
        wrong.on_connect = lambda c, u, f, rc, p: codes.append(str(rc))
        wrong.connect("127.0.0.1", server.port)
        wrong.loop_start()
        wait_for(lambda: codes, 10, "the CONNACK")
        wrong.loop_stop()
        assert codes == ["Not authorized"]
    finally:
        controller.loop_stop()
        assert daemon.stop() == 0
        server.stop()
