"""The dialects a generation can be asked in: OpenAI chat, completions, Responses and
embeddings, and Anthropic Messages. Every dialect runs the same path (:func:`orchestrator.api.generation.generate`:
keys, limits, holds, metering, settlement); a dialect only says how its body is checked and
forwarded and how the replica's chat output is written back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from orchestrator.api.accounting import RequestMeter
from orchestrator.api.anthropic.translate import MessageEvents, message
from orchestrator.api.responses.translate import ResponseEvents, response
from orchestrator.api.sse import OpenAIEvents, StreamWriter
from orchestrator.catalog import ModelSpec
from orchestrator.engine.base import Kind
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.protocol import ChatCompletionRequest, CompletionRequest
from orchestrator.protocol.anthropic import CountTokensRequest, MessagesRequest
from orchestrator.protocol.embeddings import EmbeddingRequest, input_tokens
from orchestrator.protocol.openai import prompt_count
from orchestrator.protocol.responses import ResponsesRequest


async def _as_is(body: dict[str, Any], parsed: Any) -> dict[str, Any]:
    return body


async def _message(body: dict[str, Any], parsed: Any) -> dict[str, Any]:
    return message(body)


async def _response(body: dict[str, Any], parsed: Any) -> dict[str, Any]:
    return response(body, parsed)


def _no_check(parsed: Any, spec: ModelSpec) -> None:
    return None


def _embedding_batch(parsed: Any, spec: ModelSpec) -> None:
    """An embeddings request within the model's bounds (inputs; tokens, where given as ids:
    the replica counts text once it has tokenized it)."""
    count, bounds = prompt_count(parsed.input), spec.embedding
    if count > bounds.max_inputs:
        raise OrchestratorError(
            ErrorCode.INVALID_REQUEST,
            f"Model {spec.name} takes at most {bounds.max_inputs} inputs per request; this one has {count}. "
            "Split the batch.",
            param="input",
        )
    tokens = input_tokens(parsed.input)
    if tokens > bounds.max_tokens:
        raise OrchestratorError(
            ErrorCode.INVALID_REQUEST,
            f"Model {spec.name} takes at most {bounds.max_tokens} tokens per request; this one has {tokens}. "
            "Split the batch.",
            param="input",
        )


def _openai_events(meter: RequestMeter, parsed: Any) -> StreamWriter:
    return OpenAIEvents()


def _message_events(meter: RequestMeter, parsed: Any) -> StreamWriter:
    return MessageEvents(lambda: meter.usage)


def _response_events(meter: RequestMeter, parsed: Any) -> StreamWriter:
    return ResponseEvents(parsed)


@dataclass(frozen=True)
class Dialect:
    """One generation route.

    Attributes:
        kind: how the model replica reads the forwarded body.
        route: the API path (a metrics label).
        schema: the request model the router checks the body with; it has
            ``output_budget()`` and ``capabilities_used()``.
        respond: writes a whole (metered) response in the dialect, given the parsed request.
        events: makes the writer of one stream in the dialect, given its meter and the
            parsed request.
        check: raises ``OrchestratorError`` for a parsed request the model cannot take
            (embeddings: the entry's batch bound).
    """

    kind: Kind
    route: str
    schema: type[BaseModel]
    respond: Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]] = field(default=_as_is)
    events: Callable[[RequestMeter, Any], StreamWriter] = field(default=_openai_events)
    check: Callable[[Any, ModelSpec], None] = field(default=_no_check)

    @property
    def task(self) -> str:
        """The catalog ``task`` of the models this route serves."""
        return "embed" if self.kind == "embedding" else "generate"

    @property
    def streams(self) -> bool:
        """Whether ``stream: true`` asks for an event stream (embeddings are always whole)."""
        return self.kind != "embedding"

    @property
    def first_token_batch(self) -> int:
        """The stream batch with the first token: chat's first frame is the role alone."""
        return 0 if self.kind == "completion" else 1

    def forwarded(self, parsed: Any, body: dict[str, Any]) -> dict[str, Any]:
        """The body the model replica gets: OpenAI chat's and completions' as sent (vLLM's
        extensions pass), Anthropic's with its own fields only, Responses' as a chat body."""
        # Looked up on the class: a body field named `forwarded` is an attribute of the instance.
        forwarded = getattr(type(parsed), "forwarded", None)
        return forwarded(parsed) if forwarded is not None else body


CHAT = Dialect("chat", "/v1/chat/completions", ChatCompletionRequest)
COMPLETION = Dialect("completion", "/v1/completions", CompletionRequest)
MESSAGES = Dialect("messages", "/v1/messages", MessagesRequest, respond=_message, events=_message_events)
# Keeps nothing: the route (api/responses/routes.py) makes one per request that stores.
RESPONSES = Dialect("chat", "/v1/responses", ResponsesRequest, respond=_response, events=_response_events)
EMBEDDINGS = Dialect("embedding", "/v1/embeddings", EmbeddingRequest, check=_embedding_batch)
COUNT_TOKENS = Dialect("messages", "/v1/messages/count_tokens", CountTokensRequest)  # checked, never generated
