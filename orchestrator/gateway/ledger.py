"""The ledger: admission (keys, model lists, credits, spend and rate limits) and
settlement (usage records, debits), with one authoritative in-memory view.

One ledger serves every router replica (the serving layer runs it as a single-replica
deployment), which is what makes limits and balances exact however many routers there
are. Every database call runs on one dedicated thread, so the database and the ledger's
view of it never disagree: a finished record is either still *pending* (journaled, in
memory, counted against the key) or *committed* (in the database), never both or neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway import admin
from orchestrator.gateway.fence import Fence, fence_for
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.keys import hash_key
from orchestrator.gateway.limiter import RateLimiter, concurrency_headers, refuse_unreachable
from orchestrator.gateway.records import (
    Admission,
    CreatedKey,
    KeyInfo,
    KeyLimits,
    KeyRecord,
    UsageRecord,
    Workspace,
)
from orchestrator.gateway.responses import DEFAULT_WORKSPACE_BYTES, ResponseArchive
from orchestrator.gateway.store import SQLStore
from orchestrator.metrics import GatewayMetrics, NullSink

logger = logging.getLogger(__name__)
T = TypeVar("T")
LOOKUP_WAIT_S = 30.0  # how long a lookup of an admitted request waits for its record, by default
_SETTLED_MEMORY = 200_000  # request ids remembered to refuse a second settlement
_UNKNOWN_CACHE_MAX = 10_000


class LedgerStopped(RuntimeError):
    """A ledger that is stopping (its replica is being replaced) refused a call before doing
    anything: the caller retries it on the ledger that takes over."""


@dataclass
class _KeyEntry:
    record: KeyRecord | None  # None: no such key (cached to spare the database)
    workspace_enabled: bool
    fetched: float


@dataclass
class _Admitted:
    """An admitted request not yet settled: what it holds, and the event a lookup of its
    record waits on."""

    at: float  # monotonic
    key_id: str
    workspace_id: str
    model: str
    cost: Decimal  # its worst case, held against the key's balance and spend limits
    settled: asyncio.Event
    admission: Admission  # what the caller was answered (again, to a retried call)
    holder: str | None = None  # the router that admitted it, which renews its holds while alive


@dataclass
class _Spend:
    day: datetime
    day_total: Decimal
    month: datetime
    month_total: Decimal


def _handing_over() -> OrchestratorError:
    return OrchestratorError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "The gateway is handing over to a new instance; retry shortly.",
        headers={"Retry-After": "2"},
    )


def _day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_start(now: datetime) -> datetime:
    return _day_start(now).replace(day=1)


def model_allowed(patterns: Sequence[str], names: Sequence[str]) -> bool:
    """True when ``patterns`` is empty or one of them matches one of the model's names."""
    if not patterns:
        return True
    lowered = [n.lower() for n in names]
    return any(fnmatch.fnmatchcase(n, p.lower()) for p in patterns for n in lowered)


class Ledger:
    """The gateway's state. Constructing it does no I/O; :meth:`start` opens the database,
    replays journaled records a crash left behind and starts the background flusher.

    Args:
        store: the SQL store.
        journal: the write-ahead journal of finished records (None: records live only in
            memory until flushed, for tests that do not need crash safety).
        pepper: secret mixed into key hashes.
        clock: wall-clock seconds (record times, day and month boundaries).
        monotonic: monotonic seconds (rate-limit windows, caches).
        flush_interval_s: how often finished records are written to the database.
        key_cache_s: how long a key's row is trusted before it is read again (changes made
            by the CLI directly in the database show up within this time).
        lookup_wait_s: how long :meth:`generation` waits for an admitted request's record.
        hold_ttl_s: how long an admitted request that never settles holds its reserved cost
            and stays awaited by lookups after its router (its ``holder``) was last heard from
            (an admission or :meth:`renew`); without a holder, after its admission. Past it the
            router is taken for dead and the request is recorded as lost.
        outage_grace_s: while the database is unreachable, how long past ``key_cache_s`` a
            cached key keeps being admitted (then: 503 ``service_unavailable``), and how long
            the ledger keeps admitting without seeing its fence (then admissions wait for it).
        fence: builds the fence that lets one ledger admit at a time on the database (None:
            no fence, for tests of one ledger alone).
        fence_wait_s: how long an admission waits for a fence another ledger holds (a
            redeploy) before it gets 503 ``service_unavailable``.
        fence_poll_s: how often the fence is tried (while waiting) or checked (while held).
        metrics: where the backlog (pending records, journal segments) and flush times go.
        response_bytes: the bound on one workspace's stored responses (Responses API).
    """

    def __init__(
        self,
        store: SQLStore,
        journal: UsageJournal | None = None,
        *,
        pepper: bytes = b"",
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        flush_interval_s: float = 0.2,
        key_cache_s: float = 2.0,
        lookup_wait_s: float = LOOKUP_WAIT_S,
        hold_ttl_s: float = 60.0,
        outage_grace_s: float = 300.0,
        fence: Callable[[Engine], Fence] | None = fence_for,
        fence_wait_s: float = 30.0,
        fence_poll_s: float = 0.5,
        metrics: GatewayMetrics | None = None,
        response_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        self.store = store
        self.responses = ResponseArchive(lambda: self.store.engine, response_bytes)
        self.metrics = metrics or GatewayMetrics(NullSink())
        self.journal = journal
        self._pepper = pepper
        self._clock = clock
        self._monotonic = monotonic
        self._flush_interval_s = flush_interval_s
        self._key_cache_s = key_cache_s
        self._lookup_wait_s = lookup_wait_s
        self._hold_ttl_s = hold_ttl_s
        self._outage_grace_s = outage_grace_s
        self._fence_factory = fence
        self._fence: Fence | None = None
        self._fence_wait_s = fence_wait_s
        self._fence_poll_s = fence_poll_s
        self._fencer: asyncio.Task[None] | None = None
        self._active = asyncio.Event()  # set while this ledger holds the fence and admits
        self._stopping = False  # set when stop begins: request-path calls are refused from then on
        # Admitted, unsettled requests in admission order; by key, their count and the sum of
        # their held costs (kept beside them so that admission checks need no scan).
        self._admitted: dict[str, _Admitted] = {}
        self._running: dict[str, int] = {}
        self._held_cost: dict[str, Decimal] = {}
        self._holders: dict[str, float] = {}  # router -> when it was last heard from (monotonic)
        self.limiter = RateLimiter(monotonic)
        self._lock = threading.Lock()
        self._keys: dict[str, _KeyEntry] = {}
        self._spend: dict[str, _Spend] = {}
        self._pending: dict[str, UsageRecord] = {}
        self._pending_cost: dict[str, Decimal] = {}
        self._unsealed: list[UsageRecord] = []
        self._batches: list[tuple[Path | None, list[UsageRecord]]] = []
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._db: ThreadPoolExecutor | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn`` on the database thread.

        Raises:
            OrchestratorError: 503 ``service_unavailable`` when the database cannot be reached
            (an infrastructure fault, not a bug: the client may retry).
        """
        if self._db is None:
            raise LedgerStopped("the ledger is not running")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)
        except (OperationalError, InterfaceError) as exc:
            raise OrchestratorError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "The gateway's database is unreachable; retry shortly.",
                headers={"Retry-After": "5"},
            ) from exc

    async def start(self) -> None:
        """Opens the store (applying migrations) and the journal, and starts the flusher and
        the fence keeper. Admissions wait until this ledger holds the fence (at once, unless
        another ledger on the same database still runs)."""
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-db")
        await self._run(self.store.open)
        if self.journal is not None:
            await self._run(self.journal.open)
        self._flusher = asyncio.create_task(self._flush_loop())
        self._reaper = asyncio.create_task(self._reap_loop())
        if self._fence_factory is None:
            await self._take_over()
            return
        self._fence = self._fence_factory(self.store.engine)
        if await self._run(self._fence.try_acquire):
            await self._take_over()
        self._fencer = asyncio.create_task(self._keep_fence())

    async def _take_over(self) -> None:
        """Becomes the ledger that admits: replays what earlier ledgers left in the journal
        and continues the rate-limit windows the previous one handed over."""
        if self.journal is not None:
            for segment in await self._run(self.journal.leftovers):
                replayed = await self._run(self._replay, segment)
                logger.warning("replayed %d usage records from %s", replayed, segment.name)
        # Key rows cached before (by lookups, or while another ledger held the fence) miss
        # what the replay and the other ledger debited.
        self._forget()
        windows = await self._run(self.store.take_rate_windows)
        offset = self._monotonic() - self._clock()  # epoch seconds -> this ledger's monotonic clock
        self.limiter.restore([(key, start + offset, requests, tokens) for key, start, requests, tokens in windows])
        self._active.set()

    async def _keep_fence(self) -> None:
        # Waits for the fence while another ledger holds it; once held, checks that it still
        # is. A PostgreSQL session can drop: the fence is taken again at once if it is free,
        # and admissions pause if another ledger has it. While the database is unreachable
        # nobody can take it, so admissions go on (from cached keys) for outage_grace_s.
        assert self._fence is not None
        held_at = self._monotonic()
        while True:
            await asyncio.sleep(self._fence_poll_s)
            try:
                if self._active.is_set():
                    if await self._run(self._fence.still_held) or await self._run(self._fence.try_acquire):
                        held_at = self._monotonic()
                    else:
                        logger.error("another ledger took the fence; admissions wait until it is free")
                        self._active.clear()
                elif await self._run(self._fence.try_acquire):
                    await self._take_over()
                    held_at = self._monotonic()
            except OrchestratorError:  # the database is unreachable
                if self._active.is_set() and self._monotonic() - held_at > self._outage_grace_s:
                    logger.error("the database is unreachable past the outage grace; admissions wait for it")
                    self._active.clear()
            except Exception:
                logger.exception("ledger fence check failed")

    def _replay(self, segment: Path) -> int:
        fresh = self.store.write_usage(list(UsageJournal.read(segment)))
        UsageJournal.discard(segment)
        return len(fresh)

    def _check_running(self) -> None:
        if self._stopping:
            raise LedgerStopped("the ledger is stopping")

    async def stop(self) -> None:
        """Writes every finished record to the database, closes the journal, hands the
        rate-limit windows to the next ledger, lets go of the fence, then closes the database.
        From its start, admissions, settlements, renewals and lookups raise
        :class:`LedgerStopped` (routers retry them on the next ledger), so the windows handed
        over hold every admission and no record arrives after the journal is closed.

        Each step runs even if an earlier one failed: records a failed flush left stay in the
        journal, which the next ledger to hold the fence replays.

        Raises:
            Exception: the first step that failed (each failure is also logged), once every
            step has run.
        """
        self._stopping = True
        for task in (self._fencer, self._flusher, self._reaper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fencer = self._flusher = self._reaper = None
        if self._db is None:
            return
        failures: list[Exception] = []
        for what, step in (
            ("writing the usage records to the database", self.flush),
            ("closing the journal", self._close_journal),
            ("handing the rate-limit windows over", self._hand_over),
            ("releasing the fence", self._release_fence),
            ("closing the database", self._close_store),
        ):
            try:
                await step()
            except Exception as exc:
                logger.exception("stopping the ledger: %s failed", what)
                failures.append(exc)
        self._db.shutdown(wait=True)
        self._db = None
        if failures:
            raise failures[0]

    async def _close_journal(self) -> None:
        if self.journal is not None:
            last = self.journal.close()
            if last is not None and not self._batches and not self._unsealed:
                UsageJournal.discard(last)  # everything in it was committed

    async def _hand_over(self) -> None:
        if self._active.is_set():
            self._active.clear()
            offset = self._clock() - self._monotonic()
            windows = [(key, start + offset, r, t) for key, start, r, t in self.limiter.export()]
            await self._run(self.store.save_rate_windows, windows)

    async def _release_fence(self) -> None:
        if self._fence is not None:
            await self._run(self._fence.release)

    async def _close_store(self) -> None:
        await self._run(self.store.close)

    # -- keys -------------------------------------------------------------------------

    def _load_key(self, key_hash: str) -> _KeyEntry:
        # Runs on the database thread; the cache is filled there, under the lock, so a
        # flush (same thread) can never slip between the read and the cache update.
        record = self.store.key_by_hash(key_hash)
        enabled = True
        if record is not None:
            workspace = self.store.get_workspace(record.workspace_id)
            enabled = workspace is None or workspace.enabled
        entry = _KeyEntry(record, enabled, self._monotonic())
        with self._lock:
            if record is None and len(self._keys) > _UNKNOWN_CACHE_MAX:
                self._keys = {h: e for h, e in self._keys.items() if e.record is not None}
            self._keys[key_hash] = entry
        return entry

    async def authenticate(self, api_key: str | None) -> KeyInfo:
        """Returns the key's public record; raises as :meth:`_authenticate`."""
        return (await self._authenticate(api_key)).info()

    async def _authenticate(self, api_key: str | None) -> KeyRecord:
        """Returns the key's record.

        Raises:
            OrchestratorError: 401 ``invalid_api_key`` (missing, unknown or revoked key),
            403 ``workspace_locked`` (key or workspace disabled).
        """
        if not api_key:
            raise OrchestratorError(
                ErrorCode.INVALID_API_KEY, "Missing API key. Send it as `Authorization: Bearer <key>`."
            )
        key_hash = hash_key(api_key, self._pepper)
        entry = self._keys.get(key_hash)
        if entry is None or self._monotonic() - entry.fetched > self._key_cache_s:
            try:
                entry = await self._run(self._load_key, key_hash)
            except OrchestratorError as exc:
                # The database is down: a key seen recently keeps working from its cached row
                # for `outage_grace_s`, then gets 503 like an unknown one.
                if entry is None or exc.code is not ErrorCode.SERVICE_UNAVAILABLE:
                    raise
                if self._monotonic() - entry.fetched > self._key_cache_s + self._outage_grace_s:
                    raise
        record = entry.record
        # The lookup was by hash; the constant-time comparison makes the check explicit.
        if record is None or record.revoked_at is not None or not hmac.compare_digest(record.key_hash, key_hash):
            raise OrchestratorError(ErrorCode.INVALID_API_KEY, "Invalid API key.")
        if not record.enabled or not entry.workspace_enabled:
            what = "This API key is disabled." if not record.enabled else "This key's workspace is disabled."
            raise OrchestratorError(ErrorCode.WORKSPACE_LOCKED, what)
        return record

    # -- admission --------------------------------------------------------------------

    def _load_spend(self, key_id: str, now: datetime) -> _Spend:
        day, month = _day_start(now), _month_start(now)
        day_db = self.store.spend_since(key_id, day)
        month_db = self.store.spend_since(key_id, month)
        with self._lock:
            pending = [r for r in self._pending.values() if r.key_id == key_id]
            spend = _Spend(
                day,
                day_db + sum((r.cost for r in pending if r.created_at >= day), Decimal(0)),
                month,
                month_db + sum((r.cost for r in pending if r.created_at >= month), Decimal(0)),
            )
            self._spend[key_id] = spend
        return spend

    async def admit(
        self,
        api_key: str | None,
        model_names: Sequence[str],
        tokens: int,
        request_id: str,
        *,
        cost: Decimal = Decimal(0),
        holder: str | None = None,
    ) -> Admission:
        """Lets a request in, reserving one request, ``tokens`` tokens and ``cost`` USD, or
        refuses it. A second call for a request id this ledger admitted and has not settled
        (a caller retrying a call whose answer was lost: a broken connection, an actor
        reported dead while it lived) gets the same admission, and nothing is reserved twice.

        The reserved cost is held against the key's balance and its daily and monthly spend
        until the request settles, so concurrent requests can never overrun them: a request
        is admitted only if the balance, less what finished requests have not yet debited and
        less every running request's hold, covers its own hold (likewise for the spend
        limits). The checks and the reservations happen together, with nothing awaited in
        between.

        Args:
            api_key: the bearer token as sent.
            model_names: every name of the requested model (display name, aliases, backend id).
            tokens: prompt tokens (estimated) plus the maximum output tokens.
            request_id: the request's id.
            cost: the request's worst-case cost in USD.
            holder: the calling router's id; its holds last while it keeps renewing them
                (:meth:`renew`), so a request may run longer than ``hold_ttl_s``.

        Returns:
            The admission, with the ``x-ratelimit-*`` headers for the response.

        Raises:
            OrchestratorError: ``invalid_api_key`` 401, ``workspace_locked`` 403,
            ``model_not_allowed`` 403, ``request_too_large_for_limit`` 400 (more tokens than
            the key's per-minute limit), ``insufficient_credits`` 402, ``key_limit_exceeded``
            402, ``rate_limit_exceeded`` 429 (with ``Retry-After``), ``service_unavailable``
            503 (the database is unreachable, or another ledger holds the fence).
            LedgerStopped: this ledger is stopping.
        """
        self._check_running()
        if not self._active.is_set():
            try:
                await asyncio.wait_for(self._active.wait(), self._fence_wait_s)
            except TimeoutError:
                raise _handing_over() from None
        key = await self._authenticate(api_key)
        if not model_allowed(key.models, model_names):
            raise OrchestratorError(
                ErrorCode.MODEL_NOT_ALLOWED, f"This API key may not use the model {model_names[0]!r}.", param="model"
            )
        refuse_unreachable(key.rpm, key.tpm, tokens)  # 400 before any 429: no retry could pass
        spend = None
        if key.daily_limit is not None or key.monthly_limit is not None:
            now = datetime.fromtimestamp(self._clock(), UTC)
            spend = self._spend.get(key.id)
            if spend is None or spend.day != _day_start(now) or spend.month != _month_start(now):
                spend = await self._run(self._load_spend, key.id, now)  # 503 while the database is down
        # Nothing below awaits: no other admission can slip between the checks and the holds,
        # and none is counted after stop() began (its windows would miss it) or while the
        # fence is lost.
        self._check_running()
        if not self._active.is_set():
            raise _handing_over()
        if (earlier := self._admitted.get(request_id)) is not None:
            if earlier.key_id != key.id:  # ids are the routers' own uuids: never another key's
                raise OrchestratorError(ErrorCode.INVALID_REQUEST, "This request id is already in use.")
            return earlier.admission
        held = self._held_cost.get(key.id, Decimal(0))
        self._check_funds(key, cost, held, spend)
        running = self._running.get(key.id, 0)
        if key.max_concurrent is not None and running >= key.max_concurrent:
            raise OrchestratorError(
                ErrorCode.RATE_LIMIT_EXCEEDED,
                f"This API key already has {running} requests running, its limit. Retry when one ends.",
                headers={**concurrency_headers(key.max_concurrent, running), "Retry-After": "1"},
            )
        decision = self.limiter.admit(key.id, key.rpm, key.tpm, tokens)
        headers = decision.headers()
        if key.max_concurrent is not None:
            headers |= concurrency_headers(key.max_concurrent, running + 1)
        if not decision.allowed:
            which = "requests" if key.rpm is not None and decision.remaining_requests == 0 else "tokens"
            raise OrchestratorError(
                ErrorCode.RATE_LIMIT_EXCEEDED,
                f"Rate limit reached for this API key ({which} per minute). Retry after {headers['Retry-After']} s.",
                headers=headers,
            )
        # Admitted, not yet settled: a lookup waits for the record instead of answering 404,
        # which lets routers settle after the response without a window of missing records.
        admission = Admission(
            request_id=request_id,
            key_id=key.id,
            workspace_id=key.workspace_id,
            reserved_tokens=tokens,
            window_start=decision.window_start,
            headers=headers,
        )
        at = self._monotonic()
        self._admitted[request_id] = _Admitted(
            at, key.id, key.workspace_id, model_names[0], cost, asyncio.Event(), admission, holder
        )
        if holder is not None:
            self._holders[holder] = at
        self._running[key.id] = running + 1
        if cost:
            self._held_cost[key.id] = held + cost
        return admission

    def _check_funds(self, key: KeyRecord, cost: Decimal, held: Decimal, spend: _Spend | None) -> None:
        """Raises unless the key's balance, and its spend limits if it has any (``spend``:
        its spend as loaded for today), leave room for ``cost`` beside the ``held`` costs of
        its running requests.

        The balance, what finished requests have yet to debit from it and the spend are read
        from the ledger's view as it is now, together under the lock, and not from ``key`` as
        authenticated: the database thread may have committed records since (while the
        admission awaited it, or at any moment, being another thread), and a commit moves
        their costs from pending to the cached balance in one step under that lock.

        Raises:
            OrchestratorError: 401 ``invalid_api_key`` (the key's row is gone),
            402 ``insufficient_credits``, 402 ``key_limit_exceeded``.
        """
        with self._lock:
            entry = self._keys.get(key.key_hash)
            current = entry.record if entry is not None else None
            pending = self._pending_cost.get(key.id, Decimal(0))
            # The spend that settlements update: another admission may have reloaded it since.
            spend = self._spend.get(key.id, spend) if spend is not None else None
            totals = (spend.day_total, spend.month_total) if spend is not None else None
        if current is None or current.id != key.id:
            raise OrchestratorError(ErrorCode.INVALID_API_KEY, "Invalid API key.")
        if current.credits is not None:
            available = current.credits - pending - held
            if available <= 0:
                raise OrchestratorError(ErrorCode.INSUFFICIENT_CREDITS, "This API key has no credits left.")
            if cost > available:
                raise OrchestratorError(
                    ErrorCode.INSUFFICIENT_CREDITS,
                    f"This request may cost up to ${cost} and ${available} of this key's credits are free. "
                    "Lower max_tokens (or n), wait for running requests to finish, or add credits.",
                )
        if totals is None:
            return
        for limit, total, period in ((key.daily_limit, totals[0], "daily"), (key.monthly_limit, totals[1], "monthly")):
            if limit is not None and (total >= limit or total + held + cost > limit):
                raise OrchestratorError(
                    ErrorCode.KEY_LIMIT_EXCEEDED,
                    f"This API key reached its {period} spend limit of ${limit} "
                    f"(spent ${total}, ${held} held by running requests, this one may cost up to ${cost}).",
                )

    def _release(self, request_id: str) -> _Admitted | None:
        """Ends an admitted request's holds (its worst-case cost and its place among the key's
        running requests). Returns it (its ``settled`` event not yet set), or None for a
        request this ledger did not admit."""
        admitted = self._admitted.pop(request_id, None)
        if admitted is None:
            return None
        key_id, cost = admitted.key_id, admitted.cost
        if self._running[key_id] > 1:
            self._running[key_id] -= 1
        else:
            del self._running[key_id]
        if cost:
            left = self._held_cost[key_id] - cost
            if left:
                self._held_cost[key_id] = left
            else:
                del self._held_cost[key_id]
        return admitted

    async def renew(self, holder: str) -> None:
        """Notes that the router ``holder`` is alive: the holds of the requests it admitted
        last another ``hold_ttl_s``. Routers call it every quarter of that while they run."""
        self._check_running()
        self._holders[holder] = self._monotonic()

    def reap(self) -> None:
        """Ends the admissions whose router was not heard from for ``hold_ttl_s`` (it died):
        their holds are released, lookups stop waiting, and each is recorded as lost. Runs
        every second (a quarter of ``hold_ttl_s`` if shorter) once the ledger is started."""
        now = self._monotonic()

        def heard(admitted: _Admitted) -> float:
            renewed = self._holders.get(admitted.holder) if admitted.holder is not None else None
            return admitted.at if renewed is None else max(admitted.at, renewed)

        stale = [
            (rid, admitted) for rid, admitted in self._admitted.items() if now - heard(admitted) > self._hold_ttl_s
        ]
        for request_id, admitted in stale:
            # Its router is gone, and with it what the request used: it still leaves its one
            # record (nothing billed), marked as lost.
            lost = UsageRecord(
                request_id=request_id,
                key_id=admitted.key_id,
                workspace_id=admitted.workspace_id,
                model=admitted.model,
                status_code=500,
                error_code=ErrorCode.INTERNAL_ERROR.value,
                created_at=datetime.fromtimestamp(self._clock(), UTC),
            )
            try:
                self._record(Admission(request_id=request_id), lost)
            except OrchestratorError as exc:  # not journaled: it stays admitted for the next pass
                logger.error("recording the lost request %s failed: %s", request_id, exc.message)
        holding = {admitted.holder for admitted in self._admitted.values()}
        self._holders = {h: seen for h, seen in self._holders.items() if h in holding or now - seen <= self._hold_ttl_s}

    # -- settlement -------------------------------------------------------------------

    async def settle(self, admission: Admission, record: UsageRecord) -> bool:
        """Records a finished request and debits its key, exactly once per request id.

        The record is journaled and visible to :meth:`generation` before this returns (and
        lookups that arrived since admission are released); the database write happens in
        the background. Returns False for a repeated settlement.

        Raises:
            LedgerStopped: this ledger is stopping (nothing was recorded).
            OrchestratorError: 503 ``service_unavailable`` when the journal cannot be written
            (a full disk): nothing was recorded, the request is still admitted and holds what
            it held, and a retried settlement records it.
        """
        self._check_running()
        return self._record(admission, record)

    def _record(self, admission: Admission, record: UsageRecord) -> bool:
        # settle() without the running check, and synchronous: nothing between the release of
        # the holds and the record's arrival in `_pending` can interleave. The journal comes
        # first: if it fails, nothing has changed yet.
        rid = record.request_id
        if rid in self._settled:
            return False
        if self.journal is not None:
            try:
                self.journal.append(record)
            except OSError as exc:
                logger.error("journaling the usage of %s failed: %s", rid, exc)
                raise OrchestratorError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "The gateway could not record this request's usage; retry shortly.",
                    headers={"Retry-After": "5"},
                ) from exc
        admitted = self._release(rid)
        self._settled[rid] = None
        if len(self._settled) > _SETTLED_MEMORY:
            self._settled.popitem(last=False)
        if admission.key_id is not None:
            used = record.prompt_tokens + record.completion_tokens
            self.limiter.settle(admission.key_id, admission.window_start, admission.reserved_tokens, used)
        with self._lock:
            self._pending[rid] = record
            self._unsealed.append(record)
            if record.key_id is not None and record.cost:
                self._pending_cost[record.key_id] = self._pending_cost.get(record.key_id, Decimal(0)) + record.cost
                spend = self._spend.get(record.key_id)
                if spend is not None and record.created_at >= spend.day:
                    spend.day_total += record.cost
                if spend is not None and record.created_at >= spend.month:
                    spend.month_total += record.cost
        if admitted is not None:
            admitted.settled.set()  # lookups waiting since admission now find the record
        return True

    def _commit(self, batch: list[UsageRecord]) -> None:
        # Database thread: write, then move the records from pending to committed in the
        # ledger's view in one step under the lock.
        fresh = {r.request_id for r in self.store.write_usage(batch)}
        debited: dict[str, Decimal] = {}  # key id -> what the database just took off its balance
        with self._lock:
            for record in batch:
                # A batch can be committed twice (a flush cancelled while its write ran on
                # this thread is retried): only the first commit moves the record.
                if self._pending.pop(record.request_id, None) is None or record.key_id is None or not record.cost:
                    continue
                self._pending_cost[record.key_id] -= record.cost
                if self._pending_cost[record.key_id] == 0:
                    del self._pending_cost[record.key_id]
                if record.request_id in fresh:
                    debited[record.key_id] = debited.get(record.key_id, Decimal(0)) + record.cost
            for entry in self._keys.values():
                key = entry.record
                if key is not None and key.id in debited and key.credits is not None:
                    entry.record = key.model_copy(update={"credits": key.credits - debited[key.id]})

    async def flush(self) -> None:
        """Writes every finished record to the database now.

        Raises:
            Exception: the database failed; records stay pending (and journaled) for a retry.
        """
        # One flush at a time (the flusher, a usage report and shutdown may all call it):
        # two would commit the same head batch and then pop a batch nobody committed.
        async with self._flush_lock:
            # While an earlier batch waits for the database (an outage), new records stay in
            # the open segment instead of sealing one segment per flush, so the journal keeps
            # at most two files however long the outage lasts. Once that batch is committed,
            # what accumulated meanwhile is sealed and committed in the same flush.
            sealed = False
            while True:
                if not self._batches:
                    if sealed or not self._unsealed:
                        return
                    # Sealed before the records move into a batch: if sealing fails, they stay
                    # unsealed (in memory and in the open segment) for the next flush. Nothing
                    # is awaited in between, so no record arrives between the two.
                    segment = self.journal.seal() if self.journal is not None else None
                    with self._lock:
                        batch, self._unsealed = self._unsealed, []
                    self._batches.append((segment, batch))
                    sealed = True
                segment, records = self._batches[0]
                started = self._monotonic()
                await self._run(self._commit, records)
                self.metrics.flushed(self._monotonic() - started)
                self._batches.pop(0)
                if segment is not None:
                    UsageJournal.discard(segment)

    def _report_backlog(self) -> None:
        # Called by the background loops, which must outlive any failure: logged, not raised.
        try:
            segments = self.journal.count() if self.journal is not None else 0
            self.metrics.backlog(pending=len(self._pending), segments=segments)
        except Exception:
            logger.exception("reporting the usage backlog failed")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except Exception:
                logger.exception("usage flush failed; records stay journaled and will be retried")
            self._report_backlog()

    async def _reap_loop(self) -> None:
        # Also reports the backlog: on this timer as well as after each flush, so the gauges
        # keep moving while a flush waits on a database that stopped answering. A pass that
        # fails is logged and the next one runs as planned: a reaper that died would leave
        # dead routers' holds in place for good.
        while True:
            await asyncio.sleep(min(1.0, self._hold_ttl_s / 4))
            try:
                self.reap()
            except Exception:
                logger.exception("reaping dead routers' admissions failed; the next pass retries")
            self._report_backlog()

    # -- lookups ----------------------------------------------------------------------

    async def generation(self, generation_id: str, api_key: str | None, *, admin: bool = False) -> UsageRecord:
        """Returns a finished request's record to the key that made it (or to an admin).

        Raises:
            OrchestratorError: 401/403 for a bad key; 404 ``not_found`` for an unknown id or
            another key's request (the same answer, so ids cannot be probed).
        """
        self._check_running()
        key_id = None if admin else (await self._authenticate(api_key)).id
        request_id = generation_id.removeprefix("gen-")
        admitted = self._admitted.get(request_id)
        if admitted is not None:
            # Admitted but its router has not settled it yet (it does so right after the
            # response): wait for the record rather than answer 404.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(admitted.settled.wait(), self._lookup_wait_s)
        record = self._pending.get(request_id) or await self._run(self.store.usage, request_id)
        if record is None or (not admin and record.key_id != key_id):
            raise OrchestratorError(ErrorCode.NOT_FOUND, f"No generation {generation_id!r}.", param="id")
        return record

    async def usage_report(self, **filters: Any) -> list[dict[str, Any]]:
        """Flushes, then sums usage (see :meth:`SQLStore.usage_report`)."""
        await self.flush()
        return await self._run(lambda: self.store.usage_report(**filters))

    # -- administration ---------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _forget(self, key_id: str | None = None) -> None:
        """Marks cached key rows stale, one key's or all (None): the next authentication reads
        them again. They stay cached meanwhile, and commits keep debiting them, so an
        admission already past authentication still reads a balance that agrees with the
        pending costs (:meth:`_check_funds`)."""
        with self._lock:
            for entry in self._keys.values():
                if key_id is None or (entry.record is not None and entry.record.id == key_id):
                    entry.fetched = -math.inf

    async def create_key(self, limits: KeyLimits, workspace: str = admin.DEFAULT_WORKSPACE) -> CreatedKey:
        created = await self._run(
            lambda: admin.create_key(self.store, limits, workspace=workspace, pepper=self._pepper, now=self._now())
        )
        self._forget()  # the new key may have been cached as unknown
        return created

    async def list_keys(self) -> list[KeyInfo]:
        return [r.info() for r in await self._run(self.store.list_keys)]

    async def get_key(self, key_id: str) -> KeyInfo:
        return await self._run(admin.get_key, self.store, key_id)

    async def update_key(
        self,
        key_id: str,
        limits: KeyLimits,
        clear: frozenset[str] = frozenset(),
        add_credits: Decimal | None = None,
    ) -> KeyInfo:
        info = await self._run(
            lambda: admin.update_key(self.store, key_id, limits, clear=clear, add_credits=add_credits)
        )
        self._forget(key_id)
        return info

    async def revoke_key(self, key_id: str) -> KeyInfo:
        info = await self._run(lambda: admin.revoke_key(self.store, key_id, now=self._now()))
        self._forget(key_id)
        return info

    async def list_workspaces(self) -> list[Workspace]:
        return await self._run(self.store.list_workspaces)

    async def set_workspace_enabled(self, workspace_id: str, enabled: bool) -> Workspace:
        workspace = await self._run(admin.set_workspace_enabled, self.store, workspace_id, enabled)
        self._forget()
        return workspace

    # -- stored responses (gateway/responses.py) ---------------------------------------

    async def response_context(self, api_key: str | None, previous_id: str | None, store: bool) -> list[dict[str, Any]]:
        """Returns the conversation ``previous_id`` ends (its input items, then its output),
        or none; with ``store``, first checks that the key's workspace has room for one more.

        Raises:
            OrchestratorError: 401/403 for a bad key; ``not_found`` for an unknown response or
            another workspace's; ``storage_limit_exceeded`` when ``store`` finds no room.
        """
        self._check_running()
        key = await self._authenticate(api_key)
        if store:
            await self._run(self.responses.room, key.workspace_id)
        if previous_id is None:
            return []
        return await self._run(self.responses.history, key.workspace_id, previous_id)

    async def keep_response(self, api_key: str | None, body: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Stores a Response and the input items it answered in the key's workspace."""
        self._check_running()
        key = await self._authenticate(api_key)
        await self._run(self.responses.put, key.workspace_id, key.id, body, history)

    async def stored_response(self, api_key: str | None, response_id: str) -> dict[str, Any]:
        """Returns a stored Response of the key's workspace (``not_found`` otherwise)."""
        self._check_running()
        key = await self._authenticate(api_key)
        return await self._run(self.responses.get, key.workspace_id, response_id)

    async def forget_response(self, api_key: str | None, response_id: str) -> None:
        """Deletes a stored Response of the key's workspace (``not_found`` otherwise)."""
        self._check_running()
        key = await self._authenticate(api_key)
        await self._run(self.responses.delete, key.workspace_id, response_id)
