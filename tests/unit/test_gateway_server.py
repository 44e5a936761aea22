"""The ledger actor runs only the gateway's named methods: a router (or anything holding
the actor's handle) cannot stop it, flush it or reach its internals through ``call``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.gateway.base import GATEWAY_METHODS, RequestGateway, _methods
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.serving.gateway_server import LedgerActor, RemoteGateway


@pytest.fixture
async def actor(tmp_path: Path) -> AsyncIterator[LedgerActor]:
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), UsageJournal(tmp_path / "j"))
    actor = LedgerActor({}, ledger=ledger)
    await actor.start()
    yield actor
    await actor.stop()


def test_the_method_sets_are_the_protocols() -> None:
    request_path = _methods(RequestGateway)
    assert {"authenticate", "admit", "settle", "generation"} == request_path
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
