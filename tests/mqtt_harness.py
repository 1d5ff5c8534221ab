"""Test harness for the live parts: a private Mosquitto on a free port, the real daemon process, a subscriber.

Nothing here mocks the broker or the daemon: tests start Debian's `mosquitto` binary and `dtsync run` as
subprocesses. If `mosquitto` is missing the tests fail with the install command (`.ci/run` installs it).
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
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (.ci/run does this)")
    return found


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Mosquitto:
    """A private broker on loopback; stop() and start() keep the port (to simulate an outage)."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 100000\n{extra_config}"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for(self._accepts, 10, f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
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


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    expiry: int | None


@dataclass
class Subscriber:
    """A paho client in its own thread that records every message on the given filters."""

    port: int
    filters: list[str]
    protocol: int = paho.MQTTv5
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=self.protocol)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._ready.wait(10), "subscriber did not get its SUBACK"

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        expiry = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), expiry))

    def on(self, suffix: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def statuses(self) -> list[dict[str, Any]]:
        """Twin status messages (not daemon liveness), decoded, in arrival order."""
        return [json.loads(m.payload) for m in self.on("/status") if "/twin/" in m.topic and m.payload]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class DaemonProcess:
    """`dtsync run` as a subprocess, with its config written from a dict."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.write_config(config)
        self.metrics_url = f"http://{config['metrics']['listen']}"
        self.log = workdir / "daemon.log"
        cmd = [sys.executable, "-m", "dtsync.cli", "run", "--config", str(self.config_path)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **(env or {})})

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """Value of one sample of /metrics (None if absent or the endpoint is down)."""
        try:
            _, text = self.get("/metrics")
        except OSError:
            return None
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            base, _, rest = key.partition("{")
            if base == name and ",".join(sorted(rest.rstrip("}").split(","))) == want:
                return float(value)
            if base == name and not labels and not rest:
                return float(value)
        return None

    def wait_connected(self, timeout: float = 30) -> None:
        wait_for(lambda: self.alive_or_raise() and self.metric("dtsync_mqtt_connected") == 1, timeout,
                 "the daemon to connect")  # fmt: skip

    def alive_or_raise(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return True

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def daemon_config(port: int, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """A config for one cell with twins `faithful` and `drifting`, pointed at the test broker."""
    config: dict[str, Any] = {
        "window": {"count": 5000},
        "schedule": {"every_transitions": 500, "every_seconds": 2.0},
        "trigger": {"threshold": 0.5, "rearm_below": 0.3, "cooldown_seconds": 60, "min_samples": 2000,
                    "act_on": "excess"},  # fmt: skip
        "cells": {"cell-1": {"twins": {"faithful": {}, "drifting": {}}}},
        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_seconds": 0.1, "reconnect_max_seconds": 0.5},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        # Recorded traces carry their own time base (t from 0): no receive-clock check for them.
        "daemon": {"instance": "test", "outbox_path": str(workdir / "outbox.sqlite"), "log_format": "json",
                   "max_clock_skew_seconds": None},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def publish_cli(port: int, cell: str, streams: dict[str, Path], *args: str, keep_time: bool = True) -> str:
    """Run `dtsync publish` (the real command) and return its output; by default the traces keep their own
    time base, as the tests' daemons expect (see daemon_config)."""
    cmd = [sys.executable, "-m", "dtsync.cli", "publish", "--cell", cell, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--keep-time"] if keep_time else []
    for name, path in streams.items():
        cmd += ["--real", str(path)] if name == "real" else ["--twin", f"{name}={path}"]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout
