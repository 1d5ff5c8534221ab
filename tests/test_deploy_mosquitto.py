"""deploy/mosquitto: the production broker config, run by the real Mosquitto with a test CA and password file.

The shipped dtsync.conf and dtsync.acl are copied with only the paths, the port and the run-as user rewritten.
Certificates come from a throw-away CA made with the `openssl` CLI, passwords from `mosquitto_passwd -b`. The
daemon connects with username, password_file and tls.ca_file; a producer publishes a drifting trace with paho
over TLS; a controller receives the resync event and statuses and never the telemetry; every user is refused
what the ACL does not grant (MQTT v5 PUBACK "Not authorized", 0x87). A last test shows why max_queued_messages
is raised: with Mosquitto's default a momentarily slow QoS 1 subscriber loses messages, with the shipped value not.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from mqtt_harness import DaemonProcess, daemon_config, free_port, mosquitto_binary, wait_for
from test_deploy_prometheus import DEPLOY

from dtsync.contract import encode_transition
from dtsync.offline.replay import merged
from dtsync.offline.sample import write_samples

CONF = DEPLOY / "mosquitto" / "dtsync.conf"
ACL = DEPLOY / "mosquitto" / "dtsync.acl"
PASSWORDS = {
    "dtsync": "daemon-secret",
    "cell-1": "cell-1-secret",
    "cell-2": "cell-2-secret",
    "controller": "controller-secret",
}
NOT_AUTHORIZED = 0x87


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: apt-get install {package}")
    return found


def make_certificates(workdir: Path) -> None:
    """A test CA (ca.crt) and a server certificate for 127.0.0.1/localhost signed by it, with the openssl CLI."""
    openssl = tool("openssl", "openssl")

    def run(*args: str) -> None:
        out = subprocess.run([openssl, *args], cwd=workdir, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=dtsync test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (workdir / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    )


def make_password_file(path: Path, passwords: dict[str, str]) -> None:
    mosquitto_passwd = tool("mosquitto_passwd", "mosquitto")
    for i, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if i == 0 else []
        out = subprocess.run(
            [mosquitto_passwd, *create, "-b", str(path), user, password], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
    assert all(line.split(":")[1].startswith("$7$") for line in path.read_text().splitlines())  # hashed


def production_copy(text: str, workdir: Path, port: int) -> str:
    """The shipped broker config with paths under workdir, a loopback port and the current user."""
    rewrites = {
        "listener 8883\n": f"listener {port} 127.0.0.1\n",
        "/etc/mosquitto/certs/": f"{workdir}/",
        "/etc/mosquitto/dtsync.passwd": f"{workdir}/dtsync.passwd",
        "/etc/mosquitto/dtsync.acl": f"{workdir}/dtsync.acl",
    }
    for old, new in rewrites.items():
        assert old in text, f"{old.strip()} not in {CONF}"
        text = text.replace(old, new)
    # Run as whoever runs the tests (as root, Mosquitto would switch to user "mosquitto", who cannot read the
    # test's 0600 key and passwords in a 0700 temporary directory; a non-root user keeps itself anyway).
    return text + f"\nuser {getpass.getuser()}\n"


class Broker:
    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(config)
        self.log = workdir / "mosquitto.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=log)

    def wait_listening(self, port: int) -> None:
        def accepts() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited:\n{self.log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(accepts, 10, f"mosquitto on port {port}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Client:
    """A paho MQTT v5 client recording CONNACK, PUBACK reason codes and received messages."""

    port: int
    user: str | None
    ca: Path | None
    password: str | None = None
    connack: Any = None
    pubacks: dict[int, int] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, client_id=f"test-{self.user}-{time.monotonic_ns()}"
        )
        if self.ca is not None:
            self.client.tls_set(ca_certs=str(self.ca))
        if self.user is not None:
            self.client.username_pw_set(self.user, self.password or PASSWORDS[self.user])
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._connected.wait(10), "no CONNACK"

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self.pubacks[mid] = reason.value

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def subscribe(self, topic_filter: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self._subscribed.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.pubacks, 10, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def received(self, suffix: str = "") -> list[tuple[str, bytes]]:
        with self._lock:
            return [m for m in self.messages if m[0].endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Secure:
    workdir: Path
    port: int
    ca: Path
    broker: Broker
    daemon: DaemonProcess
    controller: Client
    samples: dict[str, Path]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    workdir = tmp_path_factory.mktemp("mosquitto")
    make_certificates(workdir)
    make_password_file(workdir / "dtsync.passwd", PASSWORDS)
    shutil.copy(ACL, workdir / "dtsync.acl")
    port = free_port()
    broker = Broker(workdir, production_copy(CONF.read_text(), workdir, port))
    daemon = controller = None
    try:
        broker.wait_listening(port)
        (workdir / "daemon-password").write_text(PASSWORDS["dtsync"] + "\n")
        mqtt = {
            "host": "127.0.0.1",
            "port": port,
            "username": "dtsync",
            "password_file": str(workdir / "daemon-password"),
            "tls": {"ca_file": str(workdir / "ca.crt")},
        }
        config = daemon_config(port, workdir, mqtt=mqtt)
        config["cells"]["cell-2"] = {"twins": {"faithful": {}}}
        controller = Client(port, "controller", workdir / "ca.crt")
        controller.subscribe("dtsync/#")  # granted, but the ACL filters what it may read
        daemon = DaemonProcess(workdir, config)
        daemon.wait_connected(90)
        yield Secure(
            workdir, port, workdir / "ca.crt", broker, daemon, controller, write_samples(workdir / "samples", seed=7)
        )
    finally:
        if controller is not None:
            controller.close()
        if daemon is not None:
            daemon.stop()
        broker.stop()


def publish_trace(producer: Client, cell: str, samples: dict[str, Path], batch: int = 100) -> None:
    """All transitions of the sample streams, in trace order, in JSON-array batches per stream."""
    topics = {
        "real": f"dtsync/{cell}/real",
        "faithful": f"dtsync/{cell}/twin/faithful",
        "drifting": f"dtsync/{cell}/twin/drifting",
    }
    pending: dict[str, list[bytes]] = {}
    infos = []

    def flush(stream: str) -> None:
        payload = b"[" + b",".join(pending.pop(stream)) + b"]"
        infos.append(producer.client.publish(topics[stream], payload, qos=1))

    for _, stream, item in merged(samples):
        pending.setdefault(stream, []).append(encode_transition(item))
        if len(pending[stream]) == batch:
            flush(stream)
    for stream in list(pending):
        flush(stream)
    wait_for(lambda: all(i.mid in producer.pubacks for i in infos), 30, "PUBACKs of the trace")
    assert {producer.pubacks[i.mid] for i in infos} <= {0, 0x10}  # success / no matching subscribers


def test_shipped_config_is_tls_only_authenticated_with_tuned_queues() -> None:
    lines = [ln.split("#")[0].split() for ln in CONF.read_text().splitlines()]
    settings = {ln[0]: ln[1:] for ln in lines if ln}
    assert settings["listener"] == ["8883"] and [ln[0] for ln in lines if ln].count("listener") == 1
    assert settings["allow_anonymous"] == ["false"]
    assert {"certfile", "keyfile", "password_file", "acl_file"} <= set(settings)
    assert int(settings["max_queued_messages"][0]) >= 10 * 1000  # the default is 1000
    assert int(settings["max_queued_bytes"][0]) > 0  # bounded memory per client


def test_daemon_works_through_tls_passwords_and_acl(secure: Secure) -> None:
    producer = Client(secure.port, "cell-1", secure.ca)
    try:
        publish_trace(producer, "cell-1", secure.samples)
    finally:
        producer.close()
    daemon = secure.daemon
    for stream in ("real", "faithful", "drifting"):
        wait_for(
            lambda stream=stream: (
                daemon.metric("dtsync_transitions_received_total", cell="cell-1", stream=stream) == 20_000
            ),
            30,
            f"the {stream} stream",
        )
    ctl = secure.controller
    wait_for(lambda: ctl.received("/drifting/resync"), 30, "the resync event at the controller")
    (event,) = [json.loads(p) for _, p in ctl.received("/resync")]
    assert event["cell"] == "cell-1" and event["twin"] == "drifting" and event["instance"] == "test"
    assert daemon.metric("dtsync_outbox_pending") == 0
    statuses = [json.loads(p) for t, p in ctl.received("/status") if "/twin/" in t and p]
    assert {(s["cell"], s["twin"]) for s in statuses} >= {("cell-1", "faithful"), ("cell-1", "drifting")}
    assert b"online" in [p for t, p in ctl.received("dtsync/_daemon/test/status")]
    telemetry = [t for t, _ in ctl.received() if t.endswith("/real") or t.count("/") == 3 and "/twin/" in t]
    assert telemetry == []  # subscribed to dtsync/#, yet the ACL keeps telemetry from controllers
    assert daemon.metric("dtsync_rejected_total", reason="unknown_stream") == 0  # declared at start, never incremented


def test_acl_refuses_what_each_user_is_not_granted(secure: Secure) -> None:
    producer = Client(secure.port, "cell-1", secure.ca)
    controller = Client(secure.port, "controller", secure.ca)
    other = Client(secure.port, "cell-2", secure.ca)
    try:
        assert producer.publish("dtsync/cell-1/real", b'{"s": 0, "a": 0, "r": 0, "s_next": 1}') in (0, 0x10)
        refused = [
            (producer, "dtsync/cell-2/real"),  # another cell's stream
            (producer, "dtsync/cell-2/twin/faithful"),
            (producer, "dtsync/cell-1/twin/drifting/resync"),  # a forged resync event
            (producer, "dtsync/cell-1/twin/drifting/resynced"),  # a forged acknowledgement: controllers only
            (producer, "dtsync/cell-1/twin/drifting/status"),
            (producer, "dtsync/_daemon/test/status"),  # forged liveness
            (controller, "dtsync/cell-1/real"),  # controllers only read
            (controller, "dtsync/cell-1/twin/faithful/resync"),
            (other, "dtsync/cell-1/real"),
        ]
        for client, topic in refused:
            assert client.publish(topic, b'{"s": 0, "a": 0, "r": 0, "s_next": 1}') == NOT_AUTHORIZED, (
                client.user,
                topic,
            )
        assert other.publish("dtsync/cell-2/real", b'{"s": 0, "a": 0, "r": 0, "s_next": 1}') in (0, 0x10)
        ack = b'{"event_id": "none-of-ours", "twin_version": "2"}'
        assert controller.publish("dtsync/cell-1/twin/drifting/resynced", ack) in (0, 0x10)  # a controller may ack
        wait_for(lambda: secure.daemon.metric("dtsync_rejected_total", reason="ack_unknown_event") == 1, 10,
                 "the daemon to read the controller's ack (and refuse it: not an event it raised)")  # fmt: skip
        daemon = secure.daemon
        wait_for(
            lambda: daemon.metric("dtsync_transitions_received_total", cell="cell-2", stream="real") == 1,
            10,
            "cell-2's own transition",
        )
        assert daemon.metric("dtsync_transitions_received_total", cell="cell-2", stream="faithful") == 0
        assert not secure.controller.received("/faithful/resync")  # the forged events never reached anyone
        assert not [p for t, p in secure.controller.received("_daemon/test/status") if p != b"online"]
    finally:
        for c in (producer, controller, other):
            c.close()


def test_no_anonymous_wrong_password_or_plain_tcp(secure: Secure) -> None:
    anonymous = Client(secure.port, None, secure.ca)
    wrong = Client(secure.port, "cell-1", secure.ca, password="guess")
    try:
        assert anonymous.connack.value == NOT_AUTHORIZED and wrong.connack.value == NOT_AUTHORIZED
    finally:
        anonymous.close()
        wrong.close()
    plain = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    plain.username_pw_set("cell-1", PASSWORDS["cell-1"])
    plain.connect("127.0.0.1", secure.port)  # TCP connects, then the broker drops a CONNECT that is not TLS
    results = [plain.loop(timeout=1) for _ in range(3)]
    assert paho.MQTT_ERR_CONN_LOST in results and not plain.is_connected(), results
    context = ssl.create_default_context()  # a client that does not trust the test CA refuses the broker
    with socket.create_connection(("127.0.0.1", secure.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="localhost")


def _received_by_a_stalled_subscriber(workdir: Path, queue_settings: str, count: int = 3000) -> int:
    """A QoS 1 subscriber whose message handler stalls (3 s) on the first message while `count` messages are
    published; how many it receives in the end. Mosquitto holds the unacknowledged ones in its per-client
    queue meanwhile, and drops for that client whatever does not fit."""
    workdir.mkdir()
    port = free_port()
    broker = Broker(workdir, f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{queue_settings}")
    received: list[int] = []
    stalled = threading.Event()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not stalled.is_set():
            stalled.set()
            time.sleep(3)
        received.append(int(msg.payload))

    try:
        broker.wait_listening(port)
        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.subscribe("load/#", qos=1)
        sub.loop_start()
        time.sleep(0.3)
        pub = Client(port, None, None)
        infos = [pub.client.publish("load/x", str(i).encode(), qos=1) for i in range(count)]
        wait_for(lambda: all(i.mid in pub.pubacks for i in infos), 20, "the publisher's PUBACKs")
        pub.close()
        wait_for(lambda: received, 10, "the stalled subscriber to resume")
        last = -1
        while last != len(received):  # until no more arrive
            last = len(received)
            time.sleep(0.5)
        sub.loop_stop()
        sub.disconnect()
        return len(received)
    finally:
        broker.stop()
        dropped = "Outgoing messages are being dropped" in broker.log.read_text()
        assert dropped == (len(received) < count), "the broker log and the count disagree"


def test_default_queue_drops_for_a_stalled_subscriber_and_the_shipped_one_does_not(tmp_path: Path) -> None:
    shipped = "\n".join(
        ln
        for ln in CONF.read_text().splitlines()
        if ln.startswith(("max_inflight_messages", "max_queued_messages", "max_queued_bytes"))
    )
    assert shipped.count("\n") == 2
    assert _received_by_a_stalled_subscriber(tmp_path / "default", "") <= 1100  # 20 in flight + 1000 queued
    assert _received_by_a_stalled_subscriber(tmp_path / "shipped", shipped) == 3000


def test_an_event_the_broker_refuses_is_not_silently_lost(secure: Secure) -> None:
    """A daemon user whose ACL lacks `write .../resync` (a deployment mistake): the broker refuses the event
    (PUBACK 0x87). The daemon does not count that as delivered: the event stays in the outbox, so
    DtsyncOutboxBacklogGrowing fires, and an error names it and the ACL. (Before 2d933e5 it was dropped silently.)"""
    acl = secure.workdir / "dtsync.acl"
    acl.write_text(
        acl.read_text() + "\nuser dtsync-nowrite\ntopic read dtsync/+/real\ntopic read dtsync/+/twin/+\n"
        "topic write dtsync/+/twin/+/status\ntopic write dtsync/_daemon/+/status\n"
    )
    make_password_file(secure.workdir / "extra.passwd", {"dtsync-nowrite": "x", "cell-3": "y"})
    with (secure.workdir / "dtsync.passwd").open("a") as f:
        f.write((secure.workdir / "extra.passwd").read_text())
    secure.broker.proc.send_signal(1)  # SIGHUP: reload passwords and ACL
    workdir = secure.workdir / "nowrite"
    workdir.mkdir()
    (workdir / "password").write_text("x\n")
    mqtt = {
        "host": "127.0.0.1",
        "port": secure.port,
        "username": "dtsync-nowrite",
        "password_file": str(workdir / "password"),
        "tls": {"ca_file": str(secure.ca)},
    }
    config = daemon_config(
        secure.port,
        workdir,
        mqtt=mqtt,
        cells={"cell-3": {"twins": {"drifting": {}}}},
        daemon={"instance": "nowrite", "outbox_path": str(workdir / "outbox.sqlite")},
    )
    daemon = DaemonProcess(workdir, config)
    producer = None
    try:
        wait_for(lambda: daemon.alive_or_raise() and daemon.metric("dtsync_mqtt_connected") == 1, 60, "connect")
        producer = Client(secure.port, "cell-3", secure.ca, password="y")
        publish_trace(producer, "cell-3", {k: secure.samples[k] for k in ("real", "drifting")})
        wait_for(lambda: daemon.metric("dtsync_resync_events_total", cell="cell-3", twin="drifting"), 30, "an event")
        time.sleep(2)
        assert secure.controller.received("cell-3/twin/drifting/resync") == []  # refused by the broker
        event_id = json.loads(
            next(ln for ln in daemon.log.read_text().splitlines() if '"event": "resync event"' in ln)
        )["event_id"]
        errors = [json.loads(ln) for ln in daemon.log.read_text().splitlines() if '"level": "error"' in ln]
        assert errors and all(e["event_id"] == event_id and "refused by the broker" in e["event"] for e in errors)
        assert "Not authorized" in errors[0]["error"]
        assert daemon.metric("dtsync_outbox_pending") == 1
    finally:
        if producer is not None:
            producer.close()
        daemon.stop()
