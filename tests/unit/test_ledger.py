"""The ledger against real databases (SQLite file and a throwaway PostgreSQL server)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway import books
from orchestrator.gateway.admission import check_model
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger, model_allowed
from orchestrator.gateway.records import Admission, KeyInfo, KeyLimits, UsageRecord
from orchestrator.gateway.store import SQLStore
from orchestrator.metrics import GatewayMetrics, MemorySink
from tests.postgres import PostgresServer
from tests.usage import record

NAMES = ["tiny-a", "a", "org/tiny-a"]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ledger(db_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    clock = Clock()
    ledger = Ledger(
        SQLStore(db_url), UsageJournal(tmp_path / "journal"), clock=clock, monotonic=clock, flush_interval_s=3600
    )
    await ledger.start()
    yield ledger
    await ledger.stop()


async def refused(coro: object) -> OrchestratorError:
    with pytest.raises(OrchestratorError) as info:
        await coro  # type: ignore[misc]
    return info.value


def test_model_patterns() -> None:
    assert model_allowed([], NAMES)
    assert model_allowed(["tiny-*"], NAMES) and model_allowed(["A"], NAMES)
    assert not model_allowed(["smollm2", "tiny-b"], NAMES)


def test_model_scope_check_of_admissions_and_the_free_routes() -> None:
    """check_model: the ledger's admission and /tokenize, /detokenize and count_tokens (which
    pass None in open mode) refuse the same way."""
    created = datetime(2026, 11, 23, tzinfo=UTC)
    key = KeyInfo(id="k", hint="h", name="n", workspace_id="w", models=["smollm2"], created_at=created)
    check_model(None, NAMES)  # open mode: every model
    check_model(key.model_copy(update={"models": ["tiny-*"]}), NAMES)
    with pytest.raises(OrchestratorError) as denied:
        check_model(key, NAMES)
    assert (denied.value.code, denied.value.status, denied.value.param) == (ErrorCode.MODEL_NOT_ALLOWED, 403, "model")
    assert denied.value.message == "This API key may not use the model 'tiny-a'."


async def test_key_errors(ledger: Ledger) -> None:
    assert (await refused(ledger.admit(None, NAMES, 1, "r1"))).code is ErrorCode.INVALID_API_KEY
    assert (await refused(ledger.admit("sk-orch-nope", NAMES, 1, "r1"))).code is ErrorCode.INVALID_API_KEY
    created = await ledger.create_key(KeyLimits(name="k", models=["tiny-b"]))
    error = await refused(ledger.admit(created.key, NAMES, 1, "r1"))
    assert error.code is ErrorCode.MODEL_NOT_ALLOWED and created.key not in error.message
    await ledger.update_key(created.info.id, KeyLimits(models=["tiny-*"]))
    assert (await ledger.admit(created.key, NAMES, 1, "r2")).key_id == created.info.id
    await ledger.update_key(created.info.id, KeyLimits(enabled=False))
    assert (await refused(ledger.admit(created.key, NAMES, 1, "r3"))).code is ErrorCode.WORKSPACE_LOCKED
    await ledger.update_key(created.info.id, KeyLimits(enabled=True))
    await ledger.set_workspace_enabled("default", False)
    assert (await refused(ledger.admit(created.key, NAMES, 1, "r4"))).code is ErrorCode.WORKSPACE_LOCKED
    await ledger.set_workspace_enabled("default", True)
    await ledger.admit(created.key, NAMES, 1, "r5")
    await ledger.revoke_key(created.info.id)
    assert (await refused(ledger.admit(created.key, NAMES, 1, "r6"))).code is ErrorCode.INVALID_API_KEY


async def test_rate_limit_headers_and_retry_after(ledger: Ledger) -> None:
    key = (await ledger.create_key(KeyLimits(rpm=2, tpm=1000))).key
    first = await ledger.admit(key, NAMES, 100, "r1")
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == "900"
    await ledger.admit(key, NAMES, 100, "r2")
    error = await refused(ledger.admit(key, NAMES, 100, "r3"))
    assert error.code is ErrorCode.RATE_LIMIT_EXCEEDED and error.headers["Retry-After"] == "60"


async def test_credits_debited_once_and_exhaustion(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal("0.5")))
    first = await ledger.admit(created.key, NAMES, 10, "r1")
    assert await ledger.settle(first, record(ledger, first))
    assert not await ledger.settle(first, record(ledger, first))  # a second settlement is refused
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == Decimal("0.25")
    second = await ledger.admit(created.key, NAMES, 10, "r2")
    await ledger.settle(second, record(ledger, second))  # balance now 0, still pending
    error = await refused(ledger.admit(created.key, NAMES, 10, "r3"))
    assert error.code is ErrorCode.INSUFFICIENT_CREDITS
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == 0
    assert (await refused(ledger.admit(created.key, NAMES, 10, "r4"))).code is ErrorCode.INSUFFICIENT_CREDITS


async def test_daily_spend_limit_resets_next_day(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(daily_limit=Decimal("0.3"), monthly_limit=Decimal("10")))
    for i in range(2):
        admission = await ledger.admit(created.key, NAMES, 10, f"r{i}")
        await ledger.settle(admission, record(ledger, admission))
    error = await refused(ledger.admit(created.key, NAMES, 10, "r9"))
    assert error.code is ErrorCode.KEY_LIMIT_EXCEEDED and "daily" in error.message
    ledger._clock.now += 86_400  # type: ignore[attr-defined]
    await ledger.flush()
    await ledger.admit(created.key, NAMES, 10, "r10")


async def test_generation_lookup_pending_then_committed(ledger: Ledger) -> None:
    mine = await ledger.create_key(KeyLimits())
    other = await ledger.create_key(KeyLimits())
    admission = await ledger.admit(mine.key, NAMES, 10, "abc")
    await ledger.settle(admission, record(ledger, admission, finish_reason="stop"))
    found = await ledger.generation("gen-abc", mine.key)  # before any flush
    assert found.finish_reason == "stop" and found.cost == Decimal("0.25")
    assert (await refused(ledger.generation("gen-abc", other.key))).code is ErrorCode.NOT_FOUND
    await ledger.flush()
    assert (await ledger.generation("gen-abc", mine.key)).public()["id"] == "gen-abc"
    assert (await ledger.generation("gen-abc", None, admin=True)).key_id == mine.info.id
    assert (await refused(ledger.generation("gen-nope", mine.key))).code is ErrorCode.NOT_FOUND


async def test_usage_report_groups(ledger: Ledger) -> None:
    a = await ledger.create_key(KeyLimits(name="a"))
    b = await ledger.create_key(KeyLimits(name="b"))
    for i, key in enumerate([a.key, a.key, b.key]):
        admission = await ledger.admit(key, NAMES, 10, f"r{i}")
        await ledger.settle(admission, record(ledger, admission))
    rows = await ledger.usage_report(group_by=["key"])
    by_key = {r["key"]: r for r in rows}
    assert by_key[a.info.id]["requests"] == 2 and by_key[a.info.id]["cost"] == Decimal("0.5")
    assert by_key[b.info.id]["prompt_tokens"] == 10
    daily = await ledger.usage_report(key_id=a.info.id, group_by=["day", "model"])
    assert daily == [
        {"day": "2026-11-23", "model": "tiny-a", "requests": 2, "prompt_tokens": 20, "completion_tokens": 10,
         "cost": Decimal("0.5")}
    ]  # fmt: skip


async def test_journal_replayed_after_crash(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    first = Ledger(SQLStore(db_url), UsageJournal(tmp_path / "j"), clock=clock, monotonic=clock, flush_interval_s=3600)
    await first.start()
    created = await first.create_key(KeyLimits(credits=Decimal(1)))
    admission = await first.admit(created.key, NAMES, 10, "crash-1")
    await first.settle(admission, record(first, admission))
    # Simulated crash: nothing flushed, nothing closed; the dead process's fence is dropped
    # (by the kernel for a lock file, by PostgreSQL for the session's advisory lock).
    assert first._db is not None and first.keeper.fence is not None
    first._flusher.cancel()  # type: ignore[union-attr]
    first._fencer.cancel()  # type: ignore[union-attr]
    first.keeper.fence.release()
    second = Ledger(SQLStore(db_url), UsageJournal(tmp_path / "j"), clock=clock, monotonic=clock)
    await second.start()
    try:
        assert (await second.generation("gen-crash-1", created.key)).cost == Decimal("0.25")
        assert (await second.get_key(created.info.id)).credits == Decimal("0.75")
    finally:
        await second.stop()
        first._db.shutdown(wait=True)
        first.store.close()


async def test_lookup_of_an_admitted_request_waits_for_its_settlement(ledger: Ledger) -> None:
    import asyncio

    key = (await ledger.create_key(KeyLimits())).key
    admission = await ledger.admit(key, NAMES, 10, "slow-settle")
    lookup = asyncio.create_task(ledger.generation("gen-slow-settle", key))
    await asyncio.sleep(0.05)
    assert not lookup.done()  # no 404 while the router has yet to settle
    await ledger.settle(admission, record(ledger, admission))
    assert (await lookup).request_id == "slow-settle"


async def test_settled_ids_are_forgotten_after_the_retry_window_and_a_late_retry_debits_once(ledger: Ledger) -> None:
    """The ids of settled requests are kept for SETTLED_MEMORY_S (a router retries a settlement
    for half of it), not for ever: the ledger's memory levels off under steady load. A retry
    that comes after its id is forgotten is still stored and debited once."""
    clock = ledger.books._monotonic  # type: ignore[attr-defined]
    created = await ledger.create_key(KeyLimits(credits=Decimal("2")))
    first = await ledger.admit(created.key, NAMES, 10, "r1")
    assert await ledger.settle(first, record(ledger, first))
    clock.now += books.SETTLED_MEMORY_S - 1  # type: ignore[attr-defined]
    assert not await ledger.settle(first, record(ledger, first))  # still remembered: refused
    clock.now += 2  # type: ignore[attr-defined]
    second = await ledger.admit(created.key, NAMES, 10, "r2")
    assert await ledger.settle(second, record(ledger, second))
    assert "r1" not in ledger.books.settled and "r2" in ledger.books.settled  # r1 forgotten
    assert len(ledger.books.settled) == 1  # and dropped, not only hidden
    await ledger.settle(first, record(ledger, first))  # a retry of r1 after it was forgotten
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == Decimal("1.5")  # r1 and r2 once each
    ledger.books.settled.max_size = 2
    for rid in ("r3", "r4", "r5"):
        admitted = await ledger.admit(created.key, NAMES, 10, rid)
        await ledger.settle(admitted, record(ledger, admitted))
    assert [rid in ledger.books.settled for rid in ("r3", "r4", "r5")] == [False, True, True]  # bounded too


async def test_a_batch_committed_twice_moves_its_records_once(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
    admission = await ledger.admit(created.key, NAMES, 10, "twice")
    await ledger.settle(admission, record(ledger, admission))
    batch = list(ledger.books.unsealed)
    await ledger.flush()
    await ledger._run(ledger.books.commit, batch)  # e.g. a retried flush after a cancellation
    assert (await ledger.get_key(created.info.id)).credits == Decimal("0.75")
    assert (await ledger.admit(created.key, NAMES, 10, "after")).key_id == created.info.id


async def test_concurrent_flushes_commit_every_batch_once(ledger: Ledger) -> None:
    import asyncio

    created = await ledger.create_key(KeyLimits(credits=Decimal(10)))
    for i in range(6):
        admission = await ledger.admit(created.key, NAMES, 10, f"c{i}")
        await ledger.settle(admission, record(ledger, admission))
        if i % 2:
            await asyncio.gather(ledger.flush(), ledger.flush(), ledger.usage_report(group_by=["key"]))
    await ledger.flush()
    assert not ledger.books.pending and not ledger.books.batches
    assert (await ledger.get_key(created.info.id)).credits == Decimal(10) - 6 * Decimal("0.25")
    assert (await ledger.usage_report(group_by=["key"]))[0]["requests"] == 6


def test_journal_leftovers_are_other_owners_segments(tmp_path: Path) -> None:
    folder = tmp_path / "j"
    folder.mkdir()
    line = b'{"request_id": "x", "model": "m", "created_at": "2026-11-23T00:00:00Z"}\n'
    other = folder / "segment-0a1b2c-000000002.jsonl"  # another ledger's (it let go of the fence)
    other.write_bytes(line + b'{"request_id": "torn')  # a torn last line is skipped
    journal = UsageJournal(folder, owner="mine")
    journal.open()
    journal.append(UsageRecord.model_validate_json(line))
    assert journal.leftovers() == [other]  # its own open segment is not a leftover
    assert [r.request_id for r in UsageJournal.read(other)] == ["x"]
    assert journal.count() == 2
    journal.close()


async def test_top_up_beside_pending_debits_is_exact(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
    admission = await ledger.admit(created.key, NAMES, 10, "t1")
    await ledger.settle(admission, record(ledger, admission))  # 0.25 pending, not yet in the database
    topped = await ledger.update_key(created.info.id, KeyLimits(), add_credits=Decimal(2))
    assert topped.credits == Decimal(3)  # the database's view: the debit is still pending
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == Decimal("2.75")
    with pytest.raises(OrchestratorError):
        await ledger.update_key(created.info.id, KeyLimits(), add_credits=Decimal(-1))
    unlimited = await ledger.create_key(KeyLimits())
    assert (await ledger.update_key(unlimited.info.id, KeyLimits(), add_credits=Decimal("0.5"))).credits == Decimal(
        "0.5"
    )


async def test_admissions_without_a_holder_never_settled_are_recorded_as_lost_after_the_ttl(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
    await ledger.admit(created.key, NAMES, 10, "orphan", cost=Decimal("0.5"))  # its router died: never settled
    ledger._clock.now += 60  # type: ignore[attr-defined]  # the fixture's clock is also the monotonic one
    ledger.reap()
    assert list(ledger.holds.admitted) == ["orphan"]
    ledger._clock.now += 1  # type: ignore[attr-defined]
    ledger.reap()
    await ledger.admit(created.key, NAMES, 10, "fresh", cost=Decimal("0.5"))  # the orphan's hold is free again
    assert list(ledger.holds.admitted) == ["fresh"]
    # It still leaves its one record: lost (500), nothing billed.
    lost = await ledger.generation("gen-orphan", created.key)
    assert (lost.status_code, lost.error_code, lost.cost, lost.model) == (500, "internal_error", 0, "tiny-a")
    assert lost.key_id == created.info.id and lost.workspace_id == "default"
    assert not await ledger.settle(Admission(request_id="orphan"), lost)  # a late router cannot add a second
    await ledger.flush()
    assert (await ledger.usage_report(group_by=["key"]))[0]["requests"] == 1


async def test_fifty_concurrent_requests_cannot_overrun_a_balance(ledger: Ledger) -> None:
    """Credits cover about 5 worst cases: at most 5 are admitted at once, the rest get 402,
    and after every admitted request settles (each at its worst case) the balance is 0."""
    import asyncio

    created = await ledger.create_key(KeyLimits(credits=Decimal("1.25")))
    hold = Decimal("0.25")

    async def one(i: int) -> Admission | OrchestratorError:
        try:
            return await ledger.admit(created.key, NAMES, 10, f"c{i}", cost=hold)
        except OrchestratorError as exc:
            return exc

    results = await asyncio.gather(*(one(i) for i in range(50)))
    admitted = [r for r in results if isinstance(r, Admission)]
    refusals = [r for r in results if isinstance(r, OrchestratorError)]
    assert len(admitted) == 5 and len(refusals) == 45
    assert {r.code for r in refusals} == {ErrorCode.INSUFFICIENT_CREDITS}
    for admission in admitted:
        await ledger.settle(admission, record(ledger, admission, cost=str(hold)))
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == 0
    assert (
        await refused(ledger.admit(created.key, NAMES, 10, "late", cost=hold))
    ).code is ErrorCode.INSUFFICIENT_CREDITS


async def test_a_hold_settles_to_the_real_cost(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal("1")))
    big = await ledger.admit(created.key, NAMES, 10, "big", cost=Decimal("0.75"))
    error = await refused(ledger.admit(created.key, NAMES, 10, "second", cost=Decimal("0.5")))
    assert error.code is ErrorCode.INSUFFICIENT_CREDITS and "0.5" in error.message and "max_tokens" in error.message
    await ledger.settle(big, record(ledger, big, cost="0.1"))  # it used far less than its hold
    second = await ledger.admit(created.key, NAMES, 10, "second", cost=Decimal("0.5"))
    await ledger.settle(second, record(ledger, second, cost="0.5"))
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == Decimal("0.4")


async def test_spend_limits_count_holds(ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(daily_limit=Decimal("1"), monthly_limit=Decimal("1.5")))
    first = await ledger.admit(created.key, NAMES, 10, "d1", cost=Decimal("0.6"))
    error = await refused(ledger.admit(created.key, NAMES, 10, "d2", cost=Decimal("0.6")))
    assert error.code is ErrorCode.KEY_LIMIT_EXCEEDED and "daily" in error.message
    await ledger.settle(first, record(ledger, first, cost="0.2"))
    await ledger.admit(created.key, NAMES, 10, "d2", cost=Decimal("0.6"))  # 0.2 spent + 0.6 held <= 1


async def test_a_dead_routers_holds_expire_and_a_live_ones_last(ledger: Ledger) -> None:
    """Holds last while their router renews them, however long the request runs; once the
    router is silent for hold_ttl_s (60 s by default) they end and the request is recorded
    as lost, nothing billed."""
    clock = ledger._clock  # type: ignore[attr-defined]  # the fixture's clock is also the monotonic one
    created = await ledger.create_key(KeyLimits(credits=Decimal("1")))
    await ledger.admit(created.key, NAMES, 10, "long", cost=Decimal("0.5"), holder="live")
    await ledger.admit(created.key, NAMES, 10, "orphan", cost=Decimal("0.5"), holder="dead")
    assert (await refused(ledger.admit(created.key, NAMES, 10, "r", cost=Decimal("0.1")))).code is (
        ErrorCode.INSUFFICIENT_CREDITS
    )
    for _ in range(10):  # ten minutes: "live" renews every 15 s, "dead" never again
        for _ in range(4):
            clock.now += 15
            await ledger.renew("live")
        ledger.reap()
    assert ledger.holds.held_cost == {created.info.id: Decimal("0.5")}  # the live router's request still holds
    await ledger.admit(created.key, NAMES, 10, "r", cost=Decimal("0.1"), holder="live")
    lost = await ledger.generation("gen-orphan", None, admin=True)
    assert lost.status_code == 500 and lost.error_code == "internal_error" and lost.cost == 0
    # The live router stops renewing (it died): 60 s later its requests end too.
    clock.now += 60
    ledger.reap()
    assert "long" in ledger.holds.admitted
    clock.now += 1
    ledger.reap()
    assert ledger.holds.admitted == {} and ledger.holds.held_cost == {} and ledger.holds.holders == {}
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == Decimal("1")


class FlakyStore(SQLStore):
    """A store whose database can be taken down: every call then fails as a lost connection does."""

    down = False

    def __getattribute__(self, name: str) -> object:
        attr = super().__getattribute__(name)
        if name in ("key_by_hash", "get_workspace", "spend_since", "write_usage", "usage") and self.down:

            def fail(*args: object, **kwargs: object) -> object:
                from sqlalchemy.exc import OperationalError

                raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database is down"))

            return fail
        return attr


async def test_a_database_outage_admits_cached_keys_for_a_while_and_loses_nothing(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    store = FlakyStore(db_url)
    journal = UsageJournal(tmp_path / "journal")
    ledger = Ledger(store, journal, clock=clock, monotonic=clock, key_cache_s=1, outage_grace_s=60)
    await ledger.start()
    try:
        known = await ledger.create_key(KeyLimits(credits=Decimal(10), daily_limit=Decimal(10)))
        stranger = await ledger.create_key(KeyLimits())
        first = await ledger.admit(known.key, NAMES, 10, "before", cost=Decimal("0.1"))
        await ledger.settle(first, record(ledger, first, cost="0.1"))
        store.down = True
        clock.now += 5  # past the key cache: each admission tries the database
        admitted = []
        for i in range(20):
            admission = await ledger.admit(known.key, NAMES, 10, f"during-{i}", cost=Decimal("0.1"))
            await ledger.settle(admission, record(ledger, admission, cost="0.1"))
            admitted.append(admission)
            with pytest.raises(OrchestratorError):
                await ledger.flush()  # the database refuses the batch; it stays journaled
        assert journal.count() <= 2  # one segment waiting for the database, one open
        unknown = await refused(ledger.admit(stranger.key, NAMES, 10, "stranger"))
        assert unknown.code is ErrorCode.SERVICE_UNAVAILABLE and unknown.headers["Retry-After"]
        clock.now += 60  # past the grace: the cached key is no longer trusted
        late = await refused(ledger.admit(known.key, NAMES, 10, "late"))
        assert late.code is ErrorCode.SERVICE_UNAVAILABLE and late.status == 503
        store.down = False
        await ledger.flush()
        assert journal.count() <= 1
        assert (await ledger.get_key(known.info.id)).credits == Decimal(10) - Decimal("0.1") * 21
        report = await ledger.usage_report(group_by=["key"])
        assert {row["key"]: row["requests"] for row in report} == {known.info.id: 21}
    finally:
        store.down = False
        await ledger.stop()


class HangingStore(SQLStore):
    """A store whose database stops answering writes (no error, no reply) until
    ``answering`` is set again."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.answering = threading.Event()
        self.answering.set()

    def write_usage(self, records: list[UsageRecord]) -> object:
        self.answering.wait()
        return super().write_usage(records)


async def test_the_backlog_gauges_keep_reporting_while_a_flush_hangs(db_url: str, tmp_path: Path) -> None:
    sink = MemorySink()
    store = HangingStore(db_url)
    ledger = Ledger(
        store, UsageJournal(tmp_path / "journal"), flush_interval_s=0.05, hold_ttl_s=0.4,
        metrics=GatewayMetrics(sink),
    )  # fmt: skip
    await ledger.start()
    try:
        created = await ledger.create_key(KeyLimits())
        store.answering.clear()  # the database hangs: the next flush waits on it
        for i in range(5):
            admission = await ledger.admit(created.key, NAMES, 10, f"r{i}")
            await ledger.settle(admission, record(ledger, admission, cost="0"))
        seen = []
        for _ in range(40):  # the gauge is reported every 0.1 s here (a quarter of the hold TTL)
            await asyncio.sleep(0.05)
            seen.append(sink.get("orchestrator_gateway_pending_records"))
            if seen[-1] == 5:
                break
        assert seen[-1] == 5, seen  # reported while the flush still waits
        assert ledger.books.flush_lock.locked()
        store.answering.set()
        for _ in range(40):
            await asyncio.sleep(0.05)
            if sink.get("orchestrator_gateway_pending_records") == 0:
                break
        assert sink.get("orchestrator_gateway_pending_records") == 0
    finally:
        store.answering.set()
        await ledger.stop()


async def test_postgresql_stopped_keeps_its_ledger_admitting_cached_keys_then_all_records_land(
    postgres: PostgresServer | None, tmp_path: Path
) -> None:
    """A real outage: the server stops, so the fence's session and lock go with it. Nobody
    can take the fence meanwhile, so the ledger goes on admitting cached keys for the grace
    (a ledger that paused on a lost session would refuse them all); then it waits. When the
    server is back it holds the fence again and every record lands once."""
    if postgres is None:
        pytest.skip("ORCH_TEST_POSTGRES_URL names a server this test does not control")
    from sqlalchemy import create_engine, text

    url = postgres.url.rsplit("/", 1)[0] + "/outage_" + uuid.uuid4().hex[:8]
    admin_engine = create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {url.rsplit('/', 1)[1]}"))
    admin_engine.dispose()
    clock = Clock()
    ledger = _ledger(url, tmp_path, clock, key_cache_s=1, outage_grace_s=60, fence_wait_s=0.2)
    await ledger.start()
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(10)))
        first = await ledger.admit(created.key, NAMES, 10, "before", cost=Decimal("0.1"))
        await ledger.settle(first, record(ledger, first, cost="0.1"))
        await ledger.flush()
        postgres.stop()
        try:
            await asyncio.sleep(0.5)  # the fence keeper finds its session gone, the database unreachable
            clock.now += 5  # past the key cache: each admission tries the database
            for i in range(5):
                admission = await ledger.admit(created.key, NAMES, 10, f"during-{i}", cost=Decimal("0.1"))
                await ledger.settle(admission, record(ledger, admission, cost="0.1"))
            clock.now += 60  # past the grace: neither the key nor the fence is trusted any longer
            await asyncio.sleep(0.5)
            assert not ledger.keeper.active.is_set()
            late = await refused(ledger.admit(created.key, NAMES, 10, "late"))
            assert late.code is ErrorCode.SERVICE_UNAVAILABLE and late.headers["Retry-After"]
        finally:
            postgres.start()
        await asyncio.wait_for(ledger.keeper.active.wait(), 10)  # the fence is this ledger's again
        await ledger.flush()
        assert (await ledger.get_key(created.info.id)).credits == Decimal(10) - Decimal("0.1") * 6
        report = await ledger.usage_report(group_by=["key"])
        assert {row["key"]: row["requests"] for row in report} == {created.info.id: 6}
    finally:
        await ledger.stop()


def _ledger(db_url: str, tmp_path: Path, clock: Clock, **kwargs: object) -> Ledger:
    return Ledger(
        SQLStore(db_url), UsageJournal(tmp_path / "journal"), clock=clock, monotonic=clock,
        fence_poll_s=0.02, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_one_ledger_admits_at_a_time_and_rpm_stays_exact_across_a_handover(db_url: str, tmp_path: Path) -> None:
    import asyncio

    clock = Clock()
    old, new = _ledger(db_url, tmp_path, clock), _ledger(db_url, tmp_path, clock)
    await old.start()
    await new.start()  # ready (Serve can route to it), but not admitting: the old one holds the fence
    try:
        key = (await old.create_key(KeyLimits(rpm=5))).key
        for i in range(3):
            await old.admit(key, NAMES, 10, f"old-{i}")
        waiting = asyncio.create_task(new.admit(key, NAMES, 10, "new-0"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # two ledgers never admit at once
        await old.stop()  # flushes, hands its windows over, lets go
        admitted = await asyncio.wait_for(waiting, 5)
        assert admitted.headers["x-ratelimit-remaining-requests"] == "1"  # 3 + this one of 5
        await new.admit(key, NAMES, 10, "new-1")
        assert (await refused(new.admit(key, NAMES, 10, "new-2"))).code is ErrorCode.RATE_LIMIT_EXCEEDED
    finally:
        await old.stop()
        await new.stop()


async def test_a_handover_under_concurrent_load_admits_exactly_rpm(db_url: str, tmp_path: Path) -> None:
    """Sixty admissions arrive while the old ledger stops; each goes where a router sends it
    (the old ledger, then the next one once the old refuses as stopping). Exactly the
    key's 20 requests per minute are admitted, by both ledgers together, each recorded once."""
    from orchestrator.gateway.ledger import LedgerStopped

    clock = Clock()
    old, new = _ledger(db_url, tmp_path, clock), _ledger(db_url, tmp_path, clock)
    await old.start()
    await new.start()
    try:
        key = (await old.create_key(KeyLimits(rpm=20))).key
        await old.authenticate(key)  # a key in use: the old ledger has its row cached
        by: dict[str, list[Admission]] = {"old": [], "new": []}

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.004)
            for name, ledger in (("old", old), ("new", new)):
                try:
                    admission = await ledger.admit(key, NAMES, 10, f"h{i}")
                except LedgerStopped:
                    continue
                except OrchestratorError as exc:
                    assert exc.code is ErrorCode.RATE_LIMIT_EXCEEDED, exc
                    return
                by[name].append(admission)
                try:
                    await ledger.settle(admission, record(ledger, admission))
                except LedgerStopped:
                    await new.settle(admission, record(new, admission))  # the router's retry
                return

        async def stop_old() -> None:
            await asyncio.sleep(0.03)
            await old.stop()

        await asyncio.gather(stop_old(), *(one(i) for i in range(60)))
        assert len(by["old"]) + len(by["new"]) == 20 and by["old"] and by["new"], {k: len(v) for k, v in by.items()}
        report = await new.usage_report(group_by=["key"])
        assert [row["requests"] for row in report] == [20]
    finally:
        await old.stop()
        await new.stop()


async def test_admission_waits_for_the_fence_then_gets_503(db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    holder, standby = _ledger(db_url, tmp_path, clock), _ledger(db_url, tmp_path / "b", clock, fence_wait_s=0.1)
    await holder.start()
    await standby.start()
    try:
        key = (await holder.create_key(KeyLimits())).key
        error = await refused(standby.admit(key, NAMES, 10, "r"))
        assert error.code is ErrorCode.SERVICE_UNAVAILABLE and error.status == 503 and error.headers["Retry-After"]
    finally:
        await holder.stop()
        await standby.stop()


async def test_a_dead_ledgers_fence_is_freed_and_its_journal_replayed(db_url: str, tmp_path: Path) -> None:
    import asyncio
    import os

    from orchestrator.gateway.fence import AdvisoryLockFence, FileFence

    clock = Clock()
    dead, heir = _ledger(db_url, tmp_path, clock, flush_interval_s=3600), _ledger(db_url, tmp_path, clock)
    await dead.start()
    await heir.start()
    try:
        created = await dead.create_key(KeyLimits(credits=Decimal(1)))
        admission = await dead.admit(created.key, NAMES, 10, "last-words")
        await dead.settle(admission, record(dead, admission))  # journaled, never flushed
        assert not heir.keeper.active.is_set()
        # The process dies: its session (and advisory lock) or its lock file descriptor goes.
        dead._fencer.cancel()  # type: ignore[union-attr]
        dead._flusher.cancel()  # type: ignore[union-attr]
        fence = dead.keeper.fence
        if isinstance(fence, AdvisoryLockFence):
            fence._drop()
        elif isinstance(fence, FileFence) and fence._fd is not None:
            os.close(fence._fd)
            fence._fd = None
        await asyncio.wait_for(heir.keeper.active.wait(), 5)
        assert (await heir.generation("gen-last-words", created.key)).cost == Decimal("0.25")
        assert (await heir.get_key(created.info.id)).credits == Decimal("0.75")
    finally:
        await heir.stop()
        assert dead._db is not None
        dead._db.shutdown(wait=True)
        dead.store.close()


async def test_max_concurrent_requests_per_key(ledger: Ledger) -> None:
    import asyncio

    created = await ledger.create_key(KeyLimits(max_concurrent=3))

    async def one(i: int) -> Admission | OrchestratorError:
        try:
            return await ledger.admit(created.key, NAMES, 10, f"m{i}")
        except OrchestratorError as exc:
            return exc

    results = await asyncio.gather(*(one(i) for i in range(20)))
    admitted = [r for r in results if isinstance(r, Admission)]
    refusals = [r for r in results if isinstance(r, OrchestratorError)]
    assert len(admitted) == 3 and {r.code for r in refusals} == {ErrorCode.RATE_LIMIT_EXCEEDED}
    assert sorted(a.headers["x-ratelimit-remaining-concurrency"] for a in admitted) == ["0", "1", "2"]
    assert refusals[0].headers["x-ratelimit-limit-concurrency"] == "3" and refusals[0].headers["Retry-After"]
    await ledger.settle(admitted[0], record(ledger, admitted[0], cost="0"))  # one ends: one more may start
    again = await ledger.admit(created.key, NAMES, 10, "m-again")
    assert again.headers["x-ratelimit-remaining-concurrency"] == "0"
    assert (await refused(ledger.admit(created.key, NAMES, 10, "m-over"))).code is ErrorCode.RATE_LIMIT_EXCEEDED
    await ledger.update_key(created.info.id, KeyLimits(), clear=frozenset({"max_concurrent"}))
    await ledger.admit(created.key, NAMES, 10, "m-unlimited")


async def test_a_retried_admission_is_answered_again_and_held_once(ledger: Ledger) -> None:
    """A caller whose answer was lost asks again with the same request id (several times, at
    once): it gets the same admission, and the key's concurrency, balance and rate window
    count the request once."""
    created = await ledger.create_key(KeyLimits(max_concurrent=1, credits=Decimal("1"), rpm=2))
    hold = Decimal("0.75")
    first = await ledger.admit(created.key, NAMES, 10, "r1", cost=hold)
    again = await asyncio.gather(*(ledger.admit(created.key, NAMES, 10, "r1", cost=hold) for _ in range(5)))
    assert again == [first] * 5
    assert (await refused(ledger.admit(created.key, NAMES, 10, "r2", cost=Decimal("0")))).code is (
        ErrorCode.RATE_LIMIT_EXCEEDED  # one running, the key's limit
    )
    await ledger.settle(first, record(ledger, first, cost="0.5"))
    # Released once, and counted once in the minute: one more request fits every limit.
    second = await ledger.admit(created.key, NAMES, 10, "r2", cost=Decimal("0.5"))
    await ledger.settle(second, record(ledger, second, cost="0.5"))
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == 0
    one, other = await ledger.create_key(KeyLimits()), await ledger.create_key(KeyLimits())
    await ledger.admit(one.key, NAMES, 10, "r3")
    error = await refused(ledger.admit(other.key, NAMES, 10, "r3"))
    assert error.code is ErrorCode.INVALID_REQUEST  # another key cannot take over a request id
