"""The Engine protocol: what a ModelServer needs from an inference engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from orchestrator.protocol.tokens import TokensOp

# How a request body is written: OpenAI chat, OpenAI completions, Anthropic Messages, or
# OpenAI embeddings. A "messages" body is answered in OpenAI chat's shape; the API edge
# writes it in Anthropic's. An "embedding" body is answered whole (it never streams).
Kind = Literal["chat", "completion", "messages", "embedding"]


@dataclass(frozen=True)
class EngineLoad:
    """What an engine is doing: requests waiting for a batch slot, requests running,
    the share of KV cache in use (0..1) and how many sequences it runs at once."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    capacity: int = 1


class Engine(Protocol):
    """One model's inference engine. Constructors do no I/O; :meth:`start` does."""

    async def start(self) -> None:
        """Loads the model and starts the engine."""

    async def complete(self, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Returns the OpenAI response body, ``id`` = ``gen-<request_id>``, usage included.

        Raises:
            OrchestratorError: invalid input (4xx codes) or engine failure (5xx codes).
        """
        ...

    def stream(self, kind: Kind, body: dict[str, Any], request_id: str) -> AsyncIterator[str]:
        """Yields SSE frames (``"data: {...}\\n\\n"``): role, deltas, finish, and always a
        usage chunk last. Never yields ``[DONE]``. Closing the iterator aborts the request.

        Raises:
            OrchestratorError: invalid input before the first frame, or engine failure.
        """
        ...

    async def count_tokens(self, body: dict[str, Any]) -> int:
        """Returns the prompt tokens of an Anthropic Messages body as the model's chat template
        renders it (tools and system prompt included).

        Raises:
            OrchestratorError: invalid input (4xx codes).
        """
        ...

    async def tokens(self, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        """Returns vLLM's ``/tokenize`` or ``/detokenize`` answer (``op``) for the body.

        Raises:
            OrchestratorError: invalid input (4xx codes).
        """
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA adapter in folder ``path``; requests whose ``model`` is ``name`` run it.

        Raises:
            OrchestratorError: the adapter cannot be loaded (missing files, rank too large).
        """

    async def unload_adapter(self, name: str) -> None:
        """Unloads an adapter and frees its weights (nothing if it is not loaded)."""

    async def check_health(self) -> None:
        """Returns if the engine can serve; raises if it is dead."""

    def num_unfinished_requests(self) -> int:
        """Returns the requests waiting or running inside the engine."""
        ...

    def load(self) -> EngineLoad:
        """Returns the engine's current load (see :class:`EngineLoad`)."""
        ...

    async def shutdown(self) -> None:
        """Stops the engine and its worker processes."""
