"""deploy/grafana: the dashboard and its provisioning, and every PromQL expression shipped in deploy/.

Each expression (dashboard panels, annotation, template-variable queries and the alert rules) is parsed by
the real Prometheus parser: wrapped as a recording rule in a generated rules file for `promtool check rules`,
with Grafana's variables ($instance, $__rate_interval, ...) substituted first. Which metrics and labels the
expressions use is read by a small PromQL tokenizer (checked here on known expressions);
tests/test_deploy_live.py compares them with what a running daemon exports.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_prometheus import DEPLOY, RULES, alert_rules, run_promtool

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dtsync.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "dtsync.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dtsync.yaml"

# Grafana's built-in interval variables, as a query would see them with a 1 h range and a 15 s scrape.
BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels in order, those inside collapsed rows included."""
    out = []
    for panel in panels:
        out.append(panel)
        out += all_panels(panel.get("panels", []))
    return out


def dashboard_expressions(board: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, Prometheus annotation and template-variable query."""
    board = board if board is not None else dashboard()
    found = []
    for panel in all_panels(board["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in board["annotations"]["list"]:
        if "expr" in annotation:
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query) or re.fullmatch(r"query_result\((.+)\)", query)
            assert m, f"variable {var['name']}: unsupported query {query!r}"
            found.append((f"variable ${var['name']}", m.group(1)))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}, built-ins) by values; every variable must be known."""
    known = {**BUILTINS, **values}

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in known:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return known[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def check_parse(expressions: list[tuple[str, str]], workdir: Path) -> list[str]:
    """Problems found by Prometheus's parser (`promtool check rules`), one line per bad expression."""

    def check(batch: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
        rules = [{"record": f"dtsync_check:expr_{i}", "expr": e} for i, (_, e) in enumerate(batch)]
        path = workdir / "parse-check.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "parse", "rules": rules}]}))
        return run_promtool("check", "rules", str(path))

    if check(expressions).returncode == 0:
        return []
    problems = []
    for where, expr in expressions:  # find the culprits one by one
        out = check([(where, expr)])
        if out.returncode != 0:
            problems.append(f"{where}: {expr}\n    {(out.stderr or out.stdout).strip()}")
    assert problems, "promtool rejected the batch but no single expression"
    return problems


# --- a PromQL tokenizer: which metric names, matcher labels and grouping labels an expression uses ----------

_TOKEN = re.compile(
    r"""(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      |(?P<num>\d[\w.]*(?:[eE][-+]?\d+)?|\.\d\w*)
      |(?P<ident>[A-Za-z_:][\w:]*)
      |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],:@])
      |(?P<ws>\s+)""",
    re.X,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _GROUPING | {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end", "atan2"}
_MATCH_OPS = {"=", "!=", "=~", "!~"}


def selectors(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """({metric name: label names in its matchers}, grouping labels of by/without/on/ignoring/group_*)."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize {expr[pos : pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup or "", m.group()))
    metrics: dict[str, set[str]] = {}
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":
            while tokens[i][1] != "]":
                i += 1
        elif text == "{":  # matchers of a selector; the metric is the identifier before, or __name__
            metric = tokens[i - 1][1] if i > 0 and tokens[i - 1][0] == "ident" else None
            labels: set[str] = set()
            i += 1
            while tokens[i][1] != "}":
                if tokens[i][0] == "ident" and tokens[i + 1][1] in _MATCH_OPS:
                    if tokens[i][1] == "__name__":
                        metric = tokens[i + 2][1].strip("\"'`")
                    else:
                        labels.add(tokens[i][1])
                i += 1
            if metric is None:
                raise ValueError(f"selector without a metric name in {expr!r}")
            metrics.setdefault(metric, set()).update(labels)
        elif kind == "ident" and text in _GROUPING and nxt == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    grouping.add(tokens[i][1])
                i += 1
        elif kind == "ident" and text not in _KEYWORDS and nxt not in ("(", "by", "without"):  # not a function
            metrics.setdefault(text, set())
        i += 1
    return metrics, grouping


def test_selector_tokenizer_on_known_expressions() -> None:
    metrics, grouping = selectors(
        'histogram_quantile(0.9, sum by (job, le) (rate(dtsync_metric_compute_seconds_bucket{cell=~"a|b", '
        'twin!="x"}[15m]))) > on (job) group_left () (dtsync_schedule_seconds > 0) unless '
        '{__name__="up", job="dtsync"} offset 5m and ignoring(reason) rate(foo_total[1m:10s])'
    )
    assert metrics == {
        "dtsync_metric_compute_seconds_bucket": {"cell", "twin"},
        "dtsync_schedule_seconds": set(),
        "up": {"job"},
        "foo_total": set(),
    }
    assert grouping == {"job", "le", "reason"}
    assert selectors('dtsync_twin_state{dtsync_twin_state="drifted"} == 1')[0] == {
        "dtsync_twin_state": {"dtsync_twin_state"}
    }
    assert selectors("time() - dtsync_last_transition_timestamp_seconds > 120")[0] == {
        "dtsync_last_transition_timestamp_seconds": set()
    }


# --- the dashboard --------------------------------------------------------------------------------------------


def test_every_shipped_expression_parses(tmp_path: Path) -> None:
    values = {"datasource": "dtsync-prometheus", "instance": "127.0.0.1:9108", "cell": "cell-1", "twin": "drifting"}
    expressions = [(w, substitute(e, values)) for w, e in dashboard_expressions() + rule_expressions()]
    assert len(expressions) > 30
    assert check_parse(expressions, tmp_path) == []


def test_parse_check_finds_a_bad_expression(tmp_path: Path) -> None:
    good = ("good", "sum by (cell) (rate(dtsync_transitions_received_total[1m]))")
    bad = ("bad", "sum by (cell (rate(dtsync_transitions_received_total[1m]))")
    problems = check_parse([good, bad, good], tmp_path)
    assert len(problems) == 1 and problems[0].startswith("bad:")
    with pytest.raises(AssertionError, match=r"unknown variable \$nope"):
        substitute('dtsync_mismatch{cell="$nope"}', {})


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    board = dashboard()
    assert board["uid"] == "dtsync" and board["title"]
    used: dict[str, set[str]] = {}
    for _, expr in dashboard_expressions(board):
        for metric, labels in selectors(substitute(expr, {"instance": "i", "cell": "c", "twin": "t"}))[0].items():
            used.setdefault(metric, set()).update(labels)
    wanted = {
        "dtsync_mismatch",
        "dtsync_mismatch_lower",
        "dtsync_mismatch_upper",
        "dtsync_noise_floor",
        "dtsync_threshold",
        "dtsync_tv_bound",
        "dtsync_regret_bound",
        "dtsync_regret_estimate",
        "dtsync_window_samples",
        "dtsync_coverage",
        "dtsync_resync_events_total",
        "dtsync_transitions_received_total",
        "dtsync_rejected_total",
        "dtsync_metric_compute_seconds_bucket",
        "dtsync_mqtt_connected",
        "dtsync_outbox_pending",
        "dtsync_twin_state",
        "dtsync_resync_mismatch_before",
        "dtsync_resync_mismatch_after",
        "dtsync_resync_latency_seconds_sum",
        "dtsync_resync_latency_seconds_count",
        "dtsync_resync_unanswered_since_timestamp_seconds",
    }
    assert wanted <= set(used), wanted - set(used)
    exprs = [e for _, e in dashboard_expressions(board)]
    assert any(e.startswith("histogram_quantile(0.99, ") and "dtsync_metric_compute_seconds_bucket" in e for e in exprs)
    (resync,) = [a for a in board["annotations"]["list"] if "expr" in a]
    assert "dtsync_resync_events_total" in resync["expr"] and "increase(" in resync["expr"]


def test_template_variables_chain_instance_cell_twin() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "cell", "twin"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    queries = {n: v["query"]["query"] for n, v in variables.items() if v["type"] == "query"}
    assert queries["instance"].endswith(", instance)")
    assert "$instance" in queries["cell"] and queries["cell"].endswith(", cell)")
    assert "$instance" in queries["twin"] and "$cell" in queries["twin"] and queries["twin"].endswith(", twin)")
    for name in ("instance", "cell", "twin"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name


def test_panels_are_wired_to_the_datasource_variable_and_the_per_twin_repeat() -> None:
    board = dashboard()
    panels = all_panels(board["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip(), panel["title"]
    rows = [p for p in panels if p["type"] == "row"]
    assert [r.get("repeat") for r in rows if r.get("repeat")] == ["cell"]
    per_twin = [p for p in panels if p.get("repeat") == "twin"]
    assert {p["title"] for p in per_twin} >= {"Mismatch of $twin", "Bounds of $twin", "Samples and coverage of $twin",
                                              "Resyncs of $twin"}  # fmt: skip
    for panel in per_twin:  # a repeated panel shows its own twin only
        assert all('cell="$cell", twin="$twin"' in t["expr"] for t in panel["targets"]), panel["title"]
    (mismatch,) = [p for p in per_twin if p["title"] == "Mismatch of $twin"]
    legends = {t["legendFormat"] for t in mismatch["targets"]}
    assert {"mismatch", "lower", "upper", "noise floor", "threshold"} <= legends
    fill = [o for o in mismatch["fieldConfig"]["overrides"] if o["matcher"]["options"] == "upper"]
    assert {"id": "custom.fillBelowTo", "value": "lower"} in fill[0]["properties"]  # the interval is a band


def test_provisioning_loads_this_dashboard_from_this_datasource() -> None:
    sources = yaml.safe_load(DATASOURCES.read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://")
    datasource_var = dashboard()["templating"]["list"][0]
    assert datasource_var["current"]["value"] == source["uid"]
    providers = yaml.safe_load(PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    install = f"{provider['options']['path']}/{DASHBOARD.name}"
    assert install in PROVIDERS.read_text() and install in (DEPLOY / "README.md").read_text()


def test_rules_file_is_what_the_parse_check_reads() -> None:
    assert len(rule_expressions()) == len(alert_rules()) and RULES.exists()
