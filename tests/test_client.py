"""dtsync.client against a real Mosquitto: batching, linger, the bounded queue, reconnects, back-pressure."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from mqtt_harness import Mosquitto, Subscriber, free_port, wait_for

from dtsync.client import AsyncPublisher, Publisher, PublisherError
from dtsync.config import MqttSettings
from dtsync.contract import Transition, decode_payload

FAST = {"reconnect_min_seconds": 0.1, "reconnect_max_seconds": 0.3}


def settings(port: int, **extra: Any) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port, **{**FAST, **extra})


def trs(n: int, start: int = 0) -> list[Transition]:
    return [Transition(i % 7, i % 3, 0.5, (i + 1) % 7, seq=i) for i in range(start, start + n)]


def received(sub: Subscriber, suffix: str) -> list[Transition]:
    return [tr for m in sub.on(suffix) for tr in decode_payload(m.payload)[0]]


def test_sync_publisher_sends_full_batches_in_order(broker: Mosquitto) -> None:
    sub = Subscriber(broker.port, ["dtsync/cell-1/#"])
    try:
        with Publisher("cell-1", settings(broker.port), batch=100, linger=None) as pub:
            pub.wait_connected(10)
            assert all(pub.send(tr) for tr in trs(1000))
            assert all(pub.send(tr, "twin-a") for tr in trs(250))
            assert pub.flush(10)
            assert pub.stats.sent == {"real": 1000, "twin-a": 250} and pub.stats.messages == 13
        wait_for(lambda: len(sub.on("/real")) == 10 and len(sub.on("/twin/twin-a")) == 3, 10, "13 messages")
        assert [tr.seq for tr in received(sub, "/real")] == list(range(1000))
        assert [len(decode_payload(m.payload)[0]) for m in sub.on("/twin/twin-a")] == [100, 100, 50]
    finally:
        sub.close()


def test_batch_of_one_keeps_the_interleaving_of_streams(broker: Mosquitto) -> None:
    sub = Subscriber(broker.port, ["dtsync/cell-1/#"])
    try:
        with Publisher("cell-1", settings(broker.port), batch=1, qos=1) as pub:
            for i, tr in enumerate(trs(40)):
                pub.send(tr, "real" if i % 2 == 0 else "twin-b")
            assert pub.flush(10)
        wait_for(lambda: len(sub.messages) == 40, 10, "40 messages")
        assert [decode_payload(m.payload)[0][0].seq for m in sub.messages] == list(range(40))
        assert [m.topic.endswith("/real") for m in sub.messages] == [i % 2 == 0 for i in range(40)]
        assert all(m.payload.startswith(b"{") for m in sub.messages)  # one object, not an array
    finally:
        sub.close()


def test_partial_batch_goes_out_after_linger_without_a_flush(broker: Mosquitto) -> None:
    sub = Subscriber(broker.port, ["dtsync/cell-1/#"])
    try:
        with Publisher("cell-1", settings(broker.port), batch=100, linger=0.2) as pub:
            pub.wait_connected(10)
            sent_at = time.monotonic()
            for tr in trs(5):
                pub.send(tr)
            wait_for(lambda: len(sub.on("/real")) == 1, 5, "the lingering batch")
            assert 0.15 <= time.monotonic() - sent_at < 2.0
            assert [tr.seq for tr in received(sub, "/real")] == [0, 1, 2, 3, 4]
    finally:
        sub.close()


def test_full_queue_drops_and_counts_and_send_never_blocks(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here: the publisher keeps trying to connect
    pub = Publisher("cell-1", settings(port), queue_size=500)
    try:
        slowest = 0.0
        results = []
        for tr in trs(800):
            started = time.perf_counter()
            results.append(pub.send(tr))
            slowest = max(slowest, time.perf_counter() - started)
        assert results == [True] * 500 + [False] * 300
        assert pub.stats.dropped == 300 and pub.queued == 500
        assert slowest < 0.05, slowest
        with pytest.raises(PublisherError, match="not connected"):
            pub.wait_connected(0.5)
        assert pub.stats.last_error
    finally:
        started = time.monotonic()
        pub.close(timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert pub.stats.abandoned == 500 and pub.stats.sent == {}


def persistent_subscriber(port: int, topic: str, got: list[bytes]) -> paho.Client:
    """A QoS 1 subscriber with a persistent session: the broker queues for it while it is away."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-persistent", clean_session=False,
                         protocol=paho.MQTTv311)  # fmt: skip
    ready = threading.Event()
    client.on_connect = lambda c, *a: c.subscribe(topic, 1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.reconnect_delay_set(0.1, 0.5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert ready.wait(10)
    return client


def test_publisher_reconnects_and_delivers_what_was_queued_during_an_outage(tmp_path: Path) -> None:
    # The subscriber's session (and what is queued for it) survives the broker's restart; `user root` keeps
    # mosquitto, started as root here, from switching to a user that cannot write the test's directory.
    broker = Mosquitto(tmp_path, f"persistence true\npersistence_location {tmp_path}/\nuser root\n")
    broker.start()
    got: list[bytes] = []
    sub = persistent_subscriber(broker.port, "dtsync/cell-1/real", got)
    pub = Publisher("cell-1", settings(broker.port), batch=10, linger=0.05, qos=1)
    try:
        pub.wait_connected(10)
        for tr in trs(100):
            pub.send(tr)
        assert pub.flush(10)
        broker.stop()
        wait_for(lambda: not pub.connected, 10, "the publisher to notice the outage")
        for tr in trs(200, start=100):
            assert pub.send(tr)  # queued while the broker is away
        time.sleep(0.5)
        assert pub.queued == 200
        broker.start()
        assert pub.flush(15)
        assert pub.stats.connects >= 2 and pub.stats.dropped == 0
        wait_for(lambda: len(got) >= 30, 15, "the batches queued during the outage")
        seqs = {tr.seq for payload in got for tr in decode_payload(payload)[0]}
        assert seqs == set(range(300))  # at least once: nothing lost (a batch may come twice)
    finally:
        pub.close()
        sub.loop_stop()
        sub.disconnect()
        broker.stop()


def test_async_put_waits_for_room_instead_of_dropping(broker: Mosquitto) -> None:
    sub = Subscriber(broker.port, ["dtsync/cell-2/#"])

    async def main() -> tuple[int, int]:
        async with AsyncPublisher("cell-2", settings(broker.port), batch=20, linger=None, queue_size=50,
                                  qos=1) as pub:  # fmt: skip
            await pub.wait_connected(10)
            for tr in trs(1000):
                await pub.put(tr, "twin-x")
            assert await pub.flush(10)
            return pub.stats.sent["twin-x"], pub.stats.dropped

    try:
        assert asyncio.run(asyncio.wait_for(main(), 60)) == (1000, 0)  # a deadlock fails instead of hanging
        wait_for(lambda: len(received(sub, "/twin/twin-x")) == 1000, 10, "1000 transitions")
        assert [tr.seq for tr in received(sub, "/twin/twin-x")] == list(range(1000))
    finally:
        sub.close()


def test_a_publisher_never_closed_still_delivers_at_exit(broker: Mosquitto, tmp_path: Path) -> None:
    script = tmp_path / "forgetful.py"
    script.write_text(
        "import sys\n"
        "from dtsync.client import Publisher\n"
        "from dtsync.contract import Transition\n"
        "pub = Publisher('cell-9', host='127.0.0.1', port=int(sys.argv[1]), batch=1000, linger=None)\n"
        "pub.wait_connected(10)\n"
        "for i in range(500):\n"
        "    pub.send(Transition(i, 0, 0.0, i + 1, seq=i))\n"  # a partial batch, and no close(): exit now
    )
    sub = Subscriber(broker.port, ["dtsync/cell-9/#"])
    try:
        out = subprocess.run([sys.executable, str(script), str(broker.port)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(received(sub, "/real")) == 500, 10, "the 500 transitions")
    finally:
        sub.close()


def test_bad_names_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="cell"):
        AsyncPublisher("cell/1")
    with pytest.raises(ValueError):
        AsyncPublisher("cell-1", batch=0)
    pub = AsyncPublisher("cell-1")
    with pytest.raises(ValueError, match="stream"):
        pub.send(Transition(0, 0, 0.0, 1), "twin/+")
