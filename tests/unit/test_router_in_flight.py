"""The router's bound on requests in flight per model: past its share of the running
replicas' places a request gets 529 at once instead of queueing in front of them."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from orchestrator.catalog import ModelSpec, load_catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.serving.model_states import DeploymentState, ModelStates
from orchestrator.serving.router import InFlight, Router
from tests.unit.conftest import TINY, write_catalog


class _Source:
    """Stands in for a handle's stream: two batches, then the end."""

    def __init__(self, sent: list[str]) -> None:
        self.batches = [["a"], ["b"]]
        self.cancelled = False
        sent.append("stream")

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> list[str]:
        if not self.batches:
            raise StopAsyncIteration
        return self.batches.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, sent: list[str], answer: asyncio.Event | None = None) -> None:
        self.sent = sent
        self.answer = answer

    def remote(self, *_: Any) -> Any:
        if self.answer is None:
            return _Source(self.sent)
        self.sent.append("complete")
        answer = self.answer

        class Call:
            def __await__(self) -> Any:
                return self._wait().__await__()

            async def _wait(self) -> dict[str, str]:
                await answer.wait()
                return {"id": "done"}

            def cancel(self) -> None:
                pass

        return Call()


async def router_for(
    tmp_path: Path, replicas: int = 1, routers: int = 1, answer: asyncio.Event | None = None
) -> tuple[ModelSpec, Router, list[str]]:
    entry = {**TINY, "engine_args": {"dtype": "float32", "max_num_seqs": 2}, "overload": {"max_waiting_per_replica": 1}}
    catalog = load_catalog([write_catalog(tmp_path, entry)])
    view = {("app", "model-tiny-a"): DeploymentState("HEALTHY", replicas)}
    router = Router.__new__(Router)  # no Serve handles: stand-ins below
    router.states = ModelStates(catalog, {s.name: ("app", s.deployment_name) for s in catalog}, lambda: view)
    await router.states.refresh()
    router._cold_waiters = {}
    router.in_flight = InFlight(routers)
    sent: list[str] = []
    router._stream = {"tiny-a": _Handle(sent)}  # type: ignore[dict-item]
    router._complete = {"tiny-a": _Handle(sent, answer)}  # type: ignore[dict-item]
    return catalog.resolve("tiny-a"), router, sent


def shed(call: Any) -> OrchestratorError:
    with pytest.raises(OrchestratorError) as info:
        call()
    return info.value


async def test_past_the_replicas_places_a_stream_gets_529_at_once_and_ended_ones_free_theirs(
    tmp_path: Path,
) -> None:
    spec, router, sent = await router_for(tmp_path)  # one replica: 2 running + 1 waiting
    streams = [router.stream(spec, "completion", {}, f"r{i}") for i in range(3)]
    error = shed(lambda: router.stream(spec, "completion", {}, "r3"))
    assert error.code is ErrorCode.PROVIDER_OVERLOADED and error.status == 529 and error.headers["Retry-After"]
    assert sent == ["stream"] * 3  # the shed one never reached Serve
    assert [b async for b in streams[0]] == [["a"], ["b"]]  # it ended: its place is free
    streams[0] = router.stream(spec, "completion", {}, "r4")
    streams[1].cancel()  # the client left
    streams[1].cancel()  # counted out once, however often
    streams[1] = router.stream(spec, "completion", {}, "r5")
    shed(lambda: router.stream(spec, "completion", {}, "r6"))
    del streams[2]  # never iterated nor cancelled (the response never started)
    gc.collect()
    streams[2:] = [router.stream(spec, "completion", {}, "r7")]
    assert router.in_flight.counts == {"tiny-a": 3}


async def test_a_stream_that_fails_frees_its_place(tmp_path: Path) -> None:
    spec, router, _ = await router_for(tmp_path)
    stream = router.stream(spec, "completion", {}, "r")

    class Failing(_Source):
        async def __anext__(self) -> list[str]:
            raise RuntimeError("the replica died")

    source = stream._source = Failing([])  # type: ignore[assignment]
    with pytest.raises(RuntimeError):
        await anext(stream)
    assert source.cancelled and router.in_flight.counts == {"tiny-a": 0}


async def test_completions_count_until_they_answer(tmp_path: Path) -> None:
    answer = asyncio.Event()
    spec, router, sent = await router_for(tmp_path, answer=answer)
    running = [asyncio.ensure_future(router.complete(spec, "completion", {}, f"r{i}")) for i in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(OrchestratorError) as info:
        await router.complete(spec, "completion", {}, "r3")
    assert info.value.code is ErrorCode.PROVIDER_OVERLOADED and sent == ["complete"] * 3
    answer.set()
    assert [r["id"] for r in await asyncio.gather(*running)] == ["done"] * 3
    assert router.in_flight.counts == {"tiny-a": 0}


async def test_the_bound_grows_with_replicas_and_is_shared_by_routers(tmp_path: Path) -> None:
    spec = (await router_for(tmp_path))[0]
    assert InFlight(1).bound(spec, 1) == 3
    assert InFlight(1).bound(spec, 4) == 12
    assert InFlight(2).bound(spec, 1) == 2  # each of two routers gets half, rounded up
    # No replica running (or not known yet): a cold model is bounded while it waits instead.
    assert InFlight(1).bound(spec, 0) is None and InFlight(1).bound(spec, None) is None
    spec_default = spec.model_copy(update={"engine_args": {"dtype": "float32"}})
    assert InFlight(1).bound(spec_default, 1) == 1024 + 1  # vLLM chooses max_num_seqs; the replica sheds
