"""The ledger actor runs only the gateway's named methods: a router (or anything holding
the actor's handle) cannot stop it, flush it or reach its internals through ``call``. The
routers' client of it finds the next ledger when one stops or dies."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.base import GATEWAY_METHODS, REQUEST_METHODS, RequestGateway, _methods
from orchestrator.gateway.ledger import LedgerStopped
from orchestrator.gateway.records import KeyLimits
from orchestrator.serving.gateway_server import LedgerActor, RemoteGateway
from tests.fakes import RemoteMethod


def test_the_method_sets_are_the_protocols() -> None:
    request_path = _methods(RequestGateway)
    stored = {"response_context", "keep_response", "stored_response", "forget_response"}
    assert {"authenticate", "admit", "renew", "settle", "generation", *stored} == request_path == REQUEST_METHODS
    assert request_path < GATEWAY_METHODS and {"create_key", "update_key", "usage_report"} <= GATEWAY_METHODS
    assert not GATEWAY_METHODS & {"start", "stop", "flush", "store", "call"}


@pytest.mark.parametrize("method", ["stop", "flush", "start", "store", "_flush_once", "__init__", "nope"])
async def test_call_refuses_anything_but_gateway_methods(actor: LedgerActor, method: str) -> None:
    with pytest.raises(AttributeError, match="not a gateway method"):
        await actor.call(method)
    assert await actor.call("list_keys") == []  # still running


async def test_call_runs_gateway_methods(actor: LedgerActor) -> None:
    created = await actor.call("create_key", KeyLimits(name="k"))
    assert (await actor.call("authenticate", created.key)).id == created.info.id


def test_remote_gateway_offers_only_gateway_methods() -> None:
    class Handle:
        def options(self, **_: object) -> Handle:
            return self

    remote = RemoteGateway(Handle())  # type: ignore[arg-type]
    assert callable(remote.admit) and callable(remote.create_key)
    for name in ("stop", "flush", "start"):
        with pytest.raises(AttributeError):
            getattr(remote, name)


class _Actors:
    """Stands in for the gateway deployment's handle: each lookup returns the next actor,
    whose ``call`` raises its failure (if any), else answers with its name, ``delay_s``
    after it was called (a database that stopped answering holds the ledger)."""

    def __init__(self, *failures: BaseException | None, delay_s: float = 0.0) -> None:
        self.failures = list(failures)
        self.delay_s = delay_s
        self.lookups = 0
        self.calls: list[tuple[int, str]] = []

    def options(self, **_: object) -> _Actors:
        return self

    async def _lookup(self) -> object:
        index = self.lookups
        self.lookups += 1
        actors = self

        class Call:
            async def _answer(self, method: str) -> str:
                actors.calls.append((index, method))
                await asyncio.sleep(actors.delay_s)
                failure = actors.failures[index] if index < len(actors.failures) else None
                if failure is not None:
                    raise failure
                return f"actor-{index}"

            def remote(self, method: str, *args: object, **kwargs: object) -> object:
                return self._answer(method)

        async def no_channel() -> None:  # the ledger runs on another node: calls go through the actor
            return None

        class Actor:
            call = Call()
            channel_address = RemoteMethod(no_channel)

        return Actor()

    def remote(self) -> object:
        return self._lookup()


def _stopping() -> BaseException:
    from ray.exceptions import RayTaskError

    return RayTaskError("call", "traceback", LedgerStopped("the ledger is stopping"))  # as Ray delivers it


async def test_a_call_a_stopping_ledger_refused_is_retried_on_the_next() -> None:
    actors = _Actors(_stopping(), _stopping(), None)
    remote = RemoteGateway(actors, first_pause_s=0.001)  # type: ignore[arg-type]
    assert await remote.admit("k", ["m"], 1, "r") == "actor-2"
    assert await remote.create_key(KeyLimits()) == "actor-2"  # the live actor is kept
    assert actors.lookups == 3 and actors.calls[-1] == (2, "create_key")


async def test_only_request_path_calls_are_retried_when_the_actor_died() -> None:
    from ray.exceptions import RayActorError

    actors = _Actors(RayActorError(), None)
    assert await RemoteGateway(actors, first_pause_s=0.001).settle("a", "r") == "actor-1"  # type: ignore[arg-type]
    admin = _Actors(RayActorError(), None)
    with pytest.raises(OrchestratorError) as info:  # it may have created the key before dying
        await RemoteGateway(admin, first_pause_s=0.001).create_key(KeyLimits())  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.SERVICE_UNAVAILABLE and admin.calls == [(0, "create_key")]


async def test_a_ledger_that_keeps_stopping_gives_503_after_the_retries() -> None:
    actors = _Actors(*[_stopping()] * 10)
    with pytest.raises(OrchestratorError) as info:
        await RemoteGateway(actors, retries=3, first_pause_s=0.001).admit("k", ["m"], 1, "r")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.SERVICE_UNAVAILABLE and info.value.headers["Retry-After"]
    assert actors.lookups == 4


async def test_a_stopping_ledger_refuses_the_request_path(actor: LedgerActor) -> None:
    created = await actor.call("create_key", KeyLimits(name="k"))
    await actor.stop()
    for method, args in [("admit", (created.key, ["m"], 1, "r")), ("renew", ("router",)), ("generation", ("g", None))]:
        with pytest.raises(LedgerStopped):
            await actor.call(method, *args)


async def test_every_call_but_admission_gets_503_past_its_deadline() -> None:
    hanging = _Actors(delay_s=0.3)
    remote = RemoteGateway(hanging, timeout_s=0.05)  # type: ignore[arg-type]
    for call in (remote.authenticate("k"), remote.settle("a", "r"), remote.renew("router")):
        with pytest.raises(OrchestratorError) as info:
            await call
        assert info.value.code is ErrorCode.SERVICE_UNAVAILABLE and info.value.headers["Retry-After"] == "1"
        assert "within 0.05 s" in info.value.message
    assert hanging.lookups == 3  # each timeout drops the ledger's handle; the next call looks again
    # A lookup waits for a running request's record, so its deadline is longer; an admission
    # has none here (its caller bounds it, and settles one that comes late).
    assert await remote.generation("g", None) == "actor-3"
    assert await remote.admit("k", ["m"], 1, "r") == "actor-3"
    assert hanging.calls[-2:] == [(3, "generation"), (3, "admit")]  # both answered, after 0.3 s


async def test_each_call_s_wait_is_recorded_by_method_retries_and_failures_included() -> None:
    from ray.exceptions import RayActorError

    from orchestrator.metrics import GATEWAY_CALL_SECONDS, MemorySink

    sink = MemorySink()
    # The first ledger stops (admit retried on the second); create_key's actor then dies,
    # which an administrative call does not retry: it gets 503, and its wait is recorded too.
    actors = _Actors(_stopping(), None, RayActorError())
    # Each answer from a ledger takes 5 s on this clock.
    remote = RemoteGateway(actors, first_pause_s=0.001, metrics=sink, clock=lambda: 5.0 * len(actors.calls))
    assert await remote.admit("k", ["m"], 1, "r") == "actor-1"
    await remote.settle("a", "r")
    remote._forget()  # the next call looks the ledger up again: the third actor, which dies
    with pytest.raises(OrchestratorError):
        await remote.create_key(KeyLimits())
    name = GATEWAY_CALL_SECONDS.name
    assert sink.get(name, method="admit") == [10.0]  # both attempts
    assert sink.get(name, method="settle") == [5.0]
    assert sink.get(name, method="create_key") == [5.0]
    assert actors.calls == [(0, "admit"), (1, "admit"), (1, "settle"), (2, "create_key")]
