"""Logging set-up (JSON for the journal, console on a terminal) and the per-reason rate limiter."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from structlog.testing import capture_logs

from dtsync.logs import ReasonLimiter, configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger as they were: later tests must not write to a closed capture stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_have_timestamp_level_event_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger().bind(cell="c1").info("window full", twin="t2", n=3)
    (line,) = _json_lines(capsys.readouterr().err)
    assert line["event"] == "window full"
    assert line["level"] == "info"
    assert (line["cell"], line["twin"], line["n"]) == ("c1", "t2", 3)
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=60)


def test_level_filters_and_bad_values_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    log = structlog.get_logger()
    log.info("hidden")
    log.warning("shown")
    assert [x["event"] for x in _json_lines(capsys.readouterr().err)] == ["shown"]
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose", "json")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")  # type: ignore[arg-type]


def test_configuring_twice_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = structlog.get_logger()  # taken before configuration: must still follow it (no caching)
    configure_logging("info", "console")
    configure_logging("info", "json")
    log.info("once")
    logging.getLogger("somelib").warning("also once")
    lines = _json_lines(capsys.readouterr().err)
    assert [x["event"] for x in lines] == ["once", "also once"]


def test_stdlib_records_are_rendered_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    logging.getLogger("asyncio").error("Task exception was never retrieved %s", "x")
    (line,) = _json_lines(capsys.readouterr().err)
    assert line["event"] == "Task exception was never retrieved x"
    assert (line["level"], line["logger"]) == ("error", "asyncio")
    assert "timestamp" in line


def test_exception_is_a_string_field_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        structlog.get_logger().exception("evaluation failed")
    (line,) = _json_lines(capsys.readouterr().err)
    assert line["level"] == "error"
    assert "ZeroDivisionError" in line["exception"]


def test_console_format_is_not_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    structlog.get_logger().info("connected", broker="localhost")
    err = capsys.readouterr().err
    assert "connected" in err and "broker" in err and "localhost" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def _log_to_tty(monkeypatch: pytest.MonkeyPatch) -> str:
    """Configure in auto mode with stderr on a pseudo-terminal, log one line, return what the terminal got."""
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", tty)
    try:
        configure_logging("info", "auto")
        structlog.get_logger().info("hello", k=1)
        tty.flush()
        return os.read(master, 65536).decode()
    finally:
        tty.close()
        os.close(master)


def test_auto_is_console_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = _log_to_tty(monkeypatch)
    assert "hello" in out
    assert not out.lstrip().startswith("{")


def test_auto_is_json_under_systemd_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    (line,) = _json_lines(_log_to_tty(monkeypatch))
    assert (line["event"], line["k"]) == ("hello", 1)


def test_auto_is_json_when_stderr_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure_logging()
    structlog.get_logger().info("hello")
    assert _json_lines(capsys.readouterr().err)[0]["event"] == "hello"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_logs_first_then_suppresses_then_reports_count() -> None:
    clock = FakeClock()
    limiter = ReasonLimiter("telemetry rejected", interval=10.0, clock=clock)
    log = structlog.get_logger()
    with capture_logs() as logs:
        assert limiter.log(log, "stale", cell="c1")
        clock.now += 1
        assert not limiter.log(log, "stale", cell="c1")
        clock.now += 8.9
        assert not limiter.log(log, "stale", cell="c1")
        clock.now += 0.1  # exactly `interval` after the first line
        assert limiter.log(log, "stale", cell="c2")
        assert not limiter.log(log, "stale", cell="c2")
        clock.now += 10
        assert limiter.log(log, "stale", cell="c3")
    assert logs == [
        {"event": "telemetry rejected", "log_level": "warning", "reason": "stale", "suppressed": 0, "cell": "c1"},
        {"event": "telemetry rejected", "log_level": "warning", "reason": "stale", "suppressed": 2, "cell": "c2"},
        {"event": "telemetry rejected", "log_level": "warning", "reason": "stale", "suppressed": 1, "cell": "c3"},
    ]


def test_limiter_is_independent_per_reason() -> None:
    clock = FakeClock()
    limiter = ReasonLimiter("telemetry rejected", interval=10.0, level="info", clock=clock)
    log = structlog.get_logger()
    with capture_logs() as logs:
        assert limiter.log(log, "stale")
        assert not limiter.log(log, "stale")
        assert limiter.log(log, "bad_schema")  # another reason is not held back by the first
        assert not limiter.log(log, "bad_schema")
        assert not limiter.log(log, "bad_schema")
        clock.now += 10
        assert limiter.log(log, "bad_schema")
        assert limiter.log(log, "stale")
    assert [(x["reason"], x["suppressed"], x["log_level"]) for x in logs] == [
        ("stale", 0, "info"),
        ("bad_schema", 0, "info"),
        ("bad_schema", 2, "info"),
        ("stale", 1, "info"),
    ]


def test_limiter_bounds_memory_and_line_rate_with_unbounded_reasons() -> None:
    clock = FakeClock()
    limiter = ReasonLimiter("rejected", interval=10.0, max_reasons=4, clock=clock)
    log = structlog.get_logger()
    with capture_logs() as logs:
        for i in range(10_000):
            limiter.log(log, f"reason-{i}")
    # Four tracked reasons, then one line from the shared slot for all the rest.
    assert [x["reason"] for x in logs] == ["reason-0", "reason-1", "reason-2", "reason-3", "reason-4"]
    assert logs[-1]["overflow"] is True and "overflow" not in logs[0]
    assert len(limiter._seen) == 4  # the bounded table itself

    # The shared slot is rate-limited too, and reports what it dropped once its interval has passed.
    clock.now += 10
    with capture_logs() as logs:
        for i in range(4):
            assert limiter.log(log, f"reason-{i}")  # tracked reasons keep their own slots
        assert limiter.log(log, "late")
    assert (logs[-1]["reason"], logs[-1]["suppressed"], logs[-1]["overflow"]) == ("late", 9995, True)

    # A reason whose interval passed with nothing suppressed is forgotten to make room for a new one.
    clock.now += 10
    with capture_logs() as logs:
        assert limiter.log(log, "fresh")
        assert not limiter.log(log, "fresh")
    assert "overflow" not in logs[0]
    assert "reason-0" not in limiter._seen and len(limiter._seen) == 4
