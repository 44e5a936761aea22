"""The Anthropic Messages dialect at the HTTP edge, through Anthropic's own SDK over the app
in-process (fake engines, the real SQLite ledger): shapes, events, errors, metering."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx
import httpx2
import pytest

from orchestrator.api import create_app
from orchestrator.api.anthropic.errors import ANTHROPIC_ERRORS
from orchestrator.api.anthropic.translate import MessageEvents, message, stop_reason
from orchestrator.api.sse import frame
from orchestrator.catalog import Catalog, load_catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN, TINY, write_catalog

GOLDEN = Path(__file__).parent / "golden" / "anthropic_error_codes.json"
ASK = {"model": "a", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
WEATHER = {"name": "weather", "description": "Weather in a city.", "input_schema": {"type": "object"}}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    tools = {**TINY, "name": "tools-c", "aliases": ["c"], "backend_id": "org/tools-c", "tool_call_parser": "hermes"}
    tools["capabilities"] = {"tools": True}
    return load_catalog([write_catalog(tmp_path, TINY, tools)])


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "tools-c": FakeEngine(words=["sunny"])}


async def sdk(client: httpx2.AsyncClient, ledger: Ledger, **limits: object) -> anthropic.AsyncAnthropic:
    key = (await ledger.create_key(KeyLimits(**limits))).key  # type: ignore[arg-type]
    return anthropic.AsyncAnthropic(api_key=key, base_url="http://test", http_client=client, max_retries=0)


def test_error_table_matches_golden_file_and_covers_every_code() -> None:
    golden = json.loads(GOLDEN.read_text())
    current = {code.value: list(ANTHROPIC_ERRORS[code]) for code in ErrorCode}
    assert current == golden


async def test_message_through_the_sdk_is_metered(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    reply = await client.messages.create(**ASK)  # type: ignore[arg-type]
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.content[0].type == "text" and reply.content[0].text == "hello from the fake"
    assert reply.stop_reason == "end_turn"
    assert reply.usage.output_tokens == 4 and reply.usage.input_tokens > 0
    cost = reply.usage.model_extra["cost"]  # type: ignore[index]
    assert cost > 0
    # One record, found by the reply's id, priced as the chat route prices it.
    record = await ledger.generation(reply.id, client.api_key)
    assert (record.prompt_tokens, record.completion_tokens) == (reply.usage.input_tokens, 4)
    assert float(record.cost) == pytest.approx(cost)


async def test_stream_events_in_anthropic_order(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    async with client.messages.stream(**ASK) as stream:  # type: ignore[arg-type]
        events = [event async for event in stream]
        final = await stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    raw = [k for k in kinds if k not in ("text", "content_block")]  # the SDK's own derived events
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == "hello from the fake "  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4
    # The SDK keeps Anthropic's own usage fields; the cost is in the raw message_delta.
    delta = next(event for event in events if event.type == "message_delta")
    assert delta.usage.model_extra["cost"] > 0  # type: ignore[index]
    record = await ledger.generation(final.id, client.api_key)
    assert record.streamed and record.completion_tokens == 4


async def test_raw_stream_has_no_done_line(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = (await ledger.create_key(KeyLimits())).key
    resp = await http.post("/v1/messages", json={**ASK, "stream": True}, headers={"x-api-key": key})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in resp.text
    events = [line.removeprefix("event: ") for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"


async def test_count_tokens(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    counted = await client.messages.count_tokens(model="a", messages=[{"role": "user", "content": "one two three"}])
    assert counted.input_tokens > 0
    scoped = await sdk(sdk_http, ledger, models=["tools-c"])
    with pytest.raises(anthropic.PermissionDeniedError):
        await scoped.messages.count_tokens(model="a", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("change", "status", "kind", "code"),
    [
        ({"model": "nope"}, 404, "not_found_error", "model_not_found"),
        ({"max_tokens": None}, 400, "invalid_request_error", "invalid_request"),
        ({"max_tokens": 100_000}, 400, "invalid_request_error", "context_length_exceeded"),
        ({"tools": [WEATHER]}, 400, "invalid_request_error", "capability_not_supported"),
    ],
)
async def test_errors_in_anthropic_envelope(
    http: httpx.AsyncClient, ledger: Ledger, change: dict[str, object], status: int, kind: str, code: str
) -> None:
    key = (await ledger.create_key(KeyLimits())).key
    body = {k: v for k, v in {**ASK, **change}.items() if v is not None}
    resp = await http.post("/v1/messages", json=body, headers={"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert resp.status_code == status
    error = resp.json()
    assert error["type"] == "error" and (error["error"]["type"], error["error"]["code"]) == (kind, code)


async def test_sdk_errors_for_bad_key_and_exhausted_balance(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    bad = anthropic.AsyncAnthropic(api_key="sk-orch-nope", base_url="http://test", http_client=sdk_http, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        await bad.messages.create(**ASK)  # type: ignore[arg-type]
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "sk-orch-nope" not in str(denied.value)
    broke = await sdk(sdk_http, ledger, credits=Decimal(0))
    with pytest.raises(anthropic.APIStatusError) as refused:
        await broke.messages.create(**ASK)  # type: ignore[arg-type]
    assert refused.value.status_code == 402
    assert refused.value.body["error"]["code"] == "insufficient_credits"  # type: ignore[index]


async def test_overload_is_529_overloaded_error(
    sdk_http: httpx2.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    engines["tiny-a"].fail_before_first = OrchestratorError(ErrorCode.PROVIDER_OVERLOADED, "busy")
    client = await sdk(sdk_http, ledger)
    for stream in (False, True):
        with pytest.raises(anthropic.APIStatusError) as shed:
            await client.messages.create(**ASK, stream=stream)  # type: ignore[call-overload]
        assert shed.value.status_code == 529
        assert shed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def test_mid_stream_failure_ends_with_an_error_event(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    engines["tiny-a"].fail_after = 2
    key = (await ledger.create_key(KeyLimits())).key
    resp = await http.post("/v1/messages", json={**ASK, "stream": True}, headers={"x-api-key": key})
    last = resp.text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\n")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "api_error"


async def test_tools_reach_a_model_that_has_them(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    reply = await client.messages.create(
        **{**ASK, "model": "c"},
        tools=[WEATHER],
        tool_choice={"type": "any"},  # type: ignore[arg-type]
    )
    assert reply.content[0].type == "text"


async def test_chat_route_refuses_capabilities_in_openai_envelope(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = (await ledger.create_key(KeyLimits())).key
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for change, missing in (
        ({"tools": [tool], "tool_choice": "required"}, "tools"),
        ({"messages": [{"role": "user", "content": [image]}]}, "vision"),
    ):
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], **change}
        resp = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "capability_not_supported"
        assert "tiny-a" in resp.json()["error"]["message"] and missing in resp.json()["error"]["message"]
    # tool_choice none uses no tool calling: the model answers.
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": [tool], "tool_choice": "none"}
    resp = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200


def test_stop_reasons() -> None:
    assert stop_reason("length", None, tool_used=True) == ("max_tokens", None)
    assert stop_reason("tool_calls", None, tool_used=True) == ("tool_use", None)
    assert stop_reason("stop", None, tool_used=True) == ("tool_use", None)  # a forced (named) call
    assert stop_reason("stop", "END", tool_used=False) == ("stop_sequence", "END")
    assert stop_reason("stop", 2, tool_used=False) == ("end_turn", None)  # an end-of-sequence token id


def _chunk(delta: dict[str, object], finish: str | None = None) -> str:
    return frame({"id": "gen-1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _events(raw: bytes) -> list[dict[str, object]]:
    return [json.loads(part.split("data: ", 1)[1]) for part in raw.decode().strip().split("\n\n")]


def test_streamed_tool_calls_become_tool_use_blocks() -> None:
    events = MessageEvents(lambda: {"prompt_tokens": 7})
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "cost": 0.5}
    out = events.write(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"content": "Let me check."}),
            _chunk({"tool_calls": [call]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "tool_calls"),
            frame({"id": "gen-1", "model": "m", "choices": [], "usage": usage}),
        ]
    )
    seen = _events(out)
    assert [e["type"] for e in seen] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert seen[0]["message"]["usage"]["input_tokens"] == 7  # type: ignore[index]
    assert seen[4]["content_block"] == {"type": "tool_use", "id": "call-1", "name": "weather", "input": {}}
    assert seen[4]["index"] == 1
    partial = "".join(e["delta"]["partial_json"] for e in seen[5:7])  # type: ignore[index]
    assert json.loads(partial) == {"city": "Paris"}
    assert seen[8]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert seen[8]["usage"] == {"input_tokens": 7, "output_tokens": 5, "cache_read_input_tokens": 0, "cost": 0.5}


def test_whole_chat_completion_with_tool_calls_becomes_a_message() -> None:
    chat = {
        "id": "gen-2",
        "model": "m",
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}},
    }
    body = message(chat)
    assert body["content"] == [{"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Oslo"}}]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"] == {"input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 4}


def test_output_format_is_forwarded_as_guided_json() -> None:
    from orchestrator.protocol.anthropic import MessagesRequest

    fmt = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    parsed = MessagesRequest.model_validate({**ASK, "output_config": fmt, "service_tier": "auto"})
    assert parsed.forwarded()["output_config"] == fmt and "service_tier" not in parsed.forwarded()
    assert parsed.capabilities_used() == {"json"}


async def test_ping_while_the_model_is_silent(catalog: Catalog, ledger: Ledger) -> None:
    slow = {"tiny-a": FakeEngine(first_delay_s=0.5, token_delay_s=0.3), "tools-c": FakeEngine()}
    app = create_app(catalog, LocalBackend(slow), Settings(admin_key=ADMIN, keepalive_seconds=0.1), gateway=ledger)
    key = (await ledger.create_key(KeyLimits())).key
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        resp = await client.post("/v1/messages", json={**ASK, "stream": True}, headers={"x-api-key": key})
    # Anthropic's streams begin with message_start (its SDK refuses any event before it):
    # while the first token is awaited the keep-alive is an SSE comment, then a ping event.
    start = resp.text.index("event: message_start")
    assert resp.text.startswith(": keep-alive") and "event: " not in resp.text[:start]
    assert 'event: ping\ndata: {"type":"ping"}' in resp.text[start:]
    assert resp.text.index("event: ping") < resp.text.index("event: message_stop")


async def test_the_sdks_stream_survives_a_slow_first_token(catalog: Catalog, ledger: Ledger) -> None:
    slow = {"tiny-a": FakeEngine(first_delay_s=0.5), "tools-c": FakeEngine()}
    app = create_app(catalog, LocalBackend(slow), Settings(admin_key=ADMIN, keepalive_seconds=0.1), gateway=ledger)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
        client = await sdk(http, ledger)
        async with client.messages.stream(**ASK) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_message()
    assert final.content[0].text == "hello from the fake "  # type: ignore[union-attr]
