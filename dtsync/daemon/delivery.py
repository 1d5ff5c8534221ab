"""Resync-event delivery: outbox first, then QoS 1 publishes retried on a timer until the broker's PUBACK.

An event is written to the SQLite outbox before its first publish and leaves it only on PUBACK, or unsent
past its deadline (`expires_at`, counted as expired). Every pending event is tried after each (re)connect and
then every `RETRY_SECONDS` while connected, so an event whose publish timed out on a live connection, or that
was in flight when the broker died, is sent again without waiting for the next reconnect. An event already in
flight *on the current connection* is not sent twice at once; an attempt on an older connection never blocks
a new one. An event whose PUBACK arrived is never counted as expired.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import structlog

from dtsync.config import MqttSettings
from dtsync.daemon.metrics import DaemonMetrics
from dtsync.daemon.mqtt import Client, PublishRefused, expiry_properties
from dtsync.daemon.outbox import Outbox, PendingEvent

log = structlog.get_logger("dtsync.daemon")

PUBLISH_TIMEOUT = 10.0
RETRY_SECONDS = 5.0
CONCURRENT_SENDS = 16  # below paho's in-flight window (20), so a long backlog does not time out in its queue


class Delivery:
    """Sends outbox events over whatever client is current (`client()`; None while disconnected)."""

    def __init__(self, outbox: Outbox, metrics: DaemonMetrics, client: Callable[[], Client | None],
                 settings: MqttSettings) -> None:  # fmt: skip
        self.outbox = outbox
        self.metrics = metrics
        self._client = client
        self._settings = settings
        self._in_flight: dict[str, Client] = {}  # event id -> the client it is being published on
        self._slots = asyncio.Semaphore(CONCURRENT_SENDS)
        self.metrics.outbox_pending.set(len(outbox))

    def add(self, event: PendingEvent) -> None:
        """Persist a new event (durable before this returns); `send` publishes it."""
        self.outbox.add(event)
        self.metrics.outbox_pending.set(len(self.outbox))

    async def send(self, event: PendingEvent) -> None:
        """Publish one outbox event at QoS 1; it leaves the outbox on PUBACK, or when its deadline passed."""
        client = self._client()
        if client is None or self._in_flight.get(event.event_id) is client:
            return
        self._in_flight[event.event_id] = client
        try:
            remaining = event.expires_at - time.time()
            if remaining <= 0:
                self.outbox.remove(event.event_id)
                self.metrics.events_expired.inc()
                log.warning("resync event expired unsent", event_id=event.event_id, topic=event.topic)
                return
            props = expiry_properties(self._settings, remaining)
            await client.publish_acked(event.topic, event.payload, properties=props, timeout=PUBLISH_TIMEOUT)
            self.outbox.remove(event.event_id)
            log.info("resync event acknowledged by the broker", event_id=event.event_id)
        except PublishRefused as e:
            log.error("resync event refused by the broker; kept in the outbox (check the broker ACL)",
                      event_id=event.event_id, error=str(e))  # fmt: skip
        except aiomqtt.MqttError as e:
            log.warning("resync event not acknowledged yet; kept in the outbox", event_id=event.event_id,
                        error=str(e))  # fmt: skip
        finally:
            if self._in_flight.get(event.event_id) is client:
                del self._in_flight[event.event_id]
            self.metrics.outbox_pending.set(len(self.outbox))

    async def flush(self) -> None:
        """Try every pending event, oldest first, a few at a time (one slow PUBACK does not hold the rest)."""
        if self._client() is None:
            return

        async def send(event: PendingEvent) -> None:
            async with self._slots:
                await self.send(event)

        await asyncio.gather(*(send(event) for event in self.outbox.pending()))

    async def retry_forever(self) -> None:
        """Every RETRY_SECONDS: try what is still pending (a no-op while disconnected or when empty)."""
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if len(self.outbox):
                await self.flush()

    def pending_by_twin(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Pending events by (cell, twin), decoded: what a restored trigger must not fire again."""
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for event in self.outbox.pending():
            try:
                body = json.loads(event.payload)
                found.setdefault((str(body["cell"]), str(body["twin"])), []).append(body)
            except (ValueError, KeyError, TypeError):
                continue  # not an event this daemon wrote; it is still delivered, just not reconciled
        return found
