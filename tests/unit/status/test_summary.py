"""Rows from two scrapes and Serve's deployments: gauges, rates, and which models get a row."""

from __future__ import annotations

import pytest

from orchestrator.status.summary import ModelStatus, summarize, summarize_recent
from tests.unit.status.texts import (
    DEPLOYMENTS,
    HEAD,
    QWEN,
    ROUTER_A,
    SMOL,
    TINY,
    counter,
    head_text,
    recent_texts,
    summary,
    tokens,
    worker_text,
)


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
    (row,) = summarize(before, before, 5.0, deployments)
    assert (row.model, row.running_replicas, row.target_replicas, row.tokens_per_second) == (QWEN, 3, None, 0.0)


def test_metrics_without_serve_deployment_and_no_window() -> None:
    text = head_text(before=False)
    rows = summarize([text], [text], 0.0, {})
    smol = next(r for r in rows if r.model == SMOL)
    assert (smol.status, smol.running_replicas, smol.target_replicas) == (None, 1, 2)  # the gauge's
    assert (smol.tokens_per_second, smol.errors_per_minute) == (None, None)
    assert {r.application for r in rows} == {"llm", "batch"}  # not the removed "old" app, not "unknown"


def test_a_model_in_its_own_application_is_one_row_with_its_routers() -> None:
    """orchestrator.layout puts model qwen of router app "batch" in app "batch-model-qwen2-5-7b"."""
    before = [counter("ray_orchestrator_completion_tokens", "t", [tokens(HEAD, ROUTER_A, "batch", QWEN, 4.0)])]
    after = [counter("ray_orchestrator_completion_tokens", "t", [tokens(HEAD, ROUTER_A, "batch", QWEN, 14.0)])]
    deployments = {
        ("batch-model-qwen2-5-7b", "model-qwen2-5-7b"): {"status": "HEALTHY", "replica_states": {"RUNNING": 3}},
        ("batch-gateway", "gateway"): {"status": "HEALTHY", "replica_states": {"RUNNING": 1}},
    }
    (row,) = summarize(before, after, 5.0, deployments)
    assert (row.application, row.model, row.status, row.running_replicas) == ("batch", QWEN, "HEALTHY", 3)
    assert row.tokens_per_second == 2.0


def test_requests_on_a_models_own_route_count_in_its_routers_row() -> None:
    """The model's replicas record the requests they answer themselves under their own
    application and deployment; the row is still the router application's."""
    own = {"application": "batch-model-qwen2-5-7b", "deployment": "model-qwen2-5-7b", "replica": "model#r"}
    before = [counter("ray_orchestrator_completion_tokens", "t", [tokens(HEAD, ROUTER_A, "batch", QWEN, 4.0)])]
    after = [
        counter(
            "ray_orchestrator_completion_tokens",
            "t",
            [tokens(HEAD, ROUTER_A, "batch", QWEN, 14.0), (tokens(HEAD, "cccc0003", "x", QWEN, 20.0)[0] | own, 20.0)],
        )
    ]
    deployments = {("batch-model-qwen2-5-7b", "model-qwen2-5-7b"): {"status": "HEALTHY", "replica_states": {}}}
    (row,) = summarize(before, after, 5.0, deployments)
    assert (row.application, row.model) == ("batch", QWEN)
    assert row.tokens_per_second == 6.0  # 10 through the router and 20 on its own route, in 5 s


def test_one_scrape_reads_the_recent_rates_summed_over_processes() -> None:
    """Routers and model replicas each export what they counted lately; one scrape gives the
    model's rates: tokens and errors summed, the cache hit rate weighted by lookups."""
    rows = {(r.application, r.model): r for r in summarize_recent(recent_texts(), DEPLOYMENTS)}
    assert list(rows) == [("batch", "fresh-model"), ("batch", QWEN), ("llm", SMOL), ("llm", TINY)]
    smol = rows["llm", SMOL]
    assert smol.tokens_per_second == 80.0  # 40 + 30 through the routers, 10 on its own route
    assert smol.errors_per_minute == pytest.approx(6.0)
    assert smol.prefix_cache_hit_rate == 0.5  # 150 of 300 tokens (the replicas' own: 25 % and 100 %)
    assert (smol.status, smol.running_replicas, smol.target_replicas, smol.kv_cache_usage) == ("HEALTHY", 1, 2, 0.25)
    tiny = rows["llm", TINY]
    assert (tiny.tokens_per_second, tiny.errors_per_minute, tiny.prefix_cache_hit_rate) == (5.0, 0.0, None)
    qwen = rows["batch", QWEN]  # counters, but no recent rate: no traffic lately
    assert (qwen.tokens_per_second, qwen.errors_per_minute, qwen.prefix_cache_hit_rate) == (0.0, 0.0, None)


def test_one_scrape_without_rate_gauges_has_the_same_rows_at_zero() -> None:
    texts = [head_text(before=False), worker_text(before=False)]
    recent = summarize_recent(texts, DEPLOYMENTS)
    assert [(r.application, r.model) for r in recent] == [(r.application, r.model) for r in summary()]
    assert {(r.tokens_per_second, r.errors_per_minute, r.prefix_cache_hit_rate) for r in recent} == {(0.0, 0.0, None)}


def test_two_scrapes_take_the_cache_hit_rate_from_the_later() -> None:
    before = [head_text(before=True), worker_text(before=True)]
    rows = {r.model: r for r in summarize(before, recent_texts(), 10.0, DEPLOYMENTS)}
    assert rows[SMOL].prefix_cache_hit_rate == 0.5
    assert rows[SMOL].tokens_per_second == 70.0  # from the counters, not the gauges
