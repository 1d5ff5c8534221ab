"""The demo's moving parts: testbed streams published live, the real daemon, and what a person sees.

The real network and a faithful twin run the reference testbed with the same parameters; the third stream is a
twin whose channel model goes stale halfway through (it switches to mis-estimated channel statistics while the
real network does not). The daemon is the real `dtsync run` process on a generated config. The stale twin is run
by the example controller (deploy/controller_example.py --testbed): when the daemon flags it, the controller
refits it from the real network's measured steps, restarts its telemetry under a new version and acknowledges,
which closes the loop. The view listens to the same status and resync topics a gNB controller would.

The controller script lives in the source tree; without it (an installed wheel) the demo runs the stale twin
itself and nobody resynchronises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import yaml

from dtsync.config import parse_config
from dtsync.contract import Transition, encode_batch
from dtsync.daemon.mqtt import make_client
from dtsync.daemon.topics import Topics
from dtsync.demo.broker import BrokerInfo, free_port, local_broker
from dtsync.testbed import Switch, TestbedParams, preset, transitions

CELL = "demo-cell"
TWINS = ("faithful", "stale")
STALE_PRESET = "misestimated-channel"
PUBLISH_EVERY = 0.1  # seconds between telemetry batches per stream
CONTROLLER = Path(__file__).resolve().parents[2] / "deploy" / "controller_example.py"


def demo_config(broker: BrokerInfo, workdir: Path, metrics_port: int, rate: float) -> dict[str, Any]:
    """The daemon's config for the demo: the paper's gamma 0.9, windows of 15 s of traffic, and the default
    evidence rule. The threshold 0.75 is below the stale twin's exact mismatch (2.342: `dtbsm` on the exact real
    and misestimated-channel MDPs) by more than the 1.5x the detection benchmark asks for; the faithful twin's
    exact mismatch is 0, though its point estimate on these windows reads above 1 (sampling noise over 72
    states), which is what the evidence rule sees through."""
    window = int(15 * rate)
    return {
        "gamma": 0.9,
        "window": {"count": window},
        "schedule": {"every_seconds": 2.0, "every_transitions": window // 2},
        "trigger": {"threshold": 0.75, "rearm_below": 0.5, "cooldown_seconds": 30, "min_samples": window // 10},
        "cells": {CELL: {"twins": {name: {} for name in TWINS}}},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "protocol": broker.protocol,
                 "reconnect_min_seconds": 0.2, "reconnect_max_seconds": 2.0},  # fmt: skip
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "daemon": {"instance": "demo", "outbox_path": str(workdir / "outbox.sqlite"), "log_format": "json",
                   "stale_seconds": 30},  # fmt: skip
    }


@dataclass
class TwinView:
    status: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    resyncs: dict[str, dict[str, Any]] = field(default_factory=dict)  # event id -> the resync that answered it
    states: list[tuple[float, str]] = field(default_factory=list)  # (wall time, state) at each change


@dataclass
class DemoResult:
    twins: dict[str, TwinView]
    started: float
    switch_at: float
    broker: str
    metrics_url: str
    daemon_exit: int | None
    controller: bool = True  # the example controller runs the stale twin (else the demo does, unresynchronised)


async def publish_testbed(settings: Any, rate: float, duration: float, started: float, stale: bool) -> None:
    """The real network, the faithful twin and (if `stale`) the stale twin, paced to the wall clock (t = send
    time)."""
    steps = int(rate * duration) + int(rate)
    topics = Topics(settings.topic_prefix)
    real = preset("real")
    stale_from = Switch(int(rate * duration / 2), preset(STALE_PRESET))

    def paced(params: TestbedParams, seed: int, switch: Switch | None = None) -> Iterator[Transition]:
        return transitions(params, steps=steps, seed=seed, start_time=started, step_seconds=1 / rate, switch=switch)

    streams = {
        topics.real(CELL): paced(real, 1),
        topics.twin(CELL, "faithful"): paced(preset("faithful"), 2),
    }
    if stale:
        streams[topics.twin(CELL, "stale")] = paced(real, 3, stale_from)
    pending = {topic: next(gen) for topic, gen in streams.items()}
    async with make_client(settings, client_id=f"dtsync-demo-testbed-{os.getpid()}") as client:
        while pending:
            now = time.time()
            for topic in list(pending):
                batch = []
                while topic in pending and (t := pending[topic].t) is not None and t <= now:
                    batch.append(pending[topic])
                    nxt = next(streams[topic], None)
                    if nxt is None:
                        del pending[topic]
                    else:
                        pending[topic] = nxt
                if batch:
                    await client.publish(topic, encode_batch(batch), qos=1)
            await asyncio.sleep(PUBLISH_EVERY)


async def watch_twins(settings: Any, views: dict[str, TwinView], on_change: Callable[[str, str], None]) -> None:
    """Follow the daemon's status and resync topics for the demo cell."""
    topics = Topics(settings.topic_prefix)
    async with make_client(settings, client_id=f"dtsync-demo-view-{os.getpid()}") as client:
        for twin in TWINS:
            await client.subscribe(topics.status(CELL, twin), qos=1)
            await client.subscribe(topics.resync(CELL, twin), qos=1)
        async for message in client.messages:
            if not message.payload:
                continue
            body = json.loads(message.payload)
            twin = body.get("twin")
            if twin not in views:
                continue
            if message.topic.value.endswith("/resync"):
                if body["event_id"] not in {e["event_id"] for e in views[twin].events}:  # at least once: dedupe
                    views[twin].events.append(body)
                    on_change(twin, "event")
            else:
                view = views[twin]
                view.status = body
                resync = body.get("resync") or {}
                if resync.get("event_id") and resync.get("mismatch_after") is not None:
                    view.resyncs[resync["event_id"]] = resync
                on_change(twin, "status")
                if not view.states or view.states[-1][1] != body.get("state"):
                    view.states.append((time.time(), str(body.get("state"))))
                    on_change(twin, "state")


async def run_demo(
    duration: float, rate: float, *, embedded: bool, on_start: Callable[[DemoResult, str], None],
    render: Callable[[DemoResult, str, str], None],
) -> DemoResult:  # fmt: skip
    """Run everything for `duration` seconds; `render(result, twin, what)` is called on each status or event."""
    async with local_broker(embedded=embedded) as broker:
        with tempfile.TemporaryDirectory(prefix="dtsync-demo-") as tmp:
            workdir = Path(tmp)
            metrics_port = 9108 if _port_free(9108) else free_port()
            raw = demo_config(broker, workdir, metrics_port, rate)
            config_path = workdir / "config.yaml"
            config_path.write_text(yaml.safe_dump(raw))
            settings = parse_config(raw).mqtt
            started = time.time()
            result = DemoResult({t: TwinView() for t in TWINS}, started, started + duration / 2, broker.kind,
                                f"http://127.0.0.1:{metrics_port}/metrics", None)  # fmt: skip
            log = (workdir / "daemon.log").open("wb")
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dtsync.cli", "run", "--config", str(config_path), stdout=log, stderr=log
            )
            controller = await _controller(broker, settings, rate, duration, started, log)
            result.controller = controller is not None
            ctl = f"controller pid {controller.pid}" if controller else "no controller (deploy/ not found)"
            on_start(result, f"broker: {broker.kind} on 127.0.0.1:{broker.port}; daemon pid {daemon.pid}; {ctl}; "
                             f"metrics: {result.metrics_url} (while the demo runs)")  # fmt: skip
            tasks = [
                asyncio.create_task(_retrying(lambda: watch_twins(settings, result.twins,
                                                                  lambda t, w: render(result, t, w)))),
                asyncio.create_task(_retrying(lambda: publish_testbed(settings, rate, duration, started,
                                                                      controller is None))),  # fmt: skip
            ]  # fmt: skip
            try:
                await asyncio.wait_for(daemon.wait(), duration)
            except TimeoutError:
                pass
            finally:
                for task in tasks:
                    task.cancel()
                for proc in (controller, daemon):
                    if proc is not None:
                        await _terminate(proc)
                log.close()
            result.daemon_exit = daemon.returncode
            if daemon.returncode != 0:
                sys.stderr.write((workdir / "daemon.log").read_text()[-4000:])
            return result


async def _controller(broker: BrokerInfo, settings: Any, rate: float, duration: float, started: float,
                      log: Any) -> asyncio.subprocess.Process | None:  # fmt: skip
    """The example controller, running the stale twin and resynchronising it (None: the script is not here)."""
    if not CONTROLLER.exists():
        return None
    return await asyncio.create_subprocess_exec(
        sys.executable, str(CONTROLLER), "--host", "127.0.0.1", "--port", str(broker.port), "--protocol",
        broker.protocol, "--prefix", settings.topic_prefix, "--cell", CELL, "--client-id",
        f"dtsync-demo-controller-{os.getpid()}", "--testbed", "--twin", "stale", "--rate", str(rate), "--seed", "3",
        "--start-time", repr(started), "--stale-after", repr(duration / 2), "--stale-preset", STALE_PRESET,
        stdout=log, stderr=log,
    )  # fmt: skip


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def _retrying(start: Callable[[], Any]) -> None:
    """Keep a client going while the daemon and broker come up (the first connects may be refused)."""
    while True:
        try:
            await start()
            return
        except aiomqtt.MqttError:
            await asyncio.sleep(0.3)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s, contextlib.suppress(OSError):
        s.bind(("127.0.0.1", port))
        return True
    return False
