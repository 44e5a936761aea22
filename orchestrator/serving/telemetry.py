"""Ray's metrics API as the sink for :mod:`orchestrator.metrics`.

Serve's metric classes add the ``deployment``, ``replica`` and ``application`` labels
inside a replica (and nothing elsewhere, e.g. in the controller or the ledger actor), and
every node's metrics agent exports them with Serve's and vLLM's series. A recent rate
(a gauge declared with ``window_s``) keeps its amounts in :class:`orchestrator.rates.RecentRates`,
which a daemon thread of this process publishes every :data:`PUBLISH_INTERVAL_S`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from ray.serve import metrics as serve_metrics

from orchestrator.metrics import Instrument, MetricSpec
from orchestrator.rates import RecentRates

PUBLISH_INTERVAL_S = 1.0

# One instrument per metric and process: Ray keys series by name, so a second object
# with the same name would only duplicate work.
_INSTRUMENTS: dict[str, Instrument] = {}


class _RayInstrument:
    def __init__(self, spec: MetricSpec) -> None:
        metric: Any
        labels: Any = spec.labels  # Ray's stubs say tuple[str], meaning any tuple of str
        if spec.kind == "counter":
            metric = serve_metrics.Counter(spec.name, spec.description, tag_keys=labels)
            self._record = metric.inc
        elif spec.kind == "gauge":
            metric = serve_metrics.Gauge(spec.name, spec.description, tag_keys=labels)
            self._record = metric.set
        else:
            metric = serve_metrics.Histogram(
                spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=labels
            )
            self._record = metric.observe
        self._counter = spec.kind == "counter"

    def record(self, value: float, tags: Mapping[str, str]) -> None:
        if self._counter and value <= 0:
            return  # Ray's counters refuse 0
        self._record(value, dict(tags))


_RATES: list[RecentRates] = []
_publisher: threading.Thread | None = None


def _publish_forever() -> None:
    while True:
        time.sleep(PUBLISH_INTERVAL_S)
        for rates in list(_RATES):
            rates.publish()


def _recent_rates(spec: MetricSpec) -> RecentRates:
    """A recent rate over a Ray gauge, published by this process's publisher thread (started
    with the first)."""
    global _publisher
    rates = RecentRates(_RayInstrument(spec), spec.window_s)
    _RATES.append(rates)
    if _publisher is None:
        _publisher = threading.Thread(target=_publish_forever, name="orchestrator-rates", daemon=True)
        _publisher.start()
    return rates


class _RateInstrument:
    def __init__(self, rates: RecentRates) -> None:
        self._rates = rates

    def record(self, value: float, tags: Mapping[str, str]) -> None:
        self._rates.add(value, tags)


class RaySink:
    """Creates Ray metrics (exported by the node's metrics agent)."""

    def instrument(self, spec: MetricSpec) -> Instrument:
        found = _INSTRUMENTS.get(spec.name)
        if found is None:
            made = _RateInstrument(_recent_rates(spec)) if spec.window_s else _RayInstrument(spec)
            found = _INSTRUMENTS[spec.name] = made
        return found
