"""Anthropic Messages request and response models checked by the router.

As for OpenAI's routes, the router checks what it can decide without a tokenizer (types,
ranges, the model name, the capabilities a request uses) and forwards the fields Anthropic's
API defines as plain data; the model replica turns them into a chat request with vLLM's own
Anthropic translation. Fields Anthropic does not define are dropped, not forwarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.protocol.media import MediaPart, anthropic_image_url, media_capabilities
from orchestrator.protocol.openai import MAX_MESSAGES, MAX_STOP, MAX_TOOLS
from orchestrator.protocol.values import Boolean, CacheSalt, Integer, OptionalInteger, OptionalNumber


class AnthropicBlock(BaseModel):
    """One content block: text, image, tool use or result, or thinking."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]


class AnthropicTextBlock(BaseModel):
    """A text block (the only kind a system prompt holds)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock] = Field(description="Text, or content blocks.")


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="JSON schema of the tool's input.")


class AnthropicToolChoice(BaseModel):
    # The validator's rule, in the OpenAPI document too.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"type": {"const": "tool"}}},
            "then": {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
        },
    )

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, description="With `type: tool`: the tool to call.")
    disable_parallel_tool_use: Boolean | None = None

    @model_validator(mode="after")
    def _named(self) -> AnthropicToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type tool needs the tool's name")
        return self


class AnthropicMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(default=None, max_length=256)


class _MessagesFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[AnthropicTextBlock] | None = None
    tools: list[AnthropicTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: AnthropicToolChoice | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = Field(
        default=None, description="`format` (a JSON schema the answer must follow) and `effort`."
    )

    def media(self) -> list[MediaPart]:
        """The image blocks of the messages, in tool results too, each with the URL vLLM's
        Anthropic translation gives it."""
        parts = []
        for i, message in enumerate(self.messages):
            blocks = [] if isinstance(message.content, str) else message.content
            for j, block in enumerate(blocks):
                extra = block.model_extra or {}
                if block.type == "image":
                    parts.append(
                        MediaPart("image", anthropic_image_url(extra.get("source")), f"messages[{i}].content[{j}]")
                    )
                elif block.type == "tool_result" and isinstance(extra.get("content"), list):
                    parts.extend(_result_images(extra["content"], f"messages[{i}].content[{j}].content"))
        return parts

    def capabilities_used(self, media: Sequence[MediaPart] | None = None) -> set[str]:
        """What of the model's capabilities the request needs (catalog names); ``media``: its
        media parts, when the caller has read them already (:meth:`media`)."""
        used = set()
        if self.tools and (self.tool_choice is None or self.tool_choice.type != "none"):
            used.add("tools")
        used |= media_capabilities(self.media() if media is None else media)
        if self.thinking and self.thinking.get("type") in ("enabled", "adaptive"):
            used.add("reasoning")
        if self.output_config and self.output_config.get("format"):
            used.add("json")
        return used


def _result_images(content: list[Any], param: str) -> list[MediaPart]:
    return [
        MediaPart("image", anthropic_image_url(item.get("source")), f"{param}[{k}]")
        for k, item in enumerate(content)
        if isinstance(item, dict) and item.get("type") == "image"
    ]


class MessagesRequest(_MessagesFields):
    """``POST /v1/messages`` body."""

    max_tokens: Integer = Field(ge=1, description="Required, as Anthropic requires it.")
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP)
    stream: Boolean = False
    temperature: OptionalNumber = Field(default=None, ge=0, le=2)
    top_p: OptionalNumber = Field(default=None, gt=0, le=1)
    top_k: OptionalInteger = Field(default=None, ge=1)
    metadata: AnthropicMetadata | None = None
    cache_salt: CacheSalt = None

    def output_budget(self) -> int:
        return self.max_tokens

    def forwarded(self) -> dict[str, Any]:
        """The body for the model replica: Anthropic's fields only."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"metadata"})


class CountTokensRequest(_MessagesFields):
    """``POST /v1/messages/count_tokens`` body."""

    def forwarded(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class CountTokensResponse(BaseModel):
    input_tokens: int = Field(description="Prompt tokens under the model's chat template, tools included.")


class AnthropicUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None
    cost: float = Field(description="USD, from the model's catalog prices.")


class MessageResponse(BaseModel):
    """``POST /v1/messages`` answer without ``stream``."""

    id: str = Field(description="`gen-<id>`: what `GET /v1/generation?id=` looks up.")
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicErrorDetail(BaseModel):
    type: str = Field(description="Anthropic's error type (`invalid_request_error`, `overloaded_error`, ...).")
    message: str = Field(description="For humans; never contains a key.")
    code: str = Field(description="The orchestrator's stable error code (the same as on the OpenAI routes).")
    param: str | None = Field(description="The request parameter at fault, if one is.")


class AnthropicErrorResponse(BaseModel):
    """Every error answer of the Messages routes, and a failed stream's `error` event."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None
