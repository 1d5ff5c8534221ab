"""`dtsync replay`: stream recorded traces through the same monitor the daemon runs, in trace-time order."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dtsync.config import Config
from dtsync.contract import Rejection, Transition, read_jsonl
from dtsync.monitor import REAL, CellMonitor, Report

CELL = "replay"


@dataclass
class ReplayResult:
    """Every evaluation in order, plus what was read and what was rejected (by stream and reason)."""

    reports: list[Report] = field(default_factory=list)
    transitions: Counter[str] = field(default_factory=Counter)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)


def _timed(stream: str, order: int, path: Path) -> Iterator[tuple[float, int, int, str, Transition | Rejection]]:
    """(time, stream order, line, stream, item): a transition without `t` takes its line number as its time."""
    t = 0.0
    for line, item in enumerate(read_jsonl(path), start=1):
        if isinstance(item, Transition):
            t = float(line) if item.t is None else item.t
        yield t, order, line, stream, item


def merged(paths: dict[str, Path]) -> Iterator[tuple[float, str, Transition | Rejection]]:
    """All streams merged by time (ties: real first, then twins in command-line order, then line)."""
    streams = [_timed(name, i, path) for i, (name, path) in enumerate(paths.items())]
    for t, _, _, stream, item in heapq.merge(*streams):
        yield t, stream, item


def count_lines(paths: dict[str, Path]) -> int:
    total = 0
    for path in paths.values():
        with path.open("rb") as f:
            total += sum(1 for _ in f)
    return total


def replay(
    config: Config,
    real: Path,
    twins: dict[str, Path],
    *,
    on_report: Callable[[Report], None] | None = None,
    on_item: Callable[[], None] | None = None,
) -> ReplayResult:
    """Replay `real` against each twin trace under `config` (its schedule, windows and trigger rule).

    Evaluations happen on the configured schedule in trace time, and once more at the end of the traces for
    any twin with transitions not yet evaluated.
    """
    monitor = CellMonitor(CELL, config.for_replay(twins))
    result = ReplayResult()
    t = 0.0

    def evaluate(names: list[str], now: float) -> None:
        for name in names:
            report = monitor.evaluate(name, now)
            result.reports.append(report)
            if on_report:
                on_report(report)

    for t, stream, item in merged({REAL: real, **twins}):
        if on_item:
            on_item()
        if isinstance(item, Rejection):
            result.rejected[(stream, item.reason)] += 1
            continue
        reason = monitor.add(stream, item, t)
        if reason is not None:
            result.rejected[(stream, reason)] += 1
            continue
        result.transitions[stream] += 1
        evaluate(monitor.due(t), t)
    evaluate([name for name, tm in monitor.twins.items() if tm.new_transitions], t)
    return result
