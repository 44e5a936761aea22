"""The router's deadlines around handle calls: timeouts, cold starts, back-pressure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.catalog import Catalog, ModelSpec, load_catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.serving.model_states import DeploymentState, ModelStates
from orchestrator.serving.router import Router
from tests.unit.conftest import TINY, write_catalog


def spec_and_router(
    tmp_path: Path, view: dict[str, DeploymentState], max_waiting: int = 64
) -> tuple[ModelSpec, Router]:
    entry = {
        **TINY,
        "autoscaling": {"min_replicas": 0, "cold_start_timeout_s": 0.3},
        "overload": {"max_waiting_per_replica": max_waiting},
    }
    catalog: Catalog = load_catalog([write_catalog(tmp_path, entry)])
    router = Router.__new__(Router)  # no Serve handles needed for the deadline logic
    locations = {s.name: ("app", s.deployment_name) for s in catalog}
    router.states = ModelStates(catalog, locations, lambda: {("app", k): v for k, v in view.items()}, period_s=0.05)
    router._cold_waiters = {}
    return catalog.resolve("tiny-a"), router


async def test_a_warm_call_returns_or_times_out(tmp_path: Path) -> None:
    spec, router = spec_and_router(tmp_path, {"model-tiny-a": DeploymentState("HEALTHY", 1)})
    await router.states.refresh()

    async def answer(delay: float) -> str:
        await asyncio.sleep(delay)
        return "done"

    assert await router.bounded(spec, answer(0), 1.0, may_be_cold=True) == "done"
    slow = asyncio.ensure_future(answer(10))
    with pytest.raises(OrchestratorError) as info:
        await router.bounded(spec, slow, 0.05, may_be_cold=False)
    assert info.value.code is ErrorCode.PROVIDER_TIMEOUT and info.value.status == 504
    await asyncio.sleep(0)
    assert slow.cancelled()  # the call was abandoned, not left running


async def test_no_replica_within_the_cold_start_bound_is_503_with_retry_after(tmp_path: Path) -> None:
    spec, router = spec_and_router(tmp_path, {"model-tiny-a": DeploymentState("UPSCALING", 0)})
    await router.states.refresh()
    never = asyncio.ensure_future(asyncio.sleep(60))
    with pytest.raises(OrchestratorError) as info:
        await router.bounded(spec, never, 30.0, may_be_cold=True)
    assert info.value.code is ErrorCode.MODEL_UNAVAILABLE and info.value.status == 503
    assert int(info.value.headers["Retry-After"]) > 0
    await asyncio.sleep(0)
    assert never.cancelled()


async def test_a_cold_call_waits_for_its_replica_then_answers(tmp_path: Path) -> None:
    view = {"model-tiny-a": DeploymentState("UPSCALING", 0)}
    spec, router = spec_and_router(tmp_path, view)
    await router.states.refresh()

    async def cold_start() -> str:
        await asyncio.sleep(0.2)
        view["model-tiny-a"] = DeploymentState("HEALTHY", 1)  # the replica came up
        await asyncio.sleep(0.2)
        return "answered"

    # The whole call takes longer than the 0.3 s bound; the bound only covers the wait
    # for a replica, which appeared after 0.2 s (seen at the next refresh).
    router.states.start()
    assert await router.bounded(spec, cold_start(), 5.0, may_be_cold=True) == "answered"


async def test_past_the_bound_of_requests_waiting_for_a_cold_model_new_ones_get_529(tmp_path: Path) -> None:
    spec, router = spec_and_router(tmp_path, {"model-tiny-a": DeploymentState("UPSCALING", 0)}, max_waiting=2)
    await router.states.refresh()
    waiting = [asyncio.ensure_future(router.bounded(spec, asyncio.sleep(60), 30.0, may_be_cold=True)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(OrchestratorError) as info:
        await router.bounded(spec, asyncio.sleep(60), 30.0, may_be_cold=True)
    assert info.value.code is ErrorCode.PROVIDER_OVERLOADED and info.value.headers["Retry-After"] == "1"
    for task in waiting:  # the admitted waiters keep waiting, then hit the cold-start bound
        with pytest.raises(OrchestratorError) as late:
            await task
        assert late.value.code is ErrorCode.MODEL_UNAVAILABLE
    assert router._cold_waiters == {"tiny-a": 0}  # every slot was given back


async def test_at_the_cold_bound_a_replica_that_came_up_since_the_last_refresh_serves_instead_of_529(
    tmp_path: Path,
) -> None:
    view = {"model-tiny-a": DeploymentState("UPSCALING", 0)}
    spec, router = spec_and_router(tmp_path, view, max_waiting=2)
    router.states._period_s = 60  # no background refresh: only a recheck can see the replica
    await router.states.refresh()
    gate = asyncio.Event()

    async def answer() -> str:
        await gate.wait()
        return "answered"

    waiting = [asyncio.ensure_future(router.bounded(spec, answer(), 30.0, may_be_cold=True)) for _ in range(2)]
    await asyncio.sleep(0.3)  # the view is now older than RECHECK_S
    view["model-tiny-a"] = DeploymentState("HEALTHY", 1)  # Serve replaced the replica; the view is stale
    third = asyncio.ensure_future(router.bounded(spec, answer(), 30.0, may_be_cold=True))
    await asyncio.sleep(0.05)
    gate.set()
    assert await third == "answered"
    assert [await task for task in waiting] == ["answered"] * 2
    assert router._cold_waiters == {"tiny-a": 0}
