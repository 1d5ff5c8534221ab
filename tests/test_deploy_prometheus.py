"""deploy/prometheus: the scrape config, the alert rules and their unit tests, checked by the real promtool.

The unit tests (deploy/prometheus/tests.yml) are themselves checked: every alert has a firing and a
non-firing case, and breaking an alert (never true, or no `for:`) makes `promtool test rules` fail on it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "dtsync-alerts.yml"
UNIT_TESTS = PROMETHEUS_DIR / "tests.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        raise AssertionError("promtool is not installed: apt-get install prometheus (.ci/run does this)")
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def alert_rules(path: Path = RULES) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_scrape_config_is_valid_and_scrapes_the_daemon_default_address() -> None:
    out = run_promtool("check", "config", str(SCRAPE_CONFIG))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout  # the rules are found relative to the config file
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dtsync"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9108"]
    assert config["rule_files"] == [RULES.name]


def test_rules_are_valid() -> None:
    out = run_promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_rule_unit_tests_pass() -> None:
    out = run_promtool("test", "rules", str(UNIT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_documented_and_has_firing_and_quiet_cases() -> None:
    wanted = {
        "DtsyncTwinDrifted",
        "DtsyncDown",
        "DtsyncBrokerDisconnected",
        "DtsyncOutboxBacklogGrowing",
        "DtsyncTelemetryStale",
        "DtsyncComputeSlowerThanSchedule",
        "DtsyncEvaluationsDeferred",
        "DtsyncEvaluationStale",
        "DtsyncResyncNotAcknowledged",
    }
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) == wanted
    readme = (DEPLOY / "README.md").read_text()
    for name, rule in rules.items():
        assert rule.get("for"), f"{name}: no for: (a single bad scrape would page)"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], name
        assert "deploy/README.md#" in rule["annotations"]["runbook"], name
        assert f"`{name}`" in readme, f"{name} is not described in deploy/README.md"
    cases: dict[str, set[str]] = {name: set() for name in rules}
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            cases[case["alertname"]].add("firing" if case["exp_alerts"] else "quiet")
    assert {name: kinds for name, kinds in cases.items() if kinds != {"firing", "quiet"}} == {}


def _mutated(tmp_path: Path, alert: str, **changes: Any) -> Path:
    """A copy of the rules and unit tests with one alert changed (None removes the key)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                for key, value in changes.items():
                    if value is None:
                        rule.pop(key, None)
                    else:
                        rule[key] = value
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return tmp_path / UNIT_TESTS.name


@pytest.mark.parametrize("alert", sorted(r["alert"] for r in alert_rules()))
def test_unit_tests_catch_a_broken_alert(alert: str, tmp_path: Path) -> None:
    """An alert that never fires fails its firing case; one without `for:` fails its quiet case."""
    never = run_promtool("test", "rules", str(_mutated(tmp_path, alert, expr="vector(1) == 2")))
    assert never.returncode != 0 and f"alertname: {alert}," in never.stderr, never.stdout + never.stderr
    eager = run_promtool("test", "rules", str(_mutated(tmp_path, alert, **{"for": None})))
    assert eager.returncode != 0 and f"alertname: {alert}," in eager.stderr, eager.stdout + eager.stderr
