"""The one place where failures become HTTP responses."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api.anthropic.errors import anthropic_envelope, anthropic_status
from orchestrator.errors import ErrorCode, OrchestratorError

logger = logging.getLogger(__name__)


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# Routes answered in Anthropic's dialect (on the router's /v1 and on each model's route).
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path within the app (without the prefix it is mounted under, such as a
    model's own route ``/models/<name>``)."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def error_body(error: OrchestratorError, request_id: str | None, path: str) -> tuple[dict[str, Any], int]:
    """Returns the error envelope and status for a request to ``path`` (within the app):
    Anthropic's on the Messages routes, OpenAI's everywhere else."""
    if path in ANTHROPIC_PATHS:
        return anthropic_envelope(error, request_id), anthropic_status(error)
    return error.to_dict(request_id), error.status


def error_response(error: OrchestratorError, request_id: str | None, path: str = "") -> JSONResponse:
    """Returns the error envelope of ``path``'s dialect with its status and the error's headers."""
    body, status = error_body(error, request_id, path)
    return JSONResponse(body, status_code=status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Registers handlers so that every failure leaves as the error envelope."""

    @app.exception_handler(OrchestratorError)
    async def _orchestrator(request: Request, exc: OrchestratorError) -> JSONResponse:
        return error_response(exc, request_id_of(request), route_path(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(OrchestratorError.from_validation(exc), request_id_of(request), route_path(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.INVALID_REQUEST
        )
        message = str(exc.detail)
        if code is not ErrorCode.INVALID_REQUEST:
            message = f"No route {request.method} {request.url.path}"
        # Starlette puts `Allow` on its 405s (RFC 9110 requires it); keep what it set.
        headers = dict(exc.headers or {})
        return error_response(
            OrchestratorError(code, message, headers=headers), request_id_of(request), route_path(request.scope)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback stays in the server log; the client gets a stable code only.
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = OrchestratorError(ErrorCode.INTERNAL_ERROR, "Internal error. Quote the request id when reporting it.")
        return error_response(error, request_id_of(request), route_path(request.scope))
