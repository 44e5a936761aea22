"""Server-sent-event framing and the stream driver that ends every stream properly.

Every stream the router answers ends with either its last event (OpenAI's usage chunk,
Anthropic's ``message_stop``, Responses' ``response.completed``) or an error event, then the
dialect's end (OpenAI's ``data: [DONE]``). While the upstream is silent the dialect's
keep-alive (a ``: keep-alive`` comment, Anthropic's ``ping`` event) is sent every
``keepalive_s`` seconds so proxies do not cut long prefill or queueing waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from orchestrator.api.backend import ChunkStream
from orchestrator.errors import ErrorCode, OrchestratorError, find_error

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


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


class StreamWriter(Protocol):
    """Writes a stream in the client's dialect: the (metered) chat or completion frames, a
    failure's final event, the closing line, and the keep-alive sent while it is silent."""

    @property
    def keepalive(self) -> bytes:
        """What is sent while the stream is silent (read each time it is sent)."""
        ...

    def write(self, batch: list[str]) -> bytes:
        """Returns the bytes the client gets for a batch of frames."""
        ...

    def error(self, error: OrchestratorError, request_id: str) -> bytes:
        """Returns the final event of a stream that failed part-way."""
        ...

    async def end(self) -> bytes:
        """Returns what follows the last frame (OpenAI's ``data: [DONE]``; a dialect may hold
        its final event back until what must precede it is done)."""
        ...


class OpenAIEvents:
    """OpenAI's streams: the frames as they are, an error event, then ``data: [DONE]``."""

    keepalive = KEEPALIVE

    def write(self, batch: list[str]) -> bytes:
        return "".join(batch).encode()

    def error(self, error: OrchestratorError, request_id: str) -> bytes:
        return error_frame(error, request_id)

    async def end(self) -> bytes:
        return DONE


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


class EventStreamResponse(StreamingResponse):
    """An SSE response that sends a ``: keep-alive`` comment whenever its body has been silent
    for ``keepalive_s``: one timer task per response rather than a timeout around every
    frame and a task hand-off to apply it, which together were about half of what our code
    added per streamed frame (``benchmarks/experiments/stream_app.py``, docs/ARCHITECTURE.md)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        keepalive_s: float,
        headers: dict[str, str],
        keepalive: Callable[[], bytes] = lambda: KEEPALIVE,
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.keepalive_s = keepalive_s
        self.keepalive = keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Sends the response; a :class:`StreamDriver` body is closed however this ends
        (completed, the client gone, a send failing, cancelled before the body's first step)."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            if isinstance(self.body_iterator, StreamDriver):
                self.body_iterator.close()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        loop = asyncio.get_running_loop()
        sending = asyncio.Lock()  # a keep-alive and a frame never interleave in one send
        last = loop.time()

        async def keepalive() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(last + self.keepalive_s - loop.time())
                if loop.time() - last >= self.keepalive_s:
                    async with sending:
                        await send({"type": "http.response.body", "body": self.keepalive(), "more_body": True})
                    last = loop.time()

        timer = asyncio.create_task(keepalive())
        # Should a keep-alive's send raise (a server that raises once the client has gone),
        # the next frame's send or the disconnect ends the response: the timer's error is
        # only retrieved here, so that it is not logged as never retrieved.
        timer.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            async for chunk in self.body_iterator:
                last = loop.time()
                async with sending:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            timer.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class StreamDriver:
    """The body of a streaming response (an async iterator of bytes, made by :func:`drive`)
    that ends its stream exactly once: ``finish`` after the last frame, or, when the
    response stops early, ``abandon`` and the upstream cancelled. :meth:`close` does the
    latter unless the stream already ended, also when the body never took a step: an async
    generator cancelled before its first step never runs its ``finally``, so
    :class:`EventStreamResponse` calls :meth:`close` whenever it stops.
    """

    def __init__(
        self,
        head: StreamHead,
        *,
        request_id: str,
        observer: StreamObserver | None = None,
        writer: StreamWriter | None = None,
    ) -> None:
        self.head = head
        self.request_id = request_id
        self.observer = observer
        self.writer = writer or OpenAIEvents()
        self.ended = False
        self._body = self._frames()

    def __aiter__(self) -> StreamDriver:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._body.__anext__()

    async def aclose(self) -> None:
        """Closes the body (ending the stream as abandoned, unless it ended)."""
        self.close()
        await self._body.aclose()

    def close(self) -> None:
        """Abandons the stream unless it ended: stops the generation upstream and tells the
        observer. Synchronous (it runs while the response is being cancelled); idempotent."""
        if self.ended:
            return
        self.ended = True
        self.head.cancel()
        if self.observer is not None:
            self.observer.abandon()

    async def _frames(self) -> AsyncGenerator[bytes]:
        error: OrchestratorError | None = None
        batches = self.head.batches()
        try:
            while True:
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    error = as_orchestrator_error(exc)
                    yield self.writer.error(error, self.request_id)
                    break
                if self.observer is not None:
                    batch = self.observer.on_batch(batch)
                yield self.writer.write(batch)
            self.ended = True
            if self.observer is not None:
                self.observer.finish(error)
            yield await self.writer.end()
        finally:
            # Unless it ended: the client went away, so stop the generation in the engine.
            self.close()


def drive(
    head: StreamHead,
    *,
    request_id: str,
    observer: StreamObserver | None = None,
    writer: StreamWriter | None = None,
) -> StreamDriver:
    """Returns the body of a streaming response: upstream frames, an error event if it fails
    part-way, and always the dialect's end (OpenAI's ``data: [DONE]``) last. Keep-alives while
    the upstream is silent are :class:`EventStreamResponse`'s, and so is closing the body
    however the response ends.

    Args:
        head: the started upstream stream.
        request_id: for the error event.
        observer: sees every batch, then exactly one of ``finish`` or ``abandon``.
        writer: the client's dialect (OpenAI's by default).
    """
    return StreamDriver(head, request_id=request_id, observer=observer, writer=writer)
