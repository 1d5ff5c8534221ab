"""The systemd notify protocol, against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dtsync.daemon.notify import SystemdNotifier


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite may itself run under systemd: start every test from an environment without its variables."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, named in NOTIFY_SOCKET as systemd would."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on `sock`."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(2)


def test_sends_the_exact_datagrams(systemd: socket.socket) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.status("monitoring 2 twins")
    assert notifier.stopping()
    assert _received(systemd) == [b"READY=1", b"WATCHDOG=1", b"STATUS=monitoring 2 twins", b"STOPPING=1"]


def test_reloading_carries_the_monotonic_time(systemd: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert SystemdNotifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = systemd.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_status_is_one_utf8_line(systemd: socket.socket) -> None:
    notifier = SystemdNotifier()
    assert notifier.status("cell Zürich: θ=0.2\nREADY=1")
    # No second assignment can be smuggled in, and non-Latin-1 text arrives as UTF-8.
    assert systemd.recv(4096) == "STATUS=cell Zürich: θ=0.2 READY=1".encode()


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dtsync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SystemdNotifier().ready()
        assert sock.recv(4096) == b"READY=1"


def test_everything_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert not any([notifier.ready(), notifier.reloading(), notifier.stopping(), notifier.watchdog()])
    assert not notifier.status("x")
    assert notifier.watchdog_interval() is None


def test_unreachable_socket_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    with capture_logs() as logs:
        notifier = SystemdNotifier()
        assert not notifier.ready()
    assert not notifier.enabled
    assert [x["event"] for x in logs] == ["systemd notify socket unreachable"]


def test_send_failure_after_start_is_logged_not_raised(systemd: socket.socket, tmp_path: Path) -> None:
    notifier = SystemdNotifier()
    systemd.close()  # systemd's end goes away
    (tmp_path / "notify").unlink()
    with capture_logs() as logs:
        assert not notifier.watchdog()
    assert logs[0]["event"] == "systemd notify failed" and logs[0]["message"] == "WATCHDOG"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),  # the watchdog is meant for another process
        ("1000", None, 0.0005),
        (None, None, None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "x", None),
    ],
)
def test_watchdog_interval(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
        monkeypatch.setenv("WATCHDOG_PID", pids.get(pid, pid))
    assert SystemdNotifier().watchdog_interval() == expected
