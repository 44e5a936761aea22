"""A model's own route: its ModelServer replicas answer the OpenAI API themselves.

In the layout of :mod:`orchestrator.layout` each model's application has its own HTTP
route, ``/models/<name>/v1`` (:func:`orchestrator.layout.model_route`), served by the
model's replicas with the same FastAPI app as the router (keys, limits, metering and
errors are the router's code, run here), over a :class:`ReplicaBackend` instead of Serve
handles, with the router's deadlines (the catalog's ``overload.request_timeout_s`` and
``stream_idle_timeout_s``). Requests on it skip the router replica and the handle hop between them; the
ingress (HAProxy or Serve's proxy) sends them straight to a replica of the model.

The route serves the model's LoRA adapters by their own names too: the catalog's, and those
added at run time, which the replica reads through the gateway's ledger (it holds no
database URL) every ``key_cache_seconds``, as each router reads them from the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI
from ray import serve

from orchestrator.api import Kind, create_app
from orchestrator.api.backend import GeneratorStream, ModelHealth
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.gateway.adapters import AdapterEntry
from orchestrator.gateway.base import Gateway
from orchestrator.layout import instance_of
from orchestrator.metrics import Sink
from orchestrator.protocol.tokens import TokensOp
from orchestrator.serving.gateway_server import instance_gateway
from orchestrator.serving.model_server import ModelServer, ServedModelServer
from orchestrator.serving.model_states import current_app_name
from orchestrator.serving.router import timed_out
from orchestrator.serving.telemetry import RaySink

T = TypeVar("T")


def _path(spec: ModelSpec) -> str | None:
    return None if spec.adapter is None else str(spec.adapter.source.path)


class IdleBoundStream(GeneratorStream):
    """A :class:`GeneratorStream` that gives up (504 provider_timeout) when its next batch,
    the first included, takes longer than the model's ``overload.stream_idle_timeout_s``,
    as the router's stream does; the generator is cancelled, which aborts the request.

    One timer per stream instead of a timeout around every frame: a read only notes when it
    began, and the timer, when it fires, cancels the read that has waited the whole bound or
    moves itself to when the current read will have. The first batch and the rest are read
    by different tasks (the edge's :class:`~orchestrator.api.sse.StreamHead`, then the
    response), so it cancels whichever task is reading, as ``asyncio.timeout`` would: the
    cancellation becomes the 504 only if nothing else cancelled that task meanwhile.
    """

    def __init__(self, source: AsyncGenerator[list[str]], spec: ModelSpec) -> None:
        super().__init__(source)
        self._spec = spec
        self._seconds = spec.overload.stream_idle_timeout_s
        self._reader: asyncio.Task[Any] | None = None  # the task inside a read, if any
        self._began = 0.0  # when that read began (the event loop's clock)
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False  # the timer cancelled the current read

    async def __anext__(self) -> list[str]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # a read runs in a task
        cancelling = task.cancelling()
        self._reader, self._began = task, loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._began + self._seconds, self._check)
        try:
            return await super().__anext__()
        except BaseException as exc:  # the stream ends: its last batch, an error or a cancellation
            self._stop_timer()
            if isinstance(exc, asyncio.CancelledError) and self._end_read(task, cancelling):
                raise timed_out(self._spec, self._seconds) from None
            raise
        finally:
            self._end_read(task, cancelling)

    def cancel(self) -> None:
        self._stop_timer()
        super().cancel()

    def _check(self) -> None:
        """The timer: cancels a read that has waited the bound, or fires again when the
        current one will have (none between reads: the next read sets it)."""
        self._timer = None
        if self._reader is None:
            return
        loop = asyncio.get_running_loop()
        due = self._began + self._seconds
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check)
        else:
            self._expired = True
            self._reader.cancel()

    def _end_read(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        """Ends the current read. Returns True if the timer cancelled it and nothing else has
        cancelled ``task`` since the read began (``cancelling``: its count then)."""
        self._reader = None
        if not self._expired:
            return False
        self._expired = False
        return task.uncancel() <= cancelling

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _within_deadline(spec: ModelSpec, work: Awaitable[T]) -> T:
    """Awaits ``work`` within the model's ``overload.request_timeout_s``, as the router does;
    past it, 504 ``provider_timeout``."""
    seconds = spec.overload.request_timeout_s
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        raise timed_out(spec, seconds) from None


class ReplicaBackend:
    """Implements :class:`orchestrator.api.Backend` over one ModelServer in this process,
    within the router's deadlines."""

    def __init__(self, server: ModelServer) -> None:
        self._server = server

    async def complete(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await _within_deadline(spec, self._server.complete(kind, body, request_id, _path(spec)))

    def stream(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> GeneratorStream:
        # Every frame alone: nothing crosses a handle, so batching would only delay tokens.
        return IdleBoundStream(self._server.stream(kind, body, request_id, _path(spec), batch=False), spec)

    async def count_tokens(self, spec: ModelSpec, body: dict[str, Any]) -> int:
        return await _within_deadline(spec, self._server.count_tokens(body))

    async def tokens(self, spec: ModelSpec, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        return await _within_deadline(spec, self._server.tokens(op, body))

    def health(self) -> dict[str, ModelHealth]:
        """This replica's model: it answers, so it serves."""
        return {self._server.spec.name: ModelHealth(ready=True, state="serving", replicas=1)}


REPLICA_HEADER = "x-orch-replica"


class RoutedModelServer(ServedModelServer):
    """A ModelServer that also answers HTTP on its model's route (Serve's ingress).

    On a graceful stop the class ``serve.ingress`` builds ends the app's lifespan (the
    settlements still in flight) first, then calls ServedModelServer's ``__del__``, which
    stops the engine.
    """

    def __serve_build_asgi_app__(self) -> Any:
        gateway = None
        sink = RaySink()
        if not self.settings.open_access:
            instance = instance_of(current_app_name(), self.spec.deployment_name)
            gateway = instance_gateway(instance, self.settings.gateway_timeout_seconds, sink)
        return route_app(self, gateway, sink, replica=serve.get_replica_context().replica_id.unique_id)


def route_app(
    server: ModelServer, gateway: Gateway | None, sink: Sink | None = None, replica: str | None = None
) -> FastAPI:
    """The HTTP app of ``server``'s model route: its model and that model's LoRA adapters,
    the catalog's and, with a gateway, those added at run time (read through the gateway
    every ``key_cache_seconds``, as routers read them from the database).

    With ``replica`` (Serve's replica id, the last part of its actor's name), every HTTP
    response, errors included, names it in ``x-orch-replica``, so a client or test sees which
    replica of the model answered (session and prefix affinity, orchestrator/ingress.py)."""
    spec = server.spec

    async def adapters_of_this_model() -> list[AdapterEntry]:
        assert gateway is not None
        return [e for e in await gateway.runtime_adapters() if e.base == spec.name]

    return create_app(
        Catalog([spec]),
        ReplicaBackend(server),
        server.settings,
        gateway=gateway,
        admin_routes=False,
        echo_request_id=False,
        response_headers=None if replica is None else {REPLICA_HEADER: replica},
        metrics=sink,
        adapter_source=None if gateway is None or spec.lora is None else adapters_of_this_model,
    )


ModelRouteDeployment = serve.ingress()(RoutedModelServer)
