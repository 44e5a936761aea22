"""The FastAPI app factory: routes wired to a catalog, a backend and settings."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from orchestrator.api.accounting import Settler
from orchestrator.api.adapters import AdapterRefresher, AdapterSource, adapters_router, table_source
from orchestrator.api.admin import admin_router
from orchestrator.api.anthropic.routes import messages_router
from orchestrator.api.auth import AuthFailureGuard, bearer_token, is_admin
from orchestrator.api.backend import Backend, ModelHealth
from orchestrator.api.contract import install_contract, request_body
from orchestrator.api.dialect import CHAT, COMPLETION, EMBEDDINGS
from orchestrator.api.errors import install_error_handlers
from orchestrator.api.generation import generate
from orchestrator.api.middleware import RequestContext
from orchestrator.api.responses.routes import responses_router
from orchestrator.api.telemetry import Telemetry
from orchestrator.api.tokens import tokens_router
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.gateway.adapters import AdapterTable
from orchestrator.gateway.base import Gateway, OpenGateway, RequestGateway
from orchestrator.gateway.throttle import FailureThrottle
from orchestrator.metrics import Sink
from orchestrator.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    TextCompletion,
)
from orchestrator.protocol.embeddings import EmbeddingList, EmbeddingRequest
from orchestrator.protocol.openai import ModelPricing
from orchestrator.settings import Settings


def model_card(spec: ModelSpec, created: int) -> ModelCard:
    """Returns the public description of a catalog model."""
    return ModelCard(
        id=spec.name,
        created=created,
        aliases=list(spec.aliases),
        backend_id=spec.backend_id,
        description=spec.description,
        context_window=spec.context_window,
        pricing=ModelPricing(
            input_per_million=spec.pricing.input_per_million,
            output_per_million=spec.pricing.output_per_million,
        ),
        capabilities=spec.capabilities.model_dump(),
        task=spec.task,
        parent=spec.parent,
    )


class Readiness(BaseModel):
    """``GET /health/ready`` and ``GET /health``: 200 when any model (or the one asked for) can
    serve, else 503 with the same body."""

    status: Literal["ok", "degraded", "unavailable"]
    models: dict[str, ModelHealth] = Field(description="By display name.")


_UNREADY: dict[int | str, dict[str, Any]] = {
    503: {"model": Readiness, "description": "No model (or not the one asked for) can serve."}
}


def create_app(
    catalog: Catalog,
    backend: Backend,
    settings: Settings,
    *,
    gateway: Gateway | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    echo_request_id: bool = True,
    response_headers: Mapping[str, str] | None = None,
    metrics: Sink | None = None,
    admin_routes: bool = True,
    adapters: AdapterTable | None = None,
    adapter_source: AdapterSource | None = None,
) -> FastAPI:
    """Builds the OpenAI-compatible HTTP app.

    Args:
        catalog: the models to serve.
        backend: runs generations (Ray Serve handles in production, a fake in unit tests).
        settings: limits, stream timing, the admin key.
        gateway: keys, limits, metering and the admin API (default: open mode, no keys,
            nothing recorded, no ``/admin`` routes).
        clock: wall clock for the ``created`` fields.
        monotonic: monotonic seconds (the windows of the failed-authentication throttle).
        echo_request_id: add ``X-Request-Id`` to responses (off behind Ray Serve's proxy,
            which adds it itself).
        response_headers: added to every response, errors included (a model route's
            replica names itself in ``x-orch-replica``).
        metrics: where request metrics go (Ray's metrics in Serve; none by default).
        admin_routes: serve ``/admin`` with a gateway (off on a model's own route, whose
            replicas hold no admin key).
        adapters: the database's LoRA adapters added at run time: served beside the
            catalog's (read every ``key_cache_seconds``) and managed at ``/admin/adapters``.
        adapter_source: without ``adapters``, where to read the adapters added at run time
            (every ``key_cache_seconds``) to serve them, with no admin routes for them (a
            model's own route).
    """
    gate: RequestGateway = gateway if gateway is not None else OpenGateway()
    settler = Settler(gate, Telemetry(metrics))
    source = table_source(adapters) if adapters is not None else adapter_source
    refresher = None if source is None else AdapterRefresher(source, catalog, settings.key_cache_seconds)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Four renewals per admission TTL: the gateway ends this router's holds only after
        # it missed them all (it died). Open mode holds nothing.
        renewing = None
        if gateway is not None:
            renewing = asyncio.create_task(settler.renew_holds(settings.admission_ttl_seconds / 4))
        refreshing = None if refresher is None else asyncio.create_task(refresher.run())
        yield
        if renewing is not None:
            renewing.cancel()
        if refreshing is not None:
            refreshing.cancel()
        await settler.drain()  # settlements of abandoned requests still in flight

    # `/path/` is an unknown path (404) like any other, not a redirect: no route answers 3xx.
    app = FastAPI(
        title="vLLM orchestrator",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        redirect_slashes=False,
    )
    install_error_handlers(app)
    if gateway is not None:  # inside RequestContext: a refusal carries the request's id
        throttle = FailureThrottle(settings.auth_failures_per_address, settings.auth_failure_window_seconds, monotonic)
        app.add_middleware(
            AuthFailureGuard, throttle=throttle, trusted_proxies=settings.trusted_proxies, monotonic=monotonic
        )
    app.add_middleware(
        RequestContext, max_body_bytes=settings.max_body_bytes, echo_header=echo_request_id, headers=response_headers
    )
    if gateway is not None and admin_routes:
        app.include_router(admin_router(gateway, settings.admin_key))
        if adapters is not None and refresher is not None:
            app.include_router(adapters_router(adapters, refresher, settings.admin_key))
    created = int(clock())
    run = functools.partial(
        generate, catalog=catalog, backend=backend, gateway=gate, settler=settler, settings=settings
    )

    async def caller(request: Request) -> None:
        # Reading the catalog needs a valid key too (as with OpenAI); no-op in open mode.
        await gate.authenticate(bearer_token(request))

    @app.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        """Chat completion, streaming (SSE) when `stream` is true."""
        return await run(CHAT, request)

    @app.post("/v1/completions", response_model=TextCompletion, openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        """Text completion, streaming (SSE) when `stream` is true."""
        return await run(COMPLETION, request)

    @app.post(
        "/v1/embeddings", response_model=EmbeddingList, openapi_extra=request_body(EmbeddingRequest, streams=False)
    )
    async def embeddings(request: Request) -> Response:
        """Embedding vectors of one input or a batch, from an embedding model (catalog
        `task: embed`); metered like a generation (input tokens at the model's input price)."""
        return await run(EMBEDDINGS, request)

    app.include_router(responses_router(run, gate, keeps=gateway is not None))
    app.include_router(messages_router(run, catalog, backend, gate))
    app.include_router(tokens_router(catalog, backend, gate))

    @app.get("/v1/generation")
    async def generation(request: Request, id: str = Query(description="A response id, `gen-...`.")) -> dict[str, Any]:
        """A finished request's usage record (tokens, cost, latency): to the key that made it,
        or to the admin key. Available as soon as its response has ended."""
        token = bearer_token(request)
        record = await gate.generation(id, token, admin=is_admin(token, settings.admin_key))
        return {"data": record.public()}

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(caller)])
    async def list_models() -> ModelList:
        """Every catalog model, under its display name; a LoRA adapter names its base in `parent`."""
        return ModelList(data=[model_card(s, created) for s in catalog.listed])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, dependencies=[Depends(caller)])
    async def get_model(model_id: str) -> ModelCard:
        """One model, by display name, alias or backend id."""
        return model_card(catalog.resolve(model_id), created)

    @app.get("/v1/model/info", dependencies=[Depends(caller)])
    async def model_info(model: str = Query(description="Display name, alias or backend id.")) -> dict[str, Any]:
        """The model's card plus its serving configuration (resources, autoscaling, overload
        bounds, parsers). Answered from the catalog: it never starts a replica."""
        spec = catalog.resolve(model)
        return {
            **model_card(spec, created).model_dump(mode="json"),
            "tool_call_parser": spec.tool_call_parser,
            "reasoning_parser": spec.reasoning_parser,
            "resources": spec.resources.model_dump(mode="json") | {"gpus": spec.resources.gpus},
            "autoscaling": spec.autoscaling.model_dump(mode="json"),
            "overload": spec.overload.model_dump(mode="json"),
        }

    def readiness(model: str | None) -> JSONResponse:
        models = backend.health()
        if model is not None:
            name = catalog.resolve(model).base_name  # an adapter is as ready as its base
            models = {name: models[name]}
        ready = [m.ready for m in models.values()]
        status: Literal["ok", "degraded", "unavailable"] = (
            "ok" if all(ready) else "degraded" if any(ready) else "unavailable"
        )
        body = Readiness(status=status, models=models)
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if any(ready) else 503)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """200 while the router answers (its process and event loop work)."""
        return {"status": "ok"}

    @app.get("/health/ready", response_model=Readiness, responses=_UNREADY)
    async def ready(
        model: str | None = Query(default=None, description="Only this model (name, alias or backend id)."),
    ) -> JSONResponse:
        """Readiness from state the router already has (replica counts and Serve's health
        checks, refreshed every few seconds); it never calls an engine. 200 when at least one
        model (or the one asked for) can serve, else 503; per-model detail says which and why."""
        return readiness(model)

    @app.get("/health", response_model=Readiness, responses=_UNREADY)
    async def health() -> JSONResponse:
        """Same as `/health/ready`."""
        return readiness(None)

    install_contract(app, keyed=gateway is not None, models=[name for spec in catalog.listed for name in spec.names])
    return app
