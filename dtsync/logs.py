"""Logging set-up, in one place: JSON lines for the journal and log shippers, readable lines on a terminal.

The rest of the code only calls `structlog.get_logger()`. Records from the standard library's `logging` (asyncio's
"Task exception was never retrieved", client libraries) go through the same renderer, so the journal never mixes
JSON with free text.

`ReasonLimiter` keeps a flood of identical warnings (e.g. thousands of rejected telemetry messages a second, all for
the same reason) from drowning the journal while still saying how many were dropped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import FilteringBoundLogger, Processor

LogFormat = Literal["auto", "json", "console"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL}


_NEVER = float("-inf")  # time of the last line for a reason not yet logged: always due


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the root handler we installed, so that configuring again replaces it instead of adding a second."""


def _wants_json() -> bool:
    """JSON under systemd (which sets JOURNAL_STREAM for a service's stderr) or whenever no person reads stderr."""
    return "JOURNAL_STREAM" in os.environ or not sys.stderr.isatty()


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Configure structlog and the standard library's root logger to write to stderr; safe to call again.

    JSON lines carry at least `timestamp` (ISO-8601, UTC), `level` and `event`, plus the bound fields.
    Loggers are not cached on first use, so a logger taken before this call still follows it.
    """
    try:
        min_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}") from None
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    as_json = fmt == "json" or (fmt == "auto" and _wants_json())

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        # Plain tracebacks: the rich formatter shows local variables, which may hold the MQTT password.
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    # format_exc_info turns exc_info into an `exception` string for JSON; the console renderer formats it itself.
    exc: list[Processor] = [structlog.processors.format_exc_info] if as_json else []

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *exc,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )

    handler = _Handler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper, *exc],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(min_level)


class ReasonLimiter:
    """Log each distinct reason at most once per `interval` seconds, saying how many were suppressed meanwhile.

    The first occurrence of a reason is logged at once with `suppressed=0`; later ones within `interval` of the last
    line are counted, and the next line after the interval carries `suppressed=N`. At most `max_reasons` reasons are
    tracked: when the table is full, reasons whose interval has passed with nothing suppressed are forgotten (no
    information is lost), and if that frees nothing, new reasons share one extra rate-limited slot and are logged with
    `overflow=True`. So memory and the line rate stay bounded even if reasons are not, as they normally are, a fixed
    set. Not thread-safe: meant for the daemon's event loop.
    """

    def __init__(
        self,
        event: str,
        interval: float = 60.0,
        *,
        level: str = "warning",
        max_reasons: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        if max_reasons < 1:
            raise ValueError("max_reasons must be at least 1")
        if level.lower() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self.event = event
        self.interval = interval
        self.level = level.lower()
        self.max_reasons = max_reasons
        self._clock = clock
        # reason -> [time of last line, suppressed since]; ordered by time of last line, oldest first.
        self._seen: OrderedDict[str, list[float]] = OrderedDict()
        self._overflow: list[float] | None = None

    def log(self, logger: FilteringBoundLogger, reason: str, **fields: Any) -> bool:
        """Log `event` with `reason`, `suppressed` and `fields` unless this reason was logged too recently.

        Returns whether a line was written (to the logger: its level filter may still drop it).
        """
        now = self._clock()
        state = self._slot(reason, now)
        extra: dict[str, Any] = {}
        if state is None:  # table full: use the shared slot
            if self._overflow is None:
                self._overflow = [_NEVER, 0]
            state = self._overflow
            extra["overflow"] = True
        if now - state[0] < self.interval:
            state[1] += 1
            return False
        suppressed = int(state[1])
        state[0], state[1] = now, 0
        if state is not self._overflow:
            self._seen.move_to_end(reason)
        getattr(logger, self.level)(self.event, reason=reason, suppressed=suppressed, **fields, **extra)
        return True

    def _slot(self, reason: str, now: float) -> list[float] | None:
        """The state for `reason`, created (due at once) if there is room; None if the table is full."""
        state = self._seen.get(reason)
        if state is not None:
            return state
        while len(self._seen) >= self.max_reasons:
            oldest = next(iter(self._seen.values()))
            if now - oldest[0] < self.interval or oldest[1] > 0:
                return None
            self._seen.popitem(last=False)
        state = [_NEVER, 0]
        self._seen[reason] = state
        return state
