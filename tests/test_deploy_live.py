"""deploy/ against the real programs: Mosquitto, `dtsync run` fed a drifting trace, and Prometheus.

One stack per module (the daemon's start-up and the trace are the slow part): a private broker, the daemon
(two twins, one drifting) and a real Prometheus on loopback running a copy of the shipped scrape config (target
rewritten to the test daemon, 1 s intervals) and the shipped alert rules (only `for:` shortened). The tests then
check, in order: the dashboard and rules use only metrics and labels the daemon exports; Prometheus scrapes it
and the drift alert fires for the drifting twin only; every dashboard query returns data from that Prometheus;
stopping the broker and then the daemon fires DtsyncBrokerDisconnected and DtsyncDown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from mqtt_harness import DaemonProcess, Mosquitto, daemon_config, free_port, publish_cli, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_deploy_grafana import dashboard_expressions, rule_expressions, selectors, substitute
from test_deploy_prometheus import RULES, SCRAPE_CONFIG

from dtsync.offline.sample import write_samples

# Labels a scrape adds to every series, and the series Prometheus writes itself.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_SERIES = {"up": TARGET_LABELS}


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise AssertionError("prometheus is not installed: apt-get install prometheus (.ci/run does this)")
    return found


@dataclass
class Prometheus:
    """A real Prometheus on a free loopback port with its TSDB in a temporary directory."""

    workdir: Path
    target: str

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dtsync"]
        job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [self.target]}])
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = "2s"  # test only: the shipped for: are production values (minutes)
        (self.workdir / RULES.name).write_text(yaml.safe_dump(rules))
        self.log = self.workdir / "prometheus.log"
        cmd = [
            prometheus_binary(),
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        wait_for(self._ready, 30, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query via the HTTP API; AssertionError with Prometheus's message if it is rejected."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"prometheus rejected {expr!r}: {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def firing(self, alertname: str) -> list[dict[str, str]]:
        return [s["metric"] for s in self.query(f'ALERTS{{alertname="{alertname}", alertstate="firing"}}')]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Stack:
    broker: Mosquitto
    daemon: DaemonProcess
    prometheus: Prometheus
    target: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("live")
    samples = write_samples(workdir / "samples", seed=7)
    broker = Mosquitto(workdir)
    broker.start()
    # every 100 transitions: a burst then makes evaluations fall due while the previous one computes, so the
    # deferral counter has labelled series too
    config = daemon_config(broker.port, workdir, schedule={"every_transitions": 100, "every_seconds": 5})
    daemon = DaemonProcess(workdir, config)
    target = config["metrics"]["listen"]
    prometheus = None
    try:
        daemon.wait_connected(90)
        prometheus = Prometheus(workdir, target)
        wait_for(lambda: prometheus.query('up{job="dtsync"} == 1'), 30, "prometheus to scrape the daemon")
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        client.publish("dtsync/cell-1/real", b"not json", qos=1).wait_for_publish(5)  # a labelled reject
        client.loop_stop()
        client.disconnect()
        streams = {name: samples[name] for name in ("real", "faithful", "drifting")}
        publish_cli(broker.port, "cell-1", streams, "--batch", "20", "--qos", "1")
        wait_for(
            lambda: daemon.metric("dtsync_resync_events_total", cell="cell-1", twin="drifting"),
            60,
            "the resync event of the drifting twin",
        )
        yield Stack(broker, daemon, prometheus, target)
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.stop()
        broker.stop()


def exported(text: str) -> dict[str, set[str]]:
    """{sample name: label names} of a /metrics page."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_shipped_expressions_use_only_what_the_daemon_exports(stack: Stack) -> None:
    status, text = stack.daemon.get("/metrics")
    assert status == 200
    series = exported(text)
    for needed in ("dtsync_rejected_total", "dtsync_evaluations_deferred_total", "dtsync_resync_events_total"):
        assert needed in series, f"{needed} has no sample yet: feed the daemon more so that its labels show"
    known = {**series, **PROMETHEUS_SERIES}
    values = {"instance": ".*", "cell": ".*", "twin": ".*"}
    problems = []
    for where, expr in dashboard_expressions() + rule_expressions():
        metrics, grouping = selectors(substitute(expr, values))
        for metric, labels in metrics.items():
            if metric not in known:
                problems.append(f"{where}: {metric} is not exported")
            elif labels - known[metric] - TARGET_LABELS:
                problems.append(f"{where}: {metric} has no label {sorted(labels - known[metric] - TARGET_LABELS)}")
        available = set().union(*(known.get(m, set()) for m in metrics)) | TARGET_LABELS
        if grouping - available:
            problems.append(f"{where}: grouping by {sorted(grouping - available)}, not labels of {sorted(metrics)}")
    for var in ("cell", "twin"):  # label_values(selector, label): the label must exist on that selector
        (query,) = [v["query"]["query"] for v in _variables() if v["name"] == var]
        assert query.endswith(f", {var})") and var in known[query.split("(")[1].split("{")[0]]
    assert problems == []


def _variables() -> list[dict[str, Any]]:
    from test_deploy_grafana import dashboard

    return dashboard()["templating"]["list"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_the_daemon_and_fires_the_drift_alert(stack: Stack) -> None:
    prom = stack.prometheus
    wait_for(lambda: prom.firing("DtsyncTwinDrifted"), 30, "DtsyncTwinDrifted to fire")
    alerts = prom.firing("DtsyncTwinDrifted")
    assert [(a["cell"], a["twin"], a["instance"], a["job"], a["severity"]) for a in alerts] == [
        ("cell-1", "drifting", stack.target, "dtsync", "warning")
    ]
    mismatch = {s["metric"]["twin"]: float(s["value"][1]) for s in prom.query('dtsync_mismatch{job="dtsync"}')}
    assert set(mismatch) == {"faithful", "drifting"}
    assert mismatch["drifting"] > mismatch["faithful"]
    rules = json.load(urllib.request.urlopen(prom.url + "/api/v1/rules", timeout=5))["data"]["groups"]
    health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
    assert set(health) == {r["alert"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}
    assert set(health.values()) == {"ok"}, health  # every rule evaluates without error on real data


def test_every_dashboard_query_returns_data_from_prometheus(stack: Stack) -> None:
    values = {"instance": stack.target, "cell": "cell-1", "twin": "drifting", "datasource": "x"}
    empty = []
    for where, expr in dashboard_expressions():
        if not stack.prometheus.query(substitute(expr, values)):
            empty.append(where)
    assert empty == []
    # The annotation sees the first resync event, whose counter series appears already at 1.
    (annotation,) = [e for w, e in dashboard_expressions() if w.startswith("annotation")]
    (event,) = stack.prometheus.query(substitute(annotation, values))
    assert event["metric"] == {"cell": "cell-1", "twin": "drifting"}


def test_broker_and_daemon_outages_fire_their_alerts(stack: Stack) -> None:
    prom = stack.prometheus
    assert prom.firing("DtsyncBrokerDisconnected") == [] and prom.firing("DtsyncDown") == []
    stack.broker.stop()
    wait_for(lambda: prom.firing("DtsyncBrokerDisconnected"), 30, "DtsyncBrokerDisconnected to fire")
    assert stack.daemon.stop() == 0
    wait_for(lambda: prom.firing("DtsyncDown"), 30, "DtsyncDown to fire")
    assert [a["instance"] for a in prom.firing("DtsyncDown")] == [stack.target]
