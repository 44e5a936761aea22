"""The shipped Grafana dashboard and Prometheus alert rules, checked offline with promtool.

promtool (Prometheus' own parser) is required: the tests fail, not skip, without it, since CI
installs it (Debian package ``prometheus``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.metrics import ALL
from tests.monitoring import (
    ALERTS,
    DASHBOARD,
    EXTERNAL_METRICS,
    dashboard_expressions,
    exported_names,
    label_names,
    load_dashboard,
    metric_names,
    panels_by_row,
    promtool,
    recording_rules,
    row_titles,
    rule_expressions,
    run_promtool,
    substitute,
    variable_queries,
)

ROWS = [
    "Traffic and errors",
    "Latency",
    "Tokens and cost",
    "Queue depth and replicas",
    "KV cache and prefix cache",
    "Limits and shedding",
    "Gateway",
]
ERRORS = "OrchestratorHighErrorRate"
SATURATED = "OrchestratorModelSaturated"
BACKLOG = "OrchestratorUsageBacklogGrowing"
ALERT_NAMES = {ERRORS, SATURATED, BACKLOG}


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Runs promtool; fails the test (never skips it) when promtool is not installed."""
    try:
        promtool()
    except FileNotFoundError as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None
    return run_promtool(*args)


def test_promtool_installed() -> None:
    assert _promtool("--version").returncode == 0


def _check_rules(path: Path) -> None:
    result = _promtool("check", "rules", path)
    assert result.returncode == 0, f"promtool check rules {path}:\n{result.stdout}\n{result.stderr}"


def _alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_alert_rules_pass_promtool() -> None:
    _check_rules(ALERTS)


def test_required_alerts_have_severity_and_annotations() -> None:
    rules = _alert_rules()
    assert set(rules) >= ALERT_NAMES
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
    assert rules[ERRORS]["for"] == "5m"
    assert rules[SATURATED]["for"] == "10m"
    assert rules[BACKLOG]["for"] == "10m"


def test_dashboard_expressions_parse_with_promtool(tmp_path: Path) -> None:
    exprs = dashboard_expressions(DASHBOARD)
    assert all("$" not in expr for _, expr in exprs)
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(recording_rules(expr for _, expr in exprs), sort_keys=False))
    _check_rules(path)
    per_row = {row: sum(1 for r, _ in exprs if r == row) for row in ROWS}
    assert all(per_row.values()), f"rows without a query: {per_row}"
    assert {row for row, _ in exprs} <= set(ROWS), "panels outside the seven rows"


def test_dashboard_rows_in_order() -> None:
    assert row_titles(load_dashboard(DASHBOARD)) == ROWS


def test_dashboard_schema_and_variables() -> None:
    dashboard = load_dashboard(DASHBOARD)
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["query"]["query"] == "label_values(ray_orchestrator_requests_total, model)"
    assert model["multi"] and model["includeAll"]
    assert variables["application"]["type"] == "query"
    for _, panel in panels_by_row(dashboard):
        assert panel["type"] == "timeseries", panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    rows = [p["id"] for p in dashboard["panels"] if p["type"] == "row"]
    ids = rows + [p["id"] for _, p in panels_by_row(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_substitute() -> None:
    assert substitute('rate(x{model=~"$model"}[$__rate_interval])') == 'rate(x{model=~".*"}[1m])'
    assert substitute('x{application=~"${application}"}[$__interval]') == 'x{application=~".*"}[1m]'
    with pytest.raises(ValueError, match="datasource"):
        substitute('x{a=~"${datasource}"}')


def test_metric_names_are_declared() -> None:
    exported = exported_names(ALL)
    used = set().union(
        *map(metric_names, [e for _, e in dashboard_expressions(DASHBOARD)]),
        *map(metric_names, variable_queries(DASHBOARD)),
        *map(metric_names, rule_expressions(ALERTS)),
    )
    ours = {name for name in used if name.startswith("ray_orchestrator_")}
    assert ours - set(exported) == set(), "not declared in orchestrator.metrics.ALL (or wrong suffix for its kind)"
    assert used - ours - EXTERNAL_METRICS == set(), "unknown vLLM/Serve metrics"


def test_every_declared_metric_is_on_the_dashboard() -> None:
    exported = exported_names(ALL)
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions(DASHBOARD)))
    shown = {exported[name].name for name in used if name in exported}
    assert {spec.name for spec in ALL} - shown == set(), "declared but not on the dashboard"


# Labels Ray and Serve add to our series (Serve's in a replica, Ray's on every series), and
# histograms' bucket bound.
ADDED_LABELS = {"deployment", "replica", "application", "le", "WorkerId", "NodeAddress", "SessionName", "Component"}


def test_queries_of_our_metrics_use_only_their_declared_labels() -> None:
    """A panel or rule over our series groups and selects only by labels those series carry, so
    a label dropped from a declaration (e.g. one per key) cannot linger on the dashboard."""
    exported = exported_names(ALL)
    exprs = [e for _, e in dashboard_expressions(DASHBOARD)] + rule_expressions(ALERTS)
    checked = 0
    for expr in exprs:
        names = metric_names(expr)
        if not names or not names <= set(exported):
            continue  # vLLM's or Serve's series, or a mix: their labels are theirs
        declared = set().union(*(exported[name].labels for name in names)) | ADDED_LABELS
        assert label_names(expr) <= declared, f"{expr}: {sorted(label_names(expr) - declared)} not declared"
        checked += 1
    assert checked >= 20
    assert label_names('sum by (workspace) (rate(x{model=~"a", code!="ok"}[5m]))') == {"workspace", "model", "code"}


# --- the alerts' behaviour, with promtool's rule unit tests on synthetic series. Annotations are
# dropped from the rules under test (promtool compares them verbatim; check rules parses them).

_RAY = 'WorkerId="{worker}",NodeAddress="10.0.0.1",SessionName="s",Version="2.60.0",Component="core_worker"'


def _series(name: str, values: str, worker: str = "w1", **labels: str) -> dict[str, str]:
    tags = ",".join([*(f'{k}="{v}"' for k, v in labels.items()), _RAY.format(worker=worker)])
    return {"series": f"{name}{{{tags}}}", "values": values}


def _requests(model: str, status: str, code: str, values: str, worker: str) -> dict[str, str]:
    route = "/v1/chat/completions"
    return _series(
        "ray_orchestrator_requests_total", values, worker, model=model, route=route, status=status, code=code
    )


def _scaling(waiting: str, target: str, model: str = "m", most: str = "3x40") -> list[dict[str, str]]:
    labels = {"model": model, "application": "llm"}
    return [
        _series("ray_orchestrator_model_waiting_requests", waiting, **labels),
        _series("ray_orchestrator_model_target_replicas", target, **labels),
        _series("ray_orchestrator_model_running_replicas", target, **labels),
        _series("ray_orchestrator_model_max_replicas", most, **labels),
    ]


def _gateway(pending: str, segments: str) -> list[dict[str, str]]:
    serve = {"deployment": "Gateway", "replica": "r1", "application": "llm"}
    return [
        _series("ray_orchestrator_gateway_pending_records", pending, **serve),
        _series("ray_orchestrator_gateway_journal_segments", segments, **serve),
    ]


def _case(series: list[dict[str, str]], alert: str, at: str, expected: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": e} for e in expected]}],
    }


CASES = [
    # 10% 5xx over two router replicas: one alert for the model; 1% 5xx: none.
    _case(
        [
            _requests("m", "200", "ok", "0+45x40", "w1"),
            _requests("m", "200", "ok", "0+45x40", "w2"),
            _requests("m", "529", "provider_overloaded", "0+10x40", "w1"),
            _requests("n", "200", "ok", "0+99x40", "w1"),
            _requests("n", "504", "provider_timeout", "0+1x40", "w2"),
        ],
        ERRORS,
        "20m",
        [{"severity": "critical", "model": "m"}],
    ),
    # Too early for `for: 5m`.
    _case([_requests("m", "500", "internal_error", "0+10x40", "w1")], ERRORS, "4m", []),
    # Growing queue at max replicas: saturated. Below max (a flat target too), or queue flat: not.
    _case(_scaling("1+1x40", "3x40"), SATURATED, "25m", [{"severity": "warning", "model": "m", "application": "llm"}]),
    _case(_scaling("1+1x40", "1+1x40", most="50x40"), SATURATED, "25m", []),
    _case(_scaling("1+1x40", "3x40", most="8x40"), SATURATED, "25m", []),
    _case(_scaling("50x40", "3x40"), SATURATED, "25m", []),
    _case(_scaling("1+1x40", "3x40"), SATURATED, "8m", []),
    # Pending records over 1000 and rising; journal segments piling up; a high but flat backlog is fine.
    _case(_gateway("0+100x40", "2x40"), BACKLOG, "30m", [{"severity": "warning", "signal": "pending_records"}]),
    _case(_gateway("10x40", "1+1x40"), BACKLOG, "25m", [{"severity": "warning", "signal": "journal_segments"}]),
    _case(_gateway("5000x40", "2x40"), BACKLOG, "30m", []),
    _case(_gateway("0+10x40", "2x40"), BACKLOG, "30m", []),
]


def test_alerts_fire_as_intended(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rule_file = tmp_path / "alerts-under-test.yaml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    tests = tmp_path / "alerts-test.yaml"
    tests.write_text(
        yaml.safe_dump({"rule_files": [str(rule_file)], "evaluation_interval": "1m", "tests": CASES}, sort_keys=False)
    )
    result = _promtool("test", "rules", tests)
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}\n{result.stderr}"
