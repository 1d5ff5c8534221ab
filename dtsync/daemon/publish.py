"""`dtsync publish` (and `dtsync testbed publish`): send telemetry to the broker at a chosen rate.

A load generator and a way to feed recorded data to a running daemon. Streams are interleaved in trace-time
order exactly as `dtsync replay` reads them, so publishing a trace to a daemon and replaying it offline feed
the windows in the same order. Invalid lines are skipped and counted (the daemon would reject them anyway).
A recorded `t` is replaced by the time of sending unless asked to keep it: the daemon rejects a `t` further than
`daemon.max_clock_skew_seconds` from its receive clock, and a recorded trace's clock is not today's.
Sending is dtsync.client's publisher, with back-pressure (a recorded trace is never dropped) and only full
batches but the last of each stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from dtsync.client import AsyncPublisher, PublisherError
from dtsync.config import MqttSettings
from dtsync.contract import Rejection, Transition
from dtsync.offline.replay import merged

CONNECT_TIMEOUT = 10.0  # seconds to reach the broker before giving up (a CLI must not wait forever)


@dataclass
class PublishResult:
    """What was sent: transitions and messages per stream, skipped lines, elapsed seconds."""

    transitions: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    skipped: int = 0
    seconds: float = 0.0


async def publish_traces(
    settings: MqttSettings,
    cell: str,
    streams: dict[str, Path],
    *,
    rate: float = 0.0,
    batch: int = 1,
    qos: int = 0,
    keep_time: bool = False,
) -> PublishResult:
    """Publish `streams` (``real`` and twin names -> JSONL files) to `cell`'s topics, in trace-time order.

    Each transition is stamped with the time it is sent (what a live producer would stamp), unless
    `keep_time`: then its recorded `t` goes out unchanged (for a daemon run with ``max_clock_skew_seconds: null``,
    e.g. to compare a live run with a replay of the same trace)."""

    def stamped(item: Transition | Rejection) -> Transition | Rejection:
        return item if keep_time or isinstance(item, Rejection) else msgspec.structs.replace(item, t=time.time())

    return await publish_items(settings, cell, ((name, stamped(item)) for _, name, item in merged(streams)),
                               rate=rate, batch=batch, qos=qos)  # fmt: skip


async def publish_items(
    settings: MqttSettings,
    cell: str,
    items: Iterable[tuple[str, Transition | Rejection]],
    *,
    rate: float = 0.0,
    batch: int = 1,
    qos: int = 0,
) -> PublishResult:
    """Publish (stream, transition) pairs to `cell`'s topics (stream ``real`` or a twin's name).

    `rate` is transitions per second over all streams (0: as fast as the broker takes them). With
    `batch` > 1, each stream's transitions go out as JSON arrays of up to `batch` items. Raises
    PublisherError if the broker cannot be reached, or not everything could be delivered.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    result = PublishResult()
    started = time.perf_counter()
    queued = 0
    publisher = AsyncPublisher(cell, settings, batch=batch, linger=None, queue_size=max(10_000, 4 * batch), qos=qos,
                               client_id=f"dtsync-publish-{cell}-{id(result):x}")  # fmt: skip
    async with publisher:
        await publisher.wait_connected(CONNECT_TIMEOUT)
        for name, item in items:
            if isinstance(item, Rejection):
                result.skipped += 1
                continue
            await publisher.put(item, name)
            queued += 1
            if rate > 0:
                ahead = queued / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        left = publisher.queued
        while not (delivered := await publisher.flush(CONNECT_TIMEOUT)):
            if publisher.queued >= left:  # no progress for CONNECT_TIMEOUT seconds: the broker is gone
                break
            left = publisher.queued
    result.transitions = publisher.stats.sent
    result.messages = publisher.stats.messages
    result.seconds = time.perf_counter() - started
    if not delivered:
        raise PublisherError(f"{queued - sum(result.transitions.values())} of {queued} transitions not delivered: "
                             f"{publisher.stats.last_error or 'timed out'}")  # fmt: skip
    return result
