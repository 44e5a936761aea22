"""Credentials on the HTTP edge: the bearer token, the admin check (one place), and the
throttle of client addresses that keep failing authentication."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.requests import HTTPConnection

from orchestrator.api.errors import error_body, route_path
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.expiring_set import ExpiringSet
from orchestrator.gateway.throttle import FailureThrottle

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def bearer_token(request: HTTPConnection) -> str | None:
    """Returns the token of ``Authorization: Bearer <token>`` (also ``x-api-key``, as the
    Anthropic SDK sends it), or None. ``request``: a route's request, or the
    ``HTTPConnection`` of a middleware's scope."""
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


def client_address(scope: Mapping[str, Any], trusted: Sequence[IPNetwork]) -> str:
    """The request's client address: its peer's, or, when the peer is a trusted proxy, the
    last ``X-Forwarded-For`` hop that is not one (each proxy appends the address it heard
    from, so hops left of an untrusted one may be forged). ``"unknown"`` without a peer."""
    client = scope.get("client")
    address = str(client[0]) if client else "unknown"
    if not _trusted(address, trusted):
        return address
    forwarded = b",".join(v for k, v in scope.get("headers") or [] if k == b"x-forwarded-for")
    for hop in reversed([h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]):
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class AuthFailureGuard:
    """ASGI middleware that refuses, with 429 ``authentication_throttled``, the requests with
    credentials of a client address that keeps failing authentication
    (:class:`FailureThrottle`), before they reach the gateway. Every 401 answered to a request
    with credentials counts as a failure of its address. Requests without credentials (which
    cost the gateway no lookup) and ``/health*`` pass untouched. A request whose
    token got a 2xx answer under ``/v1/`` within ``vouch_s`` (every ``/v1`` route checks the
    key before it answers 2xx) still passes: a valid key is not locked out by others failing
    behind the same address (a NAT, a proxy that is not trusted).

    Args:
        app: the ASGI app.
        throttle: the failure counts by address.
        trusted_proxies: addresses or networks whose ``X-Forwarded-For`` is believed.
        monotonic: monotonic seconds (how long a token stays vouched for).
        vouch_s: how long a token that succeeded bypasses the throttle.
    """

    def __init__(
        self,
        app: Any,
        throttle: FailureThrottle,
        trusted_proxies: Sequence[str] = (),
        monotonic: Callable[[], float] = time.monotonic,
        vouch_s: float = 300.0,
    ) -> None:
        self.app = app
        self.throttle = throttle
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_proxies]
        self._vouched = ExpiringSet(vouch_s, 100_000, monotonic)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        token = bearer_token(HTTPConnection(scope)) if scope["type"] == "http" else None
        if token is None or route_path(scope).startswith("/health"):
            # No credentials, nothing for the database to look up (and health checks, which a
            # load balancer sends from the address of every client behind it, always pass).
            await self.app(scope, receive, send)
            return
        digest = hashlib.sha256(token.encode()).digest()
        if digest in self._vouched:
            # A key that succeeded lately is not watched: its stream's every frame would
            # otherwise pass one more call. A 401 it may get now (revoked) counts against
            # nobody's address until its vouching ends.
            await self.app(scope, receive, send)
            return
        address = client_address(scope, self._trusted)
        refusal = self.throttle.refusal(address)
        if refusal is not None:
            await _refuse(send, refusal, scope)
            return
        statuses: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        status = statuses[0] if statuses else None
        if status == 401:
            self.throttle.failed(address)
        elif status is not None and 200 <= status < 300 and _under_v1(scope):
            self._vouched.add(digest)


def _under_v1(scope: Mapping[str, Any]) -> bool:
    return route_path(scope).startswith("/v1/")


async def _refuse(send: Any, error: OrchestratorError, scope: Mapping[str, Any]) -> None:
    state = scope.get("state") or {}
    envelope, status = error_body(error, state.get("request_id"), route_path(scope))
    body = json.dumps(envelope).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
