"""Balances under concurrency: flushes (on the ledger's database thread) landing at every
point an admission waits on the database, in the middle of a commit, and across day
rollovers and a takeover, never let admissions overstate what a key has left."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import Admission, KeyLimits, KeyRecord
from orchestrator.gateway.store import SQLStore
from tests.usage import record

T = TypeVar("T")
NAMES = ["tiny-a"]
HOLD = Decimal("0.25")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


class FlushingLedger(Ledger):
    """A ledger whose database thread commits every pending record right after each call it
    runs there, before the caller resumes: a flush lands whenever anything (an admission
    reading a key or its spend) waits on the database."""

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        def then_commit() -> T:
            try:
                return fn(*args)
            finally:
                with self.books.lock:
                    pending = list(self.books.pending.values())
                self.books.commit(pending)

        return await super()._run(then_commit)


async def admit(ledger: Ledger, key: str, request_id: str) -> Admission | None:
    """Admits a request holding HOLD; None when the key's credits are refused."""
    try:
        return await ledger.admit(key, NAMES, 10, request_id, cost=HOLD)
    except OrchestratorError as exc:
        assert exc.code is ErrorCode.INSUFFICIENT_CREDITS, exc
        return None


async def recorded_cost(ledger: Ledger, key_id: str) -> Decimal:
    rows = await ledger.usage_report(key_id=key_id, group_by=["key"])
    return sum((row["cost"] for row in rows), Decimal(0))


async def test_flushes_and_day_rollovers_during_concurrent_admissions_never_overdraw_a_key(
    db_url: str, tmp_path: Path
) -> None:
    """Each round settles the previous round's requests (their costs become pending) and,
    concurrently, admits new ones on a key that those costs empty. A day has passed, so each
    admission reloads the key's spend from the database, and a flush commits the pending
    costs while it waits: the admission must then read the balance after that commit, not
    the key row it authenticated with before it."""
    wall, monotonic = Clock(), Clock()
    ledger = FlushingLedger(
        SQLStore(db_url), UsageJournal(tmp_path / "journal"), clock=wall, monotonic=monotonic,
        flush_interval_s=3600, key_cache_s=60, fence=None,
    )  # fmt: skip
    await ledger.start()
    try:
        credits = Decimal("1.5")
        created = await ledger.create_key(KeyLimits(credits=credits, daily_limit=Decimal(100)))
        running: list[Admission] = []
        admitted = 0
        for round_ in range(6):
            wall.now += 86_400  # the next day: every admission reloads the key's spend
            settling = [ledger.settle(a, record(ledger, a, cost=str(HOLD))) for a in running]
            arriving = [admit(ledger, created.key, f"r{round_}-{i}") for i in range(4)]
            results = await asyncio.gather(*settling, *arriving)
            running = [a for a in results[len(settling) :] if isinstance(a, Admission)]
            admitted += len(running)
        for admission in running:
            await ledger.settle(admission, record(ledger, admission, cost=str(HOLD)))
        await ledger.flush()
        balance = (await ledger.get_key(created.info.id)).credits
        assert balance is not None and balance >= 0
        assert balance == credits - await recorded_cost(ledger, created.info.id)
        assert admitted == credits / HOLD  # every cent used, none twice
    finally:
        await ledger.stop()


class WatchedLock:
    """A lock that sets ``contended`` when a thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


async def test_an_admission_during_a_commit_reads_the_balance_before_or_after_it(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread switch in the middle of a commit: the database thread has moved a record's
    cost out of the pending costs and has yet to debit the cached key row when an admission
    runs on the event loop. It must not see the cost in neither place (it waits for the
    commit to finish instead)."""
    clock = Clock()
    ledger = Ledger(
        SQLStore(db_url), UsageJournal(tmp_path / "journal"), clock=clock, monotonic=clock,
        flush_interval_s=3600, fence=None,
    )  # fmt: skip
    await ledger.start()
    lock = WatchedLock()
    ledger.keyring.lock = ledger.books.lock = lock  # type: ignore[assignment]  # the lock they share
    try:
        created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
        first = await ledger.admit(created.key, NAMES, 10, "first", cost=Decimal("0.5"))
        await ledger.settle(first, record(ledger, first, cost="0.5"))  # pending: 0.5 of 1 is free
        loop = asyncio.get_running_loop()
        outcome: list[Admission | OrchestratorError] = []
        switched = threading.Event()  # the intruding admission ended, or waits for the lock

        async def intrude() -> None:
            try:
                outcome.append(await ledger.admit(created.key, NAMES, 10, "intruder", cost=Decimal("0.75")))
            except OrchestratorError as exc:
                outcome.append(exc)
            finally:
                switched.set()

        lock.contended = switched
        debit = KeyRecord.model_copy
        paused: list[str] = []

        def pausing_debit(self: KeyRecord, *args: Any, **kwargs: Any) -> KeyRecord:
            # The commit makes the debited copy of the cached key row after moving the
            # pending costs: switch to the event loop here.
            if threading.current_thread().name.startswith("ledger-db") and not paused:
                paused.append(self.id)
                asyncio.run_coroutine_threadsafe(intrude(), loop)
                assert switched.wait(30)
            return debit(self, *args, **kwargs)

        monkeypatch.setattr(KeyRecord, "model_copy", pausing_debit)
        await ledger.flush()
        monkeypatch.undo()
        # The intruder ran to its end during the flush: at once, or right after the commit
        # let go of the lock (nothing in an admission past its database reads awaits).
        assert paused == [created.info.id] and len(outcome) == 1
        refused = outcome[0]
        assert isinstance(refused, OrchestratorError) and refused.code is ErrorCode.INSUFFICIENT_CREDITS
        free = re.search(r"and \$([0-9.]+) of this key's credits are free", refused.message)
        assert free is not None and Decimal(free.group(1)) == Decimal("0.5"), refused.message
        assert (await ledger.get_key(created.info.id)).credits == Decimal("0.5")
    finally:
        await ledger.stop()


async def test_a_ledger_taking_over_rereads_the_key_rows_it_cached(db_url: str, tmp_path: Path) -> None:
    """A standby ledger caches a key row (a lookup), then takes over from a ledger that died
    with a debit in its journal: the replay spends the key's last credits, and the cached
    row must not let another request in."""
    clock = Clock()

    def new_ledger(**kwargs: Any) -> Ledger:
        return Ledger(
            SQLStore(db_url), UsageJournal(tmp_path / "journal"), clock=clock, monotonic=clock,
            fence_poll_s=0.02, **kwargs,
        )  # fmt: skip

    dead, heir = new_ledger(flush_interval_s=3600), new_ledger()
    await dead.start()
    await heir.start()
    try:
        created = await dead.create_key(KeyLimits(credits=HOLD))
        assert (await heir.authenticate(created.key)).credits == HOLD  # cached by the standby
        admission = await dead.admit(created.key, NAMES, 10, "last", cost=HOLD)
        await dead.settle(admission, record(dead, admission, cost=str(HOLD)))  # journaled only
        # The process dies: its tasks stop and the kernel (or PostgreSQL) drops its fence.
        for task in (dead._fencer, dead._flusher, dead._reaper):
            assert task is not None
            task.cancel()
        assert dead.keeper.fence is not None
        dead.keeper.fence.release()
        await asyncio.wait_for(heir.keeper.active.wait(), 10)
        assert await admit(heir, created.key, "after") is None
        assert (await heir.get_key(created.info.id)).credits == 0
    finally:
        await heir.stop()
        assert dead._db is not None
        dead._db.shutdown(wait=True)
        dead.store.close()
