"""The ledger actor runs only the gateway's named methods: a router (or anything holding
the actor's handle) cannot stop it, flush it or reach its internals through ``call``. The
routers' client of it finds the next ledger when one stops or dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.base import GATEWAY_METHODS, REQUEST_METHODS, RequestGateway, _methods
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger, LedgerStopped
from orchestrator.gateway.records import KeyLimits, UsageRecord
from orchestrator.gateway.store import SQLStore
from orchestrator.serving.gateway_server import LedgerActor, RemoteGateway, SettlementBatch


@pytest.fixture
async def actor(tmp_path: Path) -> AsyncIterator[LedgerActor]:
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), UsageJournal(tmp_path / "j"))
    actor = LedgerActor({}, ledger=ledger)
    await actor.start()
    yield actor
    await actor.stop()


def test_the_method_sets_are_the_protocols() -> None:
    request_path = _methods(RequestGateway)
    assert {"authenticate", "admit", "renew", "settle", "generation"} == request_path == REQUEST_METHODS
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
        self.settle_batches: list[int] = []  # settlements per settle_many call

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

        class SettleMany:
            async def _answer(self, pairs: list[object]) -> list[object]:
                actors.settle_batches.append(len(pairs))
                return [await Call()._answer("settle") for _ in pairs[:1]] * len(pairs)

            def remote(self, pairs: list[object]) -> object:
                return self._answer(pairs)

        class Actor:
            call = Call()
            settle_many = SettleMany()

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


async def test_settlements_that_arrive_while_one_is_sent_go_together() -> None:
    actors = _Actors(delay_s=0.05)
    remote = RemoteGateway(actors)  # type: ignore[arg-type]
    assert await remote.settle("a", "r") == "actor-0"  # a lone settlement goes at once
    first = asyncio.ensure_future(remote.settle("a0", "r0"))
    await asyncio.sleep(0.01)  # on its way
    results = await asyncio.gather(first, *(remote.settle(f"a{i}", f"r{i}") for i in range(1, 20)))
    assert results == ["actor-0"] * 20
    # The 19 that came while the first was on its way went together, in one call.
    assert actors.settle_batches == [1, 1, 19] and remote.settlements.calls == 3


async def test_a_batch_whose_actor_died_is_settled_again_on_the_next_ledger() -> None:
    from ray.exceptions import RayActorError

    actors = _Actors(RayActorError(), None, delay_s=0.02)
    remote = RemoteGateway(actors, first_pause_s=0.001)  # type: ignore[arg-type]
    assert await asyncio.gather(*(remote.settle(f"a{i}", f"r{i}") for i in range(10))) == ["actor-1"] * 10
    assert actors.settle_batches[0] == 10 and sum(actors.settle_batches) == 20  # every one sent twice
    assert actors.lookups == 2  # the dead actor's handle was dropped once, not per settlement


async def test_each_settlement_in_a_batch_gets_its_own_result(actor: LedgerActor) -> None:
    created = await actor.call("create_key", KeyLimits(name="k", credits="10"))
    admissions = [await actor.call("admit", created.key, ["m"], 10, f"r{i}") for i in range(3)]

    def used(i: int) -> UsageRecord:
        a = admissions[i]
        return UsageRecord(
            request_id=a.request_id, key_id=a.key_id, workspace_id=a.workspace_id, model="m",
            prompt_tokens=5, completion_tokens=5, cost="0.5", latency_ms=1.0, created_at=datetime.now(UTC),
        )  # fmt: skip

    pairs = [(admissions[0], used(0)), (admissions[1], used(1)), (admissions[0], used(0))]
    assert await actor.settle_many(pairs) == [True, True, False]  # the repeat is not recorded twice
    await actor.stop()
    stopped = await actor.settle_many([(admissions[2], used(2))])
    assert len(stopped) == 1 and isinstance(stopped[0], LedgerStopped)  # returned, not raised


async def test_a_cancelled_batch_cancels_its_waiting_settlements() -> None:
    started = asyncio.Event()

    async def hang(pairs: list[tuple[object, object]]) -> list[object]:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    batch = SettlementBatch(hang)
    first = asyncio.ensure_future(batch.settle("a", "r"))
    await started.wait()
    second = asyncio.ensure_future(batch.settle("b", "r"))
    await asyncio.sleep(0)
    assert batch._sending is not None
    batch._sending.cancel()
    for waiting in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await waiting  # neither hangs
