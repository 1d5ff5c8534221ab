"""Measure what a dtsync daemon needs on this machine: memory per twin, transitions/s per core, compute per eval.

    .venv/bin/python deploy/measure_sizing.py                      # 1 and 5 twins, window 5000, 8 states x 2 actions
    .venv/bin/python deploy/measure_sizing.py --twins 1 5 10 --states 64 --actions 4 --transitions 20000

For each twin count: a private Mosquitto (Debian's `mosquitto`) on a free loopback port, a real `dtsync run`
process (window `--window`, evaluated every 500 transitions, 2 worker processes), and `dtsync publish` sending
`--transitions` transitions on the real stream and on every twin stream (`--batch` per message, QoS 1, as fast as
the broker takes them). When the daemon has counted them all and its last evaluations have landed, it reads:

- memory: VmRSS of the daemon process and of its worker processes (/proc/<pid>/status), windows full;
- ingest: transitions per second of wall time, and per CPU-second of the daemon's main process — the event loop
  that decodes and windows every transition, the part that does not spread over workers (the publisher shares
  the machine, so the wall-time figure is a lower bound);
- compute: evaluations done and worker CPU-milliseconds per evaluation (metric, noise floor and bounds).

Linux only (/proc). Prints one Markdown table row per twin count.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from dtsync.offline.sample import random_mdp, simulate, write_jsonl

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)  # not faster: each scrape costs the daemon CPU, which is being measured
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def scrape(url: str) -> dict[str, float]:
    """Sum of every sample per metric name (labels dropped): enough for the totals used here."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier]
        found += children
        frontier = children
    return found


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def measure(args: argparse.Namespace, twins: int, workdir: Path, mosquitto: str) -> dict[str, float]:
    rng = np.random.default_rng(1)
    R, P = random_mdp(rng, args.states, args.actions, support=3)
    traces = {"real": workdir / "real.jsonl", "twin": workdir / "twin.jsonl"}
    for path in traces.values():
        if not path.exists():
            write_jsonl(path, simulate(R, P, args.transitions, rng))
    port = free_port()
    (workdir / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 1000000\n"
    )
    broker = subprocess.Popen([mosquitto, "-c", str(workdir / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    listen = f"127.0.0.1:{free_port()}"
    config = {
        "window": {"count": args.window},
        "schedule": {"every_transitions": 500},
        "cells": {"cell-1": {"twins": {f"twin-{i}": {} for i in range(twins)}}},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "metrics": {"listen": listen},
        # The simulated traces keep their own time base (t from 0), so no receive-clock check.
        "daemon": {"instance": "sizing", "outbox_path": str(workdir / f"outbox-{twins}.sqlite"), "workers": 2,
                   "max_clock_skew_seconds": None},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    url = f"http://{listen}/metrics"
    with (workdir / f"daemon-{twins}.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "dtsync.cli", "run", "--config", str(workdir / "config.yaml")],
            stdout=log,
            stderr=log,
        )
    try:

        def connected() -> bool:
            if daemon.poll() is not None:
                raise SystemExit(f"daemon exited; see {workdir}/daemon-{twins}.log")
            try:
                return scrape(url).get("dtsync_mqtt_connected") == 1
            except OSError:
                return False

        wait(connected, 120, "the daemon to connect")
        time.sleep(1)
        workers = descendants(daemon.pid)
        cpu_main, cpu_workers = cpu_seconds(daemon.pid), sum(cpu_seconds(p) for p in workers)
        cmd = [sys.executable, "-m", "dtsync.cli", "publish", "--cell", "cell-1", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--batch", str(args.batch), "--qos", "1", "--rate", str(args.rate)]
        cmd += ["--real", str(traces["real"])]
        for i in range(twins):
            cmd += ["--twin", f"twin-{i}={traces['twin']}"]
        expected = args.transitions * (twins + 1)
        started = time.monotonic()
        publisher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait(lambda: scrape(url).get("dtsync_transitions_received_total", 0) >= expected, 600, "all transitions")
        ingest_wall = time.monotonic() - started
        ingest_cpu = cpu_seconds(daemon.pid) - cpu_main
        assert publisher.wait(60) == 0, publisher.stderr.read() if publisher.stderr else ""
        counts = [-1.0]

        def settled() -> bool:  # evaluations stop once no transition is new
            counts.append(scrape(url).get("dtsync_metric_compute_seconds_count", 0))
            time.sleep(1)
            return counts[-1] == counts[-2]

        wait(settled, 300, "the last evaluations")
        rss_main = rss_mib(daemon.pid)
        rss_workers = sum(rss_mib(p) for p in workers)
        worker_cpu = sum(cpu_seconds(p) for p in workers) - cpu_workers
        evaluations = counts[-1]
    finally:
        daemon.terminate()
        daemon.wait(30)
        broker.terminate()
        broker.wait(10)
    return {
        "twins": twins,
        "rss_main": rss_main,
        "rss_workers": rss_workers,
        "transitions": expected,
        "tps_wall": expected / ingest_wall,
        "tps_cpu": expected / max(ingest_cpu, 1e-9),
        "evaluations": evaluations,
        "ms_per_eval": 1000 * worker_cpu / max(evaluations, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--twins", type=int, nargs="+", default=[1, 5])
    p.add_argument("--window", type=int, default=5000)
    p.add_argument("--transitions", type=int, default=50_000, help="per stream")
    p.add_argument("--states", type=int, default=8)
    p.add_argument("--actions", type=int, default=2)
    p.add_argument("--batch", type=int, default=100, help="transitions per MQTT message")
    p.add_argument("--rate", type=float, default=0, help="transitions/s over all streams (0: as fast as possible)")
    args = p.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(mosquitto, os.X_OK):
        raise SystemExit("mosquitto is not installed: apt-get install mosquitto")
    print(
        f"window {args.window}, {args.states} states x {args.actions} actions, {args.transitions} transitions "
        f"per stream, {args.batch} per message, evaluation every 500 transitions, 2 workers, {os.cpu_count()} "
        "CPUs"
    )
    print(
        "| twins | RSS daemon | RSS workers | RSS total | transitions | per s (wall) | per CPU-s of the loop "
        "| evaluations | worker CPU per evaluation |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="dtsync-sizing-") as tmp:
        for twins in args.twins:
            r = measure(args, twins, Path(tmp), mosquitto)
            print(
                f"| {twins} | {r['rss_main']:.0f} MiB | {r['rss_workers']:.0f} MiB | "
                f"{r['rss_main'] + r['rss_workers']:.0f} MiB | {r['transitions']:,} | {r['tps_wall']:,.0f} | "
                f"{r['tps_cpu']:,.0f} | {r['evaluations']:.0f} | {r['ms_per_eval']:.1f} ms |",
                flush=True,
            )


if __name__ == "__main__":
    main()
