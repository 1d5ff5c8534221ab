"""Soak: the real daemon under steady load and broker restarts; memory, descriptors and events over time.

    .venv/bin/python benchmarks/soak.py --seconds 600 --check    # `make soak`
    .venv/bin/python benchmarks/soak.py --seconds 30 --restart-every 8 --sink-delay 4 --check   # in the suite
    .venv/bin/python benchmarks/soak.py --seconds 60 --check --keep DIR   # keep every log (broker: each packet)

A private Mosquitto (persistence on, so a clean restart keeps the subscriber's session), `dtsync run` with two cells
of one twin each, and publisher threads feeding `--rate` transitions/s in batches over the four streams. Each
twin alternates every `--period` seconds between the real network's behaviour and a reward offset of 1, so its
trigger fires and re-arms over and over: every firing is a resync event to deliver. The broker is restarted
every `--restart-every` seconds (SIGTERM, down for `--down` seconds). With `--kill-every`, the daemon is killed
(SIGKILL) at random moments about that often and restarted on the same outbox and state files. A
persistent-session subscriber collects the events; events raised are the ids the daemon logged.

Every `--sample` seconds it reads VmRSS of the daemon and its workers and the daemon's open descriptors
(/proc), and prints them; at the end the least-squares slope of each over the second half of the run (after
warm-up), and events raised (the daemon's dtsync_resync_events_total) against distinct event ids delivered.
With --check it exits 1 if an event was lost, if the broker came back without the subscriber's session, or if
RSS grows faster than --max-rss-slope MiB/min or the descriptor count by more than --max-fd-growth over the
second half.

What is checked is what the pieces guarantee together: the daemon keeps each event in its outbox until the
broker's PUBACK (so it reaches the broker at least once, across outages and daemon kills); the broker hands
what it acknowledged to a subscriber with a persistent session, across its own restarts only as far as it
saved that session: Mosquitto saves it on a clean stop (SIGTERM, as here) and every `autosave_interval`
(after a `kill -9`, what it acknowledged since the last save is gone). A subscriber that comes back to a
broker without its session misses what was published before it subscribed again, which is why a lost
session fails the check by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mqtt_harness import DaemonProcess, Mosquitto, daemon_config, wait_for  # noqa: E402

CELLS = ("cell-a", "cell-b")
TWIN = "twin"


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def workers(pid: int) -> list[int]:
    """The daemon's worker processes. Threads and children come and go while /proc is read (a thread that ended
    between the listing and the read once failed a CI run): what vanished is skipped."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (t, y) points."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


class Feeder(threading.Thread):
    """Publishes batches to every stream at `rate` transitions/s in total; the twins drift every other period."""

    def __init__(self, port: int, rate: float, period: float) -> None:
        super().__init__(daemon=True)
        self.rate, self.period = rate, period
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        rng = random.Random(0)
        batch = 100
        streams = [(c, s) for c in CELLS for s in ("real", f"twin/{TWIN}")]
        interval = batch * len(streams) / self.rate
        started = time.monotonic()
        k = 0
        while not self.stop.is_set():
            drifted = int((time.monotonic() - started) / self.period) % 2 == 1
            for cell, stream in streams:
                offset = 1.0 if drifted and stream != "real" else 0.0
                items = []
                for _ in range(batch):
                    s = rng.randrange(4)
                    a = rng.randrange(2)
                    items.append({"s": s, "a": a, "r": (s + a) / 5 + offset, "s_next": (s + a + rng.randrange(2)) % 4})
                self.client.publish(f"dtsync/{cell}/{stream}", json.dumps(items), qos=0)
                self.sent += batch
            k += 1
            time.sleep(max(0.0, started + k * interval - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.client.loop_stop()
        self.client.disconnect()


class EventSink:
    """A persistent-session subscriber: events published while it reconnects are queued by the broker."""

    def __init__(self, port: int, log: Path | None = None, delay: float = 0.1) -> None:
        self.ids: set[str] = set()
        self.lock = threading.Lock()
        self.connects = 0
        self.sessions_lost = 0  # reconnects the broker answered without the session: what it queued is gone
        self.log = log.open("a", buffering=1) if log is not None else None
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="soak-sink", protocol=paho.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, flags, rc, props: self._note(f"disconnected {rc}")
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(delay, max(delay, 0.5))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _note(self, line: str) -> None:
        if self.log is not None:
            self.log.write(f"{time.time():.3f} {line}\n")

    def _on_connect(self, client: paho.Client, userdata: object, flags: paho.ConnectFlags, rc: object,
                    props: object) -> None:  # fmt: skip
        self._note(f"connected {rc} session_present={flags.session_present}")
        with self.lock:
            self.connects += 1
            self.sessions_lost += self.connects > 1 and not flags.session_present
        client.subscribe("dtsync/+/twin/+/resync", qos=1)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        event_id = json.loads(msg.payload)["event_id"]
        self._note(f"message {event_id} mid={msg.mid} dup={msg.dup} {msg.topic}")
        with self.lock:
            self.ids.add(event_id)

    def count(self) -> int:
        with self.lock:
            return len(self.ids)

    def snapshot(self) -> set[str]:
        with self.lock:
            return set(self.ids)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        if self.log is not None:
            self.log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--rate", type=float, default=5000, help="transitions/s over all four streams")
    p.add_argument("--period", type=float, default=6.0, help="seconds between drift and back, per twin")
    p.add_argument("--restart-every", type=float, default=20.0)
    p.add_argument("--down", type=float, default=2.0)
    p.add_argument("--kill-every", type=float, default=0.0, help="SIGKILL + restart the daemon (0: never)")
    p.add_argument("--sample", type=float, default=2.0)
    p.add_argument("--check", action="store_true")
    p.add_argument("--max-rss-slope", type=float, default=5.0, help="MiB per minute, second half")
    p.add_argument("--max-fd-growth", type=int, default=5, help="descriptors, second half")
    p.add_argument("--sink-delay", type=float, default=0.1,
                   help="the subscriber's reconnect delay (s): it is away that long after each broker restart, "
                   "and gets what was published meanwhile only from its persistent session")  # fmt: skip
    p.add_argument("--keep", type=Path, help="work in this directory and keep it: the daemon's, the broker's "
                   "(every packet) and the subscriber's logs, the outbox")  # fmt: skip
    args = p.parse_args()

    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dtsync-soak-")))
        broker = Mosquitto(workdir, "log_type all\nlog_timestamp_format %H:%M:%S\n" if args.keep else "")
        # Persistence only works if the broker can write its directory: started as root, Mosquitto switches to
        # user "mosquitto", who cannot write the 0700 work directory, and then restarts with no sessions at all
        # (the subscriber then misses every event raised before it re-subscribes). `user <us>` keeps it as us.
        broker.conf.write_text(broker.conf.read_text().replace(
            "persistence false",
            f"persistence true\npersistence_location {workdir}/\nuser {getpass.getuser()}"))  # fmt: skip
        broker.start()
        config = daemon_config(broker.port, workdir, window={"count": 2000},
                               schedule={"every_transitions": 1000, "every_seconds": 1.0},
                               trigger={"threshold": 0.5, "rearm_below": 0.3, "cooldown_seconds": 0,
                                        "min_samples": 500, "act_on": "point"},
                               cells={c: {"twins": {TWIN: {}}} for c in CELLS},
                               daemon={"workers": 2, "snapshot_seconds": 5.0,
                                       "max_clock_skew_seconds": 300})  # fmt: skip
        config["mqtt"] = {"host": "127.0.0.1", "port": broker.port}  # default backoff
        daemon = DaemonProcess(workdir, config)
        sink = feeder = None
        try:
            daemon.wait_connected(60)
            sink = EventSink(broker.port, workdir / "sink.log" if args.keep else None, args.sink_delay)
            feeder = Feeder(broker.port, args.rate, args.period)
            feeder.start()
            started = time.monotonic()
            next_restart = started + args.restart_every
            rng = random.Random(2)
            next_kill = started + rng.uniform(0.5, 1.5) * args.kill_every if args.kill_every else float("inf")
            kills = 0

            def note(line: str) -> None:
                if args.keep is not None:
                    print("# " + line, flush=True)

            rss: list[tuple[float, float]] = []
            fds: list[tuple[float, float]] = []
            restarts = 0
            print(f"{'t (s)':>6} {'RSS daemon':>11} {'RSS workers':>12} {'fds':>5} {'raised':>7} {'delivered':>10}")
            while (now := time.monotonic()) - started < args.seconds:
                if now >= next_restart:
                    note(f"broker stopping at {time.time():.3f}")
                    broker.stop()
                    time.sleep(args.down)
                    broker.start()
                    note(f"broker back at {time.time():.3f}")
                    restarts += 1
                    next_restart = time.monotonic() + args.restart_every
                if now >= next_kill:
                    daemon.signal(signal.SIGKILL)
                    daemon.proc.wait(10)
                    daemon = DaemonProcess(workdir, config)
                    daemon.wait_connected(60)
                    kills += 1
                    rss, fds = [], []  # a new process: growth is measured from here
                    next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * args.kill_every
                pid = daemon.proc.pid
                total = rss_mib(pid) + sum(rss_mib(w) for w in workers(pid))
                n_fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
                t = now - started
                rss.append((t, total))
                fds.append((t, n_fds))
                raised = len(raised_ids(daemon))
                print(f"{t:6.0f} {rss_mib(pid):9.0f} MiB {total - rss_mib(pid):10.0f} MiB {n_fds:5d} "
                      f"{raised:7.0f} {sink.count():10d}", flush=True)  # fmt: skip
                daemon.alive_or_raise()
                time.sleep(args.sample)
            feeder.close()
            feeder = None
            ids = raised_ids(daemon)
            raised = len(ids)
            try:
                wait_for(lambda: ids <= sink.snapshot() and daemon.metric("dtsync_outbox_pending") == 0, 30,
                         "every raised event to be delivered")  # fmt: skip
            except AssertionError as e:
                print(e)
            from_t = rss[0][0] + (rss[-1][0] - rss[0][0]) / 2 if rss else 0.0
            half = [x for x in rss if x[0] >= from_t]
            fd_half = [x for x in fds if x[0] >= from_t]
            rss_slope = slope(half) * 60
            fd_growth = (max(y for _, y in fd_half) - fd_half[0][1]) if fd_half else 0
            lost = len(ids - sink.snapshot())
            print(f"\n{args.seconds:.0f} s at {args.rate:.0f} transitions/s, {restarts} broker restarts, "
                  f"{kills} daemon SIGKILLs")  # fmt: skip
            print(f"RSS (daemon + workers) slope over the second half: {rss_slope:+.2f} MiB/min "
                  f"({half[0][1]:.0f} -> {half[-1][1]:.0f} MiB)" if half else "no samples")  # fmt: skip
            print(f"open descriptors over the second half: {fd_half[0][1]:.0f} -> {fd_half[-1][1]:.0f} "
                  f"(max growth {fd_growth:.0f}, slope {slope(fd_half) * 60:+.2f}/min)" if fd_half else "")  # fmt: skip
            print(f"events raised {raised}, delivered {sink.count()} (distinct ids), lost {lost}, "
                  f"expired {daemon.metric('dtsync_events_expired_total') or 0:.0f}")  # fmt: skip
            print(f"subscriber reconnects {sink.connects - 1}, session restored by the broker on "
                  f"{sink.connects - 1 - sink.sessions_lost}")  # fmt: skip
            failed = []
            if lost > 0:
                failed.append(f"{lost} event(s) lost")
            if sink.sessions_lost:
                failed.append(f"the broker came back {sink.sessions_lost} time(s) without the subscriber's session "
                              "(persistence not saved): delivery across its restarts is not guaranteed")  # fmt: skip
            if raised == 0:
                failed.append("no event raised: the soak did not exercise delivery")
            if rss_slope > args.max_rss_slope:
                failed.append(f"RSS grows {rss_slope:.2f} MiB/min > {args.max_rss_slope}")
            if fd_growth > args.max_fd_growth:
                failed.append(f"descriptors grew by {fd_growth:.0f} > {args.max_fd_growth}")
            if failed:
                print("FAILED: " + "; ".join(failed))
            return 1 if args.check and failed else 0
        finally:
            if feeder is not None:
                feeder.close()
            if sink is not None:
                sink.close()
            daemon.stop()
            broker.stop()


def raised_ids(daemon: DaemonProcess) -> set[str]:
    """Ids of the resync events the daemon logged raising (its log is appended to across restarts)."""
    ids = set()
    for line in daemon.log.read_text(errors="replace").splitlines():
        if '"resync event"' in line:
            try:
                ids.add(json.loads(line)["event_id"])
            except (ValueError, KeyError):
                pass
    return ids


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
