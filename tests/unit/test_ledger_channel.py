"""The ledger actor's Unix-socket channel: the same calls and answers as the actor call
(only gateway methods, the same errors), many calls at once on one connection, only the
same OS user, and callers that find the next ledger when one stops or dies."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger, LedgerStopped
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.serving import gateway_server, ledger_channel
from orchestrator.serving.gateway_server import LedgerActor, RemoteGateway
from orchestrator.serving.ledger_channel import Channel, ChannelClosed, ChannelServer
from tests.fakes import RemoteMethod
from tests.usage import record


def socket_path(actor: LedgerActor) -> str:
    assert actor._channel is not None
    return actor._channel.path


async def test_the_channel_runs_gateway_methods_with_their_answers_and_errors(actor: LedgerActor) -> None:
    path = socket_path(actor)
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700  # only this user gets in
    channel = await Channel.open(path)
    created = await channel.call("create_key", KeyLimits(name="k"))
    assert (await channel.call("authenticate", created.key)).id == created.info.id
    with pytest.raises(OrchestratorError) as info:  # the ledger's own error, not a wrapper
        await channel.call("authenticate", "sk-wrong")
    assert info.value.code is ErrorCode.INVALID_API_KEY and info.value.status == 401
    for method in ("stop", "flush", "start", "store"):  # the lifecycle is out of reach
        with pytest.raises(AttributeError, match="not a gateway method"):
            await channel.call(method)
    assert await channel.call("list_keys") != []  # still running
    channel.close()


async def test_concurrent_calls_on_one_connection_each_get_their_own_answer(tmp_path: Path) -> None:
    async def echo(method: str, value: int) -> tuple[str, int]:
        await asyncio.sleep(random.random() / 100)  # answers come back out of order
        if value % 7 == 0:
            raise OrchestratorError(ErrorCode.RATE_LIMIT_EXCEEDED, f"no {value}")
        return method, value

    server = ChannelServer(str(tmp_path / "s.sock"), echo)
    await server.start()
    channel = await Channel.open(server.path)

    async def one(value: int) -> object:
        try:
            return await channel.call(f"m{value}", value)
        except OrchestratorError as exc:
            return exc.message

    answers = await asyncio.gather(*(one(v) for v in range(200)))
    assert answers == [f"no {v}" if v % 7 == 0 else (f"m{v}", v) for v in range(200)]
    channel.close()
    server.close()


SERVER = """
import asyncio, sys
from orchestrator.serving.ledger_channel import ChannelServer

async def hang(method):
    await asyncio.sleep(60)

async def main():
    server = ChannelServer(sys.argv[1], hang)
    await server.start()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_killed_ledger_fails_its_waiting_and_later_calls_with_channel_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, path, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    try:
        assert proc.stdout is not None and await proc.stdout.readline() == b"ready\n"
        channel = await Channel.open(path)
        waiting = asyncio.create_task(channel.call("admit"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        proc.kill()  # SIGKILL: the ledger's process is gone
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(ChannelClosed):
            await channel.call("admit")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_another_users_connection_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def record(method: str) -> str:
        calls.append(method)
        return "ok"

    server = ChannelServer(str(tmp_path / "s.sock"), record)
    await server.start()
    real_uid = os.getuid()
    monkeypatch.setattr(ledger_channel.os, "getuid", lambda: real_uid + 1)  # the peer is "someone else"
    channel = await Channel.open(server.path)
    with pytest.raises(ChannelClosed):
        await channel.call("admit")
    assert calls == []  # nothing it sent was read
    monkeypatch.undo()
    channel = await Channel.open(server.path)
    assert await channel.call("admit") == "ok" and calls == ["admit"]
    channel.close()
    server.close()


# -- RemoteGateway over the channel ----------------------------------------------------------


def located(actors: list[LedgerActor]) -> RemoteMethod:
    """Stands in for the gateway deployment's handle: each lookup returns the next of
    ``actors`` (the last one again once all were returned), whose channel is on this node;
    their actor calls fail the test (callers on the ledger's node use the channel)."""
    lookups: list[int] = []

    def no_actor_call(*_: object, **__: object) -> object:
        raise AssertionError("a caller on the ledger's node used the actor call")

    async def lookup() -> object:
        real = actors[min(len(lookups), len(actors) - 1)]
        lookups.append(1)

        async def address() -> Any:
            return real.channel_address()

        class Actor:
            channel_address = RemoteMethod(address)
            call = RemoteMethod(no_actor_call)

        return Actor()

    handle = RemoteMethod(lookup)
    handle.lookups = lookups  # type: ignore[attr-defined]
    return handle


@pytest.fixture
def one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_server, "this_node", lambda: "node-1")


async def test_remote_gateway_uses_the_channel_and_moves_to_the_next_ledger(tmp_path: Path, one_node: None) -> None:
    journal = tmp_path / "j"
    url = f"sqlite:///{tmp_path / 'g.db'}"
    first = LedgerActor({}, ledger=Ledger(SQLStore(url), UsageJournal(journal)))
    await first.start()
    actors = [first]
    handle = located(actors)
    remote = RemoteGateway(handle, first_pause_s=0.001)  # type: ignore[arg-type]
    created = await remote.create_key(KeyLimits(name="k"))
    assert (await remote.authenticate(created.key)).id == created.info.id and len(handle.lookups) == 1
    # A redeploy: the first ledger stops (its channel answers "stopping"), the next starts.
    await first.stop()
    second = LedgerActor({}, ledger=Ledger(SQLStore(url), UsageJournal(journal)))
    await second.start()
    actors.append(second)
    admission = await remote.admit(created.key, ["m"], 1, "r1")
    assert admission.key_id == created.info.id and len(handle.lookups) == 2
    # The connection to the second ledger breaks: the request path is retried on the ledger
    # located next (here the same one, whose channel is opened afresh), never on the actor call.
    assert remote._channel is not None
    remote._channel._writer.transport.abort()
    await asyncio.sleep(0.05)
    assert (await remote.authenticate(created.key)).id == created.info.id and len(handle.lookups) == 3
    await second.stop()


async def test_a_stopped_ledgers_socket_is_gone_and_open_connections_are_refused_as_stopping(
    actor: LedgerActor,
) -> None:
    path = socket_path(actor)
    channel = await Channel.open(path)
    await actor.stop()
    assert not Path(path).exists()  # noqa: ASYNC240
    with pytest.raises(OSError):
        await Channel.open(path)
    with pytest.raises(LedgerStopped):
        await channel.call("admit", "k", ["m"], 1, "r")
    channel.close()


async def test_with_the_channel_off_the_ledger_offers_none(tmp_path: Path) -> None:
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), UsageJournal(tmp_path / "j"))
    actor = LedgerActor({"ledger_channel": False}, ledger=ledger)
    await actor.start()
    assert actor.channel_address() is None  # callers use the actor call
    await actor.stop()


async def test_an_admission_whose_answer_was_lost_is_retried_and_held_once(tmp_path: Path, one_node: None) -> None:
    """The connection breaks after the ledger admitted a request and before its answer left
    (the ledger lives on): the caller's retry on a fresh connection gets that admission, and
    the key's one place is taken once, not twice."""
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), UsageJournal(tmp_path / "j"))
    actor = LedgerActor({}, ledger=ledger)
    await actor.start()
    created = await actor.call("create_key", KeyLimits(name="k", max_concurrent=1))
    handle = located([actor])
    remote = RemoteGateway(handle, first_pause_s=0.001)  # type: ignore[arg-type]
    assert actor._channel is not None
    dispatch, lost = actor._channel._dispatch, []

    async def lose_the_first_admission_s_answer(method: str, *args: Any, **kwargs: Any) -> Any:
        answer = await dispatch(method, *args, **kwargs)
        if method == "admit" and not lost:
            lost.append(method)
            assert remote._channel is not None
            remote._channel._writer.transport.abort()  # before the answer is written
        return answer

    actor._channel._dispatch = lose_the_first_admission_s_answer
    admission = await remote.admit(created.key, ["m"], 1, "r1")
    assert lost and len(handle.lookups) == 2  # retried on a fresh connection
    with pytest.raises(OrchestratorError) as info:  # the key's one place is r1's
        await remote.admit(created.key, ["m"], 1, "r2")
    assert info.value.code is ErrorCode.RATE_LIMIT_EXCEEDED
    await ledger.settle(admission, record(ledger, admission, cost="0"))
    assert (await remote.admit(created.key, ["m"], 1, "r2")).key_id == created.info.id  # freed once: room again
    await actor.stop()
