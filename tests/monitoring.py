"""The shipped Grafana dashboard and Prometheus rules as plain PromQL, for tests.

``dashboard_expressions`` gives every panel query with Grafana's variables replaced by values
Prometheus accepts (``$model`` -> ``.*``, ``$__rate_interval`` -> ``1m``), so the unit tests can
parse them with promtool and an integration test can run the very same queries against a real
Prometheus. ``rule_expressions`` gives the rule file's expressions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from orchestrator.metrics import ALL, MetricSpec

REPO = Path(__file__).resolve().parents[1]
# The dashboard ships in the Helm chart (one copy, rendered into a ConfigMap by the chart).
DASHBOARD = REPO / "helm" / "orchestrator" / "files" / "grafana-dashboard.json"
ALERTS = REPO / "deployments" / "monitoring" / "alerts.yaml"

# Metrics the dashboard may use that others export: vLLM's RayPrometheusStatLogger and Ray Serve.
EXTERNAL_METRICS = frozenset(
    {
        "ray_vllm_num_requests_running",
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
        "ray_vllm_prefix_cache_queries_total",
        "ray_vllm_prefix_cache_hits_total",
        "ray_vllm_time_to_first_token_seconds_bucket",
        "ray_vllm_inter_token_latency_seconds_bucket",
        "ray_vllm_generation_tokens_total",
        "ray_vllm_prompt_tokens_total",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_autoscaling_target_replicas",
    }
)

# Grafana variables a query may use, and what stands in for them outside Grafana. Longest first,
# so that ``$__rate_interval`` is not read as ``$__rate`` or the like.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "application": ".*",
    "model": ".*",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"\bray_[A-Za-z0-9_:]+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def substitute(expr: str) -> str:
    """Replaces the Grafana variables in ``expr``; raises ValueError on any other variable."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in VARIABLES:
            raise ValueError(f"unsupported Grafana variable ${name} in {expr!r}")
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def panels_by_row(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (row title, panel) for every non-row panel: the ones nested in collapsed rows and the
    ones that follow an expanded row in the top-level list ("" before the first row)."""
    row = ""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            row = panel.get("title", "")
            for child in panel.get("panels", []):
                yield row, child
        else:
            yield row, panel


def row_titles(dashboard: dict[str, Any]) -> list[str]:
    return [panel.get("title", "") for panel in dashboard.get("panels", []) if panel.get("type") == "row"]


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(row title, PromQL with variables substituted) for every panel target of the dashboard."""
    return [
        (row, substitute(target["expr"]))
        for row, panel in panels_by_row(load_dashboard(path))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def variable_queries(path: Path = DASHBOARD) -> list[str]:
    """The queries of the dashboard's query variables (``label_values(...)``), substituted."""
    queries = []
    for variable in load_dashboard(path).get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        queries.append(substitute(query["query"] if isinstance(query, dict) else query))
    return queries


def rule_expressions(path: Path = ALERTS) -> list[str]:
    """The ``expr`` of every alerting and recording rule in a Prometheus rule file."""
    rules = yaml.safe_load(Path(path).read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The ``ray_*`` metric names an expression (or a label_values query) refers to."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def label_names(expr: str) -> set[str]:
    """The label names an expression groups, matches or selects by (``by (...)``, ``on (...)``,
    ``{name="..."}`` and the like)."""
    bare = _STRING.sub('""', expr)
    grouped = {name.strip() for found in _GROUPING.findall(bare) for name in found.split(",") if name.strip()}
    selected = {name for selector in re.findall(r"\{([^}]*)\}", bare) for name in _MATCHER.findall(selector)}
    return grouped | selected


def exported_names(specs: Iterable[MetricSpec] = ALL) -> dict[str, MetricSpec]:
    """Scraped series names of our declarations as Ray's metrics agent exports them: ``ray_`` prefix,
    ``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms, gauges as they are."""
    names: dict[str, MetricSpec] = {}
    for spec in specs:
        base = f"ray_{spec.name}"
        if spec.kind == "counter":
            names[f"{base}_total"] = spec
        elif spec.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[base + suffix] = spec
        else:
            names[base] = spec
    return names


def recording_rules(exprs: Iterable[str], group: str = "dashboard") -> dict[str, Any]:
    """A rule file recording each expression (``dashboard:expr_<n>``), for promtool to parse."""
    rules = [{"record": f"{group}:expr_{n}", "expr": expr} for n, expr in enumerate(exprs)]
    return {"groups": [{"name": group, "rules": rules}]}


def promtool() -> str:
    """Path of promtool; FileNotFoundError when it is not installed."""
    found = shutil.which("promtool")
    if found is None:
        raise FileNotFoundError(
            "promtool not found on PATH: install Prometheus' tools (Debian: apt-get install prometheus); "
            "CI installs them, so the monitoring tests fail rather than skip without them"
        )
    return found


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)
