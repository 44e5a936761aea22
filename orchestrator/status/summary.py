"""One :class:`ModelStatus` row per model: one or two scrapes and Serve's deployments, summarized.

From one scrape (:func:`summarize_recent`), rates are the recent-rate gauges the routers and
model replicas export (:data:`orchestrator.metrics.RATE_WINDOW_S`), summed per model; from
two (:func:`summarize`), rates are the counters' increase between them and gauges come from
the later one. A model's Serve deployment, when there is one, gives its status and RUNNING
replicas; that count is authoritative, since the running-replicas gauge can lag one export
interval (~10 s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator import metrics
from orchestrator.catalog import deployment_name
from orchestrator.layout import instance_of
from orchestrator.status.exposition import (
    COMPLETION_TOKENS,
    KV_CACHE_USAGE,
    PREFIX_CACHE_HIT_RATE,
    PREFIX_CACHE_QUERY_RATE,
    REQUESTS,
    RUNNING_REPLICAS,
    RUNNING_REQUESTS,
    SERVER_ERROR_RATE,
    TARGET_REPLICAS,
    TOKEN_RATE,
    WAITING_REQUESTS,
    Key,
    Series,
    collect_series,
    counter_increases,
    gauge_sums,
    gauge_values,
    is_server_error,
    key_of,
)

# The model deployments' names all start so (see orchestrator.catalog.deployment_name).
MODEL_DEPLOYMENT_PREFIX = deployment_name("")


@dataclass(frozen=True)
class ModelStatus:
    """One row: a model in one Serve application. ``None`` means unknown (no such series yet);
    rates are ``None`` only without a measuring window."""

    application: str
    model: str
    deployment: str
    status: str | None
    running_replicas: int | None
    target_replicas: int | None
    waiting_requests: float | None
    running_requests: float | None
    kv_cache_usage: float | None
    tokens_per_second: float | None
    errors_per_minute: float | None
    prefix_cache_hit_rate: float | None = None
    """Prompt tokens found in the prefix cache per token looked up (0..1); None without lookups."""


def _model_deployments(deployments: Mapping[Key, Mapping[str, Any]]) -> dict[Key, Mapping[str, Any]]:
    """The model deployments, each under its router's application (a model in an application
    of its own, as orchestrator.layout lays a catalog out, is shown with the router's)."""
    return {
        (instance_of(app, name), name): info
        for (app, name), info in deployments.items()
        if name.startswith(MODEL_DEPLOYMENT_PREFIX)
    }


def _row_keys(
    gauges: Mapping[str, Mapping[Key, float]],
    rates: Iterable[Mapping[Key, float]],
    seen: Iterable[Key],
    deployments: Mapping[Key, Mapping[str, Any]],
) -> set[Key]:
    """Rows: models with a gauge, with traffic in the window, or with a deployment in Serve.
    Counters alone do not make a row: Ray keeps exporting a removed application's counters."""
    keys = {key for values in gauges.values() for key in values}
    keys |= {key for values in rates for key, value in values.items() if value > 0}
    by_deployment = {(app, deployment_name(model)): (app, model) for app, model in {*keys, *seen}}
    for app, name in deployments:
        keys.add(by_deployment.get((app, name), (app, name.removeprefix(MODEL_DEPLOYMENT_PREFIX))))
    return {key for key in keys if key[1] and key[1] != metrics.UNKNOWN_MODEL}


def _as_int(value: float | None) -> int | None:
    return None if value is None else round(value)


_GAUGES = (TARGET_REPLICAS, RUNNING_REPLICAS, WAITING_REQUESTS, RUNNING_REQUESTS, KV_CACHE_USAGE)


@dataclass(frozen=True)
class _Rates:
    """Per (application, model): tokens per second, 5xx errors per minute, and prefix-cache
    tokens looked up and found (any common unit); None for unknown rates."""

    tokens: Mapping[Key, float] | None
    errors: Mapping[Key, float] | None
    cache_queries: Mapping[Key, float]
    cache_hits: Mapping[Key, float]

    def hit_rate(self, key: Key) -> float | None:
        queries = self.cache_queries.get(key, 0.0)
        return min(1.0, self.cache_hits.get(key, 0.0) / queries) if queries > 0 else None


def _rows(now: Series, rates: _Rates, deployments: Mapping[Key, Mapping[str, Any]]) -> list[ModelStatus]:
    gauges = {name: gauge_values(now, name) for name in _GAUGES}
    models = _model_deployments(deployments)
    seen = {key_of(labels) for _, labels in now}
    traffic = [values for values in (rates.tokens, rates.errors, rates.cache_queries) if values is not None]
    rows = []
    for app, model in sorted(_row_keys(gauges, traffic, seen, models)):
        key = (app, model)
        name = deployment_name(model)
        found = models.get((app, name))
        running = gauges[RUNNING_REPLICAS].get(key)
        if found is not None:
            running = float(found.get("replica_states", {}).get("RUNNING", 0))
        rows.append(
            ModelStatus(
                application=app,
                model=model,
                deployment=name,
                status=None if found is None else str(found.get("status")),
                running_replicas=_as_int(running),
                target_replicas=_as_int(gauges[TARGET_REPLICAS].get(key)),
                waiting_requests=gauges[WAITING_REQUESTS].get(key),
                running_requests=gauges[RUNNING_REQUESTS].get(key),
                kv_cache_usage=gauges[KV_CACHE_USAGE].get(key),
                tokens_per_second=None if rates.tokens is None else rates.tokens.get(key, 0.0),
                errors_per_minute=None if rates.errors is None else rates.errors.get(key, 0.0),
                prefix_cache_hit_rate=rates.hit_rate(key),
            )
        )
    return rows


def summarize(
    before: Sequence[str],
    after: Sequence[str],
    window_s: float,
    deployments: Mapping[Key, Mapping[str, Any]],
) -> list[ModelStatus]:
    """Returns one row per (application, model), sorted by application then model.

    ``before`` and ``after`` are the exposition texts of two scrapes ``window_s`` seconds
    apart (any order of endpoints; series are matched by name and labels). Gauges are read
    from ``after``. ``deployments`` maps (application, deployment name) to
    ``{"status": str, "replica_states": {state: count}}`` as
    :meth:`orchestrator.serving.cluster.RayCluster.deployments` gives; a model's deployment is
    matched by :func:`orchestrator.catalog.deployment_name`, and its RUNNING replicas replace
    the gauge's. A deployment with no series yet is shown under its name without ``model-``
    (display names that had other characters replaced read differently until the model
    reports). A model with no counter series had no traffic: its rates are 0 (``None`` only
    when ``window_s`` is not positive). The prefix-cache hit rate is the recent-rate gauges'
    of ``after`` (vLLM's per-step figures, kept by each model replica).

    Raises:
        ValueError: a text is not Prometheus text exposition.
    """
    now, then = collect_series(after), collect_series(before)
    tokens = counter_increases(then, now, COMPLETION_TOKENS)
    errors = counter_increases(then, now, REQUESTS, where=is_server_error)
    rates = _Rates(
        tokens={key: value / window_s for key, value in tokens.items()} if window_s > 0 else None,
        errors={key: value * 60.0 / window_s for key, value in errors.items()} if window_s > 0 else None,
        cache_queries=gauge_sums(now, PREFIX_CACHE_QUERY_RATE),
        cache_hits=gauge_sums(now, PREFIX_CACHE_HIT_RATE),
    )
    return _rows(now, rates, deployments)


def summarize_recent(texts: Sequence[str], deployments: Mapping[Key, Mapping[str, Any]]) -> list[ModelStatus]:
    """Returns the rows of one scrape (``texts``, any order of endpoints), as
    :func:`summarize` does, with rates from the recent-rate gauges instead of counters: each
    router and model replica exports its own (tokens and 5xx errors of the requests it
    answered, its engine's prefix-cache lookups), and a model's rate is their sum. A model
    none of them reports had no traffic lately: its rates are 0.

    Raises:
        ValueError: a text is not Prometheus text exposition.
    """
    now = collect_series(texts)
    rates = _Rates(
        tokens=gauge_sums(now, TOKEN_RATE),
        errors={key: value * 60.0 for key, value in gauge_sums(now, SERVER_ERROR_RATE).items()},
        cache_queries=gauge_sums(now, PREFIX_CACHE_QUERY_RATE),
        cache_hits=gauge_sums(now, PREFIX_CACHE_HIT_RATE),
    )
    return _rows(now, rates, deployments)
