"""The ledger: admission (keys, model lists, credits, spend and rate limits) and
settlement (usage records, debits), with one authoritative in-memory view.

One ledger serves every router replica (the serving layer runs it as a single-replica
deployment), which is what makes limits and balances exact however many routers there
are. Every database call that touches money runs on one dedicated thread, so the database
and the ledger's view of it never disagree: a finished record is either still *pending*
(journaled, in memory, counted against the key) or *committed* (in the database), never
both or neither. Only the first lookup of a key not cached runs elsewhere, on a bounded lane
of its own (:mod:`~orchestrator.gateway.key_lookups`), so that random keys never queue
ahead of that thread's work.

This class is the facade the serving layer calls; each duty is a module of its own:
:mod:`~orchestrator.gateway.keyring` (key cache and authentication),
:mod:`~orchestrator.gateway.holds` and :mod:`~orchestrator.gateway.admission` (admitted
requests, what they hold, the admission rules), :mod:`~orchestrator.gateway.books`
(settlement, flushing, the journal), :mod:`~orchestrator.gateway.fence_keeper` (which ledger
admits, handover) and :mod:`~orchestrator.gateway.administration` (``/admin/*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway import admin
from orchestrator.gateway.adapters import AdapterEntry, stored_adapters
from orchestrator.gateway.administration import Administration
from orchestrator.gateway.admission import (
    check_concurrency,
    check_funds,
    check_model,
    handing_over,
    model_allowed,
    rate_headers,
)
from orchestrator.gateway.books import Books, Spend
from orchestrator.gateway.fence import Fence, fence_for
from orchestrator.gateway.fence_keeper import FenceKeeper
from orchestrator.gateway.holds import Holds
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.key_lookups import unreachable
from orchestrator.gateway.keyring import KEY_LOOKUP_TIMEOUT_S, KEY_LOOKUPS, UNKNOWN_KEY_TTL_S, KeyRing
from orchestrator.gateway.limiter import RateLimiter, refuse_unreachable
from orchestrator.gateway.records import Admission, CreatedKey, KeyInfo, KeyLimits, KeyRecord, UsageRecord, Workspace
from orchestrator.gateway.responses import DEFAULT_WORKSPACE_BYTES, ResponseArchive
from orchestrator.gateway.store import SQLStore
from orchestrator.metrics import GatewayMetrics, NullSink

__all__ = ["LOOKUP_WAIT_S", "Ledger", "LedgerStopped", "model_allowed"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
LOOKUP_WAIT_S = 30.0  # how long a lookup of an admitted request waits for its record, by default


class LedgerStopped(RuntimeError):
    """A ledger that is stopping (its replica is being replaced) refused a call before doing
    anything: the caller retries it on the ledger that takes over."""


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
        unknown_key_ttl_s: how long a key found unknown is refused without asking the
            database (a key made through this ledger works at once).
        key_lookups: lookups of keys not cached that may run at once, on threads of their own
            (never on the database thread admissions wait on); more get 503.
        key_lookup_timeout_s: how long one such lookup is waited for (then 503).
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
        unknown_key_ttl_s: float = UNKNOWN_KEY_TTL_S,
        key_lookups: int = KEY_LOOKUPS,
        key_lookup_timeout_s: float = KEY_LOOKUP_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.responses = ResponseArchive(lambda: self.store.engine, response_bytes)
        self.metrics = metrics or GatewayMetrics(NullSink())
        self.journal = journal
        self._clock = clock
        self._monotonic = monotonic
        self._flush_interval_s = flush_interval_s
        self._lookup_wait_s = lookup_wait_s
        self._fence_wait_s = fence_wait_s
        self._stopping = False  # set when stop begins: request-path calls are refused from then on
        self._db: ThreadPoolExecutor | None = None
        self._fencer: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.limiter = RateLimiter(monotonic)
        lock = threading.Lock()  # the money view: cached balances, pending records and costs, spend
        run = self._run
        self.keyring = KeyRing(
            store, run, lock,
            pepper=pepper, monotonic=monotonic, key_cache_s=key_cache_s, outage_grace_s=outage_grace_s,
            unknown_key_ttl_s=unknown_key_ttl_s, lookups=key_lookups, lookup_timeout_s=key_lookup_timeout_s,
        )  # fmt: skip
        self.holds = Holds(monotonic, hold_ttl_s)
        self.books = Books(
            store, journal, run, lock,
            keyring=self.keyring, holds=self.holds, limiter=self.limiter, monotonic=monotonic, metrics=self.metrics,
        )  # fmt: skip
        self.keeper = FenceKeeper(
            store, run,
            books=self.books, keyring=self.keyring, limiter=self.limiter, fence=fence,
            clock=clock, monotonic=monotonic, poll_s=fence_poll_s, outage_grace_s=outage_grace_s,
        )  # fmt: skip
        self.administration = Administration(store, run, self.keyring, pepper=pepper, clock=clock)

    # -- lifecycle --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn`` on the database thread.

        Raises:
            LedgerStopped: the ledger is not running.
            OrchestratorError: 503 ``service_unavailable`` when the database cannot be reached
            (an infrastructure fault, not a bug: the client may retry).
        """
        if self._db is None:
            raise LedgerStopped("the ledger is not running")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)
        except (OperationalError, InterfaceError) as exc:
            raise unreachable() from exc

    async def start(self) -> None:
        """Opens the store (applying migrations) and the journal, and starts the flusher and
        the fence keeper. Admissions wait until this ledger holds the fence (at once, unless
        another ledger on the same database still runs)."""
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-db")
        await self._run(self.store.open)
        self.keyring.open()
        if self.journal is not None:
            await self._run(self.journal.open)
        self._flusher = asyncio.create_task(self._flush_loop())
        self._reaper = asyncio.create_task(self._reap_loop())
        self._fencer = await self.keeper.start()

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
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("writing the usage records to the database", self.flush),
            ("closing the journal", self._close_journal),
            ("handing the rate-limit windows over", self.keeper.hand_over),
            ("releasing the fence", self.keeper.release),
            ("closing the database", self._close_store),
        )
        for what, step in steps:
            try:
                await step()
            except Exception as exc:
                logger.exception("stopping the ledger: %s failed", what)
                failures.append(exc)
        self.keyring.close()
        self._db.shutdown(wait=True)
        self._db = None
        if failures:
            raise failures[0]

    async def _close_journal(self) -> None:
        self.books.close_journal()

    async def _close_store(self) -> None:
        await self._run(self.store.close)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except Exception:
                logger.exception("usage flush failed; records stay journaled and will be retried")
            self.books.report_backlog()

    async def _reap_loop(self) -> None:
        # Also reports the backlog: on this timer as well as after each flush, so the gauges
        # keep moving while a flush waits on a database that stopped answering. A pass that
        # fails is logged and the next one runs as planned: a reaper that died would leave
        # dead routers' holds in place for good.
        while True:
            await asyncio.sleep(min(1.0, self.holds.ttl_s / 4))
            try:
                self.reap()
            except Exception:
                logger.exception("reaping dead routers' admissions failed; the next pass retries")
            self.books.report_backlog()

    # -- authentication and admission -------------------------------------------------

    async def authenticate(self, api_key: str | None) -> KeyInfo:
        """Returns the key's public record; raises as :meth:`KeyRing.authenticate`."""
        return (await self.keyring.authenticate(api_key)).info()

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
        await self._wait_for_fence()
        key = await self.keyring.authenticate(api_key)
        check_model(key, model_names)
        refuse_unreachable(key.rpm, key.tpm, tokens)  # 400 before any 429: no retry could pass
        spend = await self._spend(key)
        # Nothing below awaits: no other admission can slip between the checks and the holds,
        # and none is counted after stop() began (its windows would miss it) or while the
        # fence is lost.
        self._check_running()
        if not self.keeper.active.is_set():
            raise handing_over()
        if (earlier := self.holds.admitted.get(request_id)) is not None:
            if earlier.key_id != key.id:  # ids are the routers' own uuids: never another key's
                raise OrchestratorError(ErrorCode.INVALID_REQUEST, "This request id is already in use.")
            return earlier.admission
        return self._hold(key, model_names[0], tokens, request_id, cost, holder, spend)

    async def _wait_for_fence(self) -> None:
        if not self.keeper.active.is_set():
            try:
                await asyncio.wait_for(self.keeper.active.wait(), self._fence_wait_s)
            except TimeoutError:
                raise handing_over() from None

    async def _spend(self, key: KeyRecord) -> Spend | None:
        # The key's spend today and this month, for a key with spend limits (None otherwise).
        if key.daily_limit is None and key.monthly_limit is None:
            return None
        return await self.books.spend_now(key.id, datetime.fromtimestamp(self._clock(), UTC))

    def _hold(
        self,
        key: KeyRecord,
        model: str,
        tokens: int,
        request_id: str,
        cost: Decimal,
        holder: str | None,
        spend: Spend | None,
    ) -> Admission:
        # The checks that read the holds and the reservation itself, synchronous.
        held = self.holds.held_cost.get(key.id, Decimal(0))
        check_funds(key, cost, held, self.books.funds(key, spend))
        running = self.holds.running.get(key.id, 0)
        check_concurrency(key, running)
        decision = self.limiter.admit(key.id, key.rpm, key.tpm, tokens)
        headers = rate_headers(key, decision, running)
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
        self.holds.hold(admission, model, cost, holder)
        return admission

    async def renew(self, holder: str) -> None:
        """Notes that the router ``holder`` is alive: the holds of the requests it admitted
        last another ``hold_ttl_s``. Routers call it every quarter of that while they run."""
        self._check_running()
        self.holds.renew(holder)

    def reap(self) -> None:
        """Ends the admissions whose router was not heard from for ``hold_ttl_s`` (it died):
        their holds are released, lookups stop waiting, and each is recorded as lost. Runs
        every second (a quarter of ``hold_ttl_s`` if shorter) once the ledger is started."""
        for request_id, admitted in self.holds.stale():
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
                self.books.record(Admission(request_id=request_id), lost)
            except OrchestratorError as exc:  # not journaled: it stays admitted for the next pass
                logger.error("recording the lost request %s failed: %s", request_id, exc.message)
        self.holds.forget_silent_holders()

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
        return self.books.record(admission, record)

    async def flush(self) -> None:
        """Writes every finished record to the database now (see :meth:`Books.flush`)."""
        await self.books.flush()

    # -- lookups ----------------------------------------------------------------------

    async def generation(self, generation_id: str, api_key: str | None, *, admin: bool = False) -> UsageRecord:
        """Returns a finished request's record to the key that made it (or to an admin).

        Raises:
            OrchestratorError: 401/403 for a bad key; 404 ``not_found`` for an unknown id or
            another key's request (the same answer, so ids cannot be probed).
        """
        self._check_running()
        key_id = None if admin else (await self.keyring.authenticate(api_key)).id
        request_id = generation_id.removeprefix("gen-")
        admitted = self.holds.admitted.get(request_id)
        if admitted is not None:
            # Admitted but its router has not settled it yet (it does so right after the
            # response): wait for the record rather than answer 404.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(admitted.settled.wait(), self._lookup_wait_s)
        record = self.books.pending.get(request_id) or await self._run(self.store.usage, request_id)
        if record is None or (not admin and record.key_id != key_id):
            raise OrchestratorError(ErrorCode.NOT_FOUND, f"No generation {generation_id!r}.", param="id")
        return record

    async def usage_report(self, **filters: Any) -> list[dict[str, Any]]:
        """Flushes, then sums usage (see :meth:`SQLStore.usage_report`)."""
        await self.flush()
        return await self._run(lambda: self.store.usage_report(**filters))

    # -- administration (gateway/administration.py) -----------------------------------

    async def create_key(self, limits: KeyLimits, workspace: str = admin.DEFAULT_WORKSPACE) -> CreatedKey:
        return await self.administration.create_key(limits, workspace)

    async def list_keys(self) -> list[KeyInfo]:
        return await self.administration.list_keys()

    async def get_key(self, key_id: str) -> KeyInfo:
        return await self.administration.get_key(key_id)

    async def update_key(
        self,
        key_id: str,
        limits: KeyLimits,
        clear: frozenset[str] = frozenset(),
        add_credits: Decimal | None = None,
    ) -> KeyInfo:
        return await self.administration.update_key(key_id, limits, clear, add_credits)

    async def revoke_key(self, key_id: str) -> KeyInfo:
        return await self.administration.revoke_key(key_id)

    async def list_workspaces(self) -> list[Workspace]:
        return await self.administration.list_workspaces()

    async def set_workspace_enabled(self, workspace_id: str, enabled: bool) -> Workspace:
        return await self.administration.set_workspace_enabled(workspace_id, enabled)

    async def runtime_adapters(self) -> list[AdapterEntry]:
        """The LoRA adapters added at run time (gateway/adapters.py), read on a thread of its
        own rather than the database thread admissions wait on.

        Raises:
            LedgerStopped: the ledger is not running.
        """
        if self._db is None:
            raise LedgerStopped("the ledger is not running")
        return await asyncio.to_thread(stored_adapters, self.store.engine)

    # -- stored responses (gateway/responses.py) ---------------------------------------

    async def response_context(self, api_key: str | None, previous_id: str | None, store: bool) -> list[dict[str, Any]]:
        """Returns the conversation ``previous_id`` ends (its input items, then its output),
        or none; with ``store``, first checks that the key's workspace has room for one more.

        Raises:
            OrchestratorError: 401/403 for a bad key; ``not_found`` for an unknown response or
            another workspace's; ``storage_limit_exceeded`` when ``store`` finds no room.
        """
        self._check_running()
        key = await self.keyring.authenticate(api_key)
        if store:
            await self._run(self.responses.room, key.workspace_id)
        if previous_id is None:
            return []
        return await self._run(self.responses.history, key.workspace_id, previous_id)

    async def keep_response(self, api_key: str | None, body: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Stores a Response and the input items it answered in the key's workspace."""
        self._check_running()
        key = await self.keyring.authenticate(api_key)
        await self._run(self.responses.put, key.workspace_id, key.id, body, history)

    async def stored_response(self, api_key: str | None, response_id: str) -> dict[str, Any]:
        """Returns a stored Response of the key's workspace (``not_found`` otherwise)."""
        self._check_running()
        key = await self.keyring.authenticate(api_key)
        return await self._run(self.responses.get, key.workspace_id, response_id)

    async def forget_response(self, api_key: str | None, response_id: str) -> None:
        """Deletes a stored Response of the key's workspace (``not_found`` otherwise)."""
        self._check_running()
        key = await self.keyring.authenticate(api_key)
        await self._run(self.responses.delete, key.workspace_id, response_id)
