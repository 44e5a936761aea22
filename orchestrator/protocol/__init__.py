"""Wire models only: what clients send and what the router answers with."""

from orchestrator.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    StreamOptions,
)

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ModelCard", "ModelList", "StreamOptions"]
