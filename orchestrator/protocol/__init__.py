"""Wire models only: what clients send and what the router answers with."""

from orchestrator.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    StreamOptions,
    TextCompletion,
)

__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TextCompletion",
]
