"""The shipped monitoring artifacts against a real Prometheus scraping the running deployment.

A Prometheus server (``tests.prometheus``) scrapes Ray's metrics export port every 3 seconds with
``deployments/monitoring/alerts.yaml`` loaded. The test sends real traffic with the openai SDK, then
runs every Grafana panel query (``tests.monitoring.dashboard_expressions``) and every alert expression
on the server, and reads raw scrapes of the metrics port (taken during the load, while the engines
export their gauges) for the series names and bounded labels.

Panel queries run as range queries over the traffic window (3 s step) and pass when some series has a
value other than NaN at some step (all-NaN means e.g. a histogram nothing was observed in). An instant
query "now" is not robust here: vLLM's gauges are exported only while an engine
steps, so they go stale (Prometheus drops them from instant queries) soon after the load ends, and the
``rate(...[1m])`` panels need two samples within the minute before the evaluation time.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from orchestrator.status.exposition import parse_samples
from tests.integration.conftest import Deployment
from tests.monitoring import ALERTS, DASHBOARD, dashboard_expressions, rule_expressions, variable_queries
from tests.prometheus import find_prometheus, query, query_range, rule_groups, running_prometheus, scrape_targets

pytestmark = pytest.mark.integration

# Late in the suite the cluster exports thousands of series and its metrics agent shares 2 busy
# cores, so one scrape can take over a second (with 1 s, most scrapes timed out); 3 s leaves room.
SCRAPE_INTERVAL_S = 3.0
DATA_TIMEOUT_S = 90.0
SETTLE_S = 5 * SCRAPE_INTERVAL_S  # after the first series shows up: a few more scrapes
LOAD_SECONDS = 20.0  # concurrent long streams on tiny-a, so vLLM's gauges are exported and scraped several times
LOAD_STREAMS = 20  # more than tiny-a's max_num_seqs (16): some requests wait in the engine
LOAD_TIMEOUT_S = 300.0
ALERT_NAMES = {"OrchestratorHighErrorRate", "OrchestratorModelSaturated", "OrchestratorUsageBacklogGrowing"}
MAIN_MODELS = ("tiny-a", "tiny-b", "smollm2-135m-instruct")
SECRET_PREFIXES = ("sk-orch-", "gen-")
PER_OWNER_LABELS = frozenset({"key_id", "key", "api_key", "workspace", "workspace_id", "request_id"})
REQUIRED_SERIES = (
    "ray_orchestrator_requests_total",
    "ray_orchestrator_time_to_first_token_seconds_bucket",
    "ray_orchestrator_cost_usd_total",
)
EXTRA = {"ignore_eos": True}  # the tiny models' gibberish may end at once; streams need several chunks
USER = [{"role": "user", "content": "Tell me a story about a cat."}]
# About 300 tokens with the tiny models' tokenizer (context window 512): a few full KV blocks to reuse.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the orchestrator counts every token. " * 8

_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\s*\)$", re.DOTALL)


@pytest.fixture(scope="module")
def prometheus_url(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a Prometheus scraping ``deployment.metrics_url`` every 3 s, with the alert rules loaded.

    Module-scoped: only this module uses it, and scraping the whole cluster is load the later
    tests on this small machine need not carry.
    """
    metrics = urlsplit(deployment.metrics_url)
    assert metrics.hostname == "127.0.0.1" and metrics.path == "/metrics", deployment.metrics_url
    try:
        find_prometheus()
    except FileNotFoundError as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None
    folder = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(folder, [metrics.netloc], SCRAPE_INTERVAL_S, rules=ALERTS) as url:
        yield url


def samples(text: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(name, labels) of every ``ray_*`` sample of a Prometheus text exposition."""
    for sample in parse_samples(text, prefix="ray_"):
        yield sample.name, dict(sample.labels)


def _text(chunk: object) -> str:
    """The text a chat (``delta.content``) or completion (``text``) stream chunk carries."""
    choices = getattr(chunk, "choices", None)
    if not choices:
        return ""  # the final usage chunk
    delta = getattr(choices[0], "delta", None)
    return (delta.content if delta is not None else getattr(choices[0], "text", "")) or ""


def _consume(stream: openai.Stream) -> int:  # type: ignore[type-arg]
    """Reads a stream to its end; returns how many chunks carried text."""
    with stream:
        return sum(1 for chunk in stream if _text(chunk))


def refused(client: openai.OpenAI, model: str) -> tuple[int, str]:
    """Status and error code of a chat request that must fail."""
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, messages=USER, max_tokens=2)
    return info.value.status_code, info.value.body["code"]  # type: ignore[index]


def send_traffic(deployment: Deployment) -> list[str]:
    """Chat and completion requests, streamed and not, on every main model; a repeated long prompt (prefix
    cache hits); refusals (429 rate limited, 401 invalid key, 404 unknown model); one open-mode request on
    the ops app. Returns the API keys used, none of which may appear in a metric label."""
    client = deployment.client(timeout=120)
    for model in MAIN_MODELS:
        reply = client.chat.completions.create(model=model, messages=USER, max_tokens=8, extra_body=EXTRA)
        assert reply.usage and reply.usage.completion_tokens > 0
        assert client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, extra_body=EXTRA)
        chunks = _consume(
            client.chat.completions.create(model=model, messages=USER, max_tokens=16, stream=True, extra_body=EXTRA)
        )
        assert chunks >= 2, f"{model}: chat stream with {chunks} text chunks"
        chunks = _consume(
            client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=16, stream=True, extra_body=EXTRA
            )
        )
        assert chunks >= 2, f"{model}: completion stream with {chunks} text chunks"
    long = [{"role": "user", "content": LONG_PROMPT}]
    for _ in range(2):  # the second one finds the first one's blocks in tiny-a's prefix cache
        assert client.chat.completions.create(model="tiny-a", messages=long, max_tokens=8, extra_body=EXTRA).choices

    limited_key = deployment.new_key(name="prometheus-rpm", rpm=1)
    limited = deployment.client(api_key=limited_key, timeout=120)
    assert limited.chat.completions.create(model="tiny-b", messages=USER, max_tokens=4).choices
    assert refused(limited, "tiny-b") == (429, "rate_limit_exceeded")
    invalid_key = "sk-orch-invalid-" + secrets.token_hex(12)
    assert refused(deployment.client(api_key=invalid_key, timeout=60), "tiny-a") == (401, "invalid_api_key")
    assert refused(client, "no-such-model") == (404, "model_not_found")

    open_key = "sk-orch-open-mode-" + secrets.token_hex(12)  # open mode takes any key: it must not be a label
    ops = deployment.client(api_key=open_key, base_url=deployment.ops_base_url, timeout=120)
    assert ops.chat.completions.create(model="tiny-scale", messages=USER, max_tokens=4).choices
    return [deployment.api_key, limited_key, invalid_key, open_key]


def _long_streams(client: openai.OpenAI, until: float) -> int:
    """Streams 200 tokens from tiny-a again and again until ``until`` (at least once); returns how many."""
    done = 0
    while done == 0 or time.monotonic() < until:
        stream = client.chat.completions.create(
            model="tiny-a", messages=USER, max_tokens=200, stream=True, extra_body=EXTRA
        )
        assert _consume(stream) > 0
        done += 1
    return done


def load_and_scrape(deployment: Deployment) -> list[str]:
    """Keeps ``LOAD_STREAMS`` long streams running on tiny-a for ``LOAD_SECONDS`` and returns the raw scrapes
    of the metrics port taken meanwhile (once a second), while the engine steps and exports its gauges."""
    client = deployment.client(timeout=120)
    scrapes: list[str] = []
    until = time.monotonic() + LOAD_SECONDS
    with ThreadPoolExecutor(max_workers=LOAD_STREAMS) as pool:
        futures = [pool.submit(_long_streams, client, until) for _ in range(LOAD_STREAMS)]
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            resp = httpx.get(deployment.metrics_url, timeout=30)
            assert resp.status_code == 200, resp.text[:500]
            scrapes.append(resp.text)
            time.sleep(1)
        for future in futures:
            assert future.result(timeout=max(1.0, deadline - time.monotonic())) >= 1
    scrapes.append(httpx.get(deployment.metrics_url, timeout=30).text)
    return scrapes


def wait_for_data(url: str) -> None:
    """Waits until Prometheus has scraped the orchestrator's request counter, then a few more scrapes."""
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while not query(url, "sum(ray_orchestrator_requests_total)"):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no ray_orchestrator_requests_total after {DATA_TIMEOUT_S:.0f}s; {scrape_health(url)}"
            )
        time.sleep(SCRAPE_INTERVAL_S)
    time.sleep(SETTLE_S)


def scrape_health(url: str) -> str:
    """The scrape targets' health, last error and duration, and how many scrapes succeeded, for failure messages."""
    targets = "; ".join(
        f"{t.get('scrapeUrl')} health={t.get('health')} error={t.get('lastError')!r} "
        f"duration={t.get('lastScrapeDuration')}"
        for t in scrape_targets(url)
    )
    ok = query(url, "sum(sum_over_time(up[15m]))")
    total = query(url, "sum(count_over_time(up[15m]))")
    counts = f"{ok[0]['value'][1] if ok else 0}/{total[0]['value'][1] if total else 0}"
    return f"targets: {targets}; successful scrapes: {counts}"


def _has_values(series: dict[str, Any]) -> bool:
    return any(value != "NaN" for _, value in series.get("values", []))


def dashboard_gaps(url: str, start: float, end: float) -> list[str]:
    """Every panel query and template variable that fails or has no series over [start, end]."""
    gaps = []
    for row, expr in dashboard_expressions(DASHBOARD):
        try:
            result = query_range(url, expr, start, end, SCRAPE_INTERVAL_S)
            if not result:
                gaps.append(f"[{row}] no data: {expr}")
            elif not any(_has_values(series) for series in result):
                gaps.append(f"[{row}] only NaN (nothing observed in any window): {expr}")
        except AssertionError as error:
            gaps.append(f"[{row}] query failed: {expr}\n    {error}")
    for variable in variable_queries(DASHBOARD):
        match = _LABEL_VALUES.match(variable.strip())
        if not match:
            gaps.append(f"[variables] not label_values(metric, label): {variable}")
            continue
        selector, label = match[1], match[2]
        try:
            result = query_range(url, f"count by ({label}) ({selector})", start, end, SCRAPE_INTERVAL_S)
        except AssertionError as error:
            gaps.append(f"[variables] query failed: {variable}\n    {error}")
            continue
        if not any(series["metric"].get(label) for series in result):
            gaps.append(f"[variables] no values: {variable}")
    return gaps


def rule_problems(url: str) -> list[str]:
    """Rule expressions the server refuses, alerts it did not load, rules whose evaluation failed."""
    problems = []
    for expr in rule_expressions(ALERTS):
        try:
            query(url, expr)  # may return no series: the alerts are not firing
        except AssertionError as error:
            problems.append(f"[rules] query failed: {expr}\n    {error}")
    loaded = {rule["name"]: rule for group in rule_groups(url) for rule in group["rules"]}
    if missing := ALERT_NAMES - set(loaded):
        problems.append(f"[rules] not loaded: {sorted(missing)} (loaded: {sorted(loaded)})")
    for name, rule in sorted(loaded.items()):
        if rule.get("health") == "err":
            problems.append(f"[rules] {name} evaluation failed: {rule.get('lastError')}")
    return problems


def scrape_problems(scrapes: list[str], keys: list[str], replicas: dict[str, set[str]]) -> list[str]:
    """Required series missing from the raw scrapes, unbounded label values, keys anywhere in the
    text, and model replicas (``replicas``: model -> Serve replica ids) without vLLM's series."""
    problems = []
    names: set[str] = set()
    engines: dict[str, set[str]] = {}  # model_name -> ReplicaId of vLLM's generated-tokens counter
    for text in scrapes:
        for secret in keys:
            if secret in text:
                problems.append(f"[scrape] an API key ({secret[:12]}...) appears in the metrics")
        for name, labels in samples(text):
            names.add(name)
            if name == "ray_vllm_generation_tokens_total":
                engines.setdefault(labels.get("model_name", ""), set()).add(labels.get("ReplicaId", ""))
            if name.startswith("ray_orchestrator_"):
                problems.extend(
                    f"[scrape] {name} label {label}={value!r} looks like a key or a generation id"
                    for label, value in labels.items()
                    if value.startswith(SECRET_PREFIXES)
                )
                problems.extend(
                    f"[scrape] {name} is labelled {label} (a value per key, workspace or request)"
                    for label in labels
                    if label in PER_OWNER_LABELS
                )
    problems.extend(f"[scrape] no {name} series" for name in REQUIRED_SERIES if name not in names)
    for model, ids in sorted(replicas.items()):
        if missing := ids - engines.get(model, set()):
            problems.append(
                f"[scrape] no ray_vllm_generation_tokens_total for {model} replica(s) {sorted(missing)} "
                f"(seen: {engines.get(model)})"
            )
    return sorted(set(problems))


def model_replicas(deployment: Deployment) -> dict[str, set[str]]:
    """Each main model's live Serve replica ids (the last part of the replica actor's name,
    which vLLM's Ray stat logger puts in its ``ReplicaId`` label)."""
    found = {}
    for model in MAIN_MODELS:
        actors = deployment.replica_actors(f"orchestrator-model-{model}#model-{model}#")
        assert actors, f"no replica of {model}"
        found[model] = {name.rsplit("#", 1)[-1] for name in actors}
    return found


def test_dashboard_and_alerts_against_real_prometheus(deployment: Deployment, prometheus_url: str) -> None:
    start = time.time() - SCRAPE_INTERVAL_S
    keys = send_traffic(deployment)
    scrapes = load_and_scrape(deployment)
    wait_for_data(prometheus_url)
    end = time.time()

    problems = [
        *scrape_problems(scrapes, keys, model_replicas(deployment)),
        *dashboard_gaps(prometheus_url, start, end),
        *rule_problems(prometheus_url),
    ]
    assert not problems, (
        f"{len(problems)} monitoring problem(s) over the last {end - start:.0f}s of traffic "
        f"({scrape_health(prometheus_url)}):\n" + "\n".join(problems)
    )
