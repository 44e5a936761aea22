"""Anthropic Messages and tool calls through real Ray Serve, real vLLM engines (SmolLM2 and a
tiny model) and the real gateway (PostgreSQL), driven by the official ``anthropic`` and
``openai`` SDKs on the router's /v1 and on a model's own route."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import anthropic
import openai
import pytest

from tests.integration.conftest import Deployment

pytestmark = pytest.mark.integration
# SmolLM2's own default system prompt, so the template renders as without one.
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"name": "get_weather", "description": "Current weather in a city.", "input_schema": CITY}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather.", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time.", "parameters": CITY}},
]


def messages_client(deployment: Deployment, key: str | None = None, route: str = "") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key or deployment.api_key, base_url=deployment.base_url + route, max_retries=0, timeout=180
    )


def test_messages_create_stream_and_count_on_both_routes(deployment: Deployment) -> None:
    client = messages_client(deployment)
    reply = client.messages.create(
        model="smollm2",
        system=[{"type": "text", "text": SMOL_SYSTEM}],
        messages=FRANCE,  # type: ignore[arg-type]
        max_tokens=30,
        stop_sequences=["\n\n"],
        # Sampling options the API takes, which this SDK version no longer has parameters for.
        extra_body={"temperature": 0, "top_k": 1},
        metadata={"user_id": "someone"},
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("gen-")
    assert "Paris" in reply.content[0].text  # type: ignore[union-attr]
    assert reply.stop_reason in ("end_turn", "stop_sequence", "max_tokens")
    record = deployment.record(reply.id)
    assert record["model"] == "smollm2-135m-instruct"
    assert record["completion_tokens"] == reply.usage.output_tokens
    prompt = reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)
    assert record["prompt_tokens"] == prompt
    assert Decimal(str(record["cost"])) == Decimal(str(reply.usage.model_extra["cost"]))  # type: ignore[index]
    # count_tokens is exact for the model's chat template: the prompt the engine counted.
    counted = client.messages.count_tokens(
        model="smollm2",
        system=[{"type": "text", "text": SMOL_SYSTEM}],
        messages=FRANCE,  # type: ignore[arg-type]
    )
    assert counted.input_tokens == prompt
    # Multi-turn, streamed, on the tiny model's own route.
    route = messages_client(deployment, route="/models/tiny-a")
    turns = [*FRANCE, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    with route.messages.stream(model="tiny-a", messages=turns, max_tokens=12) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert final.content and final.content[0].type == "text"
    assert final.stop_reason == "max_tokens" or final.stop_reason == "end_turn"
    streamed = deployment.record(final.id)
    assert streamed["streamed"] is True and streamed["completion_tokens"] == final.usage.output_tokens


def test_each_error_in_anthropic_envelope(deployment: Deployment) -> None:
    ask = {"model": "tiny-a", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        messages_client(deployment, key="sk-orch-not-a-key").messages.create(**ask)  # type: ignore[arg-type]
    assert bad_key.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = messages_client(deployment)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(**{**ask, "model": "no-such-model"})  # type: ignore[arg-type]
    assert unknown.value.body["error"]["code"] == "model_not_found"  # type: ignore[index]
    long = [{"role": "user", "content": "cat " * 600}]  # over tiny-a's 512-token window
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(**{**ask, "messages": long})  # type: ignore[arg-type]
    assert too_long.value.body["error"]["code"] == "context_length_exceeded"  # type: ignore[index]
    broke = messages_client(deployment, key=deployment.new_key(credits="0"))
    with pytest.raises(anthropic.APIStatusError) as no_credits:
        broke.messages.create(**ask)  # type: ignore[arg-type]
    assert no_credits.value.status_code == 402
    assert no_credits.value.body["error"]["type"] == "billing_error"  # type: ignore[index]


def _arguments(call: object) -> dict[str, object]:
    return dict(json.loads(call.function.arguments))  # type: ignore[attr-defined]


def test_chat_tool_calls_round_trip(deployment: Deployment) -> None:
    client = deployment.client(timeout=180)
    ask = {"model": "smollm2", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": CHAT_TOOLS}
    forced = client.chat.completions.create(**ask, tool_choice="required", max_tokens=60, temperature=0)  # type: ignore[call-overload]
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(_arguments(call)["city"], str)  # constrained to the schema, whatever the model
    named = client.chat.completions.create(
        **ask, tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60, temperature=0
    )  # type: ignore[call-overload]
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    assert isinstance(_arguments(named.choices[0].message.tool_calls[0])["city"], str)
    none = client.chat.completions.create(**ask, tool_choice="none", max_tokens=8)  # type: ignore[call-overload]
    assert not none.choices[0].message.tool_calls
    assert client.chat.completions.create(**ask, tool_choice="auto", max_tokens=8).choices  # type: ignore[call-overload]
    # Streamed tool-call deltas assemble into the same valid arguments.
    parts: list[str] = []
    for chunk in client.chat.completions.create(**ask, tool_choice="required", max_tokens=60, stream=True):  # type: ignore[call-overload]
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            parts.append(delta_call.function.arguments or "")
    assert isinstance(json.loads("".join(parts))["city"], str)
    # The follow-up turn with the tool's result.
    follow = [
        *ask["messages"],  # type: ignore[misc]
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model="smollm2", messages=follow, tools=CHAT_TOOLS, max_tokens=20)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    # Parallel calls of one turn (two calls, two results) and the answer that follows them.
    clock = {"id": "call-time", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Paris"}'}}
    parallel = [
        *ask["messages"],  # type: ignore[misc]
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True), clock]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call-time", "content": "14:05"},
    ]
    both = client.chat.completions.create(
        model="smollm2",
        messages=parallel,
        tools=CHAT_TOOLS,
        parallel_tool_calls=True,
        max_tokens=20,  # type: ignore[arg-type]
    )
    assert both.choices[0].message.content or both.choices[0].message.tool_calls


def test_messages_tool_use_round_trip(deployment: Deployment) -> None:
    client = messages_client(deployment)
    question = {"role": "user", "content": "Weather in Paris?"}
    used = client.messages.create(
        model="smollm2",
        max_tokens=60,
        messages=[question],
        tools=[WEATHER],
        tool_choice={"type": "any"},  # type: ignore[list-item]
    )
    assert used.stop_reason == "tool_use"
    block = next(b for b in used.content if b.type == "tool_use")
    assert block.name == "get_weather" and isinstance(block.input["city"], str)  # type: ignore[index]
    with client.messages.stream(
        model="smollm2",
        max_tokens=60,
        messages=[question],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},  # type: ignore[list-item]
    ) as stream:
        streamed = stream.get_final_message()
    streamed_block = next(b for b in streamed.content if b.type == "tool_use")
    assert isinstance(streamed_block.input["city"], str)  # type: ignore[index]
    result = {"type": "tool_result", "tool_use_id": block.id, "content": "Sunny, 21 C"}
    answer = client.messages.create(
        model="smollm2",
        max_tokens=20,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[question, {"role": "assistant", "content": used.content}, {"role": "user", "content": [result]}],  # type: ignore[list-item]
    )
    assert answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")
    # A model without tools refuses in our own words, never vLLM's flags.
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="tiny-a", max_tokens=8, messages=[question], tools=[WEATHER])  # type: ignore[list-item]
    assert refused.value.body["error"]["code"] == "capability_not_supported"  # type: ignore[index]
    assert "--" not in refused.value.body["error"]["message"]  # type: ignore[index]


def test_fifty_concurrent_message_streams_cannot_overrun_a_balance(deployment: Deployment) -> None:
    """Credits cover about 5 streams at their worst case: some of 50 get 402, every other
    ends with message_stop, and the balance ends at or above 0, equal to the credits less
    the recorded costs."""
    from orchestrator.api.accounting import TEMPLATE_TOKENS_PER_MESSAGE, TEMPLATE_TOKENS_PER_REQUEST
    from orchestrator.catalog import Pricing
    from orchestrator.gateway.pricing import request_cost

    body = {"model": "tiny-a", "max_tokens": 64, "stream": True, "messages": FRANCE}
    worst_prompt = len(json.dumps(body).encode()) + TEMPLATE_TOKENS_PER_REQUEST + TEMPLATE_TOKENS_PER_MESSAGE
    hold = request_cost(Pricing(input_per_million=Decimal(1), output_per_million=Decimal(2)), worst_prompt, 64)
    credits = hold * Decimal("5.5")
    created = deployment.admin("POST", "/admin/keys", json={"credits": str(credits)}).json()
    client = messages_client(deployment, key=created["key"])

    def one(_: int) -> str:
        try:
            with client.messages.stream(model="tiny-a", max_tokens=64, messages=FRANCE) as stream:  # type: ignore[arg-type]
                kinds = [event.type for event in stream]
            return kinds[-1]
        except anthropic.APIStatusError as exc:
            return str(exc.status_code)

    with ThreadPoolExecutor(max_workers=50) as pool:
        ends = list(pool.map(one, range(50)))
    assert set(ends) == {"message_stop", "402"} and ends.count("message_stop") >= 5, sorted(ends)
    time.sleep(1)  # flushed every 100 ms
    key_id = created["info"]["id"]
    balance = Decimal(deployment.admin("GET", f"/admin/keys/{key_id}").json()["credits"])
    usage = deployment.admin("GET", "/admin/usage", params={"key": key_id, "group_by": "key"}).json()["data"]
    assert usage[0]["requests"] == ends.count("message_stop")
    assert balance >= 0 and balance == credits - Decimal(str(usage[0]["cost"])), (balance, usage)


def test_a_messages_stream_left_mid_way_is_billed_once(deployment: Deployment) -> None:
    created = deployment.admin("POST", "/admin/keys", json={"credits": "1"}).json()
    client = messages_client(deployment, key=created["key"])
    story = [{"role": "user", "content": "Tell me a long story about a cat."}]
    with client.messages.stream(model="smollm2", max_tokens=480, messages=story) as stream:  # type: ignore[arg-type]
        events = iter(stream)
        start = next(events)
        for _ in range(6):
            next(events)
    gen_id = start.message.id  # type: ignore[union-attr]
    record = deployment.record(gen_id)
    assert record["cancelled"] is True and record["status_code"] == 499
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] < 480
    time.sleep(1)
    info = deployment.admin("GET", f"/admin/keys/{created['info']['id']}").json()
    assert Decimal(info["credits"]) == Decimal(1) - Decimal(str(record["cost"]))
    usage = deployment.admin("GET", "/admin/usage", params={"key": created["info"]["id"], "group_by": "key"}).json()
    assert usage["data"][0]["requests"] == 1


def test_openai_sdk_sees_unchanged_chat_errors(deployment: Deployment) -> None:
    # The chat route keeps OpenAI's envelope beside the new routes.
    with pytest.raises(openai.BadRequestError) as info:
        deployment.client().chat.completions.create(
            model="tiny-a",
            messages=FRANCE,
            tools=CHAT_TOOLS,
            tool_choice="required",  # type: ignore[arg-type]
        )
    assert info.value.body["code"] == "capability_not_supported"  # type: ignore[index]
    assert "tool-call-parser" not in str(info.value)


def test_responses_create_stream_tools_and_json(deployment: Deployment) -> None:
    client = deployment.client(timeout=180)
    reply = client.responses.create(
        model="smollm2", instructions=SMOL_SYSTEM, input=FRANCE[0]["content"], max_output_tokens=30, temperature=0
    )
    assert reply.status in ("completed", "incomplete") and "Paris" in reply.output_text
    record = deployment.record(reply.id)
    assert reply.usage is not None and record["completion_tokens"] == reply.usage.output_tokens
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather.", "parameters": CITY}]
    question = {"role": "user", "content": "Weather in Paris?"}
    with client.responses.stream(
        model="smollm2",
        input=[question],
        tools=tools,
        tool_choice="required",
        max_output_tokens=60,  # type: ignore[arg-type, list-item]
    ) as stream:
        final = stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(
        model="smollm2",
        tools=tools,  # type: ignore[arg-type]
        max_output_tokens=20,
        input=[
            question,  # type: ignore[list-item]
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
    )
    assert follow.output_text
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 24}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    shaped = client.responses.create(
        model="smollm2",
        input=FRANCE[0]["content"],
        max_output_tokens=80,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}},
    )
    assert isinstance(json.loads(shaped.output_text)["capital"], str)


def test_a_responses_stream_left_mid_way_is_billed_once(deployment: Deployment) -> None:
    created = deployment.admin("POST", "/admin/keys", json={"credits": "1"}).json()
    client = deployment.client(api_key=created["key"], timeout=180)
    with client.responses.stream(
        model="smollm2", input="Tell me a long story about a cat.", max_output_tokens=480
    ) as stream:
        events = iter(stream)
        start = next(events)
        for _ in range(6):
            next(events)
    record = deployment.record(start.response.id)  # type: ignore[union-attr]
    assert record["cancelled"] is True and record["status_code"] == 499
    assert 0 < record["completion_tokens"] < 480
    time.sleep(1)
    info = deployment.admin("GET", f"/admin/keys/{created['info']['id']}").json()
    assert Decimal(info["credits"]) == Decimal(1) - Decimal(str(record["cost"]))


def test_stored_responses_continue_on_another_replica(deployment: Deployment) -> None:
    """A conversation kept by the gateway: stored through the router, continued through the
    model's own route (another process: the model's replica) and the router again, read and
    deleted; another workspace's key finds none of it."""
    key = deployment.new_key()
    router = deployment.client(api_key=key, timeout=180)
    route = deployment.client(api_key=key, base_url=deployment.base_url + "/models/tiny-a", timeout=180)
    first = router.responses.create(model="tiny-a", input="My name is Ada.", max_output_tokens=8)
    assert first.store is True
    second = route.responses.create(
        model="tiny-a", input="What is my name?", previous_response_id=first.id, max_output_tokens=8
    )
    with router.responses.stream(
        model="tiny-a", input="And again?", previous_response_id=second.id, max_output_tokens=8
    ) as stream:
        # The tiny model runs to max_output_tokens: the last event is response.incomplete,
        # which the SDK's get_final_response does not take as final.
        last = list(stream)[-1]
    assert last.type in ("response.completed", "response.incomplete")
    third = last.response  # type: ignore[union-attr]
    # The third turn's prompt holds every earlier turn: more input tokens than the second's.
    assert third.usage is not None and second.usage is not None and first.usage is not None
    assert third.usage.input_tokens > second.usage.input_tokens > first.usage.input_tokens
    assert route.responses.retrieve(third.id).previous_response_id == second.id
    stranger = deployment.client(api_key=deployment.new_key(workspace="team-other"), timeout=60)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(model="tiny-a", input="x", previous_response_id=first.id, max_output_tokens=2)
    router.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        route.responses.retrieve(first.id)


def test_each_error_of_the_responses_api(deployment: Deployment) -> None:
    ask = {"model": "tiny-a", "input": "hi", "max_output_tokens": 4}
    with pytest.raises(openai.AuthenticationError):
        deployment.client(api_key="sk-orch-not-a-key").responses.create(**ask)  # type: ignore[arg-type]
    client = deployment.client(timeout=120)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(**{**ask, "model": "no-such-model"})  # type: ignore[arg-type]
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(**{**ask, "input": "cat " * 600})  # type: ignore[arg-type]
    assert too_long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    broke = deployment.client(api_key=deployment.new_key(credits="0"))
    with pytest.raises(openai.APIStatusError) as no_credits:
        broke.responses.create(**ask)  # type: ignore[arg-type]
    assert (no_credits.value.status_code, no_credits.value.body["code"]) == (402, "insufficient_credits")  # type: ignore[index]
