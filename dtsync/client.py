"""The producer side: publish transitions to a cell's telemetry topics, batched, through reconnects.

    from dtsync.client import Publisher
    with Publisher("cell-1", host="broker.example") as pub:     # a background thread owns the connection
        pub.send(Transition(s, a, r, s_next, t=time.time()))   # never blocks; False if the queue was full
        pub.send(tr, stream="twin-a")                          # a twin's stream

    async with AsyncPublisher("cell-1", settings) as pub:      # the same, on the caller's event loop
        pub.send(tr)                                           # never waits (drops when full)
        await pub.put(tr)                                      # waits for room instead (back-pressure)

`dtsync publish`, `dtsync testbed publish` and the Gymnasium wrapper (dtsync.gym) all send through this class.

Why it looks like this: a producer (a training loop, a controller) must never stall on the network. `send`
appends to a bounded in-memory queue and returns; a sender task takes from it, groups each stream's transitions
into messages of up to `batch` (a JSON array when batch > 1, the contract's batch form), and publishes them in
the order they filled. When the queue is full, `send` refuses the transition and counts it in `stats.dropped`
(the newest is dropped, so what is queued keeps its order). A partial batch goes out once it is `linger` seconds
old (None: only at `flush`/close, so every message but the last of each stream is full — what the CLI needs).

The connection is re-established with exponential backoff and jitter (`mqtt.reconnect_min_seconds` to
`reconnect_max_seconds`); a message whose publish failed is kept and sent again first after the reconnect.
Delivery is at least once at QoS 1 (a message may be repeated after a reconnect, never lost while queued); at
QoS 0 a message the client had written when the connection broke may be lost, as QoS 0 allows. What is still
queued when the publisher is closed after its timeout is counted in `stats.abandoned`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt

from dtsync.config import MqttSettings
from dtsync.contract import Transition, encode_batch, encode_transition
from dtsync.daemon.mqtt import backoff, make_client
from dtsync.daemon.topics import REAL, Topics

__all__ = ["AsyncPublisher", "Publisher", "PublisherError", "PublisherStats"]

_EXIT_FLUSH_SECONDS = 2.0  # at interpreter exit, for a Publisher never closed
_IDLE_POLL = 0.25  # seconds between checks of a sender with nothing to do (closing, linger deadlines)


class PublisherError(aiomqtt.MqttError):
    """The publisher could not reach the broker in the time given (`wait_connected`)."""


@dataclass
class PublisherStats:
    """What happened so far. ``sent`` counts transitions per stream handed to the broker (acknowledged at QoS 1)."""

    sent: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    dropped: int = 0  # refused by a full queue
    abandoned: int = 0  # still queued when the publisher was closed
    connects: int = 0
    last_error: str | None = None


class AsyncPublisher:
    """Batching, reconnecting publisher of one cell's telemetry, on the running event loop.

    `settings` is the `mqtt` section of a dtsync config (defaults: localhost:1883, MQTT v5); `host`/`port`
    override it. `queue_size` bounds the transitions held in memory (queued, in batches, or being sent) while the
    broker is slow or away.
    """

    def __init__(
        self,
        cell: str,
        settings: MqttSettings | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        batch: int = 100,
        linger: float | None = 0.1,
        queue_size: int = 100_000,
        qos: int = 0,
        client_id: str | None = None,
    ) -> None:
        if batch < 1 or queue_size < 1 or qos not in (0, 1, 2) or (linger is not None and linger < 0):
            raise ValueError("batch and queue_size must be >= 1, qos 0, 1 or 2, linger >= 0 or None")
        _check_name(cell, "cell")
        settings = settings or MqttSettings()
        self.settings = settings.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
        self.cell, self.batch, self.linger, self.qos, self.queue_size = cell, batch, linger, qos, queue_size
        self.client_id = client_id or f"dtsync-publisher-{cell}-{secrets.token_hex(4)}"
        self.stats = PublisherStats()
        self._topics = Topics(self.settings.topic_prefix)
        self._lock = threading.Lock()  # the queue is shared with producer threads (Publisher)
        self._queue: deque[tuple[str, Transition]] = deque()
        self._open: dict[str, list[Transition]] = {}  # each stream's batch being filled
        self._open_since = 0.0
        self._ready: deque[tuple[str, list[Transition]]] = deque()  # full batches, in the order they filled
        self._held = 0  # transitions in _open and _ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._connected = asyncio.Event()
        self._refused = asyncio.Event()  # the last attempt got an answer, and it was no (kept trying all the same)
        self._asleep = False
        self._flushing = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._streams = {REAL}  # stream names already checked

    # -- producer side ------------------------------------------------------------------------------------------

    def send(self, transition: Transition, stream: str = REAL) -> bool:
        """Queue one transition for `stream` (``real`` or a twin's name); never blocks. False: queue full,
        dropped and counted. Safe to call from any thread."""
        if stream not in self._streams:
            self._check_stream(stream)
        with self._lock:
            queued = len(self._queue)
            if queued + self._held >= self.queue_size:  # the bound covers batches being filled or sent too
                self.stats.dropped += 1
                return False
            self._queue.append((stream, transition))
            held = self._held
        # Wake a sleeping sender only when it has something to do: a first transition (its linger starts) or
        # another batch's worth. Waking it per transition would cost more than the send itself.
        if self._asleep and ((queued == 0 and held == 0) or (queued + 1) % self.batch == 0):
            self._wake_sender()
        return True

    async def put(self, transition: Transition, stream: str = REAL) -> None:
        """Queue one transition, waiting for room when the queue is full (back-pressure instead of a drop)."""
        if stream not in self._streams:
            self._check_stream(stream)
        while True:
            with self._lock:
                queued = len(self._queue)
                if queued + self._held < self.queue_size:
                    self._queue.append((stream, transition))
                    held = self._held
                    break
                self._room.clear()
            await self._room.wait()
        if self._asleep and ((queued == 0 and held == 0) or (queued + 1) % self.batch == 0):
            self._wake.set()

    def _check_stream(self, stream: str) -> None:
        _check_name(stream, "stream")
        self._streams.add(stream)

    @property
    def queued(self) -> int:
        """Transitions not yet handed to the broker (in the queue or in a batch being filled or sent)."""
        with self._lock:
            return len(self._queue) + self._held

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sender task on the running loop (``async with`` does this). ConfigError at once if the
        configured password cannot be read (a mistake no reconnect can fix)."""
        if self._task is not None:
            raise RuntimeError("publisher already started")
        self.settings.password()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = asyncio.create_task(self._run(), name=f"dtsync-publisher-{self.cell}")

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the broker accepted the connection; PublisherError with the last error after `timeout`, or
        at once if the broker refused it (a wrong protocol version or password does not fix itself by waiting;
        the publisher keeps trying in the background all the same)."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._connected, self._refused)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._connected.is_set():
            return
        if self._refused.is_set():
            raise PublisherError(self.stats.last_error or "the broker refused the connection")
        raise PublisherError(f"not connected after {timeout:g} s: {self.stats.last_error or 'no answer'}")

    async def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued, partial batches included; True once all of it was handed to the broker."""
        self._flushing += 1
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.queued:
                if self._task is None or self._task.done() or (deadline is not None and time.monotonic() > deadline):
                    return False
                await asyncio.sleep(0.005)
            return True
        finally:
            self._flushing -= 1

    async def aclose(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` seconds, then disconnect; what is left is counted in `stats.abandoned`."""
        if self._task is None:
            return
        await self.flush(timeout)
        self._closing = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), 1.0)
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.stats.abandoned += self.queued
        with self._lock:
            self._queue.clear()
            self._open.clear()
            self._ready.clear()
            self._held = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sender -------------------------------------------------------------------------------------------------

    def _wake_sender(self) -> None:
        self._asleep = False
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop already closed: nothing to wake
                loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        delays = None
        st = self.settings
        while not self._closing:
            connected = False
            try:
                async with make_client(st, client_id=self.client_id) as client:
                    connected = True
                    self._refused.clear()
                    self.stats.connects += 1
                    self._connected.set()
                    delays = None
                    if await _first(self._pump(client), _until_disconnected(client)) == 0:
                        return  # closed and drained
            except aiomqtt.MqttCodeError as e:  # a code: the broker answered, e.g. CONNACK "protocol version"
                self.stats.last_error = f"{'' if connected else 'the broker refused the connection: '}{e}"
                if not connected:
                    self._refused.set()
            except aiomqtt.MqttError as e:
                self.stats.last_error = str(e) or type(e).__name__
            except Exception as e:  # not a broker problem: stop, and let flush/close report it
                self.stats.last_error = f"{type(e).__name__}: {e}"
                raise
            finally:
                self._connected.clear()
            delays = delays or backoff(st.reconnect_min_seconds, st.reconnect_max_seconds)
            await asyncio.sleep(next(delays))

    async def _pump(self, client: aiomqtt.Client) -> None:
        """Move queued transitions into batches and publish them until closed (raises MqttError on a failure)."""
        while True:
            with self._lock:
                items = list(self._queue)
                self._queue.clear()
                self._held += len(items)
                for stream, tr in items:
                    chunk = self._open.get(stream)
                    if chunk is None:
                        if not self._open:
                            self._open_since = time.monotonic()
                        chunk = self._open[stream] = []
                    chunk.append(tr)
                    if len(chunk) >= self.batch:
                        self._ready.append((stream, self._open.pop(stream)))
                age = time.monotonic() - self._open_since
                if self._open and (self._flushing or self._closing or (self.linger is not None and age >= self.linger)):
                    self._ready.extend(self._open.items())
                    self._open.clear()
            if items:
                self._room.set()
            while self._ready:
                stream, chunk = self._ready[0]
                await self._publish(client, stream, chunk)
                with self._lock:
                    self._ready.popleft()
                    self._held -= len(chunk)
                self._room.set()
            if items:
                continue
            if self._closing and not self._open:
                return
            await self._sleep()

    async def _publish(self, client: aiomqtt.Client, stream: str, chunk: list[Transition]) -> None:
        topic = self._topics.real(self.cell) if stream == REAL else self._topics.twin(self.cell, stream)
        payload = encode_transition(chunk[0]) if self.batch == 1 else encode_batch(chunk)
        await client.publish(topic, payload, qos=self.qos)
        self.stats.messages += 1
        self.stats.sent[stream] += len(chunk)

    async def _sleep(self) -> None:
        """Wait for a producer, the linger deadline of a partial batch, or the idle poll, whichever is first."""
        timeout = _IDLE_POLL
        if self._open and self.linger is not None:
            timeout = min(timeout, max(0.0, self.linger - (time.monotonic() - self._open_since)))
        self._wake.clear()
        self._asleep = True
        try:
            if not self._queue:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            self._asleep = False


class Publisher:
    """:class:`AsyncPublisher` for synchronous code: its event loop runs in a daemon thread of its own.

    `send` is as cheap as the async one (a lock and an append) and never blocks; `flush`, `close` and
    `wait_connected` block the caller for at most their timeout.
    """

    def __init__(self, cell: str, settings: MqttSettings | None = None, **options: object) -> None:
        self._async = AsyncPublisher(cell, settings, **options)  # type: ignore[arg-type]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"dtsync-publisher-{cell}", daemon=True)
        self._thread.start()
        self._call(self._async.start(), None)
        self._closed = False
        atexit.register(self.close, _EXIT_FLUSH_SECONDS)  # a forgotten close() still delivers what is queued

    @property
    def stats(self) -> PublisherStats:
        return self._async.stats

    @property
    def queued(self) -> int:
        return self._async.queued

    @property
    def connected(self) -> bool:
        return self._async.connected

    def send(self, transition: Transition, stream: str = REAL) -> bool:
        """Queue one transition; never blocks. False: the queue was full and the transition was dropped."""
        return self._async.send(transition, stream)

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; PublisherError after `timeout` seconds."""
        self._call(self._async.wait_connected(timeout), None)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued was handed to the broker (True) or `timeout` passed (False)."""
        return bool(self._call(self._async.flush(timeout), None))

    def close(self, timeout: float = 5.0) -> None:
        """Flush for up to `timeout` seconds, disconnect and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._call(self._async.aclose(timeout), None)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            self._loop.close()

    def _call(self, coro: object, timeout: float | None) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Return... never: raises MqttError when the connection is lost. A publisher subscribes to nothing, so the
    message iterator yields nothing; it is aiomqtt's public way to learn of a disconnection while idle."""
    async for _ in client.messages:
        pass


async def _first(*coros: Any) -> int:
    """Run the coroutines until the first one finishes; cancel the others; its index, or its exception."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = next(i for i, task in enumerate(tasks) if task in done)
    tasks[first].result()  # re-raise its exception
    return first


def _check_name(name: str, what: str) -> None:
    if not name or any(c in name for c in "/+#\0"):
        raise ValueError(f"{what} name {name!r} must be non-empty, without '/', '+', '#'")
