"""Ray's Prometheus text as two nodes export it, twice (a window apart), and Serve's deployments:
the fixtures the status tests share."""

from __future__ import annotations

from typing import Any

from orchestrator.catalog import deployment_name
from orchestrator.status.summary import ModelStatus, summarize

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
    return summarize(before, after, window_s, DEPLOYMENTS)


def labelled_gauge(name: str, rows: list[tuple[dict[str, str], float]]) -> str:
    """A gauge's series, each with its Serve labels (see :func:`router`) and Ray's."""
    lines = [f"# HELP {name} a gauge", f"# TYPE {name} gauge"]
    lines += [f"{name}{{{ray_labels(**labels)}}} {value}" for labels, value in rows]
    return "\n".join(lines)


MODEL_REPLICA_1 = "dddd0004"
MODEL_REPLICA_2 = "eeee0005"


def model_replica(node: str, worker: str, model: str) -> dict[str, str]:
    """A model replica's Serve labels: its model's own application (orchestrator.layout), under router app "llm"."""
    deployment = deployment_name(model)
    return {
        "node": node,
        "worker": worker,
        "application": f"llm-{deployment}",
        "deployment": deployment,
        "replica": f"{deployment}#{worker}",
        "model": model,
    }


def recent_texts() -> list[str]:
    """One scrape of both nodes with the recent-rate gauges: SMOL's tokens through two routers
    and its own route (40 + 30 + 10 per second), its 5xx errors (0.1 per second), and the
    prefix-cache lookups of its two replicas (200 tokens/s looked up with 50 found, and 100 with
    100: 150 of 300, 50 %); TINY's tokens (5 per second) and an engine that looked nothing up lately."""
    head = [
        head_text(before=False),
        labelled_gauge(
            "ray_orchestrator_recent_completion_tokens_per_second",
            [
                (router(HEAD, ROUTER_A, "llm", SMOL), 40.0),
                (router(HEAD, ROUTER_A, "llm", TINY), 5.0),
                (model_replica(HEAD, MODEL_REPLICA_1, SMOL), 10.0),
            ],
        ),
        labelled_gauge(
            "ray_orchestrator_recent_server_errors_per_second",
            [(router(HEAD, ROUTER_A, "llm", SMOL), 0.1), (router(HEAD, ROUTER_A, "llm", TINY), 0.0)],
        ),
        labelled_gauge(
            "ray_orchestrator_recent_prefix_cache_queries_per_second",
            [(model_replica(HEAD, MODEL_REPLICA_1, SMOL), 200.0), (model_replica(HEAD, "ffff0006", TINY), 0.0)],
        ),
        labelled_gauge(
            "ray_orchestrator_recent_prefix_cache_hits_per_second",
            [(model_replica(HEAD, MODEL_REPLICA_1, SMOL), 50.0), (model_replica(HEAD, "ffff0006", TINY), 0.0)],
        ),
    ]
    worker = [
        worker_text(before=False).rstrip("\n"),
        labelled_gauge(
            "ray_orchestrator_recent_completion_tokens_per_second", [(router(WORKER, ROUTER_B, "llm", SMOL), 30.0)]
        ),
        labelled_gauge(
            "ray_orchestrator_recent_prefix_cache_queries_per_second",
            [(model_replica(WORKER, MODEL_REPLICA_2, SMOL), 100.0)],
        ),
        labelled_gauge(
            "ray_orchestrator_recent_prefix_cache_hits_per_second",
            [(model_replica(WORKER, MODEL_REPLICA_2, SMOL), 100.0)],
        ),
    ]
    return ["\n".join(head) + "\n", "\n".join(worker) + "\n"]
