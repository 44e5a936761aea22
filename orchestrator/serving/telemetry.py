"""Ray's metrics API as the sink for :mod:`orchestrator.metrics`.

Serve's metric classes add the ``deployment``, ``replica`` and ``application`` labels
inside a replica (and nothing elsewhere, e.g. in the controller or the ledger actor), and
every node's metrics agent exports them with Serve's and vLLM's series.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve import metrics as serve_metrics

from orchestrator.metrics import Instrument, MetricSpec

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


class RaySink:
    """Creates Ray metrics (exported by the node's metrics agent)."""

    def instrument(self, spec: MetricSpec) -> Instrument:
        found = _INSTRUMENTS.get(spec.name)
        if found is None:
            found = _INSTRUMENTS[spec.name] = _RayInstrument(spec)
        return found
