"""ModelServer wraps an engine: batching, health, and no I/O in the constructor."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.catalog import Catalog
from orchestrator.engine.base import Engine
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings
from tests.fakes import FakeEngine


class DyingEngine(FakeEngine):
    started = False
    dead = False

    async def start(self) -> None:
        self.started = True

    async def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("EngineDeadError")

    def num_unfinished_requests(self) -> int:
        return self.running

    async def shutdown(self) -> None:
        self.started = False


def server(catalog: Catalog, engine: DyingEngine, **settings: Any) -> ModelServer:
    def factory(spec: Any, s: Settings) -> Engine:
        return engine  # type: ignore[return-value]

    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    return ModelServer(spec, Settings(**settings).model_dump(mode="json"), engine_factory=factory)


async def test_constructor_does_no_io_and_start_starts(catalog: Catalog) -> None:
    engine = DyingEngine()
    srv = server(catalog, engine)
    assert not engine.started
    await srv.start()
    assert engine.started


async def test_dead_engine_fails_health_check(catalog: Catalog) -> None:
    engine = DyingEngine()
    srv = server(catalog, engine)
    await srv.check_health()
    assert await srv.health() is True
    engine.dead = True
    with pytest.raises(RuntimeError):
        await srv.check_health()  # Serve marks the replica unhealthy and replaces it
    assert await srv.health() is False


async def test_chat_stream_sends_first_token_unbatched(catalog: Catalog) -> None:
    engine = DyingEngine(words=["a", "b", "c", "d", "e", "f"])
    # A budget of one batch a second: even a lone stream's batches are 1 s apart.
    srv = server(catalog, engine, stream_batch_ms=10_000, stream_batches_per_second=1)
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "x"}]}
    raw = [b async for b in srv.stream("chat", body, "r1")]
    # The eager batches end with the running-usage trailer; the router strips it.
    assert [b[-1].startswith(": usage ") for b in raw] == [True, True, False]
    assert json.loads(raw[1][-1].removeprefix(": usage "))["completion_tokens"] == 1
    batches = [[f for f in b if not f.startswith(":")] for b in raw]
    assert len(batches[0]) == 1 and '"role":"assistant"' in batches[0][0]
    assert len(batches[1]) == 1 and '"content":"a "' in batches[1][0]
    assert len(batches) == 3  # the rest arrive as one batch at the end
    assert '"usage"' in batches[-1][-1]


async def test_a_lone_stream_gets_every_chunk_at_once_and_batches_grow_with_streams(catalog: Catalog) -> None:
    import asyncio

    # Tokens 20 ms apart. A replica budget of 1000 batches a second: one stream's batches
    # may be 1 ms apart, so every chunk goes alone; with 40 streams, 40 ms apart.
    engine = DyingEngine(words=[f"w{i}" for i in range(12)], token_delay_s=0.02, capacity=64)
    srv = server(catalog, engine, stream_batch_ms=10_000, stream_batches_per_second=1000)
    body = {"model": "tiny-a", "prompt": "x", "stream": True}
    assert srv.batch_interval_s() == 0.0

    async def batches() -> list[list[str]]:
        return [[f for f in b if not f.startswith(":")] async for b in srv.stream("completion", body, "r")]

    alone = await batches()
    assert [len(b) for b in alone] == [1] * 13  # 12 words and the usage chunk
    together = await asyncio.gather(*(batches() for _ in range(40)))
    # Without the load-dependent interval, each of the 40 would also send 13 batches.
    assert all(sum(map(len, b)) == 13 and len(b) < 13 for b in together)
    assert srv.streams == 0 and srv.batch_interval_s() == 0.0


async def test_the_batch_interval_is_shared_by_the_streams_and_capped(catalog: Catalog) -> None:
    srv = server(catalog, DyingEngine(), stream_batch_ms=50, stream_batches_per_second=400)
    for streams, interval_ms in ((1, 2.5), (8, 20.0), (20, 50.0), (64, 50.0)):
        srv.streams = streams
        assert srv.batch_interval_s() * 1000 == pytest.approx(interval_ms)


async def test_past_the_queue_bound_new_requests_are_shed_while_admitted_ones_finish(catalog: Catalog) -> None:
    import asyncio

    from orchestrator.errors import ErrorCode, OrchestratorError

    engine = DyingEngine(words=["w"] * 5, token_delay_s=0.02)
    engine.capacity = 2
    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    spec["overload"] = {"max_waiting_per_replica": 1}
    srv = ModelServer(spec, Settings().model_dump(mode="json"), engine_factory=lambda s, st: engine)  # type: ignore[arg-type,return-value]
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "x"}]}

    async def run() -> int:
        return sum(len(b) for b in [b async for b in srv.stream("chat", body, "r")])

    admitted = [asyncio.ensure_future(run()) for _ in range(3)]  # 2 run + 1 waits = the bound
    await asyncio.sleep(0)
    assert srv.in_flight == 3
    with pytest.raises(OrchestratorError) as info:
        await srv.complete("chat", body, "r4")
    assert info.value.code is ErrorCode.PROVIDER_OVERLOADED and info.value.headers["Retry-After"] == "1"
    with pytest.raises(OrchestratorError):
        await anext(srv.stream("chat", body, "r5"))
    assert all(n > 0 for n in await asyncio.gather(*admitted))  # the admitted ones finished
    assert srv.in_flight == 0
    stats = await srv.record_autoscaling_stats()
    assert stats == {"waiting": 0.0, "running": 0.0, "kv_cache": 0.0, "capacity": 2.0}
    assert len(await srv.complete("chat", body, "r6")) > 0  # room again
