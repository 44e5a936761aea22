"""The Router deployment: the FastAPI ingress that dispatches to ModelServer replicas.

It never imports vllm. Only plain data crosses the handles: the request body (dict), the
request id, and back batches of SSE frames (lists of str) or the response dict. Every
handle call has a deadline (the catalog's ``overload`` timeouts, or its cold-start bound
while the model has no running replica), and the requests in flight to each model are
bounded (:class:`InFlight`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
import weakref
from collections.abc import Awaitable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from orchestrator.api import Kind, create_app
from orchestrator.api.backend import ModelHealth
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.adapters import AdapterTable
from orchestrator.layout import model_app_name
from orchestrator.protocol.tokens import TokensOp
from orchestrator.ray_internals import deployment_handle
from orchestrator.serving.adapters import adapter_id
from orchestrator.serving.gateway_server import instance_gateway, remote_gateway
from orchestrator.serving.model_states import ModelStates, current_app_name, serve_states
from orchestrator.serving.options import DEFAULT_MAX_NUM_SEQS
from orchestrator.serving.telemetry import RaySink
from orchestrator.settings import Settings

# How often a request waiting for a cold model checks whether a replica came up.
COLD_POLL_S = 0.5
# Sent with 503 model_unavailable: a replica is probably still starting.
COLD_RETRY_AFTER_S = 10
SHED_RETRY_AFTER_S = 1


def _overloaded(spec: ModelSpec) -> OrchestratorError:
    return OrchestratorError(
        ErrorCode.PROVIDER_OVERLOADED,
        f"Model {spec.name} has too many queued requests; retry shortly.",
        headers={"Retry-After": str(SHED_RETRY_AFTER_S)},
    )


def timed_out(spec: ModelSpec, seconds: float) -> OrchestratorError:
    """504 provider_timeout: the model gave nothing within its deadline of ``seconds``."""
    return OrchestratorError(ErrorCode.PROVIDER_TIMEOUT, f"Model {spec.name} did not answer within {seconds:g} s.")


def _unavailable(spec: ModelSpec) -> OrchestratorError:
    return OrchestratorError(
        ErrorCode.MODEL_UNAVAILABLE,
        f"Model {spec.name} has no running replica after {spec.autoscaling.cold_start_timeout_s:g} s "
        "(it is starting, or the cluster has no room for it); retry later.",
        headers={"Retry-After": str(COLD_RETRY_AFTER_S)},
    )


def _adapter_path(spec: ModelSpec) -> tuple[str, ...]:
    """The extra argument of a call for an adapter: its folder (the replica may not know an
    adapter added at run time); none for a base model."""
    return () if spec.adapter is None else (str(spec.adapter.source.path),)


class InFlight:
    """Requests this router has sent to each model and not yet seen end, bounded by the
    model's running replicas.

    Each replica holds ``max_num_seqs`` running plus ``overload.max_waiting_per_replica``
    waiting requests (the replica sheds past that); the routers share those places. A
    request past this router's share gets 529 at once, instead of waiting in Serve's queue
    for a replica slot for as long as the overload lasts. The replica's own check stays the
    exact one: this one only stops the queue in front of it.

    Args:
        routers: router replicas sharing the places.
    """

    def __init__(self, routers: int) -> None:
        self._routers = routers
        self.counts: dict[str, int] = {}

    def bound(self, spec: ModelSpec, running: int | None) -> int | None:
        """This router's share of the places (None while no replica runs: requests for a
        cold model are bounded while they wait for one, in :meth:`Router.bounded`)."""
        if not running:
            return None
        per_replica = (spec.max_num_seqs or DEFAULT_MAX_NUM_SEQS) + spec.overload.max_waiting_per_replica
        return math.ceil(running * per_replica / self._routers)

    def take(self, spec: ModelSpec, running: int | None) -> None:
        """Counts a request in (:meth:`release` counts it out).

        Raises:
            OrchestratorError: ``provider_overloaded`` (529, ``Retry-After``) past the bound.
        """
        count = self.counts.get(spec.base_name, 0)
        bound = self.bound(spec, running)
        if bound is not None and count >= bound:
            raise _overloaded(spec)
        self.counts[spec.base_name] = count + 1

    def release(self, model: str) -> None:
        self.counts[model] -= 1


class _HandleStream:
    """A ChunkStream over a handle's generator with the router's deadlines and error codes.
    It is counted out of the router's :class:`InFlight` once: when it ends, fails or is
    cancelled, or, if the response never read it (the client left first), when it is
    collected."""

    def __init__(self, router: Router, spec: ModelSpec, source: DeploymentResponseGenerator) -> None:
        self._router = router
        self._spec = spec
        self._source = source
        self._first = True
        # A finalizer runs its function at most once, whether called or collected.
        self._release = weakref.finalize(self, router.in_flight.release, spec.base_name)

    def __aiter__(self) -> _HandleStream:
        return self

    async def __anext__(self) -> list[str]:
        first, self._first = self._first, False
        try:
            batch: list[str] = await self._router.bounded(
                self._spec, anext(self._source), self._spec.overload.stream_idle_timeout_s, may_be_cold=first
            )
        except StopAsyncIteration:
            self._release()
            raise
        except BaseException:
            self.cancel()
            raise
        return batch

    def cancel(self) -> None:
        self._source.cancel()
        self._release()


class Router:
    """Implements :class:`orchestrator.api.Backend` over Serve deployment handles.

    Args:
        specs: catalog entries as plain dicts (``ModelSpec.model_dump``).
        settings: settings as a plain dict.
        handles: model display name -> the ModelServer deployment handle, bound in this
            application; ``None``: each model is in its own application and the gateway in
            one, named after this one (:mod:`orchestrator.layout`).
        gateway: the gateway deployment's handle (None: open mode, no keys; or, without
            ``handles``, the gateway application's).
    """

    def __init__(
        self,
        specs: list[dict[str, Any]],
        settings: dict[str, Any],
        handles: dict[str, DeploymentHandle] | None,
        gateway: DeploymentHandle | None = None,
    ) -> None:
        self.catalog = Catalog([ModelSpec.model_validate(s) for s in specs])
        self.settings = Settings(**settings)
        app = current_app_name()
        self._sink = RaySink()
        timeout_s = self.settings.gateway_timeout_seconds
        if handles is None:
            locations = {s.name: (model_app_name(app, s.deployment_name), s.deployment_name) for s in self.catalog}
            # Without an existence check: the other applications may not be built yet, and a
            # call waits for their replicas like any cold model's.
            handles = {name: deployment_handle(deployment, where) for name, (where, deployment) in locations.items()}
            self.gateway = None if self.settings.open_access else instance_gateway(app, timeout_s, self._sink)
        else:
            locations = {s.name: (app, s.deployment_name) for s in self.catalog}
            self.gateway = None if gateway is None else remote_gateway(gateway, timeout_s, self._sink)
        self._complete = {name: h.options(method_name="complete") for name, h in handles.items()}
        self._count = {name: h.options(method_name="count_tokens") for name, h in handles.items()}
        self._tokens = {name: h.options(method_name="tokens") for name, h in handles.items()}
        # Streams come back as a generator; each item is one batch of SSE frames.
        self._stream = {name: h.options(method_name="stream", stream=True) for name, h in handles.items()}
        self.states = ModelStates(self.catalog, locations, serve_states)
        self._cold_waiters: dict[str, int] = {}
        self._multiplexed: dict[tuple[int, str], DeploymentHandle] = {}
        self.in_flight = InFlight(self.settings.router_replicas)

    def __serve_build_asgi_app__(self) -> Any:
        # Serve's proxy assigns X-Request-Id (keeping a sane client one) and echoes it.
        # With keys there is a database: the adapters added at run time are kept there.
        adapters = None if self.gateway is None else AdapterTable(self.settings.resolved_database_url())
        return create_app(
            self.catalog,
            self,
            self.settings,
            gateway=self.gateway,
            echo_request_id=False,
            metrics=self._sink,
            adapters=adapters,
        )

    def _handle(self, handles: dict[str, DeploymentHandle], spec: ModelSpec) -> DeploymentHandle:
        """The handle of the model's base for this call; an adapter's call carries its id
        (:func:`~orchestrator.serving.adapters.adapter_id`) as Serve's multiplexed model id,
        so Serve prefers replicas that hold it loaded."""
        if spec.adapter is None:
            return handles[spec.base_name]
        model_id = adapter_id(spec.name, str(spec.adapter.source.path))
        key = (id(handles), model_id)
        handle = self._multiplexed.get(key)
        if handle is None:
            handle = self._multiplexed[key] = handles[spec.base_name].options(multiplexed_model_id=model_id)
        return handle

    def _cold(self, spec: ModelSpec) -> bool:
        return self._running(spec) == 0

    def _running(self, spec: ModelSpec) -> int | None:
        self.states.start()
        return self.states.running(spec.base_name)

    async def bounded(self, spec: ModelSpec, call: Awaitable[Any], timeout_s: float, *, may_be_cold: bool) -> Any:
        """Awaits a handle call within its deadline.

        While the model has no running replica the call may wait up to the catalog's
        cold-start bound for one; then ``timeout_s`` applies.

        Raises:
            OrchestratorError: ``model_unavailable`` (503) when no replica came up in time,
                ``provider_timeout`` (504) past ``timeout_s``, ``provider_overloaded`` (529)
                when this router already holds ``overload.max_waiting_per_replica`` requests
                waiting for the model's first replica and a fresh read of Serve's state
                still shows none running.
        """
        try:
            if may_be_cold and self._cold(spec):
                return await self._after_cold_start(spec, call, timeout_s)
            # The common path: no extra task, just a deadline around the await.
            async with asyncio.timeout(timeout_s):
                return await call
        except TimeoutError:
            raise timed_out(spec, timeout_s) from None

    async def _after_cold_start(self, spec: ModelSpec, call: Awaitable[Any], timeout_s: float) -> Any:
        waiting = self._cold_waiters.get(spec.base_name, 0)
        if waiting >= max(spec.overload.max_waiting_per_replica, 1):
            # The view may be a refresh period old: a replica that came up since (one Serve
            # just replaced, say) serves this request instead of it being refused.
            await self.states.recheck()
            if not self._cold(spec):
                async with asyncio.timeout(timeout_s):
                    return await call
            if inspect.iscoroutine(call):
                call.close()
            raise _overloaded(spec)
        task = asyncio.ensure_future(call)
        try:
            self._cold_waiters[spec.base_name] = waiting + 1
            try:
                give_up = time.monotonic() + spec.autoscaling.cold_start_timeout_s
                while self._cold(spec) and not task.done():
                    if time.monotonic() >= give_up:
                        raise _unavailable(spec)
                    await asyncio.wait({task}, timeout=COLD_POLL_S)
            finally:
                self._cold_waiters[spec.base_name] -= 1  # a replica is up (or it gave up): no longer waiting
            async with asyncio.timeout(timeout_s):
                return await task
        finally:
            if not task.done():
                task.cancel()

    async def complete(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        self.in_flight.take(spec, self._running(spec))
        try:
            call = self._handle(self._complete, spec).remote(kind, body, request_id, *_adapter_path(spec))
            try:
                result: dict[str, Any] = await self.bounded(
                    spec, call, spec.overload.request_timeout_s, may_be_cold=True
                )
            except BaseException:
                call.cancel()  # the replica stops generating (Serve cancels its task)
                raise
        finally:
            self.in_flight.release(spec.base_name)
        return result

    async def count_tokens(self, spec: ModelSpec, body: dict[str, Any]) -> int:
        call = self._handle(self._count, spec).remote(body)
        try:
            count: int = await self.bounded(spec, call, spec.overload.request_timeout_s, may_be_cold=True)
        except BaseException:
            call.cancel()
            raise
        return count

    async def tokens(self, spec: ModelSpec, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        call = self._tokens[spec.base_name].remote(op, body)  # an adapter tokenizes as its base
        try:
            answer: dict[str, Any] = await self.bounded(spec, call, spec.overload.request_timeout_s, may_be_cold=True)
        except BaseException:
            call.cancel()
            raise
        return answer

    def stream(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> _HandleStream:
        self.in_flight.take(spec, self._running(spec))
        try:
            handle = self._handle(self._stream, spec)
            source: Any = handle.remote(kind, body, request_id, *_adapter_path(spec))  # stream=True: a generator
        except BaseException:
            self.in_flight.release(spec.base_name)
            raise
        return _HandleStream(self, spec, source)

    def health(self) -> dict[str, ModelHealth]:
        self.states.start()
        return self.states.health()


RouterDeployment = serve.ingress()(Router)
