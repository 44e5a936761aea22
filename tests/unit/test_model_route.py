"""A model's own route (serving/model_route.py): the router's HTTP app over the replica's
own ModelServer, with the real ledger (SQLite) and a fake engine."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.serving.model_route import IdleBoundStream, ModelRouteDeployment, ReplicaBackend
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings
from tests.fakes import FakeEngine

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def server(catalog: Catalog, engine: FakeEngine, **overload: Any) -> ModelServer:
    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    spec["overload"] = overload
    settings = Settings(stream_batch_ms=10_000, stream_batches_per_second=1).model_dump(mode="json")
    return ModelServer(spec, settings, engine_factory=lambda s, st: engine)  # type: ignore[arg-type,return-value]


@pytest.fixture
async def route(catalog: Catalog, ledger: Ledger) -> AsyncIterator[tuple[httpx.AsyncClient, ModelServer]]:
    srv = server(catalog, FakeEngine(words=["one", "two", "three"], token_delay_s=0.005))
    spec = catalog.resolve("tiny-a")
    app = create_app(Catalog([spec]), ReplicaBackend(srv), srv.settings, gateway=ledger, admin_routes=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client, srv


async def test_every_frame_goes_alone_where_a_handle_stream_batches(catalog: Catalog) -> None:
    srv = server(catalog, FakeEngine(words=[f"w{i}" for i in range(12)]))
    spec = catalog.resolve("tiny-a")
    body = {"model": "tiny-a", "prompt": "x", "stream": True}
    local = [b async for b in ReplicaBackend(srv).stream(spec, "completion", body, "r1")]
    contents = [[f for f in b if not f.startswith(":")] for b in local]
    assert [len(b) for b in contents] == [1] * 13  # 12 words and the usage chunk
    # The same engine through the handle path's batches (one a second here): far fewer.
    batched = [b async for b in srv.stream("completion", body, "r2")]
    assert len(batched) < 13
    assert srv.in_flight == 0 and srv.streams == 0


async def test_cancelling_an_unread_stream_ends_it_in_the_engine(catalog: Catalog) -> None:
    engine = FakeEngine(words=["w"] * 50, token_delay_s=0.01)
    srv = server(catalog, engine)
    stream = ReplicaBackend(srv).stream(catalog.resolve("tiny-a"), "chat", CHAT, "r")
    await anext(stream)
    assert srv.in_flight == 1 and engine.running == 1
    stream.cancel()
    stream.cancel()  # twice is once
    for _ in range(10):
        await asyncio.sleep(0)
    assert srv.in_flight == 0 and engine.running == 0


async def test_cancelling_the_reader_ends_the_stream_in_the_engine(catalog: Catalog) -> None:
    engine = FakeEngine(words=["w"] * 50, token_delay_s=1.0)
    srv = server(catalog, engine)
    stream = ReplicaBackend(srv).stream(catalog.resolve("tiny-a"), "chat", CHAT, "r")
    await anext(stream)  # the role, before the first word's second
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.02)
    reader.cancel()  # as the edge does first when a client leaves
    stream.cancel()  # then this, while the reader is still inside the generator
    with pytest.raises(asyncio.CancelledError):
        await reader
    for _ in range(10):
        await asyncio.sleep(0)
    assert srv.in_flight == 0 and engine.running == 0


async def test_the_route_checks_keys_meters_and_serves_only_its_model(
    route: tuple[httpx.AsyncClient, ModelServer], ledger: Ledger
) -> None:
    http, srv = route
    assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 401
    key = (await ledger.create_key(KeyLimits(rpm=100))).key
    headers = {"Authorization": f"Bearer {key}"}
    resp = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    assert resp.status_code == 200 and resp.headers["x-ratelimit-limit-requests"] == "100"
    events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 3 and float(usage["cost"]) > 0
    generation = json.loads(events[-2])["id"]
    found = await http.get("/v1/generation", params={"id": generation}, headers=headers)
    data = found.json()["data"]
    assert found.status_code == 200 and data["streamed"] is True and data["cost"] == usage["cost"]
    # Another catalog model is not served here, and neither is the admin API.
    other = await http.post("/v1/chat/completions", json={**CHAT, "model": "tiny-b"}, headers=headers)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert (await http.get("/admin/keys", headers=headers)).status_code == 404
    models = (await http.get("/v1/models", headers=headers)).json()["data"]
    assert [m["id"] for m in models] == ["tiny-a"]
    assert srv.in_flight == 0


async def test_the_route_sheds_past_the_replicas_queue(catalog: Catalog) -> None:
    engine = FakeEngine(words=["w"] * 20, token_delay_s=0.01, capacity=1)
    srv = server(catalog, engine, max_waiting_per_replica=0)
    app = create_app(Catalog([catalog.resolve("tiny-a")]), ReplicaBackend(srv), srv.settings, admin_routes=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        first = asyncio.ensure_future(http.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        for _ in range(1000):  # until the first is in the replica
            if srv.in_flight:
                break
            await asyncio.sleep(0.001)
        shed = await http.post("/v1/chat/completions", json=CHAT)
        assert shed.status_code == 529 and shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "provider_overloaded"
        assert (await first).status_code == 200


async def test_a_stopping_replica_ends_the_apps_lifespan_before_the_engine(catalog: Catalog) -> None:
    """Serve calls the ingress class's __del__ on a graceful stop: the app's lifespan (the
    settlements still in flight) must end while the engine still runs, then the engine stops."""
    order: list[str] = []

    class Lifespan:
        logger = logging.getLogger("test-lifespan")

        async def shutdown(self) -> None:
            order.append("lifespan")

    class Engine(FakeEngine):
        async def shutdown(self) -> None:
            order.append("engine")

    # The class Serve instantiates, built without its constructor (which starts the engine).
    replica = ModelRouteDeployment.__new__(ModelRouteDeployment)
    replica.engine = Engine()
    replica._serve_asgi_lifespan = Lifespan()
    await replica.__del__()
    assert order == ["lifespan", "engine"]
    # Collected, Python would call the async __del__ again without awaiting it; Serve calls
    # it once, as above.
    replica.__class__ = _Stopped


class _Stopped:
    """A replica that was stopped: nothing left to end."""


class _Stalled(FakeEngine):
    """An engine that never answers a whole response (a stream stalls by first_delay_s)."""

    async def complete(self, kind: Any, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    async def tokens(self, op: Any, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")


async def test_the_route_keeps_the_routers_deadlines(catalog: Catalog) -> None:
    # /v1 sends a catalog model's requests here (orchestrator/ingress.py), so a stalled engine
    # gets the router's 504 provider_timeout here too, and its request is ended.
    deadlines = {"request_timeout_s": 0.05, "stream_idle_timeout_s": 0.05}
    for engine in (_Stalled(first_delay_s=3600), FakeEngine(token_delay_s=3600)):
        srv = server(catalog, engine, **deadlines)
        app = create_app(Catalog([srv.spec]), ReplicaBackend(srv), srv.settings, admin_routes=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            streamed = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
            if isinstance(engine, _Stalled):
                whole = await http.post("/v1/chat/completions", json=CHAT)
                assert whole.status_code == 504 and whole.json()["error"]["code"] == "provider_timeout"
                tokens = await http.post("/tokenize", json={"model": CHAT["model"], "prompt": "hi"})
                assert tokens.status_code == 504 and tokens.json()["error"]["code"] == "provider_timeout"
                # Nothing came: the status is the error's.
                assert streamed.status_code == 504 and streamed.json()["error"]["code"] == "provider_timeout"
            else:  # stalled after its first frames: the stream's error event
                events = [json.loads(e[6:]) for e in streamed.text.splitlines() if e.startswith("data: {")]
                assert streamed.status_code == 200 and events[-1]["error"]["code"] == "provider_timeout"
        assert srv.in_flight == 0 and engine.running == 0


def _idle_bound(catalog: Catalog, seconds: float) -> ModelSpec:
    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    return ModelSpec.model_validate({**spec, "overload": {"stream_idle_timeout_s": seconds}})


async def test_the_idle_bound_is_per_batch_not_per_stream(catalog: Catalog) -> None:
    """Each batch comes within the bound, the whole stream takes longer than it, and the reader
    pausing between batches for longer than it does not count: no timeout."""
    gaps = [0.06] * 8  # 0.48 s in all against a bound of 0.3 s

    async def source() -> AsyncGenerator[list[str]]:
        for i, gap in enumerate(gaps):
            await asyncio.sleep(gap)
            yield [f"data: {i}\n\n"]

    stream = IdleBoundStream(source(), _idle_bound(catalog, 0.3))
    got = [await anext(stream), await anext(stream)]
    await asyncio.sleep(0.4)  # the reader is busy elsewhere: the source is not waited on
    got += [batch async for batch in stream]
    assert got == [[f"data: {i}\n\n"] for i in range(len(gaps))]


async def test_a_stream_stalling_after_a_few_batches_times_out_and_is_closed(catalog: Catalog) -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[list[str]]:
        try:
            for i in range(3):
                yield [f"data: {i}\n\n"]
            await asyncio.sleep(3600)
            yield ["data: never\n\n"]
        finally:
            closed.set()  # where ModelServer's stream aborts the request in the engine

    stream = IdleBoundStream(source(), _idle_bound(catalog, 0.05))
    got = [await anext(stream) for _ in range(3)]
    with pytest.raises(OrchestratorError) as raised:
        await anext(stream)
    assert got == [[f"data: {i}\n\n"] for i in range(3)]
    assert raised.value.status == 504 and raised.value.code is ErrorCode.PROVIDER_TIMEOUT
    assert closed.is_set()
    # The reading task is not left cancelled: the edge goes on to send the error event.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)
