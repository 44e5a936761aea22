"""OpenAI Responses request model checked by the router, and its translation into the chat
request the model replica runs.

The router translates here, in plain Python: a Responses body becomes an OpenAI chat body
(``instructions`` a system message, input items messages, function calls and their outputs
assistant tool calls and tool messages, ``text.format`` a ``response_format``), so that
keys, limits, metering and cut-short billing run on the one chat path. vLLM's own Responses
serving is a separate engine path that keeps stored responses in one process's memory;
here they are kept in the gateway's database (gateway/responses.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.protocol.media import MediaPart, media_capabilities
from orchestrator.protocol.openai import MAX_MESSAGES, MAX_TOOLS
from orchestrator.protocol.values import Boolean, CacheSalt, OptionalInteger, OptionalNumber

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class FunctionTool(BaseModel):
    """A function tool (the only kind served: no built-in tools run here)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Boolean | None = None


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None


class MessageItem(BaseModel):
    """A message: ``role`` and ``content`` (text, or ``input_text`` / ``output_text`` /
    ``input_image`` parts)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(BaseModel):
    """A call the model made earlier (sent back with its output)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """What a function call returned."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningItem(BaseModel):
    """Earlier reasoning output; not sent to the model again."""

    model_config = ConfigDict(extra="allow")

    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class ResponsesRequest(BaseModel):
    """``POST /v1/responses`` body."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str = Field(min_length=1)
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description="Text, or input items."
    )
    instructions: str | None = None
    max_output_tokens: OptionalInteger = Field(default=None, ge=1)
    temperature: OptionalNumber = Field(default=None, ge=0, le=2)
    top_p: OptionalNumber = Field(default=None, gt=0, le=1)
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "required", "none"] | NamedFunction | None = None
    parallel_tool_calls: Boolean | None = None
    text: TextOptions | None = None
    stream: Boolean = False
    store: Boolean = Field(
        default=True,
        description="Keep the response (with API keys: in the gateway's database, per workspace; open mode: none).",
    )
    previous_response_id: str | None = Field(
        default=None, description="A stored response of the key's workspace whose conversation this continues."
    )
    metadata: dict[str, str] | None = None
    user: str | None = None
    cache_salt: CacheSalt = None

    def output_budget(self) -> int | None:
        return self.max_output_tokens

    def capabilities_used(self, media: Sequence[MediaPart] | None = None) -> set[str]:
        """What of the model's capabilities the request needs (catalog names); ``media``: its
        media parts, when the caller has read them already (:meth:`media`)."""
        used = set()
        if self.tools and self.tool_choice != "none":
            used.add("tools")
        if self.text and self.text.format and self.text.format.type != "text":
            used.add("json")
        used |= media_capabilities(self.media() if media is None else media)
        return used

    def media(self) -> list[MediaPart]:
        """The ``input_image`` parts of the input's messages (the only media forwarded)."""
        if isinstance(self.input, str):
            return []
        return [
            MediaPart(
                "image", url if isinstance(url := part.get("image_url"), str) else None, f"input[{i}].content[{j}]"
            )
            for i, item in enumerate(self.input)
            if isinstance(item, MessageItem) and isinstance(item.content, list)
            for j, part in enumerate(item.content)
            if part.get("type") == "input_image"
        ]

    def forwarded(self) -> dict[str, Any]:
        """The chat body the model replica runs for this request."""
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(), "stream": self.stream}
        for name in ("temperature", "top_p", "parallel_tool_calls", "user", "cache_salt"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [_chat_tool(tool) for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            schema = {"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        return body

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of ``instructions`` and ``input``."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            _add_item(messages, item)
        return messages


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters or {"type": "object"}}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _content(content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif part.get("type") == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
    return parts


def _add_item(messages: list[dict[str, Any]], item: InputItem) -> None:
    if isinstance(item, MessageItem):
        messages.append({"role": _ROLES[item.role], "content": _content(item.content)})
    elif isinstance(item, FunctionCallItem):
        call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)  # parallel calls of one turn: one assistant message
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif isinstance(item, FunctionCallOutputItem):
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})


class ResponseObject(BaseModel):
    """``POST /v1/responses`` answer without ``stream``: OpenAI's Response (``usage.cost``
    added)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="`gen-<id>`: what `GET /v1/generation?id=` looks up.")
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any]
