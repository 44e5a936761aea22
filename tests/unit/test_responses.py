"""The OpenAI Responses dialect at the HTTP edge, through the openai SDK over the app
in-process (fake engines, the real SQLite ledger), and its translation both ways."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx2
import openai
import pytest

from orchestrator.api.responses.translate import ResponseEvents, response
from orchestrator.api.sse import frame
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.protocol.responses import ResponsesRequest
from tests.fakes import FakeEngine

TOOL = {"type": "function", "name": "weather", "parameters": {"type": "object"}}


async def sdk(http: httpx2.AsyncClient, ledger: Ledger, **limits: object) -> openai.AsyncOpenAI:
    key = (await ledger.create_key(KeyLimits(**limits))).key  # type: ignore[arg-type]
    return openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=http, max_retries=0)


async def test_create_is_metered_and_found_by_its_id(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    reply = await client.responses.create(model="a", input="hi", instructions="Be brief.", max_output_tokens=16)
    assert reply.status == "completed" and reply.output_text == "hello from the fake"
    assert reply.instructions == "Be brief." and reply.store is True
    assert reply.usage is not None and reply.usage.output_tokens == 4
    cost = reply.usage.model_extra["cost"]  # type: ignore[index]
    record = await ledger.generation(reply.id, client.api_key)
    assert record.completion_tokens == 4 and float(record.cost) == pytest.approx(cost) and cost > 0


async def test_stream_events_accumulate_in_the_sdk(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    async with client.responses.stream(model="a", input=[{"role": "user", "content": "hi"}]) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert final.output_text == "hello from the fake "
    assert final.usage is not None and final.usage.model_extra["cost"] > 0  # type: ignore[index]
    record = await ledger.generation(final.id, client.api_key)
    assert record.streamed and record.completion_tokens == 4


async def test_a_mid_stream_failure_is_response_failed(
    sdk_http: httpx2.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    engines["tiny-a"].fail_after = 2
    client = await sdk(sdk_http, ledger)
    stream = await client.responses.create(model="a", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.failed"


async def test_errors_are_openai_envelopes(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="a", input="hi", tools=[TOOL])  # type: ignore[list-item]
    assert refused.value.body["code"] == "capability_not_supported"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as previous:
        await client.responses.create(model="a", input="hi", previous_response_id="gen-x")
    assert previous.value.body["code"] == "not_found"  # type: ignore[index]
    broke = await sdk(sdk_http, ledger, credits=Decimal(0))
    with pytest.raises(openai.APIStatusError) as no_credits:
        await broke.responses.create(model="a", input="hi")
    assert no_credits.value.status_code == 402


def test_items_become_chat_messages() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Oslo"}'},
                {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city":"Rome"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2", "output": "rain"},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
            "max_output_tokens": 9,
        }
    )
    body = request.forwarded()
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in body["messages"][2]["tool_calls"]] == ["c1", "c2"]  # one turn, parallel calls
    assert body["messages"][1]["content"] == [{"type": "text", "text": "Weather?"}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["tools"][0]["function"]["name"] == "weather"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
    }
    assert body["max_tokens"] == 9 and request.capabilities_used() == {"tools", "json"}


def test_whole_chat_with_tool_calls_becomes_function_call_items() -> None:
    request = ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": [TOOL]})
    chat = {
        "id": "gen-1",
        "model": "m",
        "created": 1,
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": "{}"}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "cost": 0.1},
    }
    body = response(chat, request)
    assert body["status"] == "completed" and [item["type"] for item in body["output"]] == ["function_call"]
    assert body["output"][0]["call_id"] == "c1" and body["usage"]["total_tokens"] == 7
    chat["choices"][0]["finish_reason"] = "length"  # type: ignore[index]
    assert response(chat, request)["incomplete_details"] == {"reason": "max_output_tokens"}


def _chunk(delta: dict[str, object], finish: str | None = None) -> str:
    return frame(
        {"id": "gen-1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    )


async def test_streamed_tool_calls_become_argument_deltas() -> None:
    events = ResponseEvents(ResponsesRequest.model_validate({"model": "m", "input": "x"}))
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    out = events.write(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"tool_calls": [call]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}, "tool_calls"),
            frame({"id": "gen-1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
        ]
    )
    out += await events.end()
    seen = [json.loads(part.split("data: ", 1)[1]) for part in out.decode().strip().split("\n\n")]
    assert [e["type"] for e in seen] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))
    assert json.loads(seen[5]["arguments"]) == {"city": "Oslo"}
    assert seen[-1]["response"]["output"][0]["name"] == "weather"
    failed = json.loads(events.error(OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "x"), "r").split(b"data: ")[1])
    assert failed["type"] == "response.failed" and failed["response"]["error"]["code"] == "provider_unavailable"


async def test_stored_responses_continue_and_stay_in_their_workspace(
    sdk_http: httpx2.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    client = await sdk(sdk_http, ledger)
    first = await client.responses.create(model="a", input="My name is Ada.")
    assert first.store is True
    assert (await client.responses.retrieve(first.id)).output_text == first.output_text
    # The next turn gets the first one's input and output before its own.
    second = await client.responses.create(model="a", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    prompts = engines["tiny-a"].prompts
    assert [m["role"] for m in prompts[-1]] == ["user", "assistant", "user"]
    assert prompts[-1][1]["content"] == [{"type": "text", "text": "hello from the fake"}]
    assert prompts[-1][2]["content"] == "What is my name?"
    # A streamed turn is stored before its response.completed event reaches the client.
    async with client.responses.stream(model="a", input="And now?", previous_response_id=second.id) as stream:
        final = await stream.get_final_response()
    assert (await client.responses.retrieve(final.id)).id == final.id
    # Another workspace sees none of it.
    other = openai.AsyncOpenAI(
        api_key=(await ledger.create_key(KeyLimits(), "team-b")).key, base_url="http://test/v1", http_client=sdk_http
    )
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.create(model="a", input="x", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.delete(first.id)
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    unkept = await client.responses.create(model="a", input="x", store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unkept.id)


async def test_a_full_workspace_refuses_to_store(sdk_http: httpx2.AsyncClient, ledger: Ledger) -> None:
    client = await sdk(sdk_http, ledger)
    kept = await client.responses.create(model="a", input="x")
    assert (await client.responses.retrieve(kept.id)).id == kept.id
    ledger.responses.workspace_bytes = 1  # what is stored now fills the bound
    with pytest.raises(openai.BadRequestError) as full:
        await client.responses.create(model="a", input="x")
    assert full.value.body["code"] == "storage_limit_exceeded"  # type: ignore[index]
    assert (await client.responses.create(model="a", input="x", store=False)).store is False


async def test_a_stored_response_outlives_its_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    first = Ledger(SQLStore(url), fence=None)
    await first.start()
    key = (await first.create_key(KeyLimits())).key
    await first.keep_response(
        key, {"id": "gen-1", "output": [{"type": "message"}]}, [{"role": "user", "content": "hi"}]
    )
    await first.stop()
    second = Ledger(SQLStore(url), fence=None)
    await second.start()
    try:
        assert (await second.stored_response(key, "gen-1"))["id"] == "gen-1"
        history = await second.response_context(key, "gen-1", store=False)
        assert history == [{"role": "user", "content": "hi"}, {"type": "message"}]
    finally:
        await second.stop()


async def test_an_output_budget_past_the_window_names_max_output_tokens(
    sdk_http: httpx2.AsyncClient, ledger: Ledger
) -> None:
    client = await sdk(sdk_http, ledger)
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.responses.create(model="a", input="hi", max_output_tokens=100_000)
    assert too_many.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert too_many.value.body["param"] == "max_output_tokens"  # type: ignore[index]
