"""The OpenAPI document as the server really behaves: the error answers of every route (the
envelope, never FastAPI's 422), their headers, the credentials each route takes, and request
bodies whose nested models are all in ``components``.

FastAPI writes the document from the routes; :func:`install_contract` amends it once, from
the table below, so the routes stay free of documentation boilerplate. A route missing from
the table fails the document's generation (and so the unit tests). Every ``model`` a client
sends (a body field, a query or path parameter) lists the catalog's names as ``examples``, so
that clients and fuzzers (schemathesis) can name a model that exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from orchestrator.api.anthropic.errors import ANTHROPIC_ERRORS
from orchestrator.errors import ErrorCode
from orchestrator.protocol import ErrorResponse
from orchestrator.protocol.anthropic import AnthropicErrorResponse

REF = "#/components/schemas/{model}"
API_KEY = "ApiKey"
ADMIN_KEY = "AdminKey"

# What the gateway adds to a route: authenticating a key (bad, disabled, the database
# unreachable, or 429 for an address that keeps failing: api/auth.py), admitting a request
# (also credits, spend and rate limits), the admin check.
_AUTHENTICATE = (401, 403, 429, 503)
_ADMIT = (*_AUTHENTICATE, 402)
_ADMIN = (401, 429, 503)
_GENERATION = (400, 404, 413, 429, 502, 503, 504, 529)
# Anthropic's statuses: no 502 or 503 (engine failures are 500, a model or gateway briefly
# unable to serve is 529), and 402 for credits as on the OpenAI routes.
_MESSAGES = (400, 404, 413, 429, 504, 529)
_MESSAGES_ADMIT = (401, 402, 403, 429, 529)


@dataclass(frozen=True)
class Route:
    """What one operation can answer besides its success."""

    errors: tuple[int, ...] = ()
    gateway: tuple[int, ...] = ()  # only with a gateway (keys); none in open mode
    auth: tuple[str, ...] = ()  # security schemes, any one of which is accepted
    anthropic: bool = False  # errors in Anthropic's envelope, with Anthropic's statuses


_ROUTES: dict[str, Route] = {
    "POST /v1/chat/completions": Route(_GENERATION, _ADMIT, (API_KEY,)),
    "POST /v1/completions": Route(_GENERATION, _ADMIT, (API_KEY,)),
    "POST /v1/embeddings": Route(_GENERATION, _ADMIT, (API_KEY,)),
    "POST /v1/responses": Route(_GENERATION, _ADMIT, (API_KEY,)),
    "GET /v1/responses/{response_id}": Route((404,), _AUTHENTICATE, (API_KEY,)),
    "DELETE /v1/responses/{response_id}": Route((404,), _AUTHENTICATE, (API_KEY,)),
    "POST /v1/messages": Route(_MESSAGES, _MESSAGES_ADMIT, (API_KEY,), anthropic=True),
    "POST /v1/messages/count_tokens": Route(
        (400, 404, 413, 504, 529), (401, 403, 429, 529), (API_KEY,), anthropic=True
    ),
    "POST /tokenize": Route((400, 404, 413, 502, 503, 504, 529), _AUTHENTICATE, (API_KEY,)),
    "POST /detokenize": Route((400, 404, 413, 502, 503, 504, 529), _AUTHENTICATE, (API_KEY,)),
    "GET /v1/generation": Route((400, 404), _AUTHENTICATE, (API_KEY, ADMIN_KEY)),
    "GET /v1/models": Route((), _AUTHENTICATE, (API_KEY,)),
    "GET /v1/models/{model_id}": Route((404,), _AUTHENTICATE, (API_KEY,)),
    "GET /v1/model/info": Route((400, 404), _AUTHENTICATE, (API_KEY,)),
    "GET /health/live": Route(),
    "GET /health/ready": Route((404,)),  # its 503 is the readiness body, declared on the route
    "GET /health": Route(),
    "POST /admin/keys": Route((400, 413), _ADMIN, (ADMIN_KEY,)),
    "GET /admin/keys": Route((), _ADMIN, (ADMIN_KEY,)),
    "GET /admin/keys/{key_id}": Route((404,), _ADMIN, (ADMIN_KEY,)),
    "PATCH /admin/keys/{key_id}": Route((400, 404, 413), _ADMIN, (ADMIN_KEY,)),
    "DELETE /admin/keys/{key_id}": Route((404,), _ADMIN, (ADMIN_KEY,)),
    "GET /admin/workspaces": Route((), _ADMIN, (ADMIN_KEY,)),
    "PATCH /admin/workspaces/{workspace_id}": Route((400, 404, 413), _ADMIN, (ADMIN_KEY,)),
    "GET /admin/usage": Route((400,), _ADMIN, (ADMIN_KEY,)),
    "POST /admin/adapters": Route((400, 404, 413), _ADMIN, (ADMIN_KEY,)),
    "GET /admin/adapters": Route((), _ADMIN, (ADMIN_KEY,)),
    "DELETE /admin/adapters/{name}": Route((404,), _ADMIN, (ADMIN_KEY,)),
}
# Any path answers an unknown method with 405 (and `Allow`), and a bug with 500.
_EVERY_ROUTE = (405, 500)
_RETRY_AFTER = (429, 503, 529)
_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {
        "description": "The request's id (a client's own is kept); error envelopes quote it.",
        "required": True,
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
    "Allow": {"description": "The methods this path answers.", "required": True, "schema": {"type": "string"}},
    **{
        f"x-ratelimit-{part}-{what}": {
            "description": f"The key's {what} per minute: {text} (only when the key has that limit).",
            "schema": {"type": "string" if part == "reset" else "integer"},
        }
        for what in ("requests", "tokens")
        for part, text in (("limit", "its limit"), ("remaining", "left in this window"), ("reset", "time left"))
    },
    **{
        f"x-ratelimit-{part}-concurrency": {
            "description": f"The key's requests running at once: {text} (only when the key has that limit).",
            "schema": {"type": "integer"},
        }
        for part, text in (("limit", "its limit"), ("remaining", "how many more may start"))
    },
}
_SECURITY = {
    API_KEY: {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`sk-orch-...`), also accepted as the `x-api-key` header.",
    },
    ADMIN_KEY: {"type": "http", "scheme": "bearer", "description": "The admin key (`ORCH_ADMIN_KEY`)."},
}
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk (the last one carries `usage` with `cost`), or an error "
            "envelope when the stream fails part-way, then `[DONE]`.",
        }
    },
}


def request_body(model: type[BaseModel], events: str | None = None, *, streams: bool = True) -> dict[str, Any]:
    """Returns ``openapi_extra`` for a route that reads ``model`` itself (for the error
    envelope) and answers with JSON or, when ``streams`` and the body's ``stream`` is true,
    server-sent events (``events`` describes them; OpenAI's chunks by default)."""
    # The `$defs` move to components in `install_contract`, so every reference resolves.
    body = {"$ref": REF.format(model=model.__name__), "$defs": _schemas(model)}
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}
    if streams:
        event = _SSE_EVENT
        if events is not None:
            event = {
                **_SSE_EVENT,
                "properties": {"event": {"type": "string"}, "data": {"type": "string", "description": events}},
            }
        extra["responses"] = {"200": {"content": {"text/event-stream": {"schema": event}}}}
    return extra


def install_contract(app: FastAPI, *, keyed: bool, models: Sequence[str] = ()) -> None:
    """Makes ``app.openapi()`` return the amended document (built once, then cached).

    Args:
        app: the app, with every route added.
        keyed: a gateway checks keys; without one there are no credentials, so no 401, 402
            or 403 and no security schemes.
        models: every name the catalog resolves (the examples of ``model``).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _amend(build(), keyed=keyed)
            _model_examples(app.openapi_schema, list(models))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _amend(document: dict[str, Any], *, keyed: bool) -> dict[str, Any]:
    """Returns ``document`` with the errors, headers and security of :data:`_ROUTES`.

    Raises:
        KeyError: an operation is not in the table.
    """
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_schemas(ErrorResponse))
    schemas.update(_schemas(AnthropicErrorResponse))
    components["headers"] = _HEADERS
    if keyed:
        components["securitySchemes"] = _SECURITY
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            name = f"{method.upper()} {path}"
            if name not in _ROUTES:
                raise KeyError(f"{name} is not documented in orchestrator/api/contract.py")
            _amend_operation(operation, _ROUTES[name], keyed=keyed)
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never sent
        schemas.pop(unused, None)
    _hoist_defs(document, schemas)
    _integer_bounds(document)
    return document


def _amend_operation(operation: dict[str, Any], route: Route, *, keyed: bool) -> None:
    responses: dict[str, Any] = operation["responses"]
    responses.pop("422", None)
    statuses = {*route.errors, *_EVERY_ROUTE, *(route.gateway if keyed else ())}
    for code in sorted(statuses):
        responses.setdefault(str(code), _error(code, anthropic=route.anthropic))
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers["X-Request-Id"] = _header("X-Request-Id")
        if status == "405":
            headers["Allow"] = _header("Allow")
        if status in ("200", "429") and keyed and 402 in route.gateway:  # admitted: rate limits apply
            headers.update({name: _header(name) for name in _HEADERS if name.startswith("x-ratelimit-")})
    if keyed and route.auth:
        operation["security"] = [{scheme: []} for scheme in route.auth]


def _model_examples(document: dict[str, Any], models: list[str]) -> None:
    """Adds ``models`` as the examples of every ``model`` or ``model_id`` parameter and of the
    ``model`` field of every request body (outside ``/admin``, whose ``model`` filter takes
    display names only)."""
    if not models:
        return
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        if path.startswith("/admin"):
            continue
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                if parameter["name"] in ("model", "model_id"):
                    parameter["schema"]["examples"] = models
            ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            body = schemas.get(str(ref.get("$ref", "")).rsplit("/", 1)[-1], {})
            if "model" in body.get("properties", {}):
                body["properties"]["model"]["examples"] = models


def _error(status: int, *, anthropic: bool = False) -> dict[str, Any]:
    model = AnthropicErrorResponse if anthropic else ErrorResponse
    codes = ", ".join(
        f"`{code.value}`"
        for code in ErrorCode
        if (ANTHROPIC_ERRORS[code][1] if anthropic else code.http_status) == status
    )
    response: dict[str, Any] = {
        "description": f"Error envelope; `error.code` is one of {codes}.",
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
    }
    if status in _RETRY_AFTER:
        response["headers"] = {"Retry-After": _header("Retry-After")}
    return response


def _header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


def _schemas(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s schema and the schemas it refers to, by name."""
    schema = model.model_json_schema(ref_template=REF)
    return {**schema.pop("$defs", {}), model.__name__: schema}


def _hoist_defs(node: Any, schemas: dict[str, Any]) -> None:
    """Moves every nested ``$defs`` (from pydantic schemas written into operations) into
    ``components.schemas``; their references already point there."""
    if isinstance(node, dict):
        for name, schema in node.pop("$defs", {}).items():
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different schemas are named {name}")
        for value in list(node.values()):
            _hoist_defs(value, schemas)
    elif isinstance(node, list):
        for value in node:
            _hoist_defs(value, schemas)


def _integer_bounds(node: Any) -> None:
    """Writes the bounds of integer schemas as integers: FastAPI's document model holds every
    number as a float, and a float such as -9.223372036854776e18 also admits integers below
    the real bound (a seed's -2**63) to anyone comparing as floats."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for name in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(name), float) and node[name].is_integer():
                    node[name] = int(node[name])
        for value in node.values():
            _integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds(value)
