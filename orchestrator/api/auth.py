"""Credentials on the HTTP edge: the bearer token and the admin check (one place)."""

from __future__ import annotations

import hmac

from fastapi import Request

from orchestrator.errors import ErrorCode, OrchestratorError


def bearer_token(request: Request) -> str | None:
    """Returns the token of ``Authorization: Bearer <token>`` (also ``x-api-key``, as the
    Anthropic SDK sends it), or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def is_admin(token: str | None, admin_key: str | None) -> bool:
    """Whether ``token`` is the admin key (constant-time comparison)."""
    if not token or not admin_key:
        return False
    return hmac.compare_digest(token.encode(), admin_key.encode())


class AdminGuard:
    """FastAPI dependency for ``/admin/*``: the admin key or 401 ``invalid_api_key``."""

    def __init__(self, admin_key: str | None) -> None:
        self._admin_key = admin_key

    def __call__(self, request: Request) -> None:
        if not self._admin_key:
            raise OrchestratorError(
                ErrorCode.INVALID_API_KEY, "The admin API is disabled: no admin key is configured (ORCH_ADMIN_KEY)."
            )
        if not is_admin(bearer_token(request), self._admin_key):
            raise OrchestratorError(ErrorCode.INVALID_API_KEY, "This route needs the admin key.")
