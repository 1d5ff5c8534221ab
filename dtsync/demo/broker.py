"""A broker for the demo: the local `mosquitto` if installed, else an embedded pure-Python one (amqtt).

amqtt speaks MQTT 3.1.1 only, so with it the demo runs the daemon in 3.1.1 mode (events then carry their
deadline in `expires_at` rather than as a message-expiry property).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BrokerInfo:
    port: int
    protocol: str  # "5" or "3.1.1", as in the mqtt config section
    kind: str  # for the user: which broker runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None
    )


@contextlib.asynccontextmanager
async def local_broker(embedded: bool = False) -> AsyncIterator[BrokerInfo]:
    """Run a broker on a free loopback port for the duration of the context."""
    binary = None if embedded else mosquitto_path()
    port = free_port()
    if binary is not None:
        with tempfile.TemporaryDirectory(prefix="dtsync-demo-broker-") as tmp:
            conf = Path(tmp) / "mosquitto.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            "max_queued_messages 100000\n")  # fmt: skip
            proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await _wait_for_port(port)
                yield BrokerInfo(port, "5", f"mosquitto ({binary})")
            finally:
                proc.terminate()
                proc.wait(10)
        return
    from amqtt.broker import Broker

    for name in ("amqtt", "transitions"):  # both log every connection at INFO/WARNING
        logging.getLogger(name).setLevel(logging.CRITICAL)
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })  # fmt: skip
    await broker.start()
    try:
        await _wait_for_port(port)
        yield BrokerInfo(port, "3.1.1", "embedded amqtt (MQTT 3.1.1; install mosquitto for MQTT 5)")
    finally:
        await broker.shutdown()


async def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the demo broker did not open port {port}") from None
            await asyncio.sleep(0.05)
