"""Every generation route (chat completions, completions, Responses, Anthropic Messages):
validate, admit through the gateway, run, meter, settle (one path for every dialect)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from orchestrator.api.accounting import CLIENT_CLOSED, RequestMeter, Settler, reservation
from orchestrator.api.auth import bearer_token
from orchestrator.api.backend import Backend
from orchestrator.api.cache_salt import salted
from orchestrator.api.dialect import Dialect
from orchestrator.api.images import check_images
from orchestrator.api.sse import EventStreamResponse, StreamHead, as_orchestrator_error, drive
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.base import RequestGateway, gateway_timed_out
from orchestrator.gateway.records import Admission
from orchestrator.settings import Settings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request) -> dict[str, Any]:
    """Returns the JSON object body.

    Raises:
        OrchestratorError: ``invalid_request`` for malformed JSON or a non-object body.
    """
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, "Request body must be a JSON object.")
    return body


def parse(dialect: Dialect, body: dict[str, Any], catalog: Catalog) -> tuple[Any, ModelSpec]:
    """Validates a body in ``dialect``, resolves its model and checks that the model can do
    what the request asks (tools, images, guided JSON, reasoning).

    Raises:
        OrchestratorError: ``invalid_request`` (naming the parameter), ``model_not_found``,
        ``model_kind_mismatch`` (an embedding model asked to generate, or a text model to
        embed), ``capability_not_supported``, or an image's error (:func:`check_images`).
    """
    try:
        parsed: Any = dialect.schema.model_validate(body)
    except ValidationError as exc:
        raise OrchestratorError.from_validation(exc) from None
    spec = catalog.resolve(parsed.model)
    if spec.task != dialect.task:
        raise _kind_mismatch(spec, dialect)
    # Looked up on the class, as Dialect.forwarded is: a body field may be named `media`.
    media = getattr(type(parsed), "media", None)
    if media is None:
        check_capabilities(parsed.capabilities_used(), spec)
    else:
        parts = media(parsed)  # read once, for both checks
        check_capabilities(parsed.capabilities_used(parts), spec)
        check_images(parts, spec)
    dialect.check(parsed, spec)
    return parsed, spec


def check_capabilities(used: set[str], spec: ModelSpec) -> None:
    """Refuses a request that needs capabilities (catalog names) ``spec`` does not have.

    Raises:
        OrchestratorError: ``capability_not_supported`` (400), naming what is missing and
        what the model can do.
    """
    missing = sorted(used - spec.capabilities.enabled())
    if missing:
        raise OrchestratorError(
            ErrorCode.CAPABILITY_NOT_SUPPORTED,
            f"Model {spec.name} does not support {', '.join(missing)}: it can do "
            f"{', '.join(sorted(spec.capabilities.enabled())) or 'plain text only'}. "
            "GET /v1/models lists each model's capabilities.",
            param="model",
        )


def _kind_mismatch(spec: ModelSpec, dialect: Dialect) -> OrchestratorError:
    if spec.task == "embed":
        serves = "an embedding model: it serves POST /v1/embeddings and /tokenize"
    else:
        serves = "a text-generation model: it serves chat completions, completions, Messages and Responses"
    return OrchestratorError(
        ErrorCode.MODEL_KIND_MISMATCH,
        f"Model {spec.name} is {serves}, not {dialect.route}. GET /v1/models lists each model's task.",
        param="model",
    )


def admit(dialect: Dialect, body: dict[str, Any], catalog: Catalog) -> tuple[Any, ModelSpec, int | None]:
    """Validates a generation body and resolves its model (:func:`parse`).

    Returns:
        The parsed request, the catalog entry its ``model`` names, and the requested output
        budget.

    Raises:
        OrchestratorError: as :func:`parse`, or ``context_length_exceeded`` when the output
        budget alone exceeds the window.
    """
    parsed, spec = parse(dialect, body, catalog)
    budget = parsed.output_budget()
    if budget is not None and budget >= spec.context_window:
        # The field the client set: chat's newer name, Responses' own, or max_tokens.
        param = next((p for p in ("max_completion_tokens", "max_output_tokens") if body.get(p)), "max_tokens")
        raise OrchestratorError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's context window is {spec.context_window} tokens; "
            f"{param}={budget} leaves no room for the prompt.",
            param=param,
        )
    return parsed, spec, budget


class _MeteredStream:
    """Connects a stream's endings to settlement (see :class:`~orchestrator.api.sse.StreamObserver`)."""

    def __init__(self, meter: RequestMeter, settler: Settler) -> None:
        self.meter = meter
        self.settler = settler

    def on_batch(self, batch: list[str]) -> list[str]:
        return self.meter.on_batch(batch)

    def finish(self, error: OrchestratorError | None) -> None:
        # Not awaited: the ledger holds lookups of admitted requests until they settle.
        status = 200 if error is None else error.status
        self.settler.finish(self.meter, status, error=error)

    def abandon(self) -> None:
        self.settler.finish(self.meter, CLIENT_CLOSED, cancelled=True)


def _settle_if_admitted(
    admitting: asyncio.Future[Admission],
    spec: ModelSpec,
    route: str,
    stream: bool,
    settler: Settler,
    arrived: float,
    gave_up: OrchestratorError | None = None,
) -> None:
    """Settles an admission its request stopped waiting for, so it leaves its one record
    (nothing generated, nothing billed) and releases its holds: the client left while it
    was being made (499), or the gateway made it past the deadline and the client already
    got ``gave_up`` (its 503, counted when it was sent)."""
    if admitting.cancelled() or admitting.exception() is not None:
        return
    meter = RequestMeter(spec, admitting.result(), route=route, streamed=stream, started_at=arrived)
    if gave_up is None:
        settler.finish(meter, CLIENT_CLOSED, cancelled=True)
    else:
        settler.finish(meter, gave_up.status, error=gave_up, counted=True)


async def generate(
    dialect: Dialect,
    request: Request,
    *,
    catalog: Catalog,
    backend: Backend,
    gateway: RequestGateway,
    settler: Settler,
    settings: Settings,
    body: dict[str, Any] | None = None,
) -> Response:
    """Runs one generation request end to end and returns its HTTP response.

    ``body``: the request's JSON when the route has read (and amended) it already.

    Every request that passes admission is settled exactly once, however it ends: completed,
    failed, or abandoned by the client.
    """
    # X-Request-Id may come from the client, so it only correlates logs and errors. The
    # generation gets an id of its own: the engine's request id, the response's `gen-` id
    # and the billing key, so a repeated header can neither clash in the engine nor make a
    # second request look like an already-settled one.
    request_id: str = request.state.request_id
    arrived: float = request.state.arrived_at
    generation_id = uuid.uuid4().hex
    api_key = bearer_token(request)
    route = dialect.route
    model: str | None = None
    try:
        try:
            if body is None:
                body = await read_json(request)
            parsed, spec, budget = admit(dialect, body, catalog)
        except OrchestratorError:
            # A caller without a valid key learns nothing about the request: 401 comes first.
            await gateway.authenticate(api_key)
            raise
        model = spec.name
        forwarded = dialect.forwarded(parsed, body)
        # The prompt's worst case from what the model gets (a Responses body becomes a chat body).
        size = len(await request.body()) if forwarded is body else len(json.dumps(forwarded).encode())
        # The body is cached; an embeddings request is known by its route.
        reserve = reservation(forwarded, size, spec, budget, embedding=dialect.kind == "embedding")
        admitting = asyncio.ensure_future(
            gateway.admit(api_key, spec.names, reserve.tokens, generation_id, cost=reserve.cost, holder=settler.holder)
        )
        stream = dialect.streams and bool(body.get("stream"))
        try:
            # Shielded: a client leaving, or the deadline passing, must not lose an admission
            # the gateway still makes; it is settled when it comes.
            admission = await asyncio.wait_for(asyncio.shield(admitting), settings.gateway_timeout_seconds)
        except asyncio.CancelledError:
            admitting.add_done_callback(lambda done: _settle_if_admitted(done, spec, route, stream, settler, arrived))
            raise
        except TimeoutError:
            late = gateway_timed_out(settings.gateway_timeout_seconds)
            admitting.add_done_callback(
                lambda done: _settle_if_admitted(done, spec, route, stream, settler, arrived, late)
            )
            raise late from None
    except OrchestratorError as exc:
        settler.telemetry.refused(route, model, exc)
        raise
    # Each workspace reuses only its own cached prefixes (api/cache_salt.py).
    body = salted({**forwarded, "model": spec.name}, admission.workspace_id, shared=spec.shared_prefix_cache)
    kind = dialect.kind
    meter = RequestMeter(
        spec, admission, route=route, streamed=stream, first_token_batch=dialect.first_token_batch, started_at=arrived
    )
    result: dict[str, Any] | None = None
    try:
        if not stream:
            result = meter.on_response(await backend.complete(spec, kind, body, generation_id))
            settler.finish(meter, 200)
        else:
            head = StreamHead(backend.stream(spec, kind, body, generation_id))
            try:
                await head.wait(settings.keepalive_seconds)
            except BaseException:
                head.cancel()
                raise
    except asyncio.CancelledError:
        settler.finish(meter, CLIENT_CLOSED, cancelled=True)
        raise
    except Exception as exc:
        error = as_orchestrator_error(exc)
        settler.finish(meter, error.status, error=error)
        error.headers = {**admission.headers, **error.headers}
        raise error from None
    if result is not None:
        # Settled already: writing the answer (which may store it) is outside the request's bill.
        return JSONResponse(await dialect.respond(result, parsed), headers=admission.headers)
    writer = dialect.events(meter, parsed)
    return EventStreamResponse(
        drive(head, request_id=request_id, observer=_MeteredStream(meter, settler), writer=writer),
        keepalive_s=settings.keepalive_seconds,
        headers={**SSE_HEADERS, **admission.headers},
        keepalive=lambda: writer.keepalive,  # a dialect's keep-alive may change as its stream goes
    )
