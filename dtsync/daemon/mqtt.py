"""Building aiomqtt clients from the `mqtt` config section: protocol, credentials, TLS, will, backoff.

Shared by the daemon, `dtsync publish` and `dtsync watch`, so all three reach the broker the same way.
MQTT v5 is the default; "3.1.1" is for brokers that speak only that (amqtt, RabbitMQ's MQTT plugin, NATS).
"""

from __future__ import annotations

import contextvars
import math
import os
import random
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dtsync.config import MqttSettings

_PUBLISH_MID: contextvars.ContextVar[int] = contextvars.ContextVar("publish_mid")


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a QoS 1 publish with a failure reason code (MQTT v5), e.g. 0x87 Not authorized."""


class Client(aiomqtt.Client):
    """aiomqtt's client, plus what it drops: the reason code of each PUBACK.

    On MQTT v5 a broker that refuses a publish (an ACL, a quota) still answers PUBACK, with a failure reason
    code; aiomqtt completes `publish` as if it were delivered. `publish_acked` raises PublishRefused instead,
    so an event that was refused stays in the outbox.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused: dict[int, str] = {}
        paho_publish = self._client.publish

        def publish(*a: Any, **k: Any) -> Any:
            info = paho_publish(*a, **k)
            _PUBLISH_MID.set(info.mid)  # same task as the awaiting caller: it reads the mid back
            return info

        self._client.publish = publish  # type: ignore[method-assign]

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self._refused[mid] = str(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        """`publish` at QoS 1 that raises PublishRefused when the PUBACK carries a failure reason code."""
        await self.publish(topic, payload, qos=1, **kwargs)
        refused = self._refused.pop(_PUBLISH_MID.get(-1), None)
        if refused is not None:
            raise PublishRefused(f"broker refused the publish to {topic}: {refused}")


def make_client(
    settings: MqttSettings,
    *,
    client_id: str | None = None,
    will: aiomqtt.Will | None = None,
    timeout: float = 10.0,
) -> Client:
    """A not-yet-connected client (`async with` connects); raises ConfigError if the password is unreadable."""
    protocol = aiomqtt.ProtocolVersion.V5 if settings.protocol == "5" else aiomqtt.ProtocolVersion.V311
    tls = None
    if settings.tls is not None:
        tls = aiomqtt.TLSParameters(
            ca_certs=_expand(settings.tls.ca_file),
            certfile=_expand(settings.tls.cert_file),
            keyfile=_expand(settings.tls.key_file),
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    return Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password(),
        identifier=client_id or settings.client_id,
        protocol=protocol,
        will=will,
        tls_params=tls,
        keepalive=settings.keepalive,
        timeout=timeout,
    )


def _expand(path: Path | None) -> str | None:
    """Paths may name systemd's ``${CREDENTIALS_DIRECTORY}``, as ``password_file`` may."""
    return None if path is None else os.path.expandvars(str(path))


def expiry_properties(settings: MqttSettings, seconds: float) -> Properties | None:
    """MQTT v5 message-expiry property (whole seconds, at least 1); None on 3.1.1, which has no properties."""
    if settings.protocol != "5":
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = max(1, math.ceil(seconds))
    return props


def backoff(low: float, high: float, rng: random.Random | None = None) -> Iterator[float]:
    """Reconnect delays: exponential from `low` to `high` with "equal jitter" (each delay uniform in [d/2, d]),
    so a fleet of daemons does not reconnect in lock-step after a broker restart."""
    rng = rng or random.Random()
    delay = low
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(high, delay * 2)
