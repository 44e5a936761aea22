"""``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{response_id}``: OpenAI's
Responses over the shared generation path, with responses kept in the gateway's database
(per workspace; open mode keeps none)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from orchestrator.api.accounting import RequestMeter
from orchestrator.api.auth import bearer_token
from orchestrator.api.contract import request_body
from orchestrator.api.dialect import RESPONSES, Dialect
from orchestrator.api.generation import read_json
from orchestrator.api.responses.translate import ResponseEvents, response
from orchestrator.api.sse import StreamWriter
from orchestrator.errors import OrchestratorError
from orchestrator.gateway.base import RequestGateway
from orchestrator.protocol.responses import ResponseObject, ResponsesRequest

logger = logging.getLogger(__name__)
Run = Callable[..., Awaitable[Response]]
_EVENTS = (
    "The Responses events: `response.created`, `response.in_progress`, per output item "
    "`response.output_item.added`, its `response.output_text.delta`s or "
    "`response.function_call_arguments.delta`s and `response.output_item.done`, then "
    "`response.completed` (or `response.incomplete`) with the usage and `cost`; "
    "`response.failed` if it fails part-way."
)
_ID = Path(description="A response's id, `gen-...`.")


class Exchange:
    """One Responses request: the conversation it continues and, when it is kept, where.

    Args:
        gateway: keeps responses (with keys) or nothing (open mode).
        api_key: the caller's key.
        history: the items of the conversation ``previous_response_id`` ended, or none.
        keep: whether the answer is stored.
    """

    def __init__(self, gateway: RequestGateway, api_key: str | None, history: list[dict[str, Any]], keep: bool) -> None:
        self._gateway = gateway
        self._api_key = api_key
        self._history = history
        self._keep = keep
        self.input: list[dict[str, Any]] = []  # this turn's whole input: history, then the new items
        self.dialect: Dialect = dataclasses.replace(RESPONSES, respond=self._respond, events=self._events)

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request body with the conversation's earlier items before its own input."""
        given = body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else given
        if not isinstance(items, list):
            return body  # invalid: refused by the request model with its own message
        self.input = [*self._history, *items]
        return {**body, "input": self.input} if self._history else body

    async def store(self, answer: dict[str, Any]) -> bool:
        """Keeps the answer with its input; returns whether it was kept."""
        try:
            await self._gateway.keep_response(self._api_key, answer, self.input)
        except OrchestratorError as exc:  # full since the check before generating, or a brief outage
            logger.warning("response %s not stored: %s", answer.get("id"), exc.message)
            return False
        return True

    async def _respond(self, chat: dict[str, Any], parsed: ResponsesRequest) -> dict[str, Any]:
        answer = response(chat, parsed, stored=self._keep)
        if self._keep and not await self.store(answer):
            answer["store"] = False
        return answer

    def _events(self, meter: RequestMeter, parsed: ResponsesRequest) -> StreamWriter:
        return ResponseEvents(parsed, keep=self.store if self._keep else None)


def responses_router(run: Run, gateway: RequestGateway, *, keeps: bool) -> APIRouter:
    """The Responses routes; ``run`` is the generation path every dialect shares, ``keeps``
    whether the gateway stores responses (it does with API keys)."""
    router = APIRouter()

    @router.post("/v1/responses", response_model=ResponseObject, openapi_extra=request_body(ResponsesRequest, _EVENTS))
    async def create_response(request: Request) -> Response:
        """OpenAI Responses, streaming (the Responses events) when `stream` is true."""
        body = await read_json(request)
        previous = body.get("previous_response_id")
        keep = keeps and body.get("store", True) is True
        history: list[dict[str, Any]] = []
        if keep or isinstance(previous, str):
            # The key is checked here first, as on every route; a bad one gets its 401.
            key = bearer_token(request)
            history = await gateway.response_context(key, previous if isinstance(previous, str) else None, keep)
        exchange = Exchange(gateway, bearer_token(request), history, keep)
        return await run(exchange.dialect, request, body=exchange.body(body))

    @router.get("/v1/responses/{response_id}", response_model=ResponseObject)
    async def get_response(request: Request, response_id: str = _ID) -> dict[str, Any]:
        """A stored response of the key's workspace (another workspace's is 404)."""
        return await gateway.stored_response(bearer_token(request), response_id)

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str = _ID) -> dict[str, Any]:
        """Forgets a stored response of the key's workspace (another workspace's is 404)."""
        await gateway.forget_response(bearer_token(request), response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    return router
