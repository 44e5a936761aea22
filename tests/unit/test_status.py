"""``orchestrator status``: parsing Ray's Prometheus text, the summary, its table and JSON,
node discovery and the command, without Ray (the cluster-facing functions are replaced)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from orchestrator import status
from orchestrator.status import ModelStatus

SESSION = "session_2026-11-23_11-02-03_456789_1234"
OTEL = (
    'otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",'
    'otel_scope_schema_url="",otel_scope_version=""'
)


def ray_labels(node: str, worker: str, **labels: str) -> str:
    """Labels as Ray's agent exports them: the metric's own plus Ray's, sorted, quoted."""
    every = {"Component": "core_worker", "NodeAddress": node, "SessionName": SESSION, "Version": "2.60.0"}
    every |= {"WorkerId": worker, **labels}
    return ",".join(f'{k}="{v}"' for k, v in sorted(every.items())) + "," + OTEL


def gauge(name: str, help_text: str, rows: list[tuple[str, str, str, str, float]]) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for node, worker, app, model, value in rows:
        lines.append(f"{name}{{{ray_labels(node, worker, application=app, model=model)}}} {value}")
    return "\n".join(lines)


def counter(name: str, help_text: str, rows: list[tuple[dict[str, str], float]]) -> str:
    lines = [f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter"]
    lines += [f"{name}_total{{{ray_labels(**labels)}}} {value}" for labels, value in rows]
    return "\n".join(lines)


HEAD = "10.0.0.1"
WORKER = "10.0.0.2"
CONTROLLER = "c0ffee01"  # the Serve controller writing the scaling gauges
OLD_CONTROLLER = "dead0001"  # its predecessor's series, not yet evicted
ROUTER_A = "aaaa0001"
ROUTER_B = "bbbb0002"
SMOL = "smollm2-135m-instruct"
TINY = "tiny-random"
QWEN = "qwen2.5-7b"  # deployment model-qwen2-5-7b


def router(node: str, worker: str, app: str, model: str, **labels: str) -> dict[str, str]:
    replica = f"router#{worker}"
    return {"node": node, "worker": worker, "application": app, "deployment": "router", "replica": replica} | {
        "model": model,
        **labels,
    }


def tokens(node: str, worker: str, app: str, model: str, value: float) -> tuple[dict[str, str], float]:
    return router(node, worker, app, model), value


def requests(
    node: str, worker: str, app: str, model: str, status_code: int, code: str, value: float
) -> tuple[dict[str, str], float]:
    labels = router(node, worker, app, model, route="/v1/chat/completions", status=str(status_code), code=code)
    return labels, value


def head_text(*, before: bool) -> str:
    """The head node: the controller's gauges, router A's counters, and series of others."""
    gauges = [
        gauge(
            "ray_orchestrator_model_target_replicas",
            "Replicas the autoscaler aims for.",
            [
                (HEAD, CONTROLLER, "llm", SMOL, 2.0),
                (HEAD, OLD_CONTROLLER, "llm", SMOL, 1.0),
                (HEAD, CONTROLLER, "llm", TINY, 1.0),
                (HEAD, CONTROLLER, "batch", QWEN, 1.0),
            ],
        ),
        gauge(
            "ray_orchestrator_model_running_replicas",
            "Replicas serving now.",
            [
                (HEAD, CONTROLLER, "llm", SMOL, 1.0),
                (HEAD, OLD_CONTROLLER, "llm", SMOL, 1.0),
                (HEAD, CONTROLLER, "llm", TINY, 1.0),
                (HEAD, CONTROLLER, "batch", QWEN, 1.0),
            ],
        ),
        gauge(
            "ray_orchestrator_model_waiting_requests",
            "Requests waiting in the model's engine queues and in router queues (all replicas).",
            [(HEAD, CONTROLLER, "llm", SMOL, 3.0), (HEAD, CONTROLLER, "llm", TINY, 0.0)],
        ),
        gauge(
            "ray_orchestrator_model_running_requests",
            "Requests the model's engines are running.",
            [(HEAD, CONTROLLER, "llm", SMOL, 5.0), (HEAD, CONTROLLER, "llm", TINY, 1.0)],
        ),
        gauge(
            "ray_orchestrator_model_kv_cache_usage_ratio",
            "KV-cache use of the model's replicas (mean, 0..1).",
            [(HEAD, CONTROLLER, "llm", SMOL, 0.25), (HEAD, CONTROLLER, "llm", TINY, 0.125)],
        ),
    ]
    token_rows = [tokens(HEAD, ROUTER_A, "llm", SMOL, 1000.0 if before else 1600.0)]
    token_rows.append(tokens(HEAD, ROUTER_A, "batch", QWEN, 200.0))  # no traffic in the window
    token_rows.append(tokens(HEAD, ROUTER_A, "old", "gone-model", 77.0))  # a removed app's counter
    if not before:
        token_rows.append(tokens(HEAD, ROUTER_A, "llm", TINY, 50.0))  # first tokens ever: new series
    request_rows = [
        requests(HEAD, ROUTER_A, "llm", SMOL, 200, "ok", 10.0 if before else 30.0),
        requests(HEAD, ROUTER_A, "llm", SMOL, 502, "provider_unavailable", 1.0 if before else 4.0),
        requests(HEAD, ROUTER_A, "llm", SMOL, 429, "rate_limit_exceeded", 2.0 if before else 9.0),
        requests(HEAD, ROUTER_A, "llm", "unknown", 404, "model_not_found", 1.0 if before else 5.0),
        requests(HEAD, ROUTER_A, "batch", QWEN, 504, "provider_timeout", 5.0 if before else 6.0),
    ]
    if not before:
        request_rows.append(requests(HEAD, ROUTER_A, "llm", TINY, 500, "internal_error", 2.0))
    others = [
        "# HELP ray_serve_num_http_requests_total The number of HTTP requests processed.",
        "# TYPE ray_serve_num_http_requests_total counter",
        f'ray_serve_num_http_requests_total{{application="llm",method="POST",route="/",{OTEL}}} 99.0',
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{engine="0",model_name="smollm2"} 3.0',
        # The OpenCensus exporter's deprecated gauge twin of a counter: never counted.
        "# HELP ray_orchestrator_completion_tokens (DEPRECATED, use ray_orchestrator_completion_tokens_total)",
        "# TYPE ray_orchestrator_completion_tokens gauge",
        f"ray_orchestrator_completion_tokens{{{ray_labels(**router(HEAD, ROUTER_A, 'llm', SMOL))}}} 1.0e6",
    ]
    return "\n".join(
        [
            *gauges,
            counter("ray_orchestrator_completion_tokens", "Generated tokens of finished requests.", token_rows),
            counter("ray_orchestrator_requests", "Generation requests by model, route, ...", request_rows),
            *others,
        ]
    )


def worker_text(*, before: bool) -> str:
    """The second node: router B, restarted during the window (its counter went down)."""
    rows = [tokens(WORKER, ROUTER_B, "llm", SMOL, 500.0 if before else 100.0)]
    return counter("ray_orchestrator_completion_tokens", "Generated tokens of finished requests.", rows) + "\n"


DEPLOYMENTS: dict[tuple[str, str], dict[str, Any]] = {
    ("llm", "router"): {"status": "HEALTHY", "replica_states": {"RUNNING": 2}},
    ("llm", "model-smollm2-135m-instruct"): {"status": "HEALTHY", "replica_states": {"RUNNING": 1}},
    ("llm", "model-tiny-random"): {"status": "UPSCALING", "replica_states": {"RUNNING": 2, "STARTING": 1}},
    ("batch", "model-qwen2-5-7b"): {"status": "UNHEALTHY", "replica_states": {"STARTING": 1}},
    ("batch", "model-fresh-model"): {"status": "UPDATING", "replica_states": {"STARTING": 1}},
}


def summary(window_s: float = 10.0) -> list[ModelStatus]:
    before = [head_text(before=True), worker_text(before=True)]
    after = [worker_text(before=False), head_text(before=False)]  # order of endpoints does not matter
    return status.summarize(before, after, window_s, DEPLOYMENTS)


def test_parse_samples_keeps_orchestrator_series_with_exported_names() -> None:
    samples = status.parse_samples(head_text(before=False))
    names = {s.name for s in samples}
    assert "ray_orchestrator_completion_tokens_total" in names
    assert "ray_orchestrator_requests_total" in names
    assert "ray_orchestrator_completion_tokens" in names  # the deprecated gauge is parsed, not used
    assert not any(n.startswith(("ray_serve_", "vllm:")) for n in names)
    first = samples[0]
    assert first.name == "ray_orchestrator_model_target_replicas"
    assert first.labels["WorkerId"] == CONTROLLER and first.labels["application"] == "llm"
    assert first.value == 2.0


def test_parse_samples_names_counters_total_also_when_type_line_lacks_it() -> None:
    text = '# TYPE ray_orchestrator_requests counter\nray_orchestrator_requests{model="m",status="500"} 3\n'
    assert status.parse_samples(text) == [
        status.Sample("ray_orchestrator_requests_total", {"model": "m", "status": "500"}, 3.0)
    ]


def test_parse_samples_rejects_broken_text() -> None:
    with pytest.raises(ValueError):
        status.parse_samples('ray_orchestrator_requests_total{model="m" 3\n')


def test_summary_figures() -> None:
    rows = {(r.application, r.model): r for r in summary()}
    assert list(rows) == [("batch", "fresh-model"), ("batch", QWEN), ("llm", SMOL), ("llm", TINY)]
    # max over the live and the stale controller's series; running from Serve
    assert rows["llm", SMOL] == ModelStatus(
        application="llm",
        model=SMOL,
        deployment="model-smollm2-135m-instruct",
        status="HEALTHY",
        running_replicas=1,
        target_replicas=2,
        waiting_requests=3.0,
        running_requests=5.0,
        kv_cache_usage=0.25,
        tokens_per_second=70.0,  # router A +600, router B restarted: 100 counted from 0
        errors_per_minute=18.0,  # +3 of 502; 429 and 200 are no errors
    )
    tiny = rows["llm", TINY]
    assert (tiny.status, tiny.running_replicas, tiny.target_replicas) == ("UPSCALING", 2, 1)  # Serve over the gauge
    assert tiny.tokens_per_second == 5.0 and tiny.errors_per_minute == 12.0  # series new in the window
    assert (tiny.kv_cache_usage, tiny.waiting_requests, tiny.running_requests) == (0.125, 0.0, 1.0)
    qwen = rows["batch", QWEN]
    assert (qwen.deployment, qwen.status, qwen.running_replicas, qwen.target_replicas) == (
        "model-qwen2-5-7b",
        "UNHEALTHY",
        0,
        1,
    )
    assert (qwen.waiting_requests, qwen.kv_cache_usage) == (None, None)
    assert (qwen.tokens_per_second, qwen.errors_per_minute) == (0.0, 6.0)


def test_deployment_without_metrics_is_shown_with_unknown_figures() -> None:
    fresh = summary()[0]
    assert fresh == ModelStatus(
        application="batch",
        model="fresh-model",
        deployment="model-fresh-model",
        status="UPDATING",
        running_replicas=0,
        target_replicas=None,
        waiting_requests=None,
        running_requests=None,
        kv_cache_usage=None,
        tokens_per_second=0.0,
        errors_per_minute=0.0,
    )


def test_deployment_named_by_counters_when_no_gauge() -> None:
    """A fixed-size model has no scaling gauges; its counters name its deployment's row."""
    before = [counter("ray_orchestrator_completion_tokens", "t", [tokens(HEAD, ROUTER_A, "batch", QWEN, 4.0)])]
    deployments = {("batch", "model-qwen2-5-7b"): {"status": "HEALTHY", "replica_states": {"RUNNING": 3}}}
    (row,) = status.summarize(before, before, 5.0, deployments)
    assert (row.model, row.running_replicas, row.target_replicas, row.tokens_per_second) == (QWEN, 3, None, 0.0)


def test_metrics_without_serve_deployment_and_no_window() -> None:
    text = head_text(before=False)
    rows = status.summarize([text], [text], 0.0, {})
    smol = next(r for r in rows if r.model == SMOL)
    assert (smol.status, smol.running_replicas, smol.target_replicas) == (None, 1, 2)  # the gauge's
    assert (smol.tokens_per_second, smol.errors_per_minute) == (None, None)
    assert {r.application for r in rows} == {"llm", "batch"}  # not the removed "old" app, not "unknown"


def test_render_table() -> None:
    assert status.render_table(summary()) == "\n".join(
        [
            "APP    MODEL                  STATUS     REPLICAS  WAITING  RUNNING   KV%  TOK/S  ERR/MIN",
            "batch  fresh-model            UPDATING        0/-        -        -     -    0.0      0.0",
            "batch  qwen2.5-7b             UNHEALTHY       0/1        -        -     -    0.0      6.0",
            "llm    smollm2-135m-instruct  HEALTHY         1/2        3        5  25.0   70.0     18.0",
            "llm    tiny-random            UPSCALING       2/1        0        1  12.5    5.0     12.0",
        ]
    )


def test_render_table_without_rows_is_the_header() -> None:
    assert status.render_table([]) == "  ".join(status.COLUMNS)


def test_to_json_shape() -> None:
    frame = status.to_json(summary(), 10.0004)
    assert frame["window_s"] == 10.0
    assert [m["model"] for m in frame["models"]] == ["fresh-model", QWEN, SMOL, TINY]
    assert frame["models"][2] == {
        "application": "llm",
        "model": SMOL,
        "deployment": "model-smollm2-135m-instruct",
        "status": "HEALTHY",
        "replicas": {"running": 1, "target": 2},
        "requests": {"waiting": 3, "running": 5},
        "kv_cache_usage": 0.25,
        "tokens_per_second": 70.0,
        "errors_per_minute": 18.0,
    }
    assert frame["models"][0]["requests"] == {"waiting": None, "running": None}
    assert frame["models"][0]["kv_cache_usage"] is None
    assert json.loads(json.dumps(frame)) == frame


def test_discovery_skips_dead_nodes_and_nodes_without_metrics_port() -> None:
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
        {"Alive": False, "NodeManagerAddress": "10.0.0.9", "MetricsExportPort": 8080},
        {"Alive": True, "NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 0},
        {"Alive": True, "NodeManagerAddress": "fd00::3", "MetricsExportPort": 51234},
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
    ]
    assert status.metrics_urls(nodes) == ["http://10.0.0.1:8080/metrics", "http://[fd00::3]:51234/metrics"]


def test_deployments_from_serve_status_gives_plain_strings() -> None:
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    deployment = SimpleNamespace(
        status=DeploymentStatus.UPSCALING, replica_states={ReplicaState.RUNNING: 1, "STARTING": 2}, message="scaling"
    )
    serve_status = SimpleNamespace(applications={"llm": SimpleNamespace(deployments={"model-x": deployment})})
    assert status.deployments_from_serve_status(serve_status) == {
        ("llm", "model-x"): {
            "status": "UPSCALING",
            "replica_states": {"RUNNING": 1, "STARTING": 2},
            "message": "scaling",
        }
    }


def test_fetch_metrics_keeps_endpoints_that_answer() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.1":
            return httpx.Response(200, text="ray_orchestrator_x 1\n")
        if request.url.host == "10.0.0.2":
            return httpx.Response(503)
        if request.url.host == "10.0.0.4":
            return httpx.Response(200, text='ray_orchestrator_x{model="m" 1\n')  # malformed
        raise httpx.ConnectError("refused", request=request)

    urls = [f"http://10.0.0.{i}:1/metrics" for i in (1, 2, 3, 4)]
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert status.fetch_metrics(client, urls) == {urls[0]: "ray_orchestrator_x 1\n"}
        with pytest.raises(status.StatusError, match=r"no metrics endpoint answered \(tried http://10.0.0.2"):
            status.fetch_metrics(client, urls[1:])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_frames_rates_between_consecutive_scrapes() -> None:
    def tok(value: float) -> str:
        return counter("ray_orchestrator_completion_tokens", "t", [tokens(HEAD, ROUTER_A, "llm", SMOL, value)]) + "\n"

    head, other = "http://head/metrics", "http://other/metrics"
    other_text = counter("ray_orchestrator_completion_tokens", "t", [tokens(WORKER, ROUTER_B, "llm", SMOL, 9e6)])
    scrapes = iter([{head: tok(0)}, {head: tok(100), other: other_text + "\n"}, {head: tok(400)}])
    clock = FakeClock()
    got = status.frames(lambda: next(scrapes), dict, window_s=10.0, interval_s=20.0, clock=clock, sleep=clock.sleep)
    rows, window = next(got)
    # "other" did not answer the first scrape: its total is not read as this window's increase
    assert (window, rows[0].tokens_per_second) == (10.0, 10.0)
    rows, window = next(got)
    assert (window, rows[0].tokens_per_second) == (20.0, 15.0)
    assert clock.slept == [10.0, 20.0]


def test_frames_single_shot_stops_after_one() -> None:
    clock = FakeClock()
    frames = list(status.frames(lambda: {"u": ""}, dict, window_s=3.0, interval_s=None, clock=clock, sleep=clock.sleep))
    assert frames == [([], 3.0)]


def command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orchestrator")
    status.add_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["status", *argv])


def test_arguments() -> None:
    ns = command([])
    assert (ns.watch, ns.window, ns.json, ns.address, ns.metrics_url) == (None, 10.0, False, None, None)
    assert ns.func is status.status_command
    assert command(["--watch"]).watch == 5.0
    assert command(["--watch", "2", "--window", "3", "--json"]).watch == 2.0
    assert command(["--metrics-url", "http://a/metrics", "--metrics-url", "http://b/metrics"]).metrics_url == [
        "http://a/metrics",
        "http://b/metrics",
    ]
    with pytest.raises(SystemExit):
        command(["--window", "0"])


def test_no_cluster_exits_1_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(address: str) -> None:
        raise status.StatusError(f"cannot reach a Ray cluster at {address!r}: Could not find any running Ray instance")

    monkeypatch.setattr(status, "connect_ray", refuse)
    monkeypatch.setattr(status, "disconnect_ray", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert status.status_command(command([])) == 1
    err = capsys.readouterr().err
    assert err == "error: cannot reach a Ray cluster at '10.0.0.1:6379': Could not find any running Ray instance\n"


def fake_cluster(monkeypatch: pytest.MonkeyPatch, answer: Any) -> list[str]:
    """Replaces Ray by two alive nodes (and a dead one) and HTTP by ``answer``; returns calls made."""
    calls: list[str] = []
    nodes = [
        {"Alive": True, "NodeManagerAddress": HEAD, "MetricsExportPort": 8080},
        {"Alive": True, "NodeManagerAddress": WORKER, "MetricsExportPort": 8080},
        {"Alive": False, "NodeManagerAddress": "10.0.0.3", "MetricsExportPort": 8080},
    ]
    monkeypatch.setattr(status, "connect_ray", lambda address: calls.append(f"connect {address}"))
    monkeypatch.setattr(status, "disconnect_ray", lambda: calls.append("disconnect"))
    monkeypatch.setattr(status, "alive_nodes", lambda: nodes)
    monkeypatch.setattr(status, "serve_deployments", lambda: DEPLOYMENTS)
    monkeypatch.setattr(status, "http_client", lambda: httpx.Client(transport=httpx.MockTransport(answer)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_command_prints_json_frame(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    scrapes: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        scrapes.append(request.url.host)
        before = scrapes.count(request.url.host) == 1
        text = head_text(before=before) if request.url.host == HEAD else worker_text(before=before)
        return httpx.Response(200, text=text)

    calls = fake_cluster(monkeypatch, answer)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert status.status_command(command(["--json", "--window", "0.01"])) == 0
    frame = json.loads(out.getvalue())
    assert [m["model"] for m in frame["models"]] == ["fresh-model", QWEN, SMOL, TINY]
    assert frame["models"][2]["replicas"] == {"running": 1, "target": 2}
    assert frame["window_s"] > 0
    assert sorted(scrapes) == [HEAD, HEAD, WORKER, WORKER]
    assert calls == ["connect auto", "disconnect"]
    assert capsys.readouterr().err == ""


def test_command_exits_1_when_no_endpoint_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = fake_cluster(monkeypatch, lambda request: httpx.Response(404))
    assert status.status_command(command(["--address", "ray://head:10001", "--metrics-url", "http://x:1/m"])) == 1
    assert capsys.readouterr().err == "error: no metrics endpoint answered (tried http://x:1/m)\n"
    assert calls == ["connect ray://head:10001", "disconnect"]


def test_watch_ends_with_0_on_ctrl_c(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    answered = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        answered += 1
        if answered > 3:
            raise KeyboardInterrupt
        return httpx.Response(200, text=worker_text(before=False))

    fake_cluster(monkeypatch, answer)
    ns = command(["--watch", "0.01", "--window", "0.01", "--metrics-url", "http://w/metrics"])
    assert status.status_command(ns) == 0
    out = capsys.readouterr().out
    assert out.count("APP  ") == 2 and "rates over" in out and "\x1b[2J" not in out  # no tty: no clearing


def test_reachable() -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert status.reachable("127.0.0.1", port, timeout_s=1.0)
    assert not status.reachable("127.0.0.1", port, timeout_s=1.0)


def test_loopback_only_cluster_is_reached_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """``orchestrator serve``'s Ray listens on 127.0.0.1 only; Ray would dial the public address."""
    from ray._private import ray_constants, services

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.delenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, raising=False)
    monkeypatch.setattr(services, "get_node_ip_address", lambda address=None: "192.0.2.7")
    dialed: list[str] = []

    def loopback_only(host: str, port: int, timeout_s: float = 0) -> bool:
        dialed.append(f"{host}:{port}")
        return host == "127.0.0.1"

    monkeypatch.setattr(status, "reachable", loopback_only)
    assert status._bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert dialed == ["192.0.2.7:6379", "127.0.0.1:6379"]
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] == "0"


def test_cluster_on_public_address_is_left_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import ray_constants, services

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setattr(services, "get_node_ip_address", lambda address=None: "192.0.2.7")
    monkeypatch.setattr(status, "reachable", lambda host, port, timeout_s=0: True)
    assert status._bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert status._bootstrap_address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert status._bootstrap_address("ray://head:10001") == "ray://head:10001"
    assert ray_constants.ENABLE_RAY_CLUSTER is True


def test_unreachable_or_missing_cluster_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import services

    monkeypatch.setattr(status, "reachable", lambda host, port, timeout_s=0: False)
    with pytest.raises(
        status.StatusError, match=r"^cannot reach a Ray cluster at 10.0.0.1:6379: nothing answers there$"
    ):
        status._bootstrap_address("10.0.0.1:6379")
    monkeypatch.setattr(services, "get_ray_address_from_environment", lambda address, temp_dir: "127.0.0.1:6379")
    with pytest.raises(status.StatusError, match=r"^cannot reach a Ray cluster at 'auto' \(127.0.0.1:6379\): nothing"):
        status._bootstrap_address("auto")

    def none_running(address: str, temp_dir: str | None) -> str:
        raise ConnectionError("Could not find any running Ray instance. Please specify ...")

    monkeypatch.setattr(services, "get_ray_address_from_environment", none_running)
    with pytest.raises(status.StatusError, match=r"^cannot reach a Ray cluster at 'auto': Could not find any running"):
        status._bootstrap_address("auto")


def test_module_imports_neither_ray_nor_http() -> None:
    """``orchestrator --help`` imports this module; Ray, httpx and the parser load on use."""
    import subprocess

    forbidden = ["ray", "httpx", "prometheus_client"]
    code = f"import sys, orchestrator.status; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
