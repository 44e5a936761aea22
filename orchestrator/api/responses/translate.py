"""The model replica's chat output as a Response and as the Responses stream events.

A whole chat completion becomes a Response whose ``output`` holds a ``message`` item (its
text) and a ``function_call`` item per tool call. A chat stream becomes ``response.created``
and ``response.in_progress``, then per output item ``response.output_item.added``, its
content events (``response.output_text.delta`` or ``response.function_call_arguments.delta``)
and ``response.output_item.done``, then ``response.completed`` (or ``response.incomplete``
when the output budget ran out) with the usage, ``cost`` included; a failure part-way ends
with ``response.failed``. Ids are the generation's ``gen-`` id, so that
``GET /v1/generation`` finds every response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.api.sse import KEEPALIVE
from orchestrator.errors import OrchestratorError
from orchestrator.protocol.responses import ResponsesRequest


def usage(chat: dict[str, Any]) -> dict[str, Any]:
    """The Responses usage of a chat usage block."""
    prompt = int(chat.get("prompt_tokens") or 0)
    completion = int(chat.get("completion_tokens") or 0)
    out: dict[str, Any] = {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": int((chat.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": int((chat.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        },
        "total_tokens": prompt + completion,
    }
    if "cost" in chat:
        out["cost"] = chat["cost"]
    return out


def envelope(request: ResponsesRequest, response_id: str, model: str, created: int, stored: bool) -> dict[str, Any]:
    """The Response object's fields that echo the request, with no output yet."""
    fmt = request.text.format if request.text and request.text.format else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "model": model,
        "output": [],
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "metadata": request.metadata or {},
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "store": stored,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": _tool_choice(request),
        "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
        "user": request.user,
        "usage": None,
    }


def _tool_choice(request: ResponsesRequest) -> Any:
    choice = request.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": [part]}


def _call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.get("id") or item_id,
        "name": function.get("name"),
        "arguments": function.get("arguments") or "",
        "status": status,
    }


def _finish(body: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    if finish_reason == "length":
        body.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    else:
        body["status"] = "completed"
    return body


def response(chat: dict[str, Any], request: ResponsesRequest, stored: bool = False) -> dict[str, Any]:
    """Returns the Response of a whole (metered) chat completion; ``stored``: it is kept."""
    created = int(chat.get("created") or time.time())
    body = envelope(request, chat["id"], chat.get("model", request.model), created, stored)
    choice = (chat.get("choices") or [{}])[0]
    said = choice.get("message") or {}
    if said.get("content"):
        body["output"].append(_message_item(f"msg-{chat['id']}", said["content"]))
    for number, call in enumerate(said.get("tool_calls") or ()):
        body["output"].append(_call_item(f"fc-{number}-{chat['id']}", call))
    body["usage"] = usage(chat.get("usage") or {})
    return _finish(body, choice.get("finish_reason"))


class ResponseEvents:
    """Writes one stream's chat frames as the Responses events (a
    :class:`~orchestrator.api.sse.StreamWriter`).

    Args:
        request: the parsed request (echoed in the Response).
        keep: stores the finished Response; its ``response.completed`` event is sent only
            once that returned, so a client that reads it finds the response stored.
    """

    keepalive = KEEPALIVE

    def __init__(
        self,
        request: ResponsesRequest,
        keep: Callable[[dict[str, Any]], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._request = request
        self._keep = keep
        self._last: tuple[str, dict[str, Any]] | None = None  # the final event, held for `end`
        self._clock = clock
        self._body: dict[str, Any] | None = None
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the output item being written
        self._calls: set[int] = set()  # the chat tool-call indexes with an output item
        self._finish: str | None = None

    def _event(self, kind: str, payload: dict[str, Any]) -> str:
        data = json.dumps({"type": kind, "sequence_number": self._sequence, **payload}, separators=(",", ":"))
        self._sequence += 1
        return f"event: {kind}\ndata: {data}\n\n"

    def write(self, batch: list[str]) -> bytes:
        out: list[str] = []
        for frame in batch:
            chunk = json.loads(frame[6:])
            if self._body is None:
                out += self._start(chunk)
            if not chunk.get("choices") and "usage" in chunk:
                out += self._end(chunk["usage"])
                continue
            for choice in chunk.get("choices") or ():
                out += self._choice(choice)
        return "".join(out).encode()

    def _start(self, chunk: dict[str, Any]) -> list[str]:
        created = int(chunk.get("created") or self._clock())
        model = chunk.get("model", self._request.model)
        self._body = envelope(self._request, chunk["id"], model, created, self._keep is not None)
        return [
            self._event("response.created", {"response": self._body}),
            self._event("response.in_progress", {"response": self._body}),
        ]

    def _index(self) -> int:
        assert self._body is not None
        return len(self._body["output"])

    def _add(self, item: dict[str, Any]) -> list[str]:
        out = self._close()
        self._open = item
        return [*out, self._event("response.output_item.added", {"output_index": self._index(), "item": item})]

    def _close(self) -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        assert self._body is not None
        index = self._index()
        item["status"] = "completed"
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(self._event("response.output_text.done", {**ids, "text": part["text"], "logprobs": []}))
            out.append(self._event("response.content_part.done", {**ids, "part": part}))
        else:
            ids = {"item_id": item["id"], "output_index": index}
            out.append(self._event("response.function_call_arguments.done", {**ids, "arguments": item["arguments"]}))
        out.append(self._event("response.output_item.done", {"output_index": index, "item": item}))
        self._body["output"].append(item)
        return out

    def _choice(self, choice: dict[str, Any]) -> list[str]:
        out: list[str] = []
        delta = choice.get("delta") or {}
        if delta.get("content"):
            out += self._text(delta["content"])
        for call in delta.get("tool_calls") or ():
            out += self._call(call)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        return out

    def _text(self, text: str) -> list[str]:
        out: list[str] = []
        assert self._body is not None
        if self._open is None or self._open["type"] != "message":
            item = _message_item(f"msg-{self._body['id']}-{self._index()}", "", status="in_progress")
            item["content"] = []
            out += self._add(item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            ids = {"item_id": item["id"], "output_index": self._index(), "content_index": 0}
            out.append(self._event("response.content_part.added", {**ids, "part": dict(part)}))
            item["content"].append(part)
        assert self._open is not None
        self._open["content"][0]["text"] += text
        ids = {"item_id": self._open["id"], "output_index": self._index(), "content_index": 0}
        out.append(self._event("response.output_text.delta", {**ids, "delta": text, "logprobs": []}))
        return out

    def _call(self, call: dict[str, Any]) -> list[str]:
        out: list[str] = []
        assert self._body is not None
        index = int(call.get("index") or 0)
        if index not in self._calls:
            item = _call_item(f"fc-{index}-{self._body['id']}", call, status="in_progress")
            item["arguments"] = ""
            out += self._add(item)
            self._calls.add(index)
        arguments = (call.get("function") or {}).get("arguments")
        if arguments and self._open is not None:
            self._open["arguments"] += arguments
            ids = {"item_id": self._open["id"], "output_index": self._index()}
            out.append(self._event("response.function_call_arguments.delta", {**ids, "delta": arguments}))
        return out

    def _end(self, chat_usage: dict[str, Any]) -> list[str]:
        out = self._close()
        assert self._body is not None
        body = _finish(self._body, self._finish)
        body["usage"] = usage(chat_usage)
        self._last = ("response.incomplete" if body["status"] == "incomplete" else "response.completed", body)
        return out

    def error(self, error: OrchestratorError, request_id: str) -> bytes:
        body = self._body or envelope(self._request, "", self._request.model, int(self._clock()), False)
        body = {**body, "status": "failed", "error": {"code": error.code.value, "message": error.message}}
        return self._event("response.failed", {"response": body}).encode()

    async def end(self) -> bytes:
        """The final event (completed or incomplete), once the Response is stored."""
        if self._last is None:
            return b""
        kind, body = self._last
        if self._keep is not None and not await self._keep(body):
            body["store"] = False
        return self._event(kind, {"response": body}).encode()
