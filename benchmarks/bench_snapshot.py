"""Cost of one state snapshot: one cell, two twins, windows of 5,000 transitions over 72 states x 6 actions.

    .venv/bin/python benchmarks/bench_snapshot.py

Captures the monitors and writes the file 20 times the way the daemon does (temp file, fsync, rename, directory
fsync) and prints the file size and the median and worst wall time, with the CPU time beside it.
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from pathlib import Path

from dtsync.config import parse_config
from dtsync.contract import Transition
from dtsync.daemon import state
from dtsync.monitor import CellMonitor


def main() -> None:
    config = parse_config({"window": {"count": 5000}, "cells": {"c": {"twins": {"a": {}, "b": {}}}}})
    monitor = CellMonitor("c", config)
    rng = random.Random(0)
    for stream in ("real", "a", "b"):
        for i in range(6000):
            tr = Transition(s=rng.randrange(72), a=rng.randrange(6), r=rng.random(), s_next=rng.randrange(72))
            monitor.add(stream, tr, float(i))
    path = Path(tempfile.mkdtemp()) / "s.snapshot"
    wall, cpu = [], []
    for _ in range(20):
        w0, c0 = time.perf_counter(), time.process_time()
        state.write(path, state.capture(uuid.uuid4(), {"c": monitor}, {}, {}))
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    wall.sort()
    cpu.sort()
    print(f"snapshot {path.stat().st_size / 1024:.0f} KiB; write median {wall[10] * 1e3:.1f} ms wall "
          f"(worst {wall[-1] * 1e3:.1f} ms), {cpu[10] * 1e3:.1f} ms CPU")  # fmt: skip


if __name__ == "__main__":
    main()
