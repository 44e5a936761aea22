"""Ray's Prometheus text: the orchestrator's series in it, and gauge and counter arithmetic.

The orchestrator's metrics (:mod:`orchestrator.metrics`) arrive with Ray's ``ray_`` prefix
(``_total`` on counters) and Ray's own labels (``WorkerId``, ``NodeAddress``, ...); the
functions here match series by name and full label set and report per (application, model),
summing or taking the maximum over Ray's labels.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

from orchestrator import metrics
from orchestrator.catalog import deployment_name
from orchestrator.layout import instance_of

_PREFIX = "ray_orchestrator_"


def exported_name(spec: metrics.MetricSpec) -> str:
    """Returns a metric's sample name as Ray exports it: ``ray_`` prefix, ``_total`` on counters."""
    return f"ray_{spec.name}_total" if spec.kind == "counter" else f"ray_{spec.name}"


TARGET_REPLICAS = exported_name(metrics.TARGET_REPLICAS)
RUNNING_REPLICAS = exported_name(metrics.RUNNING_REPLICAS)
WAITING_REQUESTS = exported_name(metrics.WAITING)
RUNNING_REQUESTS = exported_name(metrics.RUNNING)
KV_CACHE_USAGE = exported_name(metrics.KV_CACHE)
COMPLETION_TOKENS = exported_name(metrics.COMPLETION_TOKENS)
REQUESTS = exported_name(metrics.REQUESTS)
TOKEN_RATE = exported_name(metrics.TOKEN_RATE)
SERVER_ERROR_RATE = exported_name(metrics.SERVER_ERROR_RATE)
PREFIX_CACHE_QUERY_RATE = exported_name(metrics.PREFIX_CACHE_QUERY_RATE)
PREFIX_CACHE_HIT_RATE = exported_name(metrics.PREFIX_CACHE_HIT_RATE)
RECENT_RATES = (TOKEN_RATE, SERVER_ERROR_RATE, PREFIX_CACHE_QUERY_RATE, PREFIX_CACHE_HIT_RATE)

Key = tuple[str, str]
"""(Serve application, model display name)."""

Series = Mapping[tuple[str, frozenset[tuple[str, str]]], float]
"""Sample values by (name, full label set)."""


class Sample(NamedTuple):
    """One Prometheus sample: its name as exposed (counters end in ``_total``), labels, value."""

    name: str
    labels: Mapping[str, str]
    value: float


def _relevant_lines(text: str, prefix: str) -> Iterator[str]:
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#"):
            parts = stripped.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2].startswith(prefix):
                yield stripped
        elif stripped.startswith(prefix):
            yield stripped


def parse_samples(text: str, prefix: str = _PREFIX) -> list[Sample]:
    """Returns the samples of the series whose names start with ``prefix`` (by default the
    orchestrator's), in text order. Other lines are dropped before parsing, which keeps a
    node's large exposition (Ray's, Serve's and vLLM's series) cheap to read. Samples whose
    value is not finite are dropped.

    Raises:
        ValueError: a kept line is not valid Prometheus text exposition.
    """
    # Imported here so that importing the command (``orchestrator --help``) stays fast.
    from prometheus_client.parser import text_string_to_metric_families

    kept = "\n".join(_relevant_lines(text, prefix))
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(kept + "\n" if kept else "")
        for sample in family.samples
        if math.isfinite(sample.value)
    ]


def collect_series(texts: Iterable[str]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Returns every sample of the texts by (name, full label set), values of identical series summed.

    Raises:
        ValueError: a text is not Prometheus text exposition.
    """
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = defaultdict(float)
    for text in texts:
        for sample in parse_samples(text):
            out[(sample.name, frozenset(sample.labels.items()))] += sample.value
    return out


def key_of(labels: Iterable[tuple[str, str]]) -> Key:
    """Returns a series' (application, model) from its labels; ``""`` for a missing label.

    A series recorded on a model's own route carries the model's application
    (:mod:`orchestrator.layout`); it is keyed by its router's, like the router's series.
    """
    found = dict(labels)
    model = found.get("model", "")
    application = found.get("application", "")
    deployment = deployment_name(model)
    if model and found.get("deployment") == deployment:
        application = instance_of(application, deployment)
    return application, model


def gauge_values(series: Series, name: str) -> dict[Key, float]:
    """Returns a gauge's value per (application, model).

    Several series can carry the same (application, model): Ray labels each with the
    ``WorkerId`` that wrote it, so a restarted Serve controller leaves its predecessor's
    series until Ray's agent evicts it (about two export intervals). The maximum is taken:
    for replicas it is what the cluster may be running during such a hand-over, and a stale
    series cannot be told from the live one by its labels, so the largest is the safe side.
    """
    out: dict[Key, float] = {}
    for (sample_name, labels), value in series.items():
        if sample_name == name:
            key = key_of(labels)
            out[key] = max(value, out.get(key, value))
    return out


def gauge_sums(series: Series, name: str) -> dict[Key, float]:
    """Returns a gauge's values summed per (application, model): for a recent rate, which
    each process (router or model replica) exports for what it counted itself."""
    out: dict[Key, float] = defaultdict(float)
    for (sample_name, labels), value in series.items():
        if sample_name == name:
            out[key_of(labels)] += value
    return dict(out)


def counter_increases(
    before: Series,
    after: Series,
    name: str,
    where: Callable[[Mapping[str, str]], bool] = lambda labels: True,
) -> dict[Key, float]:
    """Returns how much a counter grew per (application, model), summed over its series whose
    labels pass ``where``. A series absent before (a new router replica) or lower than before
    (a restarted process) counts from 0; a series absent after is ignored."""
    out: dict[Key, float] = defaultdict(float)
    for (sample_name, labels), value in after.items():
        if sample_name != name or not where(dict(labels)):
            continue
        previous = before.get((sample_name, labels), 0.0)
        out[key_of(labels)] += value - previous if value >= previous else value
    return dict(out)


def is_server_error(labels: Mapping[str, str]) -> bool:
    """Returns whether a request series' ``status`` label is an HTTP status of 500 or more."""
    try:
        return int(labels.get("status", "")) >= 500
    except ValueError:
        return False
