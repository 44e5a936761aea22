"""What the engine relies on in vLLM's Anthropic serving (engine/vllm_engine.py, _StrictChat):
these fail with a message naming the change when a vLLM upgrade moves it."""

from __future__ import annotations

import inspect

import pytest

pytestmark = pytest.mark.engine


def test_anthropic_serving_is_a_chat_serving_with_the_translation_used() -> None:
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    assert issubclass(AnthropicServingMessages, OpenAIServingChat), "vLLM's Anthropic serving no longer extends chat"
    params = inspect.signature(AnthropicServingMessages.to_chat_completion_request).parameters
    assert "merge_inline_system" in params, "to_chat_completion_request lost merge_inline_system"
    # The only private name used: the per-template choice vLLM makes in its constructor.
    init = inspect.getsource(AnthropicServingMessages.__init__)
    assert "self._merge_inline_system =" in init, "AnthropicServingMessages no longer sets _merge_inline_system"
    assert inspect.iscoroutinefunction(AnthropicServingMessages.count_tokens)


def test_translation_of_a_tool_conversation() -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    request = AnthropicMessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 5,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"c": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
            ],
            "tools": [{"name": "w", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        }
    )
    chat = AnthropicServingMessages.to_chat_completion_request(request).model_dump(exclude_unset=True)
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]
    assert chat["tool_choice"] == "required" and chat["max_tokens"] == 5
