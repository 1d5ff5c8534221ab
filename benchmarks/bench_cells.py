"""Capacity: how many cells one core carries at the defaults, with one-transition and batched messages.

Run: .venv/bin/python benchmarks/bench_cells.py [--quick] [--cells N] [--rate R] [--seconds S]

A private Mosquitto (tests/mqtt_harness.py), the real `dtsync run` with N cells of one twin each at the
default metric, window (5,000), schedule (every 500 transitions or 5 s) and trigger (evidence), one worker,
and a publisher process writing pre-built MQTT packets to a raw socket (next to no CPU of its own; see
bench_daemon.py). Each cell's real stream and twin stream carry the reference testbed (72 states x 6 actions;
the twin is the real network under another seed: faithful) at R transitions per second each, first as a
burst that fills every window, then paced. Measured over S seconds of the paced phase, from /proc:

- loop CPU: the daemon's main process (decode, time check, windows, scheduling; one core at most);
- worker CPU: its metric worker (evaluations);
- per cell: loop CPU per transition received x 2R, plus worker CPU per evaluation x the evaluations the
  schedule asks (max(2R / 500, 1 / 5) per second); cells per core = 1 / that, and 1 / the loop part alone
  bounds one instance (its loop is one core). Costs are normalised by what was actually received and
  computed, so a loop or worker that fell behind on a busy machine is not credited with its backlog.

The two cases are run back to back on the same machine: one transition per message (the baseline: what a
naive producer sends) and batches of `--batch` transitions per message. Each case checks that the daemon kept
up (transitions received over the phase at least 95 % of those offered), else its figures are marked.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_daemon import children, connect_packet, cpu_seconds, publish_packet  # noqa: E402
from mqtt_harness import DaemonProcess, Mosquitto, free_port, wait_for  # noqa: E402

from dtsync.contract import Transition, encode_batch, encode_transition  # noqa: E402
from dtsync.testbed import preset, transitions  # noqa: E402

WINDOW = 5000  # the default window.count
TICK = 0.05  # publisher pacing
EVERY_TRANSITIONS, EVERY_SECONDS = 500, 5.0  # the default schedule


def _stream(seed: int, steps: int) -> list[Transition]:
    return [msgspec.structs.replace(tr, t=None) for tr in transitions(preset("real"), steps=steps, seed=seed)]


def publisher_main(port: int, cells: int, batch: int, rate: float, seconds: float) -> None:
    """Burst WINDOW transitions per stream (batches of 500), then `rate` per stream in messages of `batch`."""
    streams = {"real": _stream(1, WINDOW + 2000), "twin/tw": _stream(2, WINDOW + 2000)}
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(connect_packet("bench-cells-publisher"))
    sock.recv(4)  # CONNACK
    topics = [(f"dtsync/cell-{c:03d}/{name}", name) for c in range(cells) for name in streams]
    for i in range(0, WINDOW, 500):
        sock.sendall(b"".join(publish_packet(t, encode_batch(streams[n][i : i + 500])) for t, n in topics))
    print("WARM", flush=True)
    sys.stdin.readline()  # the parent says when the windows are full and judged once
    payloads = {n: [encode_transition(trs[i]) if batch == 1 else encode_batch(trs[i : i + batch])
                    for i in range(0, len(trs) - batch + 1, batch)] for n, trs in streams.items()}  # fmt: skip
    per_message = batch / rate  # seconds between two messages of one stream
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) / per_message) + 1
        if due > sent:
            sock.sendall(b"".join(publish_packet(t, payloads[n][k % len(payloads[n])])
                                  for k in range(sent, due) for t, n in topics))  # fmt: skip
            sent = due
        time.sleep(TICK)
    print("DONE", sent * batch * len(topics), flush=True)
    sock.close()


def _received(d: DaemonProcess) -> float:
    _, text = d.get("/metrics")
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("dtsync_transitions_received_total{"))  # fmt: skip


def _evaluations(d: DaemonProcess) -> float:
    _, text = d.get("/metrics")
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("dtsync_metric_compute_seconds_count{"))  # fmt: skip


def run_case(workdir: Path, cells: int, batch: int, rate: float, seconds: float) -> dict[str, Any]:
    broker = Mosquitto(workdir)
    broker.start()
    config = {
        "cells": {f"cell-{c:03d}": {"twins": {"tw": {}}} for c in range(cells)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "daemon": {"instance": "bench", "outbox_path": str(workdir / "outbox.sqlite"), "workers": 1,
                   "log_format": "json", "stale_seconds": 3600},  # fmt: skip
    }
    daemon = DaemonProcess(workdir, config)
    try:
        daemon.wait_connected(120)  # dtsync_mqtt_connected is 1 once subscribed
        pub = subprocess.Popen([sys.executable, __file__, "--role", "publisher", "--port", str(broker.port),
                                "--cells", str(cells), "--batch", str(batch), "--rate", str(rate),
                                "--seconds", str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
        assert pub.stdout is not None
        assert pub.stdout.readline().strip() == "WARM"
        wait_for(lambda: _received(daemon) >= 2 * cells * WINDOW * 0.99, 120, "the burst received")
        # Every twin's first (cold) evaluation done before measuring: steady state is warm-started.
        wait_for(lambda: _evaluations(daemon) >= 2 * cells, 300, "two evaluations per twin", interval=0.5)
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        main = daemon.proc.pid
        workers = children(main)
        t0, r0, e0 = time.monotonic(), _received(daemon), _evaluations(daemon)
        c0 = cpu_seconds(main), sum(cpu_seconds(w) for w in workers)
        done = pub.stdout.readline().split()
        pub.wait(30)
        offered = float(done[1])
        time.sleep(1.0)  # the last messages in flight
        t1, r1, e1 = time.monotonic(), _received(daemon), _evaluations(daemon)
        c1 = cpu_seconds(main), sum(cpu_seconds(w) for w in children(main))
    finally:
        daemon.stop()
        broker.stop()
    wall = t1 - t0
    loop, worker = (c1[0] - c0[0]) / wall, (c1[1] - c0[1]) / wall
    return {"cells": cells, "batch": batch, "rate": rate, "wall": wall, "loop": loop, "worker": worker,
            "received": r1 - r0, "offered": offered, "evaluations": e1 - e0,
            "kept_up": (r1 - r0) >= 0.95 * offered}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 cells, 15 s per case")
    parser.add_argument("--cells", type=int, default=5, help="cells, one twin each (5: 1,000 messages/s "
                        "in the one-transition case at 100 transitions/s per stream)")
    parser.add_argument("--rate", type=float, default=100.0, help="transitions per second per stream")
    parser.add_argument("--batch", type=int, default=100, help="transitions per message in the batched case")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--role", choices=["publisher"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "publisher":
        publisher_main(args.port, args.cells, args.batch, args.rate, args.seconds)
        return
    if args.quick:
        args.cells, args.seconds = 3, 15.0
    rows = []
    for batch in (1, args.batch):
        with tempfile.TemporaryDirectory(prefix="bench-cells-") as tmp:
            rows.append(run_case(Path(tmp), args.cells, batch, args.rate, args.seconds))
    due = max(2 * args.rate / EVERY_TRANSITIONS, 1 / EVERY_SECONDS)  # scheduled evaluations per twin per second
    print(f"{args.cells} cells x 1 twin, testbed 72 x 6, window {WINDOW}, default schedule and trigger, "
          f"{args.rate:g} transitions/s per stream, {args.seconds:g} s measured per case; the schedule asks "
          f"{due:.2f} evaluations per twin per second")  # fmt: skip
    print(f"{'per message':>12} {'loop CPU':>9} {'worker CPU':>11} {'evals/s':>8} {'CPU/eval':>9} "
          f"{'received/offered':>17} {'loop/cell':>10} {'cells/core':>11} {'cells/loop core':>16}")  # fmt: skip
    per_core = []
    for r in rows:
        per_eval = r["worker"] * r["wall"] / max(r["evaluations"], 1)
        # CPU seconds per second one cell needs at the offered rate (per transition actually received, so a
        # loop that fell behind on a busy machine is not credited with the backlog it left).
        loop_cell = r["loop"] * r["wall"] / max(r["received"], 1) * 2 * r["rate"]
        per_cell = loop_cell + due * per_eval
        per_core.append(1 / per_cell)
        mark = "" if r["kept_up"] else "  (did not keep up)"
        print(f"{r['batch']:>12} {r['loop']:>9.3f} {r['worker']:>11.3f} {r['evaluations'] / r['wall']:>8.2f} "
              f"{per_eval * 1000:>7.0f}ms {r['received']:>8.0f}/{r['offered']:<8.0f} "
              f"{loop_cell * 1000:>8.1f}ms {1 / per_cell:>11.1f} {1 / loop_cell:>16.1f}{mark}")  # fmt: skip
    print(f"batched / one-transition messages: {per_core[1] / per_core[0]:.1f}x the cells per core")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
