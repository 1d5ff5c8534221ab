"""The aiomqtt range dtsync is pinned to, and the behaviour the pin protects: PUBACK reason codes are read.

dtsync.daemon.mqtt.Client overrides aiomqtt's publish callback to keep the PUBACK reason code (aiomqtt drops it),
so an event the broker refuses stays in the outbox. That hook depends on aiomqtt internals: pyproject pins the
range it was tested with, and this test fails if the installed version leaves the range or the hook stops working.
"""

from __future__ import annotations

import asyncio
import getpass
import importlib.metadata
from pathlib import Path

import pytest
from mqtt_harness import Mosquitto
from packaging.requirements import Requirement

from dtsync.config import MqttSettings
from dtsync.daemon.mqtt import PublishRefused, make_client


def test_installed_aiomqtt_is_in_the_pinned_range() -> None:
    pins = {Requirement(r).name: Requirement(r) for r in importlib.metadata.requires("dtsync") or []}
    assert pins["aiomqtt"].specifier, "aiomqtt must be pinned to a tested range"
    assert importlib.metadata.version("aiomqtt") in pins["aiomqtt"].specifier
    assert "paho-mqtt" in pins  # imported directly, so declared


def test_a_refused_publish_raises_and_an_accepted_one_does_not(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")
    broker = Mosquitto(tmp_path, extra_config=f"acl_file {acl}\nuser {getpass.getuser()}\n")
    broker.start()
    settings = MqttSettings(host="127.0.0.1", port=broker.port)

    async def go() -> None:
        async with make_client(settings, client_id="pin-test") as client:
            await client.publish_acked("allowed/x", b"1", timeout=5)
            with pytest.raises(PublishRefused, match="Not authorized"):
                await client.publish_acked("denied/x", b"1", timeout=5)

    try:
        asyncio.run(go())
    finally:
        broker.stop()
