"""The autoscaling policy: keep each replica's engine queue near the catalog's target.

Serve calls the policy in its controller on every control-loop tick with an
``AutoscalingContext``. Each ModelServer replica reports, through
``record_autoscaling_stats``, its engine's waiting and running requests, KV-cache use and
batch capacity (``max_num_seqs``); Serve averages them over ``look_back_period_s``.
Serve's wrapper around a custom policy then applies the catalog's bounds and its upscale,
downscale and scale-to-zero delays, and starts a replica at once for the first request to a
model at zero (the handles report requests queued while no replica exists).

Why waiting requests and not in-flight ones: an engine runs up to ``max_num_seqs``
requests in one batch at nearly the same per-token speed, so in-flight requests say how
full a batch is, not whether anyone waits. Requests waiting for a batch slot are exactly
the ones a new replica would serve sooner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.layout import instance_of
from orchestrator.metrics import ScalingMetrics, Sink


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's averaged report."""

    waiting: float
    running: float
    kv_cache: float
    capacity: float


def desired_replicas(current: int, loads: list[ReplicaLoad], queued_at_routers: float, target_waiting: float) -> int:
    """Returns how many replicas would carry the load with about ``target_waiting`` requests
    waiting in each (before Serve's bounds and delays).

    The load is every running and waiting request plus those queued in routers for want of
    a replica. A replica carries as many as it runs at once plus the target: its
    ``max_num_seqs``, or, when requests already wait there, what it actually runs (the KV
    cache can limit a batch below ``max_num_seqs``). With no report yet (replicas starting)
    the count stays as it is.
    """
    if not loads:
        return current if current or queued_at_routers <= 0 else 1
    load = sum(r.running + r.waiting for r in loads) + max(queued_at_routers, 0.0)
    per_replica = sum(r.running if r.waiting >= 1 else r.capacity for r in loads) / len(loads)
    return math.ceil(load / (max(per_replica, 1.0) + target_waiting))


def replica_loads(aggregated: Mapping[str, Mapping[Any, float]] | None) -> list[ReplicaLoad]:
    """Returns the reports of the replicas that sent all four figures."""
    if not aggregated:
        return []
    fields = ("waiting", "running", "kv_cache", "capacity")
    per_metric = [aggregated.get(f) or {} for f in fields]
    replicas = set(per_metric[0]).intersection(*per_metric[1:])
    return [ReplicaLoad(*(float(m[r]) for m in per_metric)) for r in sorted(replicas, key=str)]


class QueueDepthPolicy:
    """Serve's ``policy_function`` for a model deployment (a class: Serve makes one instance
    per deployment with ``policy_kwargs`` and calls it every tick).

    Args:
        model: the catalog display name (the metrics label).
        target_waiting_per_replica: the catalog's target.
        sink: metrics sink (default: Ray's metrics, created on the first call).
    """

    def __init__(self, model: str, target_waiting_per_replica: float, sink: Sink | None = None) -> None:
        self.model = model
        self.target = target_waiting_per_replica
        self._sink = sink
        self._metrics: ScalingMetrics | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        loads = replica_loads(ctx.aggregated_metrics)
        queued = float(ctx.total_queued_requests or 0.0)
        decision = desired_replicas(ctx.current_num_replicas, loads, queued, self.target)
        self._observe(ctx, loads, queued)
        return decision, {"replicas_reporting": len(loads)}

    def _observe(self, ctx: Any, loads: list[ReplicaLoad], queued: float) -> None:
        if self._metrics is None:
            if self._sink is None:
                from orchestrator.serving.telemetry import RaySink

                self._sink = RaySink()
            self._metrics = ScalingMetrics(self._sink)
        self._metrics.observe(
            self.model,
            # Labelled with the router's application, which labels the same model's traffic.
            instance_of(ctx.app_name or "", ctx.deployment_name),
            target=int(ctx.target_num_replicas),
            replicas=int(ctx.current_num_replicas),
            max_replicas=int(ctx.capacity_adjusted_max_replicas),
            waiting=sum(r.waiting for r in loads) + queued,
            running=sum(r.running for r in loads),
            kv_cache=sum(r.kv_cache for r in loads) / len(loads) if loads else 0.0,
        )
