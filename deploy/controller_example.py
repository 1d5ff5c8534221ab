"""Example gNB-controller side of dtsync: receive resync events, act on each one once, ignore stale ones, and
tell the daemon when a twin was resynchronised.

    python deploy/controller_example.py --host broker.example --port 8883 --ca-file /etc/gnb/ca.crt \
        --username controller --password-file /etc/gnb/mqtt-password --cell cell-1 --client-id gnb-ctl-cell-1

A controller makes three calls (deploy/README.md, "Controllers"):

1. subscribe to ``<prefix>/<cell>/twin/+/resync`` (QoS 1, persistent session) and keep each fresh event once;
2. resynchronise the twin, and restart its telemetry under a new version ``v`` (a string on every transition);
3. publish the acknowledgement ``{"event_id", "twin_version", "time"}`` to ``<prefix>/<cell>/twin/<twin>/resynced``
   (QoS 1): the daemon then drops the twin's window and judges it afresh, `resyncing` until it can.

With ``--testbed`` (needs dtsync installed) this controller runs the twins of dtsync's reference testbed itself
and really does all three: on an event it refits the twin's parameters from ``--fit-steps`` measured steps of
the real network (dtsync.testbed.variants.fitted), restarts that twin's telemetry with the new version, and
acks. ``dtsync demo`` runs it so. In that mode it also publishes the twins' telemetry, so under the shipped
Mosquitto ACL it needs the cell's producer rights as well as the controller's.

Delivery is at least once: the daemon keeps an event in its outbox until the broker acknowledges it and re-sends
it after a reconnect or a restart, and QoS 1 itself may deliver a message twice. So a controller:

- de-duplicates by ``event_id`` (unique per event, identical in every copy of it);
- ignores an event past its deadline: ``expires_at`` in the payload (the daemon's wall clock, so keep clocks in
  NTP sync) and, on MQTT v5, the message expiry interval, which is the time the event had left when the broker
  handed it over (the broker itself drops events that expire while they wait for a disconnected controller);
- keeps a persistent session (fixed ``--client-id``, clean start off, a session expiry), so events raised while
  the controller restarts wait at the broker instead of being lost.

Only the standard library and paho-mqtt (a dtsync dependency) are needed without ``--testbed``; copy this file
and replace ``resync_twin`` with the call that resynchronises the twin (it returns the twin's new version, or
None when nothing was done and there is nothing to acknowledge). The de-duplication memory lives in the process: if a
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


def resync_twin(event: dict[str, Any]) -> str | None:
    """Replace with the controller's action: re-synchronise twin ``event['twin']`` of cell ``event['cell']``;
    return its new version (then acknowledged), or None if nothing was done.

    The event also carries the evidence: mismatch and its interval, noise floor, threshold, the worst states
    (``top_states``), sample counts, coverage, the twin's ``version`` and the daemon ``instance`` that raised it.
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
    return None


def ack_payload(event: dict[str, Any], version: str, now: float) -> bytes:
    """Call 3: the acknowledgement of `event`, published to ``<prefix>/<cell>/twin/<twin>/resynced``."""
    return json.dumps({"event_id": event["event_id"], "twin_version": version, "time": now}).encode()


class TestbedTwins:
    """``--testbed``: twins of dtsync's reference testbed, run here (telemetry paced to the wall clock, every
    transition carrying its twin's version), and resynchronised by refitting them on the real network."""

    def __init__(self, client: paho.Client, prefix: str, cell: str, names: list[str], *, rate: float, fit_steps: int,
                 seed: int, start: float, stale_after: float | None, stale_preset: str) -> None:  # fmt: skip
        from dtsync.testbed import Switch, preset

        self.client, self.prefix, self.cell = client, prefix, cell
        self.rate, self.fit_steps, self.seed = rate, fit_steps, seed
        self.real = preset("real")
        self.lock = threading.Lock()
        self.refits = 0
        self.streams: dict[str, tuple[str, Any, Any]] = {}  # twin -> (version, generator, next transition)
        switch = None if stale_after is None else Switch(int(stale_after * rate), preset(stale_preset))
        for i, name in enumerate(names):
            self._start(name, self.real, "v0", start, seed + i, switch)

    def _start(self, name: str, params: Any, version: str, start: float, seed: int, switch: Any = None) -> None:
        from dtsync.testbed import transitions

        stream = transitions(params, steps=10**12, seed=seed, start_time=start, step_seconds=1 / self.rate,
                             switch=switch)  # fmt: skip
        self.streams[name] = (version, stream, next(stream))

    def resync(self, event: dict[str, Any]) -> str | None:
        """Call 2: refit the twin from the real network's measured steps, restart its telemetry as a new version."""
        import numpy as np

        from dtsync.testbed.variants import fitted

        name = event.get("twin")
        if event.get("cell") != self.cell or name not in self.streams:
            return None  # not a twin run here
        self.refits += 1
        params = fitted(self.real, self.fit_steps, np.random.default_rng(self.seed + 7919 * self.refits))
        version = f"v{self.refits}"
        with self.lock:
            self._start(name, params, version, time.time(), self.seed + 104729 * self.refits)
        log("twin refitted", twin=name, version=version, fit_steps=self.fit_steps, event_id=event.get("event_id"))
        return version

    def run(self, stop: threading.Event) -> None:
        """Publish each twin's transitions as their time comes, in batches every 0.1 s."""
        import msgspec

        from dtsync.contract import encode_batch

        while not stop.is_set():
            now = time.time()
            with self.lock:
                for name, (version, stream, nxt) in list(self.streams.items()):
                    batch = []
                    while nxt.t <= now:
                        batch.append(msgspec.structs.replace(nxt, v=version))
                        nxt = next(stream)
                    self.streams[name] = (version, stream, nxt)
                    if batch:
                        self.client.publish(f"{self.prefix}/{self.cell}/twin/{name}", encode_batch(batch), qos=1)
            stop.wait(0.1)


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
    t = p.add_argument_group("--testbed: run twins of dtsync's reference testbed and really resync them")
    t.add_argument("--testbed", action="store_true")
    t.add_argument("--twin", action="append", default=[], help="a twin of --cell run here (repeatable)")
    t.add_argument("--rate", type=float, default=1000.0, help="transitions per second per twin")
    t.add_argument("--fit-steps", type=int, default=30000, help="measured steps of the real network a refit uses")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--start-time", type=float, help="wall time of the twins' first step (default: now)")
    t.add_argument("--stale-after", type=float, help="seconds after the start the twins' model goes stale")
    t.add_argument("--stale-preset", default="misestimated-channel", help="what the stale model becomes")
    args = p.parse_args(argv)
    if args.testbed and (not args.cell or len(args.cell) != 1 or not args.twin):
        p.error("--testbed needs one --cell and at least one --twin")

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
    twins = None
    if args.testbed:
        twins = TestbedTwins(client, args.prefix, args.cell[0], args.twin, rate=args.rate, fit_steps=args.fit_steps,
                             seed=args.seed, start=args.start_time or time.time(), stale_after=args.stale_after,
                             stale_preset=args.stale_preset)  # fmt: skip
    resync = resync_twin if twins is None else twins.resync

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
        event = verdict.event
        version = resync(event)  # the PUBACK goes out after this returns: a crash here means redelivery
        if version is not None:
            ack = f"{args.prefix}/{event['cell']}/twin/{event['twin']}/resynced"
            client.publish(ack, ack_payload(event, version, time.time()), qos=1)
            log("resync acknowledged", topic=ack, event_id=event["event_id"], version=version)
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
    if twins is not None:
        threading.Thread(target=twins.run, args=(done,), name="testbed-twins", daemon=True).start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    client.disconnect()
    client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
