"""Real Ray Serve + real vLLM engines on tiny models, driven by the official openai SDK."""

from __future__ import annotations

import json
import os
import time

import httpx
import openai
import pytest

from tests.integration.conftest import Deployment, engine_probe, open_stream
from tests.stream_shape import GOLDEN, PATHS, REQUESTS, golden, stream_shape

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def test_models_list_has_catalog_fields(client: openai.OpenAI, deployment: Deployment) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [
        "tiny-a",
        "tiny-b",
        "tiny-vision",
        "smollm2-135m-instruct",
        "all-minilm-l6-v2",
        "tiny-a-lora",
        "tiny-a-lora-2",
    ]
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    card = httpx.get(deployment.base_url + "/v1/models/test-org/tiny-b", headers=headers).json()
    assert card["id"] == "tiny-b" and card["aliases"] == ["b"] and card["context_window"] == 512
    assert card["pricing"] == {"input_per_million": "1", "output_per_million": "2"}


def test_chat_non_streaming_dispatches_by_every_name(client: openai.OpenAI) -> None:
    for name, expected in [("tiny-a", "tiny-a"), ("b", "tiny-b"), ("test-org/tiny-a", "tiny-a")]:
        raw = client.chat.completions.with_raw_response.create(model=name, messages=USER, max_tokens=8)
        resp = raw.parse()
        assert resp.model == expected
        assert resp.id.startswith("gen-") and raw.headers["x-request-id"] not in resp.id
        assert resp.usage is not None and resp.usage.completion_tokens <= 8
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_role_deltas_finish_usage_done(client: openai.OpenAI, deployment: Deployment) -> None:
    # ignore_eos: the tiny model's random weights may sample EOS before 16 tokens.
    chunks = list(
        client.chat.completions.create(
            model="tiny-a", messages=USER, max_tokens=16, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 0  # type: ignore[union-attr]
    assert usage_chunk.usage.completion_tokens_details.reasoning_tokens == 0  # type: ignore[union-attr]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("gen-")
    # The wire format ends with [DONE] (the SDK hides it).
    body = {"model": "tiny-b", "messages": USER, "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    with httpx.stream(
        "POST", deployment.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as resp:
        text = "".join(resp.iter_text())
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and '"usage"' in events[-2]


@pytest.mark.parametrize("name", ["chat", "completion"])
def test_real_streams_have_the_recorded_frame_shapes(deployment: Deployment, name: str) -> None:
    """Real vLLM's streams through the router still have the shapes in
    tests/golden/stream_shapes.json, which the fake engine's unit-test streams must match.
    If vLLM changes its framing, this fails; rerun with ORCH_RECORD_STREAM_SHAPES=1 to
    record the new shapes, then make tests/fakes.py frame the same way."""
    body = {**REQUESTS[name], "model": "tiny-a"}
    headers = {"Authorization": f"Bearer {deployment.api_key}"}
    resp = httpx.post(deployment.base_url + PATHS[name], json=body, headers=headers, timeout=120)
    assert resp.status_code == 200, resp.text
    found = stream_shape(resp.text.splitlines())
    if os.environ.get("ORCH_RECORD_STREAM_SHAPES"):
        GOLDEN.write_text(json.dumps({**golden(), name: found}, indent=1) + "\n")
    assert found == golden()[name]


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    eos = {"ignore_eos": True}  # random weights may sample EOS before 6 tokens
    resp = client.completions.create(model="tiny-b", prompt="The quick brown fox", max_tokens=6, extra_body=eos)
    assert resp.id.startswith("gen-") and resp.usage is not None and resp.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="tiny-b", prompt="Hello", max_tokens=6, stream=True, extra_body=eos))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_n_greater_than_one(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="tiny-a", messages=USER, max_tokens=5, n=3, temperature=1.0)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]


def test_seed_determinism_at_temperature(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        resp = client.chat.completions.create(model="tiny-a", messages=USER, max_tokens=24, temperature=1.0, seed=seed)
        return resp.choices[0].message.content or ""

    assert run(7) == run(7)
    assert len({run(7), run(8), run(9)}) > 1


def test_stop_sequence_cuts_output(client: openai.OpenAI) -> None:
    full = client.completions.create(
        model="tiny-a", prompt="Hello world", max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    cut = client.completions.create(
        model="tiny-a", prompt="Hello world", max_tokens=32, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_json_schema_guided_output_parses(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model="tiny-b",
        messages=USER,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert data["answer"] in ("yes", "no") and 0 <= data["score"] <= 9


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(("extra", "param"), [({"temperature": 5}, "temperature"), ({"n": 0}, "n")])
def test_bad_parameters(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-a", messages=USER, **extra)
    assert info.value.body["code"] == "invalid_request" and info.value.body["param"] == param  # type: ignore[index]


def test_engine_side_validation_maps_to_invalid_request(client: openai.OpenAI) -> None:
    # Not checked by the router: vLLM rejects it, and the code is still ours.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-a", messages=USER, extra_body={"min_p": 7})
    assert info.value.body["code"] == "invalid_request"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow(client: openai.OpenAI, stream: bool) -> None:
    # ~100-token prompt + 480 output tokens > 512-token window: vLLM would silently clamp.
    prompt = "The quick brown fox jumps over the lazy dog. " * 10
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-a", prompt=prompt, max_tokens=480, stream=stream)
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": prompt * 20}])
    assert info.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_client_disconnect_aborts_engine_request(deployment: Deployment) -> None:
    slow = {"model": "tiny-b", "messages": USER, "max_tokens": 480, "stream": True, "ignore_eos": True}
    # The probe joins Ray first: a new process takes seconds to, and 480 tokens of the tiny
    # model can be generated (and buffered in the sockets) in about one.
    with engine_probe(deployment, "model-tiny-b") as unfinished:
        with open_stream(deployment, slow) as lines:
            assert next(lines).startswith("data: ")
            assert unfinished() >= 1
        # Leaving the block closed the connection mid-stream.
        deadline = time.monotonic() + 60
        while (running := unfinished()) and time.monotonic() < deadline:
            time.sleep(1)
    assert running == 0


def test_smollm2_knows_paris(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=32,
    )
    assert "paris" in (resp.choices[0].message.content or "").lower()
