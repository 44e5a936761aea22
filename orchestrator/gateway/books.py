"""The books: finished requests' usage records from settlement to the database.

A settled record is journaled, then *pending* (in memory, its cost counted against its key)
until a flush *commits* it (in the database, its cost debited from the key's balance). A
commit moves records from pending to committed, and their costs from the pending costs to
the cached balances, in one step under the lock of the ledger's money view, so that view
never counts a cost twice or not at all. The spend of keys with spend limits (today's and
this month's) is kept here too: settlements add to it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.expiring_set import ExpiringSet
from orchestrator.gateway.holds import Admitted, Holds
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.keyring import KeyRing
from orchestrator.gateway.limiter import RateLimiter
from orchestrator.gateway.records import Admission, KeyRecord, UsageRecord
from orchestrator.gateway.store import SQLStore
from orchestrator.metrics import GatewayMetrics

logger = logging.getLogger(__name__)
Runner = Callable[..., Awaitable[Any]]
# Request ids remembered to refuse a second settlement: for SETTLED_MEMORY_S after it (twice
# the 300 s a router retries a settlement, ``Settler.retry_for_s``) and at most SETTLED_MEMORY_MAX
# of them. One forgotten earlier is still stored and debited once: the store skips request ids it
# has (``SQLStore.write_usage``).
SETTLED_MEMORY_S = 600.0
SETTLED_MEMORY_MAX = 200_000


@dataclass
class Spend:
    """A key's spend since the start of the day and of the month its totals are for."""

    day: datetime
    day_total: Decimal
    month: datetime
    month_total: Decimal


@dataclass
class Funds:
    """What an admission checks a key's funds against, read together under the lock: the
    key's cached row (None: gone), the costs of its pending records, its spend totals."""

    current: KeyRecord | None
    pending: Decimal
    totals: tuple[Decimal, Decimal] | None


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


class Books:
    """Pending records, their costs by key, the sealed batches awaiting the database, and the
    request ids already settled.

    Args:
        store: the SQL store records are written to.
        journal: the write-ahead journal (None: records live only in memory until flushed).
        run: runs a function on the ledger's database thread (``Ledger._run``).
        lock: the lock of the ledger's money view, shared with ``keyring``.
        keyring: the cached key rows, whose balances commits debit.
        holds: the admitted requests, whose holds a settlement releases.
        limiter: the rate limiter, which a settlement corrects to the tokens used.
        monotonic: monotonic seconds (flush times).
        metrics: where flush times and the backlog go.
    """

    def __init__(
        self,
        store: SQLStore,
        journal: UsageJournal | None,
        run: Runner,
        lock: threading.Lock,
        *,
        keyring: KeyRing,
        holds: Holds,
        limiter: RateLimiter,
        monotonic: Callable[[], float],
        metrics: GatewayMetrics,
    ) -> None:
        self._store = store
        self.journal = journal
        self._run = run
        self.lock = lock
        self._keyring = keyring
        self._holds = holds
        self._limiter = limiter
        self._monotonic = monotonic
        self._metrics = metrics
        self.spend: dict[str, Spend] = {}
        self.pending: dict[str, UsageRecord] = {}
        self.pending_cost: dict[str, Decimal] = {}
        self.unsealed: list[UsageRecord] = []
        self.batches: list[tuple[Path | None, list[UsageRecord]]] = []
        self.settled = ExpiringSet(SETTLED_MEMORY_S, SETTLED_MEMORY_MAX, monotonic)  # request ids settled
        self.flush_lock = asyncio.Lock()

    # -- settlement -------------------------------------------------------------------

    def record(self, admission: Admission, record: UsageRecord) -> bool:
        """Journals ``record``, releases its request's holds and makes it pending. Returns
        False for a request id already settled. Synchronous: nothing between the release
        of the holds and the record's arrival among the pending ones can interleave. The
        journal comes first: if it fails, nothing has changed yet.

        Raises:
            OrchestratorError: 503 ``service_unavailable`` when the journal cannot be written.
        """
        rid = record.request_id
        if rid in self.settled:
            return False
        self._journal(record)
        admitted = self._holds.release(rid)
        self.settled.add(rid)
        if admission.key_id is not None:
            used = record.prompt_tokens + record.completion_tokens
            self._limiter.settle(admission.key_id, admission.window_start, admission.reserved_tokens, used)
        self._add_pending(record)
        _wake(admitted)
        return True

    def _journal(self, record: UsageRecord) -> None:
        if self.journal is None:
            return
        try:
            self.journal.append(record)
        except OSError as exc:
            logger.error("journaling the usage of %s failed: %s", record.request_id, exc)
            raise OrchestratorError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "The gateway could not record this request's usage; retry shortly.",
                headers={"Retry-After": "5"},
            ) from exc

    def _add_pending(self, record: UsageRecord) -> None:
        with self.lock:
            self.pending[record.request_id] = record
            self.unsealed.append(record)
            if record.key_id is None or not record.cost:
                return
            self.pending_cost[record.key_id] = self.pending_cost.get(record.key_id, Decimal(0)) + record.cost
            spend = self.spend.get(record.key_id)
            if spend is not None and record.created_at >= spend.day:
                spend.day_total += record.cost
            if spend is not None and record.created_at >= spend.month:
                spend.month_total += record.cost

    def commit(self, batch: list[UsageRecord]) -> None:
        """Writes ``batch`` to the database, then moves its records from pending to committed
        in the ledger's view in one step under the lock. Runs on the database thread."""
        fresh = {r.request_id for r in self._store.write_usage(batch)}
        debited: dict[str, Decimal] = {}  # key id -> what the database just took off its balance
        with self.lock:
            for record in batch:
                # A batch can be committed twice (a flush cancelled while its write ran on
                # the database thread is retried): only the first commit moves the record.
                if self.pending.pop(record.request_id, None) is None or record.key_id is None or not record.cost:
                    continue
                self.pending_cost[record.key_id] -= record.cost
                if self.pending_cost[record.key_id] == 0:
                    del self.pending_cost[record.key_id]
                if record.request_id in fresh:
                    debited[record.key_id] = debited.get(record.key_id, Decimal(0)) + record.cost
            self._keyring.debit(debited)

    # -- flushing ---------------------------------------------------------------------

    async def flush(self) -> None:
        """Writes every finished record to the database now.

        Raises:
            Exception: the database failed; records stay pending (and journaled) for a retry.
        """
        # One flush at a time (the flusher, a usage report and shutdown may all call it):
        # two would commit the same head batch and then pop a batch nobody committed.
        async with self.flush_lock:
            # While an earlier batch waits for the database (an outage), new records stay in
            # the open segment instead of sealing one segment per flush, so the journal keeps
            # at most two files however long the outage lasts. Once that batch is committed,
            # what accumulated meanwhile is sealed and committed in the same flush.
            sealed = False
            while self.batches or (not sealed and self.unsealed):
                if not self.batches:
                    self._seal()
                    sealed = True
                await self._commit_head()

    def _seal(self) -> None:
        # Sealed before the records move into a batch: if sealing fails, they stay unsealed
        # (in memory and in the open segment) for the next flush. Nothing is awaited in
        # between, so no record arrives between the two.
        segment = self.journal.seal() if self.journal is not None else None
        with self.lock:
            batch, self.unsealed = self.unsealed, []
        self.batches.append((segment, batch))

    async def _commit_head(self) -> None:
        segment, records = self.batches[0]
        started = self._monotonic()
        await self._run(self.commit, records)
        self._metrics.flushed(self._monotonic() - started)
        self.batches.pop(0)
        if segment is not None:
            UsageJournal.discard(segment)

    def replay(self, segment: Path) -> int:
        """Writes a journal segment an earlier ledger left behind to the database, then
        discards it. Returns how many of its records were new. Runs on the database thread."""
        fresh = self._store.write_usage(list(UsageJournal.read(segment)))
        UsageJournal.discard(segment)
        return len(fresh)

    def close_journal(self) -> None:
        """Closes the journal; its last segment is discarded when everything was committed."""
        if self.journal is not None:
            last = self.journal.close()
            if last is not None and not self.batches and not self.unsealed:
                UsageJournal.discard(last)  # everything in it was committed

    def report_backlog(self) -> None:
        """Reports the pending records and journal segments. Called by the background loops,
        which must outlive any failure: logged, not raised."""
        try:
            segments = self.journal.count() if self.journal is not None else 0
            self._metrics.backlog(pending=len(self.pending), segments=segments)
        except Exception:
            logger.exception("reporting the usage backlog failed")

    # -- spend ------------------------------------------------------------------------

    def load_spend(self, key_id: str, now: datetime) -> Spend:
        """Reads the key's spend today and this month (the database's, plus its pending
        records') and keeps it. Runs on the database thread."""
        day, month = day_start(now), month_start(now)
        day_db = self._store.spend_since(key_id, day)
        month_db = self._store.spend_since(key_id, month)
        with self.lock:
            pending = [r for r in self.pending.values() if r.key_id == key_id]
            spend = Spend(
                day,
                day_db + sum((r.cost for r in pending if r.created_at >= day), Decimal(0)),
                month,
                month_db + sum((r.cost for r in pending if r.created_at >= month), Decimal(0)),
            )
            self.spend[key_id] = spend
        return spend

    async def spend_now(self, key_id: str, now: datetime) -> Spend:
        """The key's spend for ``now``'s day and month: kept, or read again when the day or
        the month has turned (503 ``service_unavailable`` while the database is down)."""
        spend = self.spend.get(key_id)
        if spend is None or spend.day != day_start(now) or spend.month != month_start(now):
            loaded: Spend = await self._run(self.load_spend, key_id, now)
            return loaded
        return spend

    def funds(self, key: KeyRecord, spend: Spend | None) -> Funds:
        """Reads the key's balance, its pending costs and its spend as they are now, together
        under the lock (``spend``: as the admission loaded it; None: the key has no spend
        limits)."""
        with self.lock:
            current = self._keyring.current(key)
            pending = self.pending_cost.get(key.id, Decimal(0))
            # The spend that settlements update: another admission may have reloaded it since.
            spend = self.spend.get(key.id, spend) if spend is not None else None
            totals = (spend.day_total, spend.month_total) if spend is not None else None
        return Funds(current, pending, totals)


def _wake(admitted: Admitted | None) -> None:
    if admitted is not None:
        admitted.settled.set()  # lookups waiting since admission now find the record
