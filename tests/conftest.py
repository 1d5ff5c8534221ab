"""Fixtures shared by the tests that need a live broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_harness import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free loopback port, stopped after the test."""
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()
