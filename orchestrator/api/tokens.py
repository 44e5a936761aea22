"""``POST /tokenize`` and ``POST /detokenize``: a model's tokenizer, as vLLM's server has
them, so that clients can count before they send.

They take the same key as the generation routes (the key's model scope applies) and are
free: nothing is generated, held, metered or billed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from orchestrator.api.auth import bearer_token
from orchestrator.api.backend import Backend
from orchestrator.api.contract import request_body
from orchestrator.api.generation import check_capabilities, read_json
from orchestrator.api.images import check_images
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.errors import OrchestratorError
from orchestrator.gateway.admission import check_model
from orchestrator.gateway.base import RequestGateway
from orchestrator.protocol.media import MediaPart, chat_media, media_capabilities
from orchestrator.protocol.tokens import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokensOp,
)


def check_media(parts: list[MediaPart], spec: ModelSpec) -> None:
    """Checks the media of messages to tokenize as a chat request's: the model must take
    images (and nothing else), and each image must pass :func:`check_images`, since the
    replica loads them to count their tokens.

    Raises:
        OrchestratorError: ``capability_not_supported``, or an image's error.
    """
    check_capabilities(media_capabilities(parts), spec)
    check_images(parts, spec)


def tokens_router(catalog: Catalog, backend: Backend, gateway: RequestGateway) -> APIRouter:
    """The tokenizer routes of every catalog model."""
    router = APIRouter()

    async def run(op: TokensOp, schema: type[BaseModel], request: Request) -> dict[str, Any]:
        key = await gateway.authenticate(bearer_token(request))  # 401 before anything about the body
        try:
            parsed: Any = schema.model_validate(await read_json(request))
        except ValidationError as exc:
            raise OrchestratorError.from_validation(exc) from None
        spec = catalog.resolve(parsed.model)
        check_model(key, spec.names)
        if isinstance(parsed, TokenizeRequest) and parsed.messages:
            check_media(list(chat_media(parsed.messages)), spec)
        return await backend.tokens(spec, op, {**parsed.forwarded(), "model": spec.name})

    @router.post(
        "/tokenize", response_model=TokenizeResponse, openapi_extra=request_body(TokenizeRequest, streams=False)
    )
    async def tokenize(request: Request) -> dict[str, Any]:
        """The token ids of a prompt, or of chat messages under the model's chat template
        (as vLLM's server has it). Free: nothing is generated, held or billed."""
        return await run("tokenize", TokenizeRequest, request)

    @router.post(
        "/detokenize", response_model=DetokenizeResponse, openapi_extra=request_body(DetokenizeRequest, streams=False)
    )
    async def detokenize(request: Request) -> dict[str, Any]:
        """The text of token ids of the model's vocabulary. Free."""
        return await run("detokenize", DetokenizeRequest, request)

    return router
