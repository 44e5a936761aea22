"""Adapting vLLM's output: error mapping, error frames, the usage block."""

from __future__ import annotations

import json

import pytest

from orchestrator.engine.frames import (
    complete_usage,
    error_from_frame,
    is_usage_frame,
    map_engine_error,
    patch_usage_frame,
)
from orchestrator.engine.requests import strict_forced_tools
from orchestrator.errors import ErrorCode

# Messages as vLLM 0.32 words them.
PROMPT_TOO_LONG = (
    "This model's maximum context length is 512 tokens. However, your prompt contains at least 513 "
    "input tokens, which exceeds this limit even without any output tokens."
)


@pytest.mark.parametrize(
    ("status", "message", "code"),
    [
        (400, PROMPT_TOO_LONG, ErrorCode.CONTEXT_LENGTH_EXCEEDED),
        (400, "max_tokens=1000 cannot be greater than max_model_len=512.", ErrorCode.CONTEXT_LENGTH_EXCEEDED),
        (400, "temperature must be non-negative, got -1.0.", ErrorCode.INVALID_REQUEST),
        (422, "unprocessable", ErrorCode.INVALID_REQUEST),
        (404, "The model `x` does not exist.", ErrorCode.MODEL_NOT_FOUND),
        (429, "slow down", ErrorCode.PROVIDER_RATE_LIMIT),
        (503, "queue full", ErrorCode.PROVIDER_OVERLOADED),
        (504, "timed out", ErrorCode.PROVIDER_TIMEOUT),
        (500, "boom", ErrorCode.PROVIDER_UNAVAILABLE),
    ],
)
def test_engine_errors_map_to_taxonomy(status: int, message: str, code: ErrorCode) -> None:
    err = map_engine_error(status, message, "param")
    assert err.code is code and err.message == message and err.param == "param"


def test_error_frame_detected_and_mapped() -> None:
    frame = 'data: {"error":{"message":"engine died","type":"InternalServerError","param":null,"code":500}}\n\n'
    err = error_from_frame(frame)
    assert err is not None and err.code is ErrorCode.PROVIDER_UNAVAILABLE
    text = 'data: {"id":"gen-1","choices":[{"delta":{"content":"\\"error\\""}}]}\n\n'
    assert error_from_frame(text) is None


def test_usage_frame_gets_cached_and_reasoning_counts() -> None:
    frame = 'data: {"id":"gen-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    assert is_usage_frame(frame)
    assert not is_usage_frame('data: {"id":"gen-1","choices":[{"delta":{}}]}\n\n')
    patched = patch_usage_frame(frame)
    assert patched.startswith("data: ") and patched.endswith("\n\n")
    usage = json.loads(patched[6:])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_complete_usage_keeps_reported_counts() -> None:
    usage = complete_usage({"prompt_tokens_details": {"cached_tokens": 256}, "completion_tokens_details": None})
    assert usage["prompt_tokens_details"]["cached_tokens"] == 256
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_split_usage_cuts_only_the_usage_member() -> None:
    from orchestrator.engine.frames import split_usage

    usage = (
        '{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2,"completion_tokens_details":{"reasoning_tokens":1}}'
    )
    content = '"choices":[{"index":0,"delta":{"content":"},\\"usage\\":{"}}]'
    frame = f'data: {{"id":"x",{content},"usage":{usage},"prompt_token_ids":null}}\n\n'
    rest, cut = split_usage(frame)
    assert cut == usage
    assert rest == f'data: {{"id":"x",{content},"prompt_token_ids":null}}\n\n'
    plain = 'data: {"id":"x","choices":[]}\n\n'
    assert split_usage(plain) == (plain, None)


def _chunk(index: int, prompt: int, completion: int) -> str:
    usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    data = {"id": "gen-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": index, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}],
            "usage": usage}  # fmt: skip
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def test_running_usage_of_several_choices_counts_them_all() -> None:
    from orchestrator.engine.frames import ChoiceUsage, split_usage

    running = ChoiceUsage(n=3)
    last = ""
    for index, completion in [(0, 1), (1, 1), (2, 1), (0, 2), (2, 2), (0, 3)]:
        frame = _chunk(index, 7, completion)
        last = running.add(frame, split_usage(frame)[1] or "")
    # Choice 0 has 3 tokens, choice 1 has 1, choice 2 has 2; the prompt counts once.
    assert json.loads(last) == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}


def test_running_usage_of_a_prompt_list_counts_every_prompt() -> None:
    from orchestrator.engine.frames import ChoiceUsage, split_usage

    running = ChoiceUsage(n=2)  # 2 prompts x 2 choices: indexes 0, 1 (prompt 0) and 2, 3 (prompt 1)
    for index, prompt, completion in [(0, 5, 1), (1, 5, 1), (2, 9, 1), (3, 9, 2)]:
        frame = _chunk(index, prompt, completion)
        last = running.add(frame, split_usage(frame)[1] or "")
    assert json.loads(last) == {"prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19}


def test_forced_tool_calls_decode_under_the_tools_schemas() -> None:
    weather = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
    loose = {"type": "function", "function": {"name": "l", "parameters": {"type": "object"}, "strict": False}}
    for choice in ("required", {"type": "function", "function": {"name": "w"}}):
        body = strict_forced_tools({"tools": [weather, loose], "tool_choice": choice})
        assert [t["function"].get("strict") for t in body["tools"]] == [True, False]
    assert weather["function"].get("strict") is None  # the caller's body is not changed
    for choice in ("auto", "none", None):
        body = {"tools": [weather], "tool_choice": choice}
        assert strict_forced_tools(body) is body


def test_engine_errors_never_show_vllm_flags() -> None:
    error = map_engine_error(400, 'tool_choice="required" requires --tool-call-parser to be set', "tool_choice")
    assert error.code is ErrorCode.INVALID_REQUEST and "--" not in error.message and error.param == "tool_choice"
    kept = map_engine_error(400, "temperature must be non-negative, got -1.", "temperature")
    assert kept.message == "temperature must be non-negative, got -1."
