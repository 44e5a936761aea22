"""Every metric the orchestrator exports, declared once.

The declarations are plain data; a :class:`Sink` turns each into an instrument. In Ray
Serve the sink is Ray's metrics API (``orchestrator.serving.telemetry``), so the series
leave through each node's metrics agent beside Serve's and vLLM's, and Ray adds the
``ray_`` prefix (and ``_total`` to counters) on export: ``orchestrator_requests`` is
scraped as ``ray_orchestrator_requests_total``. Unit tests use :class:`MemorySink`.

A gauge declared with ``window_s`` is a recent rate: what is recorded are amounts, and what
is exported is their sum per second over the last ``window_s`` seconds (each process its
own, :mod:`orchestrator.rates`), so that one scrape gives a rate.

Labels are bounded: ``model`` is a catalog display name (``unknown`` when the request
named none that exists), ``route`` one of the API paths, ``code`` an
:class:`~orchestrator.errors.ErrorCode` value or ``ok``. No label takes a value per key,
workspace or request (their number grows with what admins and clients create, and every
value is a series Prometheus keeps): spend per key is the gateway's usage report
(``GET /admin/usage``), not a metric.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["counter", "gauge", "histogram"]

UNKNOWN_MODEL = "unknown"
OK = "ok"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (before Ray's ``ray_`` prefix), kind, help text and labels;
    ``window_s`` makes a gauge a recent rate (see above)."""

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    window_s: float = 0.0


# --- measured where a request is answered (the router, or a model replica on its own route): what the client sees
REQUESTS = MetricSpec(
    "orchestrator_requests",
    "counter",
    "Generation requests by model, route, HTTP status and error code (`ok` when it succeeded).",
    ("model", "route", "status", "code"),
)
TTFT = MetricSpec(
    "orchestrator_time_to_first_token_seconds",
    "histogram",
    "Time from request arrival to the first token leaving the router (or the model's replica, on its own route).",
    ("model", "route"),
    _LATENCY_BUCKETS,
)
ITL = MetricSpec(
    "orchestrator_inter_token_latency_seconds",
    "histogram",
    "Gap before each streamed chunk with content, as the client receives it (0 inside a batch).",
    ("model", "route"),
    _ITL_BUCKETS,
)
DURATION = MetricSpec(
    "orchestrator_request_duration_seconds",
    "histogram",
    "End-to-end time of a generation request, until its last byte.",
    ("model", "route"),
    _LATENCY_BUCKETS,
)
PROMPT_TOKENS = MetricSpec("orchestrator_prompt_tokens", "counter", "Prompt tokens of finished requests.", ("model",))
COMPLETION_TOKENS = MetricSpec(
    "orchestrator_completion_tokens", "counter", "Generated tokens of finished requests.", ("model",)
)
COST = MetricSpec(
    "orchestrator_cost_usd",
    "counter",
    "Cost of finished requests in USD, from catalog prices.",
    ("model",),
)
REJECTED = MetricSpec(
    "orchestrator_rejected_requests",
    "counter",
    "Requests refused before or instead of generating: `rate_limited` (429), `shed` (overload, no replica), "
    "`timeout`, or `rejected` by the gateway (keys, credits, models).",
    ("model", "reason", "code"),
)

# --- recent rates, kept by each process that counts (router, model route, model replica), for
# `orchestrator status`: one scrape gives them; summed over a model's processes
RATE_WINDOW_S = 10.0
TOKEN_RATE = MetricSpec(
    "orchestrator_recent_completion_tokens_per_second",
    "gauge",
    f"Generated tokens of finished requests per second over the last {RATE_WINDOW_S:g} s, in this process.",
    ("model",),
    window_s=RATE_WINDOW_S,
)
SERVER_ERROR_RATE = MetricSpec(
    "orchestrator_recent_server_errors_per_second",
    "gauge",
    f"Generation requests answered with a 5xx status per second over the last {RATE_WINDOW_S:g} s, in this process.",
    ("model",),
    window_s=RATE_WINDOW_S,
)
PREFIX_CACHE_QUERY_RATE = MetricSpec(
    "orchestrator_recent_prefix_cache_queries_per_second",
    "gauge",
    f"Prompt tokens the engine looked up in its prefix cache per second over the last {RATE_WINDOW_S:g} s "
    "(vLLM's prefix-cache statistics, which also feed vllm:prefix_cache_queries).",
    ("model",),
    window_s=RATE_WINDOW_S,
)
PREFIX_CACHE_HIT_RATE = MetricSpec(
    "orchestrator_recent_prefix_cache_hits_per_second",
    "gauge",
    f"Prompt tokens found in the engine's prefix cache per second over the last {RATE_WINDOW_S:g} s "
    "(vLLM's prefix-cache statistics, which also feed vllm:prefix_cache_hits).",
    ("model",),
    window_s=RATE_WINDOW_S,
)

# --- decided by the autoscaling policy (in Serve's controller), per model and Serve application
_SCALING_LABELS = ("model", "application")
TARGET_REPLICAS = MetricSpec(
    "orchestrator_model_target_replicas", "gauge", "Replicas the autoscaler aims for.", _SCALING_LABELS
)
RUNNING_REPLICAS = MetricSpec("orchestrator_model_running_replicas", "gauge", "Replicas serving now.", _SCALING_LABELS)
MAX_REPLICAS = MetricSpec(
    "orchestrator_model_max_replicas",
    "gauge",
    "The most replicas the autoscaler may ask for (the catalog's max, less what the cluster cannot hold).",
    _SCALING_LABELS,
)
WAITING = MetricSpec(
    "orchestrator_model_waiting_requests",
    "gauge",
    "Requests waiting in the model's engine queues and in router queues (all replicas).",
    _SCALING_LABELS,
)
RUNNING = MetricSpec(
    "orchestrator_model_running_requests", "gauge", "Requests the model's engines are running.", _SCALING_LABELS
)
KV_CACHE = MetricSpec(
    "orchestrator_model_kv_cache_usage_ratio",
    "gauge",
    "KV-cache use of the model's replicas (mean, 0..1).",
    _SCALING_LABELS,
)

# --- the gateway: the replicas' calls to the ledger, and its backlog
GATEWAY_CALL_SECONDS = MetricSpec(
    "orchestrator_gateway_call_duration_seconds",
    "histogram",
    "Time a replica waited for the ledger to answer one gateway call (`admit`, `settle`, ...), retries "
    "included; a request's `admit` is part of its time to first token.",
    ("method",),
    _CALL_BUCKETS,
)
PENDING_RECORDS = MetricSpec(
    "orchestrator_gateway_pending_records", "gauge", "Usage records journaled but not yet in the database."
)
FLUSH_SECONDS = MetricSpec(
    "orchestrator_gateway_flush_duration_seconds",
    "histogram",
    "Time to write one batch of usage records to the database.",
    (),
    _FLUSH_BUCKETS,
)
JOURNAL_SEGMENTS = MetricSpec("orchestrator_gateway_journal_segments", "gauge", "Usage journal segment files on disk.")

ALL: tuple[MetricSpec, ...] = (
    REQUESTS,
    TTFT,
    ITL,
    DURATION,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    COST,
    REJECTED,
    TOKEN_RATE,
    SERVER_ERROR_RATE,
    PREFIX_CACHE_QUERY_RATE,
    PREFIX_CACHE_HIT_RATE,
    GATEWAY_CALL_SECONDS,
    TARGET_REPLICAS,
    RUNNING_REPLICAS,
    MAX_REPLICAS,
    WAITING,
    RUNNING,
    KV_CACHE,
    PENDING_RECORDS,
    FLUSH_SECONDS,
    JOURNAL_SEGMENTS,
)


SeriesKey = tuple[tuple[str, str], ...]


class Labels(Mapping[str, str]):
    """A label set made once for a series recorded often (an engine's every step), which
    carries its series key, so that recording it does not build the key again."""

    __slots__ = ("_labels", "key")

    def __init__(self, **labels: str) -> None:
        self._labels = labels
        self.key: SeriesKey = tuple(sorted(labels.items()))

    def __getitem__(self, name: str) -> str:
        return self._labels[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)


def series_key(tags: Mapping[str, str]) -> SeriesKey:
    """Returns the key of the series ``tags`` name: its pairs sorted by label."""
    return tags.key if isinstance(tags, Labels) else tuple(sorted(tags.items()))


class Instrument(Protocol):
    """A metric ready to record: counters add, gauges set, histograms observe."""

    def record(self, value: float, tags: Mapping[str, str]) -> None: ...


class Sink(Protocol):
    """Creates instruments for metric declarations."""

    def instrument(self, spec: MetricSpec) -> Instrument: ...


class _Null:
    def record(self, value: float, tags: Mapping[str, str]) -> None:
        pass


class NullSink:
    """Records nothing (metrics off)."""

    def instrument(self, spec: MetricSpec) -> Instrument:
        return _Null()


class MemorySink:
    """Keeps what is recorded in memory, for tests: ``values[name][labels]`` is a counter's
    sum, a gauge's last value (a recent rate's: the sum of its amounts), or a histogram's
    list of observations."""

    def __init__(self) -> None:
        self.values: dict[str, dict[SeriesKey, Any]] = defaultdict(dict)

    def instrument(self, spec: MetricSpec) -> Instrument:
        return _MemoryInstrument(self, spec)

    def get(self, name: str, **labels: str) -> Any:
        """Returns the value recorded for exactly these labels (None if nothing was)."""
        return self.values[name].get(tuple(sorted(labels.items())))


class _MemoryInstrument:
    def __init__(self, sink: MemorySink, spec: MetricSpec) -> None:
        self.sink = sink
        self.spec = spec

    def record(self, value: float, tags: Mapping[str, str]) -> None:
        if set(tags) != set(self.spec.labels):
            raise ValueError(f"{self.spec.name}: labels {sorted(tags)} != {sorted(self.spec.labels)}")
        series: dict[SeriesKey, Any] = self.sink.values[self.spec.name]
        key = series_key(tags)
        if self.spec.kind == "counter" or self.spec.window_s:
            series[key] = series.get(key, 0.0) + value
        elif self.spec.kind == "gauge":
            series[key] = value
        else:
            series.setdefault(key, []).append(value)


_NO_TAGS: Mapping[str, str] = {}


class RouterMetrics:
    """What the router records per request (see the declarations above)."""

    def __init__(self, sink: Sink) -> None:
        self.requests = sink.instrument(REQUESTS)
        self.ttft = sink.instrument(TTFT)
        self.itl = sink.instrument(ITL)
        self.duration = sink.instrument(DURATION)
        self.prompt_tokens = sink.instrument(PROMPT_TOKENS)
        self.completion_tokens = sink.instrument(COMPLETION_TOKENS)
        self.cost = sink.instrument(COST)
        self.rejected = sink.instrument(REJECTED)
        self.token_rate = sink.instrument(TOKEN_RATE)
        self.server_error_rate = sink.instrument(SERVER_ERROR_RATE)


class GatewayMetrics:
    """The ledger's backlog: pending records, flush time, journal segments."""

    def __init__(self, sink: Sink) -> None:
        self._pending = sink.instrument(PENDING_RECORDS)
        self._flush = sink.instrument(FLUSH_SECONDS)
        self._segments = sink.instrument(JOURNAL_SEGMENTS)

    def backlog(self, pending: int, segments: int) -> None:
        self._pending.record(pending, _NO_TAGS)
        self._segments.record(segments, _NO_TAGS)

    def flushed(self, seconds: float) -> None:
        self._flush.record(seconds, _NO_TAGS)


class PrefixCacheMetrics:
    """An engine's prefix-cache lookups, as vLLM's statistics give them per step (its label
    set is made once, with its series key)."""

    def __init__(self, sink: Sink, model: str) -> None:
        self._queries = sink.instrument(PREFIX_CACHE_QUERY_RATE)
        self._hits = sink.instrument(PREFIX_CACHE_HIT_RATE)
        self._tags = Labels(model=model)

    def observe(self, queries: int, hits: int) -> None:
        self._queries.record(queries, self._tags)
        self._hits.record(hits, self._tags)


class ScalingMetrics:
    """Per-model figures the autoscaling policy sees and decides."""

    def __init__(self, sink: Sink) -> None:
        self._target = sink.instrument(TARGET_REPLICAS)
        self._running_replicas = sink.instrument(RUNNING_REPLICAS)
        self._max_replicas = sink.instrument(MAX_REPLICAS)
        self._waiting = sink.instrument(WAITING)
        self._running = sink.instrument(RUNNING)
        self._kv = sink.instrument(KV_CACHE)

    def observe(
        self,
        model: str,
        application: str,
        *,
        target: int,
        replicas: int,
        max_replicas: int,
        waiting: float,
        running: float,
        kv_cache: float,
    ) -> None:
        tags = {"model": model, "application": application}
        self._target.record(target, tags)
        self._running_replicas.record(replicas, tags)
        self._max_replicas.record(max_replicas, tags)
        self._waiting.record(waiting, tags)
        self._running.record(running, tags)
        self._kv.record(kv_cache, tags)
