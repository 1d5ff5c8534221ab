"""Fixtures shared by the tests: the numba cache filled once, and a live broker for the tests that need one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mqtt_harness import Mosquitto

import dtsync


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Compile the engine's kernels once, into numba's on-disk cache, before any daemon starts.

    On a clean checkout the cache is empty, and every daemon's workers would otherwise compile the kernels
    themselves at start (about 15 s of CPU each), racing the tests' 30 s connect deadline on a busy machine.
    """
    rng = np.random.default_rng(0)
    R = rng.random((4, 2))
    P = rng.dirichlet(np.ones(4), size=(4, 2))
    P[0, 1] = 0.0  # a state-action with no data: the lower/upper paths compile too
    dtsync.dtbsm(R, P, R[::-1].copy(), P[::-1].copy(), gamma=0.9)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free loopback port, stopped after the test."""
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()
