"""Server-sent-event framing and the stream driver that ends every stream properly.

Every stream the router answers ends with either the usage chunk or an error event,
then ``data: [DONE]``. While the upstream is silent a ``: keep-alive`` comment is sent
every ``keepalive_s`` seconds so proxies do not cut long prefill or queueing waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from orchestrator.api.backend import ChunkStream
from orchestrator.errors import ErrorCode, OrchestratorError, find_error

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
_END = object()


def frame(payload: dict[str, Any]) -> str:
    """Returns one SSE data frame for a JSON payload."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def error_frame(error: OrchestratorError, request_id: str) -> bytes:
    """Returns the final SSE event of a stream that failed after it began."""
    return frame(error.to_dict(request_id)).encode()


def as_orchestrator_error(exc: BaseException) -> OrchestratorError:
    """Maps any upstream failure to the taxonomy (unknown failures: provider_unavailable)."""
    found = find_error(exc)
    if found is not None:
        return found
    return OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The model backend failed while generating.")


class StreamObserver(Protocol):
    """Sees a stream pass (metering): every batch, then exactly one of its two endings."""

    def on_batch(self, batch: list[str]) -> list[str]:
        """Returns the batch as the client gets it."""
        ...

    def finish(self, error: OrchestratorError | None) -> None:
        """The stream ended (``error`` if it failed part-way); called before ``[DONE]``."""

    def abandon(self) -> None:
        """The client went away mid-stream (must not block: the task is being cancelled)."""


class StreamHead:
    """The first batch of a stream, awaited before the HTTP status is committed so that early
    failures (bad input, a dead engine) still get a proper 4xx/5xx response."""

    def __init__(self, stream: ChunkStream) -> None:
        self.stream = stream
        self._task: asyncio.Future[list[str]] = asyncio.ensure_future(anext(stream))

    async def wait(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for the first batch (longer waits continue inside the
        response, with keep-alives).

        Raises:
            OrchestratorError: the upstream failed before sending anything.
        """
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if done and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None and not isinstance(exc, StopAsyncIteration):
                raise as_orchestrator_error(exc) from exc

    def cancel(self) -> None:
        """Abandons the stream before any response started."""
        self._task.cancel()
        self.stream.cancel()

    async def batches(self) -> AsyncIterator[list[str]]:
        """Yields the first batch, then the rest of the stream."""
        try:
            yield await self._task
        except StopAsyncIteration:
            return
        async for batch in self.stream:
            yield batch


async def drive(
    head: StreamHead,
    *,
    request_id: str,
    keepalive_s: float,
    observer: StreamObserver | None = None,
) -> AsyncIterator[bytes]:
    """Yields the body of a streaming response: upstream frames, keep-alives while it is
    silent, an error event if it fails part-way, and always ``data: [DONE]`` last.

    Args:
        head: the started upstream stream.
        request_id: for the error event.
        keepalive_s: interval of keep-alive comments while the upstream is silent.
        observer: sees every batch, then ``finish`` or ``abandon``.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for batch in head.batches():
                queue.put_nowait(batch)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    finished = False
    error: OrchestratorError | None = None
    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(keepalive_s):
                    item = await queue.get()
            except TimeoutError:
                yield KEEPALIVE
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                error = as_orchestrator_error(item)
                yield error_frame(error, request_id)
                break
            if observer is not None:
                item = observer.on_batch(item)
            yield "".join(item).encode()
        finished = True
        if observer is not None:
            observer.finish(error)
        yield DONE
    finally:
        if not task.done():
            task.cancel()
        if not finished:
            # The client went away: stop the generation inside the engine.
            head.stream.cancel()
            if observer is not None:
                observer.abandon()
