"""One :class:`ModelStatus` row per model: two scrapes and Serve's deployments, summarized.

Gauges come from the later scrape, rates from the difference between the two. A model's
Serve deployment, when there is one, gives its status and RUNNING replicas; that count is
authoritative, since the running-replicas gauge can lag one export interval (~10 s).
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
    REQUESTS,
    RUNNING_REPLICAS,
    RUNNING_REQUESTS,
    TARGET_REPLICAS,
    WAITING_REQUESTS,
    Key,
    collect_series,
    counter_increases,
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
    when ``window_s`` is not positive).

    Raises:
        ValueError: a text is not Prometheus text exposition.
    """
    now, then = collect_series(after), collect_series(before)
    gauges = {
        name: gauge_values(now, name)
        for name in (TARGET_REPLICAS, RUNNING_REPLICAS, WAITING_REQUESTS, RUNNING_REQUESTS, KV_CACHE_USAGE)
    }
    tokens = counter_increases(then, now, COMPLETION_TOKENS)
    errors = counter_increases(then, now, REQUESTS, where=is_server_error)
    models = _model_deployments(deployments)
    seen = {key_of(labels) for _, labels in now}
    rows = []
    for app, model in sorted(_row_keys(gauges, (tokens, errors), seen, models)):
        name = deployment_name(model)
        found = models.get((app, name))
        running = gauges[RUNNING_REPLICAS].get((app, model))
        if found is not None:
            running = float(found.get("replica_states", {}).get("RUNNING", 0))
        rows.append(
            ModelStatus(
                application=app,
                model=model,
                deployment=name,
                status=None if found is None else str(found.get("status")),
                running_replicas=_as_int(running),
                target_replicas=_as_int(gauges[TARGET_REPLICAS].get((app, model))),
                waiting_requests=gauges[WAITING_REQUESTS].get((app, model)),
                running_requests=gauges[RUNNING_REQUESTS].get((app, model)),
                kv_cache_usage=gauges[KV_CACHE_USAGE].get((app, model)),
                tokens_per_second=tokens.get((app, model), 0.0) / window_s if window_s > 0 else None,
                errors_per_minute=errors.get((app, model), 0.0) * 60.0 / window_s if window_s > 0 else None,
            )
        )
    return rows
