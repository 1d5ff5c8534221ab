"""Example gNB-controller side of dtsync: receive resync events, act on each one once, ignore stale ones.

    python deploy/controller_example.py --host broker.example --port 8883 --ca-file /etc/gnb/ca.crt \
        --username controller --password-file /etc/gnb/mqtt-password --cell cell-1 --client-id gnb-ctl-cell-1

Delivery is at least once: the daemon keeps an event in its outbox until the broker acknowledges it and re-sends
it after a reconnect or a restart, and QoS 1 itself may deliver a message twice. So a controller:

- de-duplicates by ``event_id`` (unique per event, identical in every copy of it);
- ignores an event past its deadline: ``expires_at`` in the payload (the daemon's wall clock, so keep clocks in
  NTP sync) and, on MQTT v5, the message expiry interval, which is the time the event had left when the broker
  handed it over (the broker itself drops events that expire while they wait for a disconnected controller);
- keeps a persistent session (fixed ``--client-id``, clean start off, a session expiry), so events raised while
  the controller restarts wait at the broker instead of being lost.

Only the standard library and paho-mqtt (a dtsync dependency) are needed; copy this file and replace
``resync_twin`` with the call that resynchronises the twin. The de-duplication memory lives in the process: if a
resync must never run twice even across controller restarts, persist ``EventFilter.seen`` as well.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class Verdict:
    """What to do with one received event: act on it, or why not."""

    accept: bool
    reason: str  # "new", "duplicate", "expired" or "invalid: ..."
    event: dict[str, Any] | None = None


class EventFilter:
    """De-duplication by ``event_id`` and expiry, with bounded memory.

    An id is remembered until the event's own deadline: after it, any further copy is rejected as expired
    anyway, so forgetting the id then is safe. ``max_ids`` caps the memory whatever the deadlines say.
    """

    def __init__(self, max_ids: int = 100_000) -> None:
        self.max_ids = max_ids
        self.seen: OrderedDict[str, float] = OrderedDict()  # event_id -> deadline (wall clock), oldest first

    def check(
        self, payload: bytes, *, now: float, received_at: float | None = None, expiry_interval: float | None = None
    ) -> Verdict:
        """Judge one resync event payload.

        ``now`` is the current wall time; ``received_at`` when the message arrived (default ``now``) and
        ``expiry_interval`` its MQTT v5 message expiry interval in seconds (None on MQTT 3.1.1).
        """
        try:
            event = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return Verdict(False, "invalid: not JSON")
        if not isinstance(event, dict) or not isinstance(event.get("event_id"), str):
            return Verdict(False, "invalid: no event_id")
        expires_at = event.get("expires_at")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            return Verdict(False, "invalid: no expires_at")
        deadline = float(expires_at)
        if expiry_interval is not None:
            deadline = min(deadline, (now if received_at is None else received_at) + expiry_interval)
        self._forget_expired(now)
        event_id = event["event_id"]
        if event_id in self.seen:
            return Verdict(False, "duplicate", event)
        if now >= deadline:
            return Verdict(False, "expired", event)
        self.seen[event_id] = max(deadline, float(expires_at))
        while len(self.seen) > self.max_ids:
            self.seen.popitem(last=False)
        return Verdict(True, "new", event)

    def _forget_expired(self, now: float) -> None:
        for event_id in [e for e, until in self.seen.items() if until <= now]:
            del self.seen[event_id]


def resync_twin(event: dict[str, Any]) -> None:
    """Replace with the controller's action: re-synchronise twin ``event['twin']`` of cell ``event['cell']``.

    The event also carries the evidence: mismatch and its interval, noise floor, threshold, the worst states
    (``top_states``), sample counts, coverage and the daemon ``instance`` that raised it.
    """
    print(
        json.dumps(
            {
                "action": "resync",
                "cell": event["cell"],
                "twin": event["twin"],
                "event_id": event["event_id"],
                "mismatch": event.get("mismatch"),
            }
        ),
        flush=True,
    )


def log(message: str, **fields: Any) -> None:
    print(json.dumps({"log": message, **fields}), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Act once on each fresh dtsync resync event.")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--prefix", default="dtsync", help="mqtt.topic_prefix of the daemons")
    p.add_argument("--cell", action="append", help="cell to follow (repeatable); default: all cells")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path)
    p.add_argument("--ca-file", type=Path, help="CA of the broker's certificate; enables TLS")
    p.add_argument("--client-id", default="gnb-controller", help="fixed, so the broker keeps the session")
    p.add_argument("--session-expiry", type=int, default=3600, help="seconds the broker keeps our session")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--exit-after", type=int, default=0, help="exit after acting on this many events (0: never)")
    args = p.parse_args(argv)

    v5 = args.protocol == "5"
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,
    )
    if args.username:
        password = args.password_file.read_text().rstrip("\r\n") if args.password_file else None
        client.username_pw_set(args.username, password)
    if args.ca_file:
        client.tls_set(ca_certs=str(args.ca_file))
    filters = [f"{args.prefix}/{cell}/twin/+/resync" for cell in (args.cell or ["+"])]
    filters.append(f"{args.prefix}/_daemon/+/status")
    seen = EventFilter()
    acted = 0
    done = threading.Event()

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log("broker refused the connection", reason=str(reason))
            return
        log("connected", session_present=bool(flags.session_present))
        client.subscribe([(f, 1) for f in filters])  # QoS 1: at least once, hence the de-duplication

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        nonlocal acted
        if msg.topic.endswith("/status"):  # daemon liveness: online / offline (last will)
            log("daemon liveness", topic=msg.topic, status=msg.payload.decode(errors="replace"))
            return
        now = time.time()
        expiry = getattr(msg.properties, "MessageExpiryInterval", None) if msg.properties else None
        verdict = seen.check(msg.payload, now=now, expiry_interval=expiry)
        if not verdict.accept:
            log("event ignored", reason=verdict.reason, topic=msg.topic, event_id=(verdict.event or {}).get("event_id"))
            return
        assert verdict.event is not None
        resync_twin(verdict.event)  # the PUBACK goes out after this returns: a crash here means redelivery
        acted += 1
        if args.exit_after and acted >= args.exit_after:
            done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    props = None
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = args.session_expiry
    client.connect(
        args.host,
        args.port,
        keepalive=30,
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=props,
    )
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    client.loop_start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
