"""The queue-depth autoscaling policy and the replica's report to it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.metrics import MemorySink
from orchestrator.serving.autoscaling import QueueDepthPolicy, ReplicaLoad, desired_replicas, replica_loads


def load(waiting: float, running: float, capacity: float = 2, kv: float = 0.5) -> ReplicaLoad:
    return ReplicaLoad(waiting=waiting, running=running, kv_cache=kv, capacity=capacity)


def test_a_queue_above_target_asks_for_more_replicas() -> None:
    # One replica running 2 (its max) with 6 waiting, target 1 waiting per replica:
    # 8 requests / (2 + 1) per replica -> 3 replicas.
    assert desired_replicas(1, [load(6, 2)], 0, target_waiting=1) == 3


def test_waiting_at_or_below_target_keeps_the_count() -> None:
    assert desired_replicas(2, [load(1, 2), load(1, 2)], 0, target_waiting=1) == 2
    assert desired_replicas(1, [load(0, 2)], 0, target_waiting=1) == 1


def test_in_flight_without_waiting_does_not_scale_up() -> None:
    # What Serve's default policy gets wrong for LLMs: 60 in flight in a batch of 64, none
    # waiting, is one replica's comfortable load.
    assert desired_replicas(1, [load(0, 60, capacity=64)], 0, target_waiting=2) == 1


def test_idle_load_fits_in_fewer_replicas() -> None:
    assert desired_replicas(3, [load(0, 1), load(0, 0), load(0, 0)], 0, target_waiting=1) == 1
    assert desired_replicas(2, [load(0, 0), load(0, 0)], 0, target_waiting=1) == 0  # min_replicas bounds it later


def test_a_kv_limited_batch_counts_what_it_really_runs() -> None:
    # max_num_seqs 64 but the KV cache holds only 4 while 8 wait: capacity is 4, not 64.
    assert desired_replicas(1, [load(8, 4, capacity=64)], 0, target_waiting=2) == 2


def test_router_queues_count_as_waiting_and_no_report_keeps_the_count() -> None:
    assert desired_replicas(1, [load(0, 2)], queued_at_routers=4, target_waiting=1) == 2
    assert desired_replicas(2, [], 0, target_waiting=1) == 2
    assert desired_replicas(0, [], 3, target_waiting=1) == 1
    assert desired_replicas(0, [], 0, target_waiting=1) == 0


def test_replica_loads_skip_incomplete_reports() -> None:
    aggregated = {
        "waiting": {"r1": 3.0, "r2": 1.0},
        "running": {"r1": 2.0, "r2": 2.0},
        "kv_cache": {"r1": 0.2, "r2": 0.4},
        "capacity": {"r1": 2.0},
    }
    assert replica_loads(aggregated) == [load(3, 2, kv=0.2)]
    assert replica_loads(None) == []


def context(**overrides: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "aggregated_metrics": {
            "waiting": {"r1": 5.0},
            "running": {"r1": 2.0},
            "kv_cache": {"r1": 0.75},
            "capacity": {"r1": 2.0},
        },
        "total_queued_requests": 1.0,
        "current_num_replicas": 1,
        "target_num_replicas": 1,
        "capacity_adjusted_max_replicas": 4,
        "app_name": "ops",
        "deployment_name": "model-tiny",
    }
    return SimpleNamespace(**{**base, **overrides})


def test_policy_decides_and_exports_what_it_saw() -> None:
    sink = MemorySink()
    policy = QueueDepthPolicy(model="tiny", target_waiting_per_replica=1, sink=sink)
    decision, state = policy(context())
    assert decision == 3 and state == {"replicas_reporting": 1}  # (5 + 2 + 1) / (2 + 1)
    labels = {"model": "tiny", "application": "ops"}
    assert sink.get("orchestrator_model_waiting_requests", **labels) == 6.0
    assert sink.get("orchestrator_model_running_requests", **labels) == 2.0
    assert sink.get("orchestrator_model_kv_cache_usage_ratio", **labels) == 0.75
    assert sink.get("orchestrator_model_target_replicas", **labels) == 1
    assert sink.get("orchestrator_model_running_replicas", **labels) == 1
    assert sink.get("orchestrator_model_max_replicas", **labels) == 4


def test_a_model_in_its_own_application_is_labelled_with_the_routers() -> None:
    sink = MemorySink()
    policy = QueueDepthPolicy(model="tiny", target_waiting_per_replica=1, sink=sink)
    policy(context(app_name="ops-model-tiny"))  # orchestrator.layout: the router app is "ops"
    assert sink.get("orchestrator_model_waiting_requests", model="tiny", application="ops") == 6.0


@pytest.mark.parametrize("replicas", [0, 2])
def test_policy_with_no_reports(replicas: int) -> None:
    sink = MemorySink()
    policy = QueueDepthPolicy(model="tiny", target_waiting_per_replica=1, sink=sink)
    ctx = context(aggregated_metrics={}, total_queued_requests=0, current_num_replicas=replicas)
    assert policy(ctx)[0] == replicas
    assert sink.get("orchestrator_model_kv_cache_usage_ratio", model="tiny", application="ops") == 0.0
