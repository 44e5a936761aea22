"""The model replica's chat output in Anthropic's shapes.

The replica answers a Messages request in OpenAI chat's shape (vLLM's Anthropic serving
turned it into a chat request), so that metering, settlement and cut-short billing read one
format on every dialect. Here, after the meter has seen it, a chat body becomes a Messages
body and a chat stream becomes Anthropic's events: ``message_start``, then per content block
``content_block_start``, its deltas and ``content_block_stop``, then ``message_delta`` (stop
reason and usage, ``cost`` included) and ``message_stop``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from orchestrator.api.anthropic.errors import anthropic_envelope
from orchestrator.api.sse import KEEPALIVE
from orchestrator.errors import OrchestratorError

PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n"


def stop_reason(finish_reason: str | None, matched: Any, tool_used: bool) -> tuple[str | None, str | None]:
    """Maps a chat finish reason (and vLLM's ``stop_reason``, the stop string matched) to
    Anthropic's ``(stop_reason, stop_sequence)``. A forced tool call finishes with ``stop``
    in chat; Anthropic reports ``tool_use`` whenever a tool was called."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason not in ("stop", "tool_calls"):
        return None, None
    if finish_reason == "tool_calls" or tool_used:
        return "tool_use", None
    if isinstance(matched, str):
        return "stop_sequence", matched
    return "end_turn", None


def usage(chat: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's usage from a chat usage block: ``input_tokens`` excludes the tokens read
    from the prefix cache (``cache_read_input_tokens``), as Anthropic counts them."""
    cached = int((chat.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    out: dict[str, Any] = {
        "input_tokens": max(int(chat.get("prompt_tokens") or 0) - cached, 0),
        "output_tokens": int(chat.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
    }
    if "cost" in chat:
        out["cost"] = chat["cost"]
    return out


def _tool_input(arguments: str) -> Any:
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}  # a call cut short (max_tokens): its stop reason says so


def message(chat: dict[str, Any]) -> dict[str, Any]:
    """Returns the Messages body of a whole chat completion (its usage already priced)."""
    choice = (chat.get("choices") or [{}])[0]
    said = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if said.get("reasoning"):
        content.append({"type": "thinking", "thinking": said["reasoning"], "signature": ""})
    if said.get("content"):
        content.append({"type": "text", "text": said["content"]})
    calls = said.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _tool_input(function.get("arguments", "")),
            }
        )
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), bool(calls))
    return {
        "id": chat["id"],
        "type": "message",
        "role": "assistant",
        "model": chat.get("model"),
        "content": content or [{"type": "text", "text": ""}],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(chat.get("usage") or {}),
    }


class MessageEvents:
    """Writes one stream's chat frames as Anthropic's events (a
    :class:`~orchestrator.api.sse.StreamWriter`).

    Args:
        usage_so_far: the meter's usage (the prompt's tokens are known from the first batch),
            for ``message_start``.
    """

    def __init__(self, usage_so_far: Callable[[], dict[str, Any]]) -> None:
        self._usage_so_far = usage_so_far
        self._started = False
        self._block: str | None = None  # the open block's type: text, thinking, tool_use
        self._index = -1
        self._tools: set[int] = set()  # the chat tool-call indexes with a block
        self._finish: str | None = None
        self._matched: Any = None

    @property
    def keepalive(self) -> bytes:
        """``ping`` once the stream has begun; before ``message_start`` (which Anthropic's
        streams always begin with) an SSE comment, which no client reads as an event."""
        return PING if self._started else KEEPALIVE

    def write(self, batch: list[str]) -> bytes:
        out: list[str] = []
        for frame in batch:
            chunk = json.loads(frame[6:])
            if not self._started:
                out.append(self._message_start(chunk))
            if not chunk.get("choices") and "usage" in chunk:
                out.extend(self._end(chunk["usage"]))
                continue
            for choice in chunk.get("choices") or ():
                out.extend(self._choice(choice))
        return "".join(out).encode()

    def _message_start(self, chunk: dict[str, Any]) -> str:
        self._started = True
        start = usage(self._usage_so_far())
        start["output_tokens"] = 0
        start.pop("cost", None)
        body: dict[str, Any] = {
            "id": chunk.get("id"),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start,
        }
        return _event("message_start", {"message": body})

    def _open(self, kind: str, block: dict[str, Any]) -> list[str]:
        out = self._close()
        self._index += 1
        self._block = kind
        out.append(_event("content_block_start", {"index": self._index, "content_block": block}))
        return out

    def _close(self) -> list[str]:
        if self._block is None:
            return []
        self._block = None
        return [_event("content_block_stop", {"index": self._index})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return _event("content_block_delta", {"index": self._index, "delta": delta})

    def _choice(self, choice: dict[str, Any]) -> list[str]:
        out: list[str] = []
        delta = choice.get("delta") or {}
        if delta.get("reasoning"):
            if self._block != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning"]}))
        if delta.get("content"):
            if self._block != "text":
                out += self._open("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or ():
            out += self._tool_call(call)
        if choice.get("finish_reason"):
            self._finish, self._matched = choice["finish_reason"], choice.get("stop_reason")
        return out

    def _tool_call(self, call: dict[str, Any]) -> list[str]:
        out: list[str] = []
        index = int(call.get("index") or 0)
        function = call.get("function") or {}
        if index not in self._tools:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": {},
            }
            out += self._open("tool_use", block)
            self._tools.add(index)
        if function.get("arguments"):
            # Anthropic sends one block at a time; chat streams a call's arguments after its start.
            out.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
        return out

    def _end(self, chat_usage: dict[str, Any]) -> list[str]:
        reason, sequence = stop_reason(self._finish, self._matched, bool(self._tools))
        out = self._close()
        out.append(
            _event(
                "message_delta",
                {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage(chat_usage)},
            )
        )
        out.append(_event("message_stop", {}))
        return out

    def error(self, error: OrchestratorError, request_id: str) -> bytes:
        return _event("error", {k: v for k, v in anthropic_envelope(error, request_id).items() if k != "type"}).encode()

    async def end(self) -> bytes:
        return b""
