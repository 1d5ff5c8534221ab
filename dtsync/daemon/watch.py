"""`dtsync watch`: resync events, twin status and daemon liveness, as readable lines for a person."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from dtsync.config import MqttSettings
from dtsync.daemon.mqtt import make_client


def describe(topic: str, payload: bytes) -> tuple[str, str]:
    """(kind, one readable line) for a message on an event, status or liveness topic."""
    if topic.endswith("/resync"):
        e = json.loads(payload)
        return "event", (
            f"RESYNC {e['cell']}/{e['twin']}: mismatch {e['mismatch']:.4g} "
            f"[{e['mismatch_lower']:.4g}, {e['mismatch_upper']:.4g}], noise floor {e['noise_floor']:.4g}, "
            f"threshold {e['threshold']:.4g}; {e['reason']}; regret bound {e['regret_bound']:.4g} "
            f"(estimate {e['regret_estimate']:.4g}); event {e['event_id']}"
        )
    if "/_daemon/" in topic:
        instance = topic.split("/")[-2]
        return "daemon", f"DAEMON {instance}: {payload.decode(errors='replace') or '(cleared)'}"
    if not payload:
        return "status", f"STATUS {topic}: (cleared)"
    s = json.loads(payload)
    mismatch = "-" if s.get("mismatch") is None else f"{s['mismatch']:.4g}"
    return "status", f"STATUS {s['cell']}/{s['twin']}: {s['state']}, mismatch {mismatch}"


async def watch(
    settings: MqttSettings, echo: Callable[[str], Any], *, as_json: bool = False, max_events: int = 0
) -> None:
    """Subscribe to every cell's events and status and to all daemons' liveness; print until interrupted
    (or after `max_events` resync events)."""
    p = settings.topic_prefix
    seen = 0
    async with make_client(settings, client_id=f"dtsync-watch-{time.time_ns():x}") as client:
        for topic in (f"{p}/+/twin/+/resync", f"{p}/+/twin/+/status", f"{p}/_daemon/+/status"):
            await client.subscribe(topic, qos=1)
        async for message in client.messages:
            topic, payload = message.topic.value, bytes(message.payload)
            try:
                kind, line = describe(topic, payload)
            except (ValueError, KeyError, TypeError) as e:
                kind, line = "bad", f"UNREADABLE {topic}: {e}"
            if as_json:
                echo(json.dumps({"topic": topic, "kind": kind, "payload": payload.decode(errors="replace")}))
            else:
                echo(f"{time.strftime('%H:%M:%S')} {line}")
            if kind == "event":
                seen += 1
                if max_events and seen >= max_events:
                    return
