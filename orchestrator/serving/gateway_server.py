"""The gateway deployment: the one ledger all router replicas share, and a client for it.

A single ledger decides, so rate limits and balances are exact however many routers run
(docs/ARCHITECTURE.md says why this beats a per-router limiter or Redis here). It lives in a
plain Ray actor owned by the gateway deployment's one replica: Serve gives it a lifecycle
(deploy, health checks, replacement, graceful shutdown), while routers and model replicas
call the actor directly, which costs about half of a Serve handle call
(benchmarks/experiments/handle_hop.py: 1.2 ms against 2.5 ms here); those on the actor's node call it
over its Unix-socket channel instead (:mod:`orchestrator.serving.ledger_channel`):
benchmarks/experiments/ledger_hop.py measured 0.36 ms against the actor call's 2.2 ms at rest, and
3.9 ms against 28 ms while two processes kept the cores busy.
The actor shares its owner's fate: if the replica dies, so does the actor, and Serve's
replacement replica starts a new one (which replays the usage journal).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from orchestrator.errors import ErrorCode, OrchestratorError, find_cause, find_error
from orchestrator.gateway.base import GATEWAY_METHODS, REQUEST_METHODS, Gateway, gateway_timed_out
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import LOOKUP_WAIT_S, Ledger, LedgerStopped
from orchestrator.gateway.store import SQLStore
from orchestrator.layout import GATEWAY_DEPLOYMENT, gateway_app_name
from orchestrator.metrics import GATEWAY_CALL_SECONDS, GatewayMetrics, NullSink, Sink
from orchestrator.ray_internals import deployment_handle
from orchestrator.serving.ledger_channel import Channel, ChannelClosed, ChannelServer
from orchestrator.serving.telemetry import RaySink
from orchestrator.settings import Settings

logger = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 60.0  # the least deadline of an administrative call (it may write to the database)


def ledger_for(settings: Settings, metrics: Sink | None = None) -> Ledger:
    """Returns the ledger the settings describe (database, journal, pepper, timings)."""
    return Ledger(
        SQLStore(settings.resolved_database_url()),
        UsageJournal(settings.journal_dir()),
        pepper=settings.key_pepper.encode(),
        flush_interval_s=settings.usage_flush_ms / 1000.0,
        key_cache_s=settings.key_cache_seconds,
        outage_grace_s=settings.db_outage_grace_seconds,
        hold_ttl_s=settings.admission_ttl_seconds,
        metrics=None if metrics is None else GatewayMetrics(metrics),
        response_bytes=settings.stored_responses_bytes,
    )


class LedgerActor:
    """The Ray actor holding the ledger; :meth:`call` runs one of its gateway methods, as an
    actor call or over its Unix-socket channel (:mod:`~orchestrator.serving.ledger_channel`)
    for callers on its node."""

    def __init__(self, settings: dict[str, Any], ledger: Ledger | None = None) -> None:
        parsed = Settings(**settings)
        self.ledger = ledger or ledger_for(parsed, RaySink())
        self._serve_channel = parsed.ledger_channel
        self._channel: ChannelServer | None = None

    async def start(self) -> None:
        await self.ledger.start()
        if not self._serve_channel:
            return
        folder = tempfile.mkdtemp(prefix="orch-ledger-")  # mode 0700: only this user connects
        channel = ChannelServer(os.path.join(folder, "ledger.sock"), self.call)
        try:
            await channel.start()
        except OSError:  # e.g. a socket path past the system's limit: every call takes the actor
            logger.exception("the ledger's channel did not start; callers use the actor call")
            shutil.rmtree(folder, ignore_errors=True)
            return
        self._channel = channel

    async def stop(self) -> None:
        await self.ledger.stop()
        if self._channel is not None:
            # Unlinked, not closed: connections already open keep getting answers (each call
            # refused as stopping, so callers retry on the next ledger) until the process
            # ends; new callers cannot find it and use the actor call.
            shutil.rmtree(os.path.dirname(self._channel.path), ignore_errors=True)

    def channel_address(self) -> tuple[str, str] | None:
        """Where the channel listens: (this Ray node's id, socket path); None before start."""
        if self._channel is None:
            return None
        return this_node(), self._channel.path

    async def ping(self) -> bool:
        return True

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs one of the ledger's :data:`GATEWAY_METHODS` (the routers' only entry point;
        its lifecycle methods are not reachable through it).

        Raises:
            AttributeError: ``method`` is not a gateway method.
        """
        if method not in GATEWAY_METHODS:
            raise AttributeError(f"{method!r} is not a gateway method")
        return await getattr(self.ledger, method)(*args, **kwargs)


class GatewayServer:
    """What Serve runs: starts the ledger actor in the async constructor (so the app is only
    ready once the database is migrated and leftover journals are replayed), hands routers
    its handle, health-checks it, and flushes it on graceful shutdown."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        actor_class = ray.remote(LedgerActor).options(num_cpus=0, max_concurrency=10_000)
        self._actor: ActorHandle = actor_class.remote(settings)  # type: ignore[assignment]
        await self._actor.start.remote()

    def ledger_actor(self) -> ActorHandle:
        """Returns the ledger actor's handle (routers call it directly)."""
        return self._actor

    async def check_health(self) -> None:
        """Raises when the ledger actor is gone; Serve then replaces this replica."""
        await self._actor.ping.remote()

    async def __del__(self) -> None:  # type: ignore[misc]
        await self._actor.stop.remote()
        ray.kill(self._actor)


class RemoteGateway:
    """Forwards every :class:`~orchestrator.gateway.base.Gateway` method to the ledger actor:
    ``await remote.admit(...)`` runs ``Ledger.admit(...)`` there (same arguments, same
    result, the same OrchestratorError).

    A redeploy replaces the gateway: the old ledger hands over and stops, then its actor is
    killed, while routers still hold its handle. A call it refused as stopping is retried on
    the ledger Serve routes to next, up to ``retries`` times with doubling pauses from
    ``first_pause_s``; the refusal came before the ledger did anything, so nothing doubles.
    So is a request-path call (admission, settlement, renewal, lookup) whose actor died or
    whose channel connection broke: an admission a dead ledger made died with it (never
    journaled, no record), a live one answers a retried admission with the admission it
    made (:meth:`Ledger.admit`), and a settlement is stored once per request id.

    Every call has a deadline: ``timeout_s`` (a lookup, which waits for a running request's
    record, that plus :data:`LOOKUP_WAIT_S`; an administrative call, which may write to the
    database, at least :data:`ADMIN_TIMEOUT_S`). Past it the call gets 503, as for a gateway
    that is restarting: a ledger that hangs (its database stops answering) cannot hold a
    request. Admissions are the exception: a timed-out one may still be made, and only its
    caller can settle it, so the caller bounds it (``generate`` does).

    Each call's wait, retries included and however it ended, goes to ``metrics`` as
    :data:`~orchestrator.metrics.GATEWAY_CALL_SECONDS`, timed on ``clock``.
    """

    def __init__(
        self,
        handle: DeploymentHandle,
        *,
        timeout_s: float = 10.0,
        retries: int = 6,
        first_pause_s: float = 0.1,
        metrics: Sink | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._waited = (metrics or NullSink()).instrument(GATEWAY_CALL_SECONDS)
        self._clock = clock
        self._locate = handle.options(method_name="ledger_actor")
        self._actor: ActorHandle | None = None
        self._channel: Channel | None = None
        self._retries = retries
        self._first_pause_s = first_pause_s
        self._deadlines: dict[str, float | None] = {m: max(timeout_s, ADMIN_TIMEOUT_S) for m in GATEWAY_METHODS}
        self._deadlines |= {method: timeout_s for method in REQUEST_METHODS}
        self._deadlines |= {"generation": timeout_s + LOOKUP_WAIT_S, "admit": None}

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        if method not in GATEWAY_METHODS:
            raise AttributeError(method)
        return functools.partial(self._run, method)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._actor is None:
            actor = await self._locate.remote()
            channel = await _open_channel(actor)
            if self._actor is None:
                self._actor, self._channel = actor, channel
            elif channel is not None:
                channel.close()  # a concurrent call located the ledger first
        channel = self._channel
        if channel is not None and channel.loop is asyncio.get_running_loop():
            return await channel.call(method, *args, **kwargs)  # ChannelClosed: the connection is gone
        return await self._actor.call.remote(method, *args, **kwargs)

    def _forget(self) -> None:
        """Drops the ledger's handle and channel: the next call looks the ledger up again."""
        self._actor = None
        if self._channel is not None:
            self._channel.close_when_idle()  # calls still waiting on it keep their answers
            self._channel = None

    async def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        started = self._clock()
        try:
            return await self._attempts(method, *args, **kwargs)
        finally:
            self._waited.record(self._clock() - started, {"method": method})

    async def _attempts(self, method: str, *args: Any, **kwargs: Any) -> Any:
        pause = self._first_pause_s
        deadline = self._deadlines[method]
        for attempt in itertools.count():
            try:
                return await asyncio.wait_for(self._call(method, *args, **kwargs), deadline)
            except TimeoutError:
                self._forget()  # the next call looks the ledger up again
                assert deadline is not None  # only a call with a deadline times out
                raise gateway_timed_out(deadline) from None
            except Exception as exc:
                # The ledger stopped, its actor died (its replica was replaced) or the channel
                # broke: the next attempt finds the live one. Request-path calls are retried
                # (safe: each is answered once per request id; see the class docstring);
                # others, and calls out of attempts, get 503 with Retry-After, an
                # infrastructure fault rather than a bug (settlements retry on it).
                gone = isinstance(exc, RayActorError | RayServeException | TaskCancelledError | ChannelClosed)
                stopped = find_cause(exc, LedgerStopped) is not None
                if not gone and not stopped:
                    # Give the edge the OrchestratorError itself, not Ray's wrapper around it.
                    found = find_error(exc)
                    if found is None or found is exc:
                        raise
                    raise found from None
                self._forget()
                died = isinstance(exc, RayActorError | ChannelClosed)
                retry = stopped or (died and method in REQUEST_METHODS)
                if not retry or attempt == self._retries:
                    raise _restarting() from exc
            await asyncio.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable")


def this_node() -> str:
    """This process's Ray node id."""
    return str(ray.get_runtime_context().get_node_id())


async def _open_channel(actor: ActorHandle) -> Channel | None:
    """Opens the ledger's channel if it runs on this node (None otherwise, or if it cannot be
    reached: calls then go through the actor)."""
    address = await actor.channel_address.remote()
    if address is None:
        return None
    node, path = address
    if node != this_node():
        return None
    try:
        return await Channel.open(path)
    except OSError:
        return None  # it stopped since (its socket is gone): the actor call gets its refusal


def _restarting() -> OrchestratorError:
    return OrchestratorError(
        ErrorCode.SERVICE_UNAVAILABLE, "The gateway is restarting; retry the request.", headers={"Retry-After": "1"}
    )


def remote_gateway(handle: DeploymentHandle, timeout_s: float, metrics: Sink | None = None) -> Gateway:
    """Returns the gateway deployment's ledger as a :class:`Gateway` whose calls get 503
    past ``timeout_s`` and are timed into ``metrics`` (see :class:`RemoteGateway`)."""
    return cast(Gateway, RemoteGateway(handle, timeout_s=timeout_s, metrics=metrics))


def instance_gateway(instance: str, timeout_s: float, metrics: Sink | None = None) -> Gateway:
    """Returns the gateway of router application ``instance`` in the layout of
    :mod:`orchestrator.layout` (its own application), looked up without an existence check:
    the applications are built concurrently, and a call waits for it like any cold model."""
    handle = deployment_handle(GATEWAY_DEPLOYMENT, gateway_app_name(instance))
    return remote_gateway(handle, timeout_s, metrics)
