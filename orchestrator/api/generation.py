"""``POST /v1/chat/completions`` and ``POST /v1/completions``."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from orchestrator.api.backend import Backend, Kind
from orchestrator.api.sse import StreamHead, drive
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.protocol import ChatCompletionRequest, CompletionRequest
from orchestrator.settings import Settings

_SCHEMAS: dict[Kind, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request) -> dict[str, Any]:
    """Returns the JSON object body.

    Raises:
        OrchestratorError: ``invalid_request`` for malformed JSON or a non-object body.
    """
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, "Request body must be a JSON object.")
    return body


def admit(kind: Kind, body: dict[str, Any], catalog: Catalog) -> ModelSpec:
    """Validates a generation body and resolves its model.

    Returns:
        The catalog entry the body's ``model`` names.

    Raises:
        OrchestratorError: ``invalid_request`` (naming the parameter), ``model_not_found``,
        or ``context_length_exceeded`` when the output budget alone exceeds the window.
    """
    try:
        parsed = _SCHEMAS[kind].model_validate(body)
    except ValidationError as exc:
        raise OrchestratorError.from_validation(exc) from None
    spec = catalog.resolve(parsed.model)
    budget = parsed.output_budget()
    if budget is not None and budget >= spec.context_window:
        param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        raise OrchestratorError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's context window is {spec.context_window} tokens; "
            f"{param}={budget} leaves no room for the prompt.",
            param=param,
        )
    return spec


async def generate(kind: Kind, request: Request, *, catalog: Catalog, backend: Backend, settings: Settings) -> Response:
    """Runs one generation request end to end and returns its HTTP response."""
    request_id: str = request.state.request_id
    body = await read_json(request)
    spec = admit(kind, body, catalog)
    body["model"] = spec.name
    if not body.get("stream"):
        result = await backend.complete(spec, kind, body, request_id)
        return JSONResponse(result)
    head = StreamHead(backend.stream(spec, kind, body, request_id))
    try:
        await head.wait(settings.keepalive_seconds)
    except BaseException:
        head.cancel()
        raise
    return StreamingResponse(
        drive(head, request_id=request_id, keepalive_s=settings.keepalive_seconds),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )
