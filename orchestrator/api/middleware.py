"""ASGI middleware (plain ASGI, so streaming and cancellation pass through untouched)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from orchestrator.api.errors import error_body, route_path
from orchestrator.errors import ErrorCode, OrchestratorError

Scope = dict[str, Any]


_SANE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Gives every request an id (``X-Request-Id`` on every response) and refuses bodies
    over ``max_body_bytes`` with 413 ``payload_too_large``, also for chunked uploads.

    A body is read whole before the app sees the request (every route reads it whole anyway):
    a limit hit while the app reads would reach FastAPI's body parsing as an unknown error,
    which it answers with 400.

    An incoming ``X-Request-Id`` is kept when it is a sane token: behind Ray Serve the proxy
    has already chosen the id and echoes it on the response itself, so there
    ``echo_header=False`` avoids a second header.

    ``headers`` are added to every response too (a model route's replica names itself in
    ``x-orch-replica``), through the same wrapper of ``send``; with nothing to add, ``send``
    is passed on unwrapped.
    """

    def __init__(
        self, app: Any, max_body_bytes: int, echo_header: bool = True, headers: Mapping[str, str] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.echo_header = echo_header
        self._headers = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"")
        request_id = incoming.decode() if _SANE_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # Latency and time to first token count from here, as the client sees them: body
        # reading, admission and routing included.
        state["arrived_at"] = time.monotonic()
        added = [*self._headers, (b"x-request-id", request_id.encode())] if self.echo_header else self._headers

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        sender = send_with_headers if added else send

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(sender, request_id, route_path(scope))
            return
        read = await self._read_body(receive)
        if read is None:
            await self._too_large(sender, request_id, scope.get("path", ""))
            return

        async def replay() -> dict[str, Any]:
            # The body as read, then the client's own messages (a disconnect, while streaming).
            return read.pop(0) if read else await receive()

        await self.app(scope, replay, sender)

    async def _read_body(self, receive: Any) -> list[dict[str, Any]] | None:
        """Returns the request's messages up to the end of its body (or a disconnect), or
        None once the body is larger than the limit."""
        messages: list[dict[str, Any]] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _too_large(self, send: Any, request_id: str, path: str) -> None:
        envelope, status = error_body(_too_large_error(self.max_body_bytes), request_id, path)
        body = json.dumps(envelope).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _too_large_error(limit: int) -> OrchestratorError:
    return OrchestratorError(ErrorCode.PAYLOAD_TOO_LARGE, f"Request body is larger than {limit} bytes.")
