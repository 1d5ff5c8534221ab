"""A private ZooKeeper for the coordination tests: Debian's `zookeeper` package, one standalone server on a free
loopback port, started in the foreground from a plain zoo.cfg (the packaged zkServer.sh ignores a custom
configuration directory). `.ci/system-deps` installs the package; nothing here mocks the server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from mqtt_harness import free_port

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
ZOOKEEPER_CONF = Path("/etc/zookeeper/conf")  # log4j settings of the package


def _classpath() -> str:
    if not ZOOKEEPER_JAR.exists() or shutil.which("java") is None:
        raise RuntimeError("ZooKeeper is not installed: apt-get install zookeeper (.ci/system-deps does this)")
    return f"{ZOOKEEPER_CONF}:{ZOOKEEPER_JAR}"


class ZooKeeper:
    """One standalone server; `hosts` is the connection string for kazoo."""

    def __init__(self, workdir: Path, tick_ms: int = 200) -> None:
        self.port = free_port()
        self.dir = workdir / "zookeeper"
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.cfg = self.dir / "zoo.cfg"
        # With tickTime 200 ms the server accepts session timeouts from 0.4 s (2 ticks) to 4 s (20 ticks), so
        # failover tests run in seconds; a production ensemble keeps the default 2 s tick.
        self.cfg.write_text(
            f"tickTime={tick_ms}\ndataDir={self.dir / 'data'}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxSessionTimeout=20000\n"
            "4lw.commands.whitelist=ruok\n",
            encoding="utf-8",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - owned by the process for its lifetime
        env = {**os.environ, "ZOO_LOG_DIR": str(self.dir), "JVMFLAGS": "-Xmx256m"}
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-cp", _classpath(), "org.apache.zookeeper.server.quorum.QuorumPeerMain",
             str(self.cfg)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            if self._ruok():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not answer within {timeout} s on {self.hosts}")

    def _ruok(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"ruok")
                return s.recv(4) == b"imok"
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
