"""The one error taxonomy of the orchestrator.

Every failure a client can see is an :class:`OrchestratorError` carrying an
:class:`ErrorCode`. Code raises it anywhere; the API edge (``orchestrator.api.errors``)
is the only place that turns it into an HTTP response or a final SSE error event.
The code -> status table is pinned by ``tests/unit/golden/error_codes.json``: codes are
only ever added, never renamed or re-mapped.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar


class ErrorCode(StrEnum):
    """Stable, snake_case error codes (the ``error.code`` field of the envelope)."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CONTENT_FILTER = "content_filter"
    INVALID_API_KEY = "invalid_api_key"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    KEY_LIMIT_EXCEEDED = "key_limit_exceeded"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    WORKSPACE_LOCKED = "workspace_locked"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    PROVIDER_RATE_LIMIT = "provider_rate_limit"
    INTERNAL_ERROR = "internal_error"
    PROVIDER_AUTH = "provider_auth"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_OVERLOADED = "provider_overloaded"
    MODEL_UNAVAILABLE = "model_unavailable"
    SERVICE_UNAVAILABLE = "service_unavailable"
    CAPABILITY_NOT_SUPPORTED = "capability_not_supported"
    REQUEST_TOO_LARGE_FOR_LIMIT = "request_too_large_for_limit"
    STORAGE_LIMIT_EXCEEDED = "storage_limit_exceeded"
    MODEL_KIND_MISMATCH = "model_kind_mismatch"
    AUTHENTICATION_THROTTLED = "authentication_throttled"
    INVALID_IMAGE = "invalid_image"
    IMAGE_URL_NOT_ALLOWED = "image_url_not_allowed"
    IMAGE_LIMIT_EXCEEDED = "image_limit_exceeded"

    @property
    def http_status(self) -> int:
        """The HTTP status this code is always answered with."""
        return _STATUS[self]

    @property
    def error_type(self) -> str:
        """The OpenAI-style ``error.type`` family of this code."""
        return _TYPE[self]


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.CONTENT_FILTER: 400,
    ErrorCode.INVALID_API_KEY: 401,
    ErrorCode.INSUFFICIENT_CREDITS: 402,
    ErrorCode.KEY_LIMIT_EXCEEDED: 402,
    ErrorCode.MODEL_NOT_ALLOWED: 403,
    ErrorCode.WORKSPACE_LOCKED: 403,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMIT_EXCEEDED: 429,
    ErrorCode.PROVIDER_RATE_LIMIT: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.PROVIDER_AUTH: 502,
    ErrorCode.PROVIDER_UNAVAILABLE: 502,
    ErrorCode.PROVIDER_TIMEOUT: 504,
    ErrorCode.PROVIDER_OVERLOADED: 529,
    ErrorCode.MODEL_UNAVAILABLE: 503,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.CAPABILITY_NOT_SUPPORTED: 400,
    ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT: 400,
    ErrorCode.STORAGE_LIMIT_EXCEEDED: 400,
    ErrorCode.MODEL_KIND_MISMATCH: 400,
    ErrorCode.AUTHENTICATION_THROTTLED: 429,
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.IMAGE_URL_NOT_ALLOWED: 400,
    ErrorCode.IMAGE_LIMIT_EXCEEDED: 400,
}

# OpenAI SDKs only look at the status, but `type` helps humans group errors.
_TYPE_BY_STATUS = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    429: "rate_limit_error",
}
_TYPE: dict[ErrorCode, str] = {
    code: _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
    for code, status in _STATUS.items()
}


class OrchestratorError(Exception):
    """The single exception type for client-visible failures.

    Args:
        code: the stable error code; decides the HTTP status.
        message: a human-readable message. It must never contain an API key.
        param: the request parameter at fault, if one is.
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return self.code.http_status

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        """Returns the OpenAI error envelope ``{"error": {...}}`` as plain data."""
        return {
            "error": {
                "message": self.message,
                "type": self.code.error_type,
                "code": self.code.value,
                "param": self.param,
                "request_id": request_id,
            }
        }

    @classmethod
    def from_validation(cls, exc: Any) -> OrchestratorError:
        """Turns a pydantic ``ValidationError`` into ``invalid_request`` naming the parameter."""
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        text = f"Invalid parameter {param}: {message}" if param else f"Invalid request: {message}"
        return cls(ErrorCode.INVALID_REQUEST, text, param=param)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the error picklable across Ray so a replica's raise arrives intact.
        return (_rebuild, (self.code.value, self.message, self.param, self.headers))

    def __repr__(self) -> str:
        return f"OrchestratorError({self.code.value!r}, {self.message!r}, param={self.param!r})"


E = TypeVar("E", bound=BaseException)


def find_cause(exc: BaseException, kind: type[E]) -> E | None:
    """Returns the exception of type ``kind`` that ``exc`` is or wraps (Ray wraps a remote
    exception and keeps the original as ``cause``), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def find_error(exc: BaseException) -> OrchestratorError | None:
    """Returns the OrchestratorError ``exc`` is or wraps, or None."""
    return find_cause(exc, OrchestratorError)


def _rebuild(code: str, message: str, param: str | None, headers: dict[str, str]) -> OrchestratorError:
    return OrchestratorError(ErrorCode(code), message, param=param, headers=headers)
