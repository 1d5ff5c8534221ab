"""Prometheus metrics of the daemon, defined once here, and the HTTP endpoint that serves them.

Every series is bounded: labels are configured cells and twins, fixed rejection reasons and fixed states —
never a name taken from the wire (telemetry for an undeclared twin counts under reason="unknown_stream").

The endpoint runs in its own thread (prometheus_client's threading WSGI server), so `/metrics` and
`/healthz` keep answering while the broker is away or the event loop is busy.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from dtsync import __version__
from dtsync.monitor import Report

TWIN_STATES = ["warming", "ok", "drifted", "resyncing"]
_COMPUTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PER_TWIN = ("cell", "twin")
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class DaemonMetrics:
    """All metric objects, registered in one registry (a fresh one per daemon, so tests can run several)."""

    def __init__(self, instance: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()

        def gauge(name: str, doc: str, labels: Iterable[str] = _PER_TWIN) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r)

        self.mismatch = gauge("dtsync_mismatch", "DT-BSM point estimate max_s d(s,s) of a twin.")
        self.mismatch_lower = gauge("dtsync_mismatch_lower", "Optimistic DT-BSM (unknown terms at 0).")
        self.mismatch_upper = gauge("dtsync_mismatch_upper", "Pessimistic DT-BSM (unknown terms at Rbar/(1-gamma)).")
        self.interval_low = gauge(
            "dtsync_mismatch_interval_low", "Lower end of the mismatch's bootstrap interval (NaN: not computed)."
        )
        self.interval_high = gauge(
            "dtsync_mismatch_interval_high", "Upper end of the mismatch's bootstrap interval (NaN: not computed)."
        )
        self.p_value = gauge(
            "dtsync_mismatch_p_value", "Permutation-test p-value of 'twin and real are alike' (NaN: not computed)."
        )
        self.noise_floor = gauge("dtsync_noise_floor", "Mismatch expected from sampling noise alone.")
        self.tv_bound = gauge("dtsync_tv_bound", "TV-based upper bound max_s d_TV(s)/(1-gamma) on the mismatch.")
        self.regret_bound = gauge("dtsync_regret_bound", "Proven deployment-regret bound 2/(1-gamma) * DT-BSM.")
        self.regret_estimate = gauge("dtsync_regret_estimate", "Plug-in estimate of deployment regret.")
        self.threshold = gauge("dtsync_threshold", "Resync threshold of the twin's trigger rule.")
        self.coverage = gauge("dtsync_coverage", "Share of state-actions seen in both windows.")
        self.window_samples = gauge(
            "dtsync_window_samples", "Transitions in a window at the last evaluation.", (*_PER_TWIN, "window")
        )
        self.last_evaluation = gauge("dtsync_last_evaluation_timestamp_seconds", "Wall time of the last evaluation.")
        self.twin_state = Enum(
            "dtsync_twin_state", "State of a twin: warming, ok or drifted.", _PER_TWIN, states=TWIN_STATES, registry=r
        )
        self.resync_events = Counter("dtsync_resync_events", "Resync events raised.", _PER_TWIN, registry=r)
        self.compute_seconds = Histogram(
            "dtsync_metric_compute_seconds", "Time to compute the metric, noise floor and bounds of one evaluation.",
            _PER_TWIN, buckets=_COMPUTE_BUCKETS, registry=r,
        )  # fmt: skip
        self.schedule_seconds = gauge(
            "dtsync_schedule_seconds", "Configured evaluation period (schedule.every_seconds; 0 if unset).", ()
        )
        self.evaluations_deferred = Counter(
            "dtsync_evaluations_deferred", "Evaluations due while the previous one was still computing.",
            _PER_TWIN, registry=r,
        )  # fmt: skip
        self.transitions = Counter(
            "dtsync_transitions_received", "Transitions accepted into a window.", ("cell", "stream"), registry=r
        )
        self.last_transition = gauge(
            "dtsync_last_transition_timestamp_seconds", "Wall time a stream last delivered a transition.",
            ("cell", "stream"),
        )  # fmt: skip
        self.rejected = Counter("dtsync_rejected", "Rejected telemetry (items or payloads) by reason.", ["reason"],
                                registry=r)  # fmt: skip
        self.mqtt_connected = gauge("dtsync_mqtt_connected", "1 while connected and subscribed to the broker.", ())
        self.mqtt_connects = Counter("dtsync_mqtt_connects", "Successful (re)connections to the broker.", registry=r)
        self.outbox_pending = gauge("dtsync_outbox_pending", "Resync events not yet acknowledged by the broker.", ())
        self.events_expired = Counter(
            "dtsync_events_expired", "Resync events dropped unsent because their deadline passed.", registry=r
        )
        self.snapshot_seconds = Histogram(
            "dtsync_state_snapshot_seconds", "Time to write one state snapshot (windows, triggers), fsync included.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0), registry=r,
        )  # fmt: skip
        # Resyncs (dtsync.resync, dtsync.daemon.acks). The version label is the one value taken from the wire: at
        # most 64 characters, and one series per twin (the previous version's series is removed).
        self.resync_latency = Histogram(
            "dtsync_resync_latency_seconds", "Time from a resync event to the controller's acknowledgement.",
            _PER_TWIN, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.resyncs = Counter("dtsync_resyncs", "Resyncs of a twin, by cause: ack or version (telemetry).",
                               (*_PER_TWIN, "cause"), registry=r)  # fmt: skip
        self.twin_version = gauge("dtsync_twin_version_info", "The twin's current version (value 1).",
                                  (*_PER_TWIN, "version"))  # fmt: skip
        self.mismatch_before = gauge("dtsync_resync_mismatch_before", "Mismatch at the last judgement before the "
                                     "latest completed resync (NaN: never judged).")  # fmt: skip
        self.mismatch_after = gauge("dtsync_resync_mismatch_after", "Mismatch at the first judgement on fresh data "
                                    "after the latest completed resync (NaN: none yet).")  # fmt: skip
        self.resync_unanswered_since = gauge(
            "dtsync_resync_unanswered_since_timestamp_seconds",
            "Wall time of the twin's oldest resync event not yet acknowledged (0: none waiting).",
        )
        self.resync_ack_timeout = gauge(
            "dtsync_resync_ack_timeout_seconds", "daemon.resync_ack_seconds: how long an event may wait for an ack.", ()
        )
        self._versions: dict[tuple[str, str], str] = {}
        self._resync_t: dict[tuple[str, str], float] = {}
        self.worker_restarts = Counter(
            "dtsync_worker_restarts", "Metric worker processes that died and were replaced.", registry=r
        )
        self.owned_cells = gauge("dtsync_owned_cells", "Cells this instance evaluates (all configured without "
                                 "coordination; its share under coordination).", ())  # fmt: skip
        self.ownership_changes = Counter(
            "dtsync_ownership_changes", "Cells taken or given up by this instance (coordination).", ["change"],
            registry=r,
        )  # fmt: skip
        self.zookeeper_connected = gauge("dtsync_zookeeper_connected", "1 while connected to ZooKeeper "
                                         "(coordination only).", ())  # fmt: skip
        Info("dtsync_build", "Version of the running daemon.", registry=r).info(
            {"version": __version__, "daemon_instance": instance}
        )

    def declare(self, cell: str, twins: Iterable[str], reasons: Iterable[str], since: float) -> None:
        """Create every configured series at start (or when a reload adds a twin), so that a first event shows
        as an increase from 0 and a stream that never delivers is seen as stale from `since`, not as absent."""
        for twin in twins:
            self.resync_events.labels(cell, twin)
            self.evaluations_deferred.labels(cell, twin)
            self.twin_state.labels(cell, twin).state("warming")
            self.last_evaluation.labels(cell, twin).set(since)  # never evaluated reads as stale from `since`
            self.resync_unanswered_since.labels(cell, twin).set(0.0)
            self.resync_latency.labels(cell, twin)
            self.mismatch_before.labels(cell, twin).set(math.nan)  # NaN: no resync completed yet
            self.mismatch_after.labels(cell, twin).set(math.nan)
            for cause in ("ack", "version"):
                self.resyncs.labels(cell, twin, cause)
        for stream in ("real", *twins):
            self.transitions.labels(cell, stream)
            self.last_transition.labels(cell, stream).set(since)
        for reason in reasons:
            self.rejected.labels(reason)

    def record(self, report: Report) -> None:
        """Export one evaluation."""
        f, labels = report.figures, (report.cell, report.twin)
        for gauge, value in (
            (self.mismatch, f.mismatch), (self.mismatch_lower, f.mismatch_lower),
            (self.mismatch_upper, f.mismatch_upper), (self.noise_floor, f.noise_floor), (self.tv_bound, f.tv_bound),
            (self.regret_bound, f.regret_bound), (self.regret_estimate, f.regret_estimate),
            (self.threshold, report.threshold), (self.coverage, f.coverage),
            (self.interval_low, _or_nan(f.interval_low)), (self.interval_high, _or_nan(f.interval_high)),
            (self.p_value, _or_nan(f.p_value)),
        ):  # fmt: skip
            gauge.labels(*labels).set(value)
        self.window_samples.labels(*labels, "real").set(f.samples_real)
        self.window_samples.labels(*labels, "twin").set(f.samples_twin)
        self.last_evaluation.labels(*labels).set_to_current_time()
        self.twin_state.labels(*labels).state(report.state)
        self.compute_seconds.labels(*labels).observe(f.compute_seconds)
        if report.fired:
            self.resync_events.labels(*labels).inc()
        self.twin_version_changed(*labels, report.version)
        r = report.resync
        if report.resynced and r is not None:
            self.mismatch_before.labels(*labels).set(_or_nan(r.mismatch_before))
            self.mismatch_after.labels(*labels).set(_or_nan(r.mismatch_after))
        if r is not None and self._resync_t.get(labels) != r.t:  # a resync this twin's records had not shown yet
            self._resync_t[labels] = r.t
            self.resyncs.labels(*labels, r.cause).inc()

    def twin_version_changed(self, cell: str, twin: str, version: str | None) -> None:
        """One dtsync_twin_version_info series per twin: the current version's."""
        old = self._versions.get((cell, twin))
        if version is None or version == old:
            return
        if old is not None:
            self.twin_version.remove(cell, twin, old)
        self._versions[(cell, twin)] = version
        self.twin_version.labels(cell, twin, version).set(1)

    def forget_twin(self, cell: str, twin: str) -> None:
        """Drop a removed twin's series (config reload), so dashboards do not show a frozen last value."""
        for metric in (
            self.mismatch, self.mismatch_lower, self.mismatch_upper, self.noise_floor, self.tv_bound,
            self.regret_bound, self.regret_estimate, self.threshold, self.coverage, self.last_evaluation,
            self.interval_low, self.interval_high, self.p_value,
            self.twin_state, self.resync_events, self.compute_seconds, self.evaluations_deferred,
            self.resync_latency, self.mismatch_before, self.mismatch_after, self.resync_unanswered_since,
        ):  # fmt: skip
            try:
                metric.remove(cell, twin)
            except KeyError:
                pass
        for window in ("real", "twin"):
            try:
                self.window_samples.remove(cell, twin, window)
            except KeyError:
                pass
        for cause in ("ack", "version"):
            try:
                self.resyncs.remove(cell, twin, cause)
            except KeyError:
                pass
        self._resync_t.pop((cell, twin), None)
        version = self._versions.pop((cell, twin), None)
        if version is not None:
            self.twin_version.remove(cell, twin, version)

    def forget_stream(self, cell: str, stream: str) -> None:
        """Drop a removed stream's series, so its staleness alert does not fire forever."""
        for metric in (self.transitions, self.last_transition):
            try:
                metric.remove(cell, stream)
            except KeyError:
                pass


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr (the daemon logs through structlog)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


Health = Callable[[], tuple[bool, dict[str, Any]]]


class MetricsServer:
    """`/metrics` (Prometheus exposition) and `/healthz` (200 or 503 with a JSON reason) in a thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok, detail = health()
                body = json.dumps({"ok": ok, **detail}).encode()
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            return metrics_app(environ, start_response)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("MetricsWSGIServer", (ThreadingWSGIServer,), {"address_family": family})
        self._httpd: WSGIServer = make_server(host, port, app, server, handler_class=_QuietHandler)
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dtsync-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
