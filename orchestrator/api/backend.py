"""What the HTTP layer needs from whatever runs the models.

In production this is the Router deployment talking to ModelServer replicas through Ray
Serve handles; unit tests use a small deterministic fake (tests/fakes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

from pydantic import BaseModel, Field

from orchestrator.catalog import ModelSpec
from orchestrator.engine.base import Kind
from orchestrator.protocol.tokens import TokensOp

__all__ = ["Backend", "ChunkStream", "GeneratorStream", "Kind", "ModelHealth"]


class ModelHealth(BaseModel):
    """One model's readiness, from state the router already holds (no engine call)."""

    ready: bool = Field(description="Requests to this model can be served (a replica runs, or it starts on demand).")
    state: str = Field(description="`serving`, `scaled_to_zero`, `starting`, `unhealthy` or `unknown`.")
    replicas: int = Field(default=0, description="Running replicas.")
    reason: str = Field(default="", description="Why it is not ready (Serve's message), if it is not.")


class ChunkStream(Protocol):
    """Batches of SSE frames (``"data: {...}\\n\\n"`` strings) from one generation.

    The stream never yields ``data: [DONE]`` (the edge adds it) and always yields the
    usage chunk last. Failures are raised as :class:`~orchestrator.errors.OrchestratorError`.
    """

    def __aiter__(self) -> AsyncIterator[list[str]]: ...

    def __anext__(self) -> Any: ...

    def cancel(self) -> None:
        """Stops the generation upstream (the engine aborts the request)."""


class GeneratorStream:
    """A :class:`ChunkStream` over an async generator of batches in this process.

    The edge cancels the task reading a stream before it calls :meth:`cancel`, and that
    cancellation closes the generator (its ``finally`` aborts the request); :meth:`cancel`
    closes a generator that no task is reading.
    """

    def __init__(self, source: AsyncGenerator[list[str]]) -> None:
        self._source = source
        self._closing: asyncio.Future[None] | None = None

    def __aiter__(self) -> GeneratorStream:
        return self

    async def __anext__(self) -> list[str]:
        return await anext(self._source)

    def cancel(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        # RuntimeError: it is still being read, and the reader's cancellation closes it.
        with contextlib.suppress(RuntimeError):
            await self._source.aclose()


class Backend(Protocol):
    """Runs generations on catalog models."""

    async def complete(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Returns the whole OpenAI response body (``id`` = ``gen-<request_id>``).

        Raises:
            OrchestratorError: on bad input (4xx codes) or engine failure (5xx codes).
        """
        ...

    def stream(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> ChunkStream:
        """Starts a streaming generation; see :class:`ChunkStream`."""
        ...

    async def count_tokens(self, spec: ModelSpec, body: dict[str, Any]) -> int:
        """Returns the prompt tokens of an Anthropic Messages body under the model's chat template.

        Raises:
            OrchestratorError: on bad input (4xx codes) or when no replica answers (5xx codes).
        """
        ...

    async def tokens(self, spec: ModelSpec, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        """Returns vLLM's ``/tokenize`` or ``/detokenize`` answer (``op``) for a body the
        router validated (:mod:`orchestrator.protocol.tokens`).

        Raises:
            OrchestratorError: on bad input (4xx codes) or when no replica answers (5xx codes).
        """
        ...

    def health(self) -> dict[str, ModelHealth]:
        """Returns every model's readiness (by display name) from state already at hand: it
        must not call an engine, so probes never wake a model scaled to zero."""
        ...
