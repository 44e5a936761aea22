"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API
over the same generation path as OpenAI's routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from orchestrator.api.auth import bearer_token
from orchestrator.api.backend import Backend
from orchestrator.api.contract import request_body
from orchestrator.api.dialect import COUNT_TOKENS, MESSAGES, Dialect
from orchestrator.api.generation import parse, read_json
from orchestrator.catalog import Catalog
from orchestrator.gateway.admission import check_model
from orchestrator.gateway.base import RequestGateway
from orchestrator.protocol.anthropic import CountTokensRequest, CountTokensResponse, MessageResponse, MessagesRequest

_EVENTS = (
    "Anthropic's events: `message_start`, per content block `content_block_start`, its "
    "`content_block_delta`s and `content_block_stop`, then `message_delta` (stop reason, usage with "
    "`cost`) and `message_stop`; `ping` while the model is silent; `error` if it fails part-way."
)


def messages_router(
    run: Callable[[Dialect, Request], Awaitable[Response]],
    catalog: Catalog,
    backend: Backend,
    gateway: RequestGateway,
) -> APIRouter:
    """The Messages routes; ``run`` is the generation path every dialect shares."""
    router = APIRouter()

    @router.post("/v1/messages", response_model=MessageResponse, openapi_extra=request_body(MessagesRequest, _EVENTS))
    async def create_message(request: Request) -> Response:
        """Anthropic Messages, streaming (Anthropic's events) when `stream` is true."""
        return await run(MESSAGES, request)

    @router.post(
        "/v1/messages/count_tokens",
        response_model=CountTokensResponse,
        openapi_extra=request_body(CountTokensRequest, streams=False),
    )
    async def count_tokens(request: Request) -> CountTokensResponse:
        """The prompt's tokens as the model's chat template renders it (system prompt and
        tools included). Free: nothing is generated, held or billed."""
        key = await gateway.authenticate(bearer_token(request))
        parsed, spec = parse(COUNT_TOKENS, await read_json(request), catalog)
        check_model(key, spec.names)
        body = {**parsed.forwarded(), "model": spec.name}
        return CountTokensResponse(input_tokens=await backend.count_tokens(spec, body))

    return router
