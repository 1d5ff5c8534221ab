"""Fault injection against the real processes: a private Mosquitto, the real `dtsync run`, real signals.

Each test has a numeric criterion: worker SIGKILL -> evaluations resume within 10 s; daemon SIGKILL ->
restart restores windows and sends no second event for the same drift episode; broker SIGKILL / SIGSTOP
outages -> reconnected within 5 s of the broker's return; hostile time and label floods -> counted, memory
under the documented bound, good traffic still evaluated. (Longer outages and repetitions: `make soak`.)
"""

from __future__ import annotations

import getpass
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_harness import DaemonProcess, Mosquitto, Subscriber, daemon_config, publish_cli, wait_for

from dtsync.offline.sample import write_samples

WORKER_RESUME_SECONDS = 10.0
RECONNECT_SECONDS = 5.0
# Documented in README "Reliability": daemon + 2 workers, 2 twins at the label caps (256 states, 16 actions).
MEMORY_BOUND_MIB = 1024


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def workers_of(daemon: DaemonProcess) -> list[int]:
    """The daemon's metric workers (spawned processes running multiprocessing's spawn main)."""
    found = []
    for pid in children(daemon.proc.pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except FileNotFoundError:
            pass
    return found


class Feeder:
    """Publishes live telemetry (no `t`: receive time) to every stream of cell-1 until stopped."""

    def __init__(self, port: int, streams: tuple[str, ...] = ("real", "twin/faithful", "twin/drifting")) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.streams = streams
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(0)
        while not self._stop.is_set():
            for stream in self.streams:
                batch = [{"s": rng.randrange(4), "a": rng.randrange(2), "r": rng.random(), "s_next": rng.randrange(4)}
                         for _ in range(50)]  # fmt: skip
                self.client.publish(f"dtsync/cell-1/{stream}", json.dumps(batch), qos=0)
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def live_config(broker: Mosquitto, tmp_path: Path) -> dict:
    return daemon_config(broker.port, tmp_path, window={"count": 2000},
                         schedule={"every_transitions": 500, "every_seconds": 1.0},
                         daemon={"max_clock_skew_seconds": 300, "workers": 2, "snapshot_seconds": 1.0})  # fmt: skip


def last_evaluation(daemon: DaemonProcess, twin: str) -> float:
    return daemon.metric("dtsync_last_evaluation_timestamp_seconds", cell="cell-1", twin=twin) or 0.0


def test_killed_workers_are_replaced_and_evaluations_resume(broker: Mosquitto, live_config: dict,
                                                            tmp_path: Path) -> None:  # fmt: skip
    daemon = DaemonProcess(tmp_path, live_config)
    feeder = Feeder(broker.port)
    try:
        daemon.wait_connected()
        wait_for(lambda: min(last_evaluation(daemon, t) for t in ("faithful", "drifting")) > time.time() - 5, 30,
                 "first evaluations")  # fmt: skip
        for round_ in range(2):
            pids = workers_of(daemon)  # an idle dead worker is replaced on its next use: there may be one
            assert pids
            killed_at = time.time()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            def both_after(since: float = killed_at) -> float | bool:
                return min(last_evaluation(daemon, t) for t in ("faithful", "drifting")) > since and time.time()

            resumed = wait_for(both_after, WORKER_RESUME_SECONDS, "evaluations after the workers died")
            print(f"round {round_}: evaluations resumed {resumed - killed_at:.1f} s after SIGKILL of both workers")
            assert set(workers_of(daemon)).isdisjoint(pids)
        # The counter is exported on the daemon's one-second tick, and evaluations can resume sooner than that.
        wait_for(lambda: (daemon.metric("dtsync_worker_restarts_total") or 0) >= 2, 5, "both replacements counted")
        status, body = daemon.get("/healthz")
        assert status == 200, body
    finally:
        feeder.close()
        assert daemon.stop() == 0


def test_workers_die_with_a_killed_daemon(broker: Mosquitto, live_config: dict, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, live_config)
    daemon.wait_connected()
    pids = workers_of(daemon)
    assert len(pids) == 2
    daemon.signal(signal.SIGKILL)
    daemon.proc.wait(10)
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() and b"spawn_main" in
                             Path(f"/proc/{p}/cmdline").read_bytes() for p in pids), 5, "workers to exit")  # fmt: skip


def test_stale_evaluations_fail_healthz(broker: Mosquitto, tmp_path: Path) -> None:
    """Streams deliver, but one twin is never evaluated (its window gets nothing): /healthz says which."""
    config = daemon_config(broker.port, tmp_path, daemon={"stale_seconds": 3.0, "workers": 1})
    daemon = DaemonProcess(tmp_path, config)
    feeder = Feeder(broker.port, ("real", "twin/faithful"))
    try:
        daemon.wait_connected()
        time.sleep(4)
        status, body = daemon.get("/healthz")
        detail = json.loads(body)
        assert status == 503 and "cell-1/drifting" in detail["stale_streams"]
        # faithful is evaluated (real data changes it), drifting too (the real stream makes it due): both fresh
        assert "cell-1/faithful" not in detail["stale_evaluations"]
    finally:
        feeder.close()
        daemon.stop()


def test_far_future_time_is_rejected_and_good_traffic_still_evaluated(broker: Mosquitto, live_config: dict,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    daemon = DaemonProcess(tmp_path, {**live_config, "window": {"count": 2000, "seconds": 30.0}})
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    feeder = None
    try:
        daemon.wait_connected()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        now = time.time()
        poison = [{"s": 0, "a": 0, "r": 1.0, "s_next": 1, "t": now * 1000.0},  # milliseconds, not seconds
                  {"s": 0, "a": 0, "r": 1.0, "s_next": 1, "t": now - 3600}]  # fmt: skip
        client.publish("dtsync/cell-1/real", json.dumps(poison), qos=1).wait_for_publish(5)
        wait_for(lambda: daemon.metric("dtsync_rejected_total", reason="clock_skew") == 2, 10, "clock_skew")
        feeder = Feeder(broker.port)
        wait_for(lambda: (daemon.metric("dtsync_window_samples", cell="cell-1", twin="faithful", window="real")
                          or 0) >= 1500, 30, "the real window to fill with good traffic")  # fmt: skip
    finally:
        if feeder is not None:
            feeder.close()
        client.loop_stop()
        client.disconnect()
        daemon.stop()


def test_label_flood_is_capped_memory_bounded_and_good_traffic_evaluated(broker: Mosquitto, live_config: dict,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    daemon = DaemonProcess(tmp_path, live_config)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    feeder = None
    try:
        daemon.wait_connected()
        feeder = Feeder(broker.port)  # the good traffic's labels are known before the flood
        wait_for(lambda: min(last_evaluation(daemon, t) for t in ("faithful", "drifting")) > 0, 30, "evaluations")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        flood = [{"s": f"s{i}", "a": f"a{i}", "r": 0.0, "s_next": f"n{i}"} for i in range(10_000)]
        for lo in range(0, 10_000, 1000):
            client.publish("dtsync/cell-1/real", json.dumps(flood[lo:lo + 1000]), qos=1).wait_for_publish(5)
        wait_for(lambda: (daemon.metric("dtsync_rejected_total", reason="too_many_labels") or 0) >= 9_000, 30,
                 "the flood to be refused")  # fmt: skip
        peak = 0.0
        deadline = time.monotonic() + 30
        started = time.time()
        while time.monotonic() < deadline:
            pids = [daemon.proc.pid, *workers_of(daemon)]
            peak = max(peak, sum(rss_mib(p) for p in pids))
            if min(last_evaluation(daemon, t) for t in ("faithful", "drifting")) > started + 2:
                break
            time.sleep(0.2)
        print(f"label flood: peak RSS of daemon + workers {peak:.0f} MiB")
        assert min(last_evaluation(daemon, t) for t in ("faithful", "drifting")) > started + 2
        assert peak < MEMORY_BOUND_MIB
        status, _ = daemon.get("/metrics")
        assert status == 200
    finally:
        if feeder is not None:
            feeder.close()
        client.loop_stop()
        client.disconnect()
        daemon.stop()


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"), seed=7)


def test_daemon_sigkill_restart_restores_windows_and_keeps_the_episode_one_event(
    broker: Mosquitto, samples: dict[str, Path], tmp_path: Path
) -> None:
    config = daemon_config(broker.port, tmp_path, daemon={"snapshot_seconds": 1.0})
    sub = Subscriber(broker.port, ["dtsync/+/twin/+/resync"])
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected()
        publish_cli(broker.port, "cell-1", {n: samples[n] for n in ("real", "faithful", "drifting")}, "--batch",
                    "100", "--qos", "1")  # fmt: skip
        wait_for(lambda: sub.on("/resync"), 60, "the drift event")
        time.sleep(1.5)  # a periodic snapshot after the last transitions
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait(10)
        restarted = DaemonProcess(tmp_path, config)
        daemon = restarted
        daemon.wait_connected()
        # Judged at once from the restored windows (no telemetry since the restart), and not fired again.
        wait_for(lambda: daemon.metric("dtsync_window_samples", cell="cell-1", twin="drifting", window="twin")
                 == 5000, 20, "an evaluation of the restored windows")  # fmt: skip
        assert "state restored" in daemon.log.read_text()
        time.sleep(2)
        ids = {json.loads(m.payload)["event_id"] for m in sub.on("/resync")}
        assert len(ids) == 1, ids
        assert daemon.metric("dtsync_resync_events_total", cell="cell-1", twin="drifting") == 0
    finally:
        sub.close()
        daemon.stop()


def _reconnect_seconds(broker: Mosquitto, daemon: DaemonProcess, outage: float, how: str) -> float:
    connects = daemon.metric("dtsync_mqtt_connects_total") or 0
    assert broker.proc is not None
    if how == "kill":
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(5)
        time.sleep(outage)
        broker.start()
        back = time.monotonic()
    else:  # SIGSTOP past the keepalive: the TCP connection stays up, the broker answers nothing
        broker.proc.send_signal(signal.SIGSTOP)
        time.sleep(outage)
        broker.proc.send_signal(signal.SIGCONT)
        back = time.monotonic()
    wait_for(lambda: (daemon.metric("dtsync_mqtt_connects_total") or 0) > connects
             and daemon.metric("dtsync_mqtt_connected") == 1, 30, "the reconnect")  # fmt: skip
    return time.monotonic() - back


@pytest.mark.parametrize("how, outage", [("kill", 2.0), ("kill", 10.0), ("kill", 60.0), ("stop", 6.0)])
def test_reconnect_within_5_s_of_the_brokers_return(broker: Mosquitto, tmp_path: Path, how: str,
                                                    outage: float) -> None:  # fmt: skip
    # Default backoff (no test shortcuts); keepalive 2 s so a frozen broker is noticed within the outage.
    config = daemon_config(broker.port, tmp_path)
    config["mqtt"] = {"host": "127.0.0.1", "port": broker.port, "keepalive": 2, "liveness_seconds": 1.0}
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.wait_connected()
        seconds = _reconnect_seconds(broker, daemon, outage, how)
        print(f"broker {how} for {outage:.0f} s: reconnected {seconds:.2f} s after its return")
        assert seconds < RECONNECT_SECONDS
        late = Subscriber(broker.port, ["dtsync/_daemon/test/#"])
        try:
            wait_for(lambda: late.on("/heartbeat"), 5, "the retained heartbeat")
            beat = json.loads(late.on("/heartbeat")[-1].payload)
            assert beat["state"] == "online" and time.time() - beat["time"] < 3 * beat["every_seconds"]
            status = late.on("/status")[-1]
            assert status.payload == b"online" and status.expiry is not None and status.expiry <= 3
        finally:
            late.close()
    finally:
        daemon.stop()


def test_refused_credentials_are_logged_as_such(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dtsync", "right"], check=True, capture_output=True)
    pw.chmod(0o600)
    broker = Mosquitto(tmp_path, extra_config="")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
                           + f"password_file {pw}\nuser {getpass.getuser()}\n")  # fmt: skip
    broker.start()
    os.environ["DTSYNC_TEST_PW"] = "wrong"
    config = daemon_config(broker.port, tmp_path)
    config["mqtt"] = {**config["mqtt"], "username": "dtsync", "password_env": "DTSYNC_TEST_PW"}
    daemon = DaemonProcess(tmp_path, config)
    try:
        wait_for(lambda: "broker refused the connection" in daemon.log.read_text(), 20, "the refusal in the log")
        line = next(json.loads(x) for x in daemon.log.read_text().splitlines() if "refused the connection" in x)
        # MQTT v5: 134 bad user name or password, or 135 not authorised (what Mosquitto 2.0 answers)
        assert line["level"] == "error" and re.search(r"reason code 13[45] \(", line["error"]), line
        assert "broker unreachable" not in daemon.log.read_text()
    finally:
        daemon.stop()
        broker.stop()
        os.environ.pop("DTSYNC_TEST_PW", None)


def test_tls_failure_is_logged_as_such(tmp_path: Path) -> None:
    """A broker whose certificate the configured CA did not sign: the log says TLS, not "unreachable"."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    broker = Mosquitto(tmp_path)
    broker.conf.write_text(broker.conf.read_text() + f"certfile {cert}\nkeyfile {key}\nuser {getpass.getuser()}\n")
    broker.start()
    config = daemon_config(broker.port, tmp_path)
    config["mqtt"] = {**config["mqtt"], "tls": {"ca_file": "/etc/ssl/certs/ca-certificates.crt"}}
    daemon = DaemonProcess(tmp_path, config)
    try:
        wait_for(lambda: "TLS handshake with the broker failed" in daemon.log.read_text(), 20, "the TLS failure")
        line = next(json.loads(x) for x in daemon.log.read_text().splitlines() if "TLS handshake" in x)
        assert line["level"] == "error" and "CERTIFICATE_VERIFY_FAILED" in line["error"]
        assert "broker unreachable" not in daemon.log.read_text()
    finally:
        daemon.stop()
        broker.stop()


@pytest.mark.parametrize("end", ["thawed", "killed"])
def test_event_in_flight_when_the_broker_froze_is_delivered_soon_after_it_returns(broker: Mosquitto, tmp_path: Path,
                                                                                  end: str) -> None:  # fmt: skip
    """An event whose publish was in flight when the broker stopped answering is not held back by that attempt:
    it is delivered within 5 s of the broker's return (the old attempt's 10 s timeout does not block it) —
    whether the frozen broker thaws, or is killed with SIGKILL and restarted (persistence on)."""
    import sqlite3

    persistence = f"persistence true\npersistence_location {tmp_path}/\nuser {getpass.getuser()}"  # user: see soak.py
    broker.conf.write_text(broker.conf.read_text().replace("persistence false", persistence))
    broker.stop()
    broker.start()
    config = daemon_config(broker.port, tmp_path)
    config["mqtt"] = {"host": "127.0.0.1", "port": broker.port, "keepalive": 2}
    daemon = DaemonProcess(tmp_path, config)
    sub = Subscriber(broker.port, ["dtsync/+/twin/+/resync"])
    try:
        daemon.wait_connected()
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        db = sqlite3.connect(tmp_path / "outbox.sqlite")  # as if raised now: the retry timer picks it up
        payload = json.dumps({"event_id": "in-flight", "cell": "cell-1", "twin": "drifting", "t": 1.0}).encode()
        db.execute("INSERT INTO events (event_id, topic, payload, expires_at) VALUES (?, ?, ?, ?)",
                   ("in-flight", "dtsync/cell-1/twin/drifting/resync", payload, time.time() + 600))  # fmt: skip
        db.commit()
        db.close()
        time.sleep(7)  # the retry timer (5 s) publishes into the frozen broker; keepalive drops the link
        if end == "thawed":
            broker.proc.send_signal(signal.SIGCONT)
        else:
            broker.proc.send_signal(signal.SIGKILL)
            broker.proc.wait(5)
            broker.start()
        back = time.monotonic()
        if end == "thawed":  # the subscriber's session survived: it receives the event
            wait_for(lambda: sub.on("/resync"), RECONNECT_SECONDS, "the in-flight event after the broker's return")
            assert [json.loads(m.payload)["event_id"] for m in sub.on("/resync")][:1] == ["in-flight"]
        # acknowledged by the broker (PUBACK): it left the outbox
        wait_for(lambda: daemon.metric("dtsync_outbox_pending") == 0, RECONNECT_SECONDS, "the broker's PUBACK")
        print(f"in-flight event delivered {time.monotonic() - back:.2f} s after the broker {end}")
        assert daemon.metric("dtsync_events_expired_total") == 0
    finally:
        sub.close()
        daemon.stop()
