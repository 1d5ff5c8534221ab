"""The broker link: connect, subscribe, consume, reconnect; and the liveness that cannot go stale.

Reconnects use exponential backoff with jitter capped at `mqtt.reconnect_max_seconds` (default 2 s), so the
daemon is back within about that long of the broker's return after an outage of any length. A broker that
refuses the connection (bad credentials, not authorised) or a failed TLS handshake is logged as such, with
the broker's reason code, at error level (once a minute per kind), rather than as "unreachable".

Liveness: `<prefix>/_daemon/<instance>/status` says `online` on every connect and is re-published every
`mqtt.liveness_seconds` with an MQTT v5 message expiry of three periods, so a stale `online` left by a daemon
that died while the broker was away expires; the last will (and a clean stop) says `offline`. Beside it,
`.../heartbeat` carries the same state with a wall-clock `time` and `expires_at`, for MQTT 3.1.1 consumers
that cannot rely on message expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import msgspec
import paho.mqtt.client as paho
import structlog

from dtsync.config import MqttSettings
from dtsync.daemon.metrics import DaemonMetrics
from dtsync.daemon.mqtt import Client, backoff, expiry_properties, make_client
from dtsync.daemon.topics import Topics
from dtsync.logs import ReasonLimiter

log = structlog.get_logger("dtsync.daemon")
_JSON = msgspec.json.Encoder()


def describe_failure(error: aiomqtt.MqttError, connecting: bool) -> tuple[str, str]:
    """(kind, message) for a failed connection: `refused` (a CONNACK reason code while `connecting`), `tls`,
    or `unreachable`."""
    if connecting and isinstance(error, aiomqtt.MqttCodeError) and error.rc not in (None, 0):
        rc = error.rc
        if isinstance(rc, int):  # MQTT 3.1.1 CONNACK return code
            code, name = rc, paho.connack_string(rc)
        else:  # MQTT v5 reason code, e.g. 134 Bad user name or password, 135 Not authorized
            code, name = rc.value, str(rc)
        return "refused", f"broker refused the connection: reason code {code} ({name}); check the credentials"
    text = str(error)
    cause = error.__cause__ or error.__context__
    if isinstance(cause, ssl.SSLError) or "SSL" in text or "certificate" in text.lower():
        return "tls", f"TLS handshake with the broker failed: {text}"
    return "unreachable", text


def connect_timeout(keepalive: float) -> float:
    """How long one attempt waits for a CONNACK (and a SUBACK): a frozen broker holds an attempt this long,
    and paho gives up on a silent socket after about one and a half keepalives anyway."""
    return min(10.0, max(2.0, 1.5 * keepalive))


class Connection:
    """Owns the current client (None while disconnected); `run()` until `stop` is set."""

    def __init__(self, settings: MqttSettings, instance: str, topics: Topics, metrics: DaemonMetrics,
                 on_connect: Callable[[Client], Awaitable[None]], on_message: Callable[[str, bytes], None],
                 stop: asyncio.Event, before_goodbye: Callable[[], Awaitable[None]]) -> None:  # fmt: skip
        self.settings = settings
        self.instance = instance
        self.metrics = metrics
        self.liveness = topics.daemon_status(instance)
        self.heartbeat = topics.daemon_heartbeat(instance)
        self._on_connect = on_connect
        self._on_message = on_message
        self._stop = stop
        self._before_goodbye = before_goodbye
        self._failures = ReasonLimiter("broker connection failed", interval=60.0, level="error")
        self.client: Client | None = None
        self.ever_connected = False

    async def run(self) -> None:
        s = self.settings
        delays = backoff(s.reconnect_min_seconds, s.reconnect_max_seconds)
        will = aiomqtt.Will(self.liveness, b"offline", qos=1, retain=True)
        while not self._stop.is_set():
            client = make_client(s, client_id=s.client_id or f"dtsync-{self.instance}", will=will,
                                 timeout=connect_timeout(s.keepalive))  # fmt: skip
            connecting = True
            try:
                async with client:
                    connecting = False
                    self.client = client
                    await self._connected(client)
                    delays = backoff(s.reconnect_min_seconds, s.reconnect_max_seconds)
                    await self._consume(client)
                    await self._goodbye(client)
                    return
            except aiomqtt.MqttError as e:
                self._report(e, connecting)
            finally:
                self.client = None
                self.metrics.mqtt_connected.set(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), next(delays))

    def _report(self, error: aiomqtt.MqttError, connecting: bool) -> None:
        kind, message = describe_failure(error, connecting)
        fields = {"host": self.settings.host, "port": self.settings.port, "error": message}
        if kind == "unreachable":
            log.warning("broker connection lost" if self.ever_connected else "broker unreachable", **fields)
        else:  # refused or TLS: retrying will not fix it by itself; say so loudly (rate-limited)
            self._failures.log(log, kind, **fields)

    async def _connected(self, client: Client) -> None:
        await self.publish_liveness(client, "online")
        self.metrics.mqtt_connected.set(1)
        self.metrics.mqtt_connects.inc()
        self.ever_connected = True
        log.info("connected", host=self.settings.host, port=self.settings.port, protocol=self.settings.protocol)
        await self._on_connect(client)

    async def publish_liveness(self, client: Client, state: str) -> None:
        """The retained liveness and heartbeat; `online` expires (v5) after three refresh periods."""
        every = self.settings.liveness_seconds
        now = time.time()
        expiry = expiry_properties(self.settings, 3 * every) if state == "online" else None
        await client.publish(self.liveness, state.encode(), qos=1, retain=True, properties=expiry, timeout=5.0)
        beat = {"instance": self.instance, "state": state, "time": now, "every_seconds": every,
                "expires_at": now + 3 * every}  # fmt: skip
        await client.publish(self.heartbeat, _JSON.encode(beat), qos=1, retain=True, properties=expiry, timeout=5.0)

    async def liveness_forever(self) -> None:
        """Refresh the retained `online` every `liveness_seconds` while connected."""
        while True:
            await asyncio.sleep(self.settings.liveness_seconds)
            client = self.client
            if client is not None:
                with contextlib.suppress(aiomqtt.MqttError):
                    await self.publish_liveness(client, "online")

    async def _consume(self, client: Client) -> None:
        """Handle messages until stopped (returns) or the connection breaks (MqttError)."""
        consume = asyncio.create_task(self._handle_all(client))
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({consume, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (consume, stop):
            task.cancel()
        if consume in done:
            consume.result()  # re-raises the MqttError that ended it

    async def _handle_all(self, client: Client) -> None:
        async for message in client.messages:
            self._on_message(message.topic.value, message.payload)

    async def _goodbye(self, client: Client) -> None:
        """Clean stop: give pending events a short chance, then say offline (the will is not sent)."""
        with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
            await self._before_goodbye()
        with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
            await asyncio.wait_for(self.publish_liveness(client, "offline"), 1.5)

    async def subscribe(self, filters: list[str], *, subscribe: bool) -> None:
        client = self.client
        if client is None:
            return  # the next connect subscribes from the monitors
        with contextlib.suppress(aiomqtt.MqttError):
            for topic in filters:
                await (client.subscribe(topic, qos=1) if subscribe else client.unsubscribe(topic))

    async def publish_retained(self, topic: str, payload: bytes) -> None:
        """A retained QoS 1 message; dropped if disconnected (the next connect re-publishes statuses)."""
        client = self.client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, payload, qos=1, retain=True)
