"""Anthropic's error envelope, mapped from the one taxonomy (:mod:`orchestrator.errors`).

The table gives every code Anthropic's error type and status; it is pinned by
``tests/unit/golden/anthropic_error_codes.json`` and, like the OpenAI table, only grows.
Statuses are Anthropic's: its API has no 502 or 503, so an engine failure is 500
``api_error`` and a model or gateway that is briefly unable to serve is 529
``overloaded_error``, which Anthropic's SDKs retry.
"""

from __future__ import annotations

from typing import Any

from orchestrator.errors import ErrorCode, OrchestratorError

ANTHROPIC_ERRORS: dict[ErrorCode, tuple[str, int]] = {
    ErrorCode.INVALID_REQUEST: ("invalid_request_error", 400),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: ("invalid_request_error", 400),
    ErrorCode.CONTENT_FILTER: ("invalid_request_error", 400),
    ErrorCode.CAPABILITY_NOT_SUPPORTED: ("invalid_request_error", 400),
    ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT: ("invalid_request_error", 400),
    ErrorCode.STORAGE_LIMIT_EXCEEDED: ("invalid_request_error", 400),
    ErrorCode.MODEL_KIND_MISMATCH: ("invalid_request_error", 400),
    ErrorCode.INVALID_IMAGE: ("invalid_request_error", 400),
    ErrorCode.IMAGE_URL_NOT_ALLOWED: ("invalid_request_error", 400),
    ErrorCode.IMAGE_LIMIT_EXCEEDED: ("invalid_request_error", 400),
    ErrorCode.INVALID_API_KEY: ("authentication_error", 401),
    ErrorCode.INSUFFICIENT_CREDITS: ("billing_error", 402),
    ErrorCode.KEY_LIMIT_EXCEEDED: ("billing_error", 402),
    ErrorCode.MODEL_NOT_ALLOWED: ("permission_error", 403),
    ErrorCode.WORKSPACE_LOCKED: ("permission_error", 403),
    ErrorCode.MODEL_NOT_FOUND: ("not_found_error", 404),
    ErrorCode.NOT_FOUND: ("not_found_error", 404),
    ErrorCode.METHOD_NOT_ALLOWED: ("invalid_request_error", 405),
    ErrorCode.PAYLOAD_TOO_LARGE: ("request_too_large", 413),
    ErrorCode.RATE_LIMIT_EXCEEDED: ("rate_limit_error", 429),
    ErrorCode.PROVIDER_RATE_LIMIT: ("rate_limit_error", 429),
    ErrorCode.AUTHENTICATION_THROTTLED: ("rate_limit_error", 429),
    ErrorCode.INTERNAL_ERROR: ("api_error", 500),
    ErrorCode.PROVIDER_AUTH: ("api_error", 500),
    ErrorCode.PROVIDER_UNAVAILABLE: ("api_error", 500),
    ErrorCode.PROVIDER_TIMEOUT: ("timeout_error", 504),
    ErrorCode.PROVIDER_OVERLOADED: ("overloaded_error", 529),
    ErrorCode.MODEL_UNAVAILABLE: ("overloaded_error", 529),
    ErrorCode.SERVICE_UNAVAILABLE: ("overloaded_error", 529),
}


def anthropic_status(error: OrchestratorError) -> int:
    """The HTTP status of ``error`` on an Anthropic route."""
    return ANTHROPIC_ERRORS[error.code][1]


def anthropic_envelope(error: OrchestratorError, request_id: str | None) -> dict[str, Any]:
    """Returns ``{"type": "error", "error": {"type", "message", "code", "param"}, "request_id"}``:
    Anthropic's envelope, with the stable code and parameter of the OpenAI routes beside its type."""
    kind, _ = ANTHROPIC_ERRORS[error.code]
    return {
        "type": "error",
        "error": {"type": kind, "message": error.message, "code": error.code.value, "param": error.param},
        "request_id": request_id,
    }
