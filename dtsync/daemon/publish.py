"""`dtsync publish` (and `dtsync testbed publish`): send telemetry to the broker at a chosen rate.

A load generator and a way to feed recorded data to a running daemon. Streams are interleaved in trace-time
order exactly as `dtsync replay` reads them, so publishing a trace to a daemon and replaying it offline feed
the windows in the same order. Invalid lines are skipped and counted (the daemon would reject them anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dtsync.config import MqttSettings
from dtsync.contract import Rejection, Transition, encode_batch, encode_transition
from dtsync.daemon.mqtt import make_client
from dtsync.daemon.topics import REAL, Topics
from dtsync.offline.replay import merged


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
) -> PublishResult:
    """Publish `streams` (``real`` and twin names -> JSONL files) to `cell`'s topics, in trace-time order."""
    return await publish_items(settings, cell, ((name, item) for _, name, item in merged(streams)),
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
    `batch` > 1, each stream's transitions go out as JSON arrays of up to `batch` items.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    topics = Topics(settings.topic_prefix)
    result = PublishResult()
    pending: dict[str, list[Transition]] = {}
    started = time.perf_counter()
    async with make_client(settings, client_id=f"dtsync-publish-{cell}-{id(result):x}") as client:

        async def send(name: str, chunk: list[Transition]) -> None:
            topic = topics.real(cell) if name == REAL else topics.twin(cell, name)
            payload = encode_transition(chunk[0]) if batch == 1 else encode_batch(chunk)
            await client.publish(topic, payload, qos=qos)
            result.messages += 1
            result.transitions[name] += len(chunk)

        for name, item in items:
            if isinstance(item, Rejection):
                result.skipped += 1
                continue
            chunk = pending.setdefault(name, [])
            chunk.append(item)
            if len(chunk) >= batch:
                await send(name, chunk)
                pending[name] = []
            if rate > 0:
                ahead = sum(result.transitions.values()) / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        for name, chunk in pending.items():
            if chunk:
                await send(name, chunk)
    result.seconds = time.perf_counter() - started
    return result
