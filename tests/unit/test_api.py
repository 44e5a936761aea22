"""The HTTP edge with a fake backend: routing, validation, SSE framing, error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.api.sse import KEEPALIVE, EventStreamResponse
from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.stream_shape import PATHS, REQUESTS, golden, stream_shape

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def make_client(catalog: Catalog, backend: LocalBackend, **settings: object) -> httpx.AsyncClient:
    app = create_app(catalog, backend, Settings(**settings))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "tiny-b": FakeEngine(words=["bee"])}


@pytest.fixture
async def client(catalog: Catalog, engines: dict[str, FakeEngine]) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(catalog, LocalBackend(engines)) as c:
        yield c


def events(text: str) -> list[str]:
    return [block for block in text.split("\n\n") if block]


async def test_non_streaming_dispatches_by_alias(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "org/tiny-b"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["choices"][0]["message"]["content"] == "bee"
    assert body["model"] == "tiny-b"
    assert body["id"].startswith("gen-") and len(body["id"]) == 36


async def test_stream_ends_with_usage_then_done(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = events(resp.text)
    assert blocks[-1] == "data: [DONE]"
    usage = json.loads(blocks[-2].removeprefix("data: "))
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert json.loads(blocks[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"


async def test_sane_client_request_id_is_kept(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    again = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-123"})
    assert again.json()["id"] != resp.json()["id"]  # a generation's id is never the client's
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "bad id!"})
    assert resp.headers["x-request-id"] != "bad id!"


async def test_unknown_model_404(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert err["request_id"] == resp.headers["x-request-id"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": "x"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 129}, "tools"),
        ({"logit_bias": {"50": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"stop": ["x"] * 17}, "stop"),
    ],
)
async def test_bad_parameter_names_param(client: httpx.AsyncClient, patch: dict, param: str) -> None:
    resp = await client.post("/v1/chat/completions", json={**CHAT, **patch})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "invalid_request" and err["param"] == param and param in err["message"]


async def test_prompt_lists_are_bounded(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"model": "a", "prompt": ["x"] * 129, "max_tokens": 1})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["code"] == "invalid_request" and err["param"] == "prompt" and "128 prompts" in err["message"]
    # One prompt given as token ids is not a list of prompts.
    resp = await client.post("/v1/completions", json={"model": "a", "prompt": [1] * 200, "max_tokens": 1})
    assert resp.status_code == 200, resp.text


async def test_malformed_json_400(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request"


async def test_output_budget_over_window_is_context_length(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 512})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


async def test_body_over_limit_413(catalog: Catalog, engines: dict[str, FakeEngine]) -> None:
    async with make_client(catalog, LocalBackend(engines), max_body_bytes=2048) as c:
        resp = await c.post("/v1/completions", json={"model": "a", "prompt": "x" * 4000})
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "payload_too_large"
        assert "x-request-id" in resp.headers

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted while read
            for _ in range(4):
                yield b"x" * 1000

        resp = await c.post("/v1/completions", content=chunks())
        assert resp.status_code == 413


async def test_failure_before_first_byte_is_http_error(client: httpx.AsyncClient, engines: dict) -> None:
    engines["tiny-a"].fail_before_first = OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "engine down")
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "provider_unavailable"


async def test_failure_mid_stream_is_error_event_then_done(client: httpx.AsyncClient, engines: dict) -> None:
    engines["tiny-a"].fail_after = 2
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status_code == 200
    blocks = events(resp.text)
    assert blocks[-1] == "data: [DONE]"
    err = json.loads(blocks[-2].removeprefix("data: "))["error"]
    assert err["code"] == "provider_unavailable" and err["request_id"] == resp.headers["x-request-id"]


async def test_keepalive_while_upstream_silent(catalog: Catalog, engines: dict) -> None:
    engines["tiny-a"].first_delay_s = 0.25
    async with make_client(catalog, LocalBackend(engines), keepalive_seconds=0.1) as c:
        resp = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    blocks = events(resp.text)
    assert blocks[0] == ": keep-alive"
    assert blocks[-1] == "data: [DONE]" and "usage" in blocks[-2]


async def test_keepalive_between_tokens_only_while_silent(catalog: Catalog, engines: dict) -> None:
    # Tokens 0.3 s apart with keep-alives due every 0.1 s: comments come between the
    # tokens, never inside a frame, and the stream still ends with its usage chunk.
    engines["tiny-a"].words = ["slow", "words"]
    engines["tiny-a"].token_delay_s = 0.3
    async with make_client(catalog, LocalBackend(engines), keepalive_seconds=0.1) as c:
        resp = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    blocks = events(resp.text)
    data = [b for b in blocks if b.startswith("data: {")]
    assert [json.loads(b[6:])["choices"][0]["delta"].get("content") for b in data[:3]] == ["", "slow ", "words "]
    between = blocks[blocks.index(data[1]) + 1 : blocks.index(data[2])]
    assert between and set(between) == {": keep-alive"}
    assert blocks[-1] == "data: [DONE]" and "usage" in blocks[-2]
    # A fast stream gets none.
    engines["tiny-a"].token_delay_s = 0.0
    async with make_client(catalog, LocalBackend(engines), keepalive_seconds=0.1) as c:
        resp = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert ": keep-alive" not in events(resp.text)


async def test_keepalives_never_overlap_a_frame_on_a_slow_connection() -> None:
    # A client that reads slowly (each send takes 30 ms) while keep-alives fall due every
    # 5 ms: the timer must wait for a frame's send to finish, never send alongside it.
    async def body() -> AsyncIterator[bytes]:
        for i in range(6):
            await asyncio.sleep(0.02)
            yield f"data: {i}\n\n".encode()

    in_flight, most, sent = 0, 0, []

    async def send(message: dict) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.03)
        sent.append(message.get("body", b""))
        in_flight -= 1

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    response = EventStreamResponse(body(), keepalive_s=0.005, headers={})
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await response(scope, receive, send)
    frames = [m for m in sent if m.startswith(b"data:")]
    assert most == 1 and frames == [f"data: {i}\n\n".encode() for i in range(6)]
    assert KEEPALIVE in sent and sent[-1] == b""


async def test_models_list_and_lookup(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["tiny-a", "tiny-b"]
    card = listed["data"][0]
    assert card["aliases"] == ["a"] and card["context_window"] == 512
    assert card["pricing"] == {"input_per_million": "1.5", "output_per_million": "2"}
    assert card["capabilities"]["json"] is True
    assert (await client.get("/v1/models/org/tiny-b")).json()["id"] == "tiny-b"
    info = (await client.get("/v1/model/info", params={"model": "b"})).json()
    assert info["resources"]["device"] == "cpu" and info["autoscaling"]["max_replicas"] == 1
    assert info["overload"]["max_waiting_per_replica"] == 64 and info["autoscaling"]["cold_start_timeout_s"] == 600
    assert (await client.get("/v1/model/info")).json()["error"]["param"] == "model"


async def test_unknown_route_uses_envelope(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/nope")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    resp = await client.get("/v1/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "POST"
    resp = await client.delete("/v1/models")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    resp = await client.get("/health/live/")  # a trailing slash is another path, not a redirect
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


async def test_health(client: httpx.AsyncClient) -> None:
    resp = await client.get("/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    assert {name: m["ready"] for name, m in resp.json()["models"].items()} == {"tiny-a": True, "tiny-b": True}
    assert (await client.get("/health/live")).json() == {"status": "ok"}


@pytest.mark.parametrize("name", ["chat", "completion"])
async def test_fake_streams_are_framed_as_real_vllm_streams(client: httpx.AsyncClient, name: str) -> None:
    """The fake engine's streams, through the whole API, have the frame shapes real vLLM's
    had (recorded by the integration tests into tests/golden/stream_shapes.json)."""
    resp = await client.post(PATHS[name], json={**REQUESTS[name], "model": "a"})
    assert resp.status_code == 200
    assert stream_shape(resp.text.splitlines()) == golden()[name]
