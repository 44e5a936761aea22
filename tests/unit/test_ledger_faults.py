"""Faults on the ledger's own side that must not lose a record or a hold: a journal on a
full disk, a reaper pass that raises, a shutdown step that fails."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from orchestrator.api import create_app
from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits, UsageRecord
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN
from tests.usage import record

NAMES = ["tiny-a"]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()
        self.failures = 0  # how many of the next readings raise

    def __call__(self) -> float:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the clock failed")
        return self.now


class FullDiskJournal(UsageJournal):
    """A journal whose next ``appends_failing`` appends (and, while ``seal_fails``, seals)
    fail as on a full disk."""

    appends_failing = 0
    seal_fails = False

    def append(self, record: UsageRecord) -> None:
        if self.appends_failing:
            self.appends_failing -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        super().append(record)

    def seal(self) -> Path:
        if self.seal_fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().seal()


def new_ledger(db_url: str, tmp_path: Path, clock: Clock, **kwargs: Any) -> Ledger:
    journal = kwargs.pop("journal", None) or FullDiskJournal(tmp_path / "journal")
    options: dict[str, Any] = {"clock": clock, "monotonic": clock, "flush_interval_s": 3600, "fence_poll_s": 0.02}
    return Ledger(SQLStore(db_url), journal, **(options | kwargs))


def journal_of(ledger: Ledger) -> FullDiskJournal:
    """The ledger's journal, whose writes and seals a test can make fail."""
    assert isinstance(ledger.journal, FullDiskJournal)
    return ledger.journal


async def refused(coro: Any) -> OrchestratorError:
    with pytest.raises(OrchestratorError) as info:
        await coro
    return info.value


async def requests_recorded(ledger: Ledger) -> int:
    return sum(row["requests"] for row in await ledger.usage_report(group_by=["key"]))


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Waits for a background task's effect (up to 10 s)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# -- the journal on a full disk -------------------------------------------------------


def test_a_journal_write_that_fills_the_disk_raises_and_leaves_no_part_of_its_line(tmp_path: Path) -> None:
    """A real short write: the file size limit (as a full disk would) lets 20 bytes of the
    line through, then refuses the rest."""

    def line(request_id: str) -> UsageRecord:
        return UsageRecord(request_id=request_id, model="m", created_at=datetime(2026, 11, 23, tzinfo=UTC))

    journal = UsageJournal(tmp_path / "j", owner="me")
    journal.open()
    journal.append(line("a"))
    size = sum(p.stat().st_size for p in (tmp_path / "j").iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, hard))
    try:
        with pytest.raises(OSError):
            journal.append(line("b"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    journal.append(line("c"))
    segment = journal.close()
    assert segment is not None
    assert [r.request_id for r in UsageJournal.read(segment)] == ["a", "c"]


async def test_a_settlement_the_journal_cannot_take_fails_keeps_its_holds_and_is_recorded_once_on_retry(
    db_url: str, tmp_path: Path
) -> None:
    clock = Clock()
    ledger = new_ledger(db_url, tmp_path, clock, lookup_wait_s=10, fence=None)
    journal = journal_of(ledger)
    await ledger.start()
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(1), max_concurrent=1))
        admission = await ledger.admit(created.key, NAMES, 10, "r1", cost=Decimal("0.5"), holder="router")
        journal.appends_failing = 1
        error = await refused(ledger.settle(admission, record(ledger, admission)))
        assert error.code is ErrorCode.SERVICE_UNAVAILABLE and error.headers["Retry-After"]
        # Nothing was recorded: the request still runs, with its holds, and a lookup waits for it.
        lookup = asyncio.create_task(ledger.generation("gen-r1", created.key))
        assert (await refused(ledger.admit(created.key, NAMES, 10, "r2"))).code is ErrorCode.RATE_LIMIT_EXCEEDED
        await ledger.update_key(created.info.id, KeyLimits(), clear=frozenset({"max_concurrent"}))
        held = await refused(ledger.admit(created.key, NAMES, 10, "r2", cost=Decimal("0.75")))
        assert held.code is ErrorCode.INSUFFICIENT_CREDITS
        assert await ledger.settle(admission, record(ledger, admission))  # the router's retry
        assert not await ledger.settle(admission, record(ledger, admission))
        assert (await lookup).cost == Decimal("0.25")
        await ledger.flush()
        assert (await ledger.get_key(created.info.id)).credits == Decimal("0.75")
        assert await requests_recorded(ledger) == 1
    finally:
        await ledger.stop()


async def test_a_chat_whose_record_the_journal_refuses_once_is_recorded_by_the_routers_retry(
    tmp_path: Path, catalog: Catalog, engines: dict[str, FakeEngine]
) -> None:
    journal = FullDiskJournal(tmp_path / "journal")
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), journal, flush_interval_s=0.05)
    await ledger.start()
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
            headers = {"Authorization": f"Bearer {created.key}"}
            journal.appends_failing = 1
            chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            resp = await client.post("/v1/chat/completions", json=chat, headers=headers)
            assert resp.status_code == 200
            # The lookup waits for the settlement, which the router retries after the 503.
            found = await client.get("/v1/generation", params={"id": resp.json()["id"]}, headers=headers)
            assert found.status_code == 200 and journal.appends_failing == 0
            cost = Decimal(str(found.json()["data"]["cost"]))
        await ledger.flush()
        assert cost > 0 and (await ledger.get_key(created.info.id)).credits == 1 - cost
        assert await requests_recorded(ledger) == 1
    finally:
        await ledger.stop()


async def test_a_flush_that_cannot_seal_the_journal_keeps_its_records_for_the_next(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    ledger = new_ledger(db_url, tmp_path, clock, fence=None)
    journal = journal_of(ledger)
    await ledger.start()
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
        admission = await ledger.admit(created.key, NAMES, 10, "r1")
        await ledger.settle(admission, record(ledger, admission))
        journal.seal_fails = True
        with pytest.raises(OSError):
            await ledger.flush()
        journal.seal_fails = False
        await ledger.flush()
        assert await requests_recorded(ledger) == 1
        assert (await ledger.get_key(created.info.id)).credits == Decimal("0.75")
        assert journal.count() == 1  # the committed segment is gone, the open one stays
    finally:
        await ledger.stop()


# -- the reaper -----------------------------------------------------------------------


async def test_a_reaper_pass_that_raises_does_not_stop_later_ones(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wall, monotonic = Clock(), Clock()
    ledger = new_ledger(db_url, tmp_path, wall, monotonic=monotonic, hold_ttl_s=0.4, fence=None)  # a pass every 0.1 s
    await ledger.start()
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
        await ledger.admit(created.key, NAMES, 10, "orphan", cost=Decimal("0.5"), holder="dead")
        wall.failures = 1  # the pass that finds the orphan raises (the lost record's time)
        monotonic.now += 1  # the router "dead" was last heard from past the TTL
        await eventually(lambda: wall.failures == 0, "a reaper pass ran and raised")
        await eventually(lambda: "orphan" not in ledger.holds.admitted, "a later pass released the orphan")
        assert ledger._reaper is not None and not ledger._reaper.done()
        assert "reaping dead routers' admissions failed" in caplog.text
        lost = await ledger.generation("gen-orphan", None, admin=True)
        assert (lost.status_code, lost.cost) == (500, 0)
        await ledger.admit(created.key, NAMES, 10, "fresh", cost=Decimal(1))  # its hold is free again
    finally:
        await ledger.stop()


async def test_a_lost_request_the_journal_cannot_take_stays_held_until_a_later_pass_records_it(
    db_url: str, tmp_path: Path
) -> None:
    clock = Clock()
    ledger = new_ledger(db_url, tmp_path, clock, fence=None)
    journal = journal_of(ledger)
    await ledger.start()
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
        for rid in ("orphan-1", "orphan-2"):
            await ledger.admit(created.key, NAMES, 10, rid, cost=Decimal("0.5"), holder="dead")
        clock.now += 61
        journal.appends_failing = 1
        ledger.reap()  # the first one's record cannot be journaled; the second is recorded
        assert list(ledger.holds.admitted) == ["orphan-1"]
        ledger.reap()
        assert ledger.holds.admitted == {} and ledger.holds.held_cost == {}
        await ledger.flush()
        assert await requests_recorded(ledger) == 2
    finally:
        await ledger.stop()


# -- shutdown -------------------------------------------------------------------------


class BrokenStore(SQLStore):
    """A store whose methods named in ``broken`` fail as a database that lost its disk."""

    broken: frozenset[str] = frozenset()

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in super().__getattribute__("broken"):

            def fail(*args: object, **kwargs: object) -> object:
                raise OperationalError("INSERT", {}, OSError(errno.ENOSPC, "No space left on device"))

            return fail
        return attr


@pytest.mark.parametrize("broken", [{"write_usage"}, {"write_usage", "save_rate_windows"}])
async def test_every_shutdown_step_runs_when_one_fails(db_url: str, tmp_path: Path, broken: set[str]) -> None:
    """The flush (and, in the second case, the handover of rate windows) fails at shutdown:
    the journal is still closed, the fence released, the database closed and the thread
    stopped, and the first failure is raised. The next ledger takes over at once, replays the
    record the flush could not write and continues the rate window if it was handed over."""
    clock = Clock()
    store = BrokenStore(db_url)
    ledger = Ledger(
        store, UsageJournal(tmp_path / "journal"), clock=clock, monotonic=clock, flush_interval_s=3600,
        fence_poll_s=0.02,
    )  # fmt: skip
    await ledger.start()
    heir = new_ledger(db_url, tmp_path, clock, journal=UsageJournal(tmp_path / "journal"))
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(1), rpm=2))
        admission = await ledger.admit(created.key, NAMES, 10, "r1")
        await ledger.settle(admission, record(ledger, admission))
        store.broken = frozenset(broken)
        error = await refused(ledger.stop())
        assert error.code is ErrorCode.SERVICE_UNAVAILABLE
        assert ledger.journal is not None and ledger.journal.close() is None  # already closed
        assert ledger._db is None and store._engine is None
        await heir.start()
        assert heir.keeper.active.is_set()  # the fence was free
        assert (await heir.generation("gen-r1", created.key)).cost == Decimal("0.25")
        assert (await heir.get_key(created.info.id)).credits == Decimal("0.75")
        second = await heir.admit(created.key, NAMES, 10, "r2")
        handed_over = "save_rate_windows" not in broken
        assert second.headers["x-ratelimit-remaining-requests"] == ("0" if handed_over else "1")
    finally:
        store.broken = frozenset()
        await ledger.stop()
        await heir.stop()


async def test_a_failed_shutdown_step_is_logged(db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenStore(db_url)
    ledger = Ledger(store, UsageJournal(tmp_path / "journal"), flush_interval_s=3600, fence=None)
    await ledger.start()
    created = await ledger.create_key(KeyLimits())
    admission = await ledger.admit(created.key, NAMES, 10, "r1")
    await ledger.settle(admission, record(ledger, admission))
    store.broken = frozenset({"write_usage", "save_rate_windows"})
    with caplog.at_level(logging.ERROR, logger="orchestrator.gateway.ledger"):
        await refused(ledger.stop())
    logged = [r.getMessage() for r in caplog.records if r.name == "orchestrator.gateway.ledger"]
    assert logged == [
        "stopping the ledger: writing the usage records to the database failed",
        "stopping the ledger: handing the rate-limit windows over failed",
    ]
