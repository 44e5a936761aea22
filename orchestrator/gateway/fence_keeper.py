"""The fence keeper: which ledger admits on a database, and the handover between ledgers.

One ledger at a time holds the fence (:mod:`~orchestrator.gateway.fence`) and admits; the
keeper takes it at start (or waits for it while another ledger runs), checks that it still
holds it, and on taking over replays what earlier ledgers left in the journal and continues
the rate-limit windows the previous one handed over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Engine

from orchestrator.errors import OrchestratorError
from orchestrator.gateway.books import Books
from orchestrator.gateway.fence import Fence
from orchestrator.gateway.keyring import KeyRing
from orchestrator.gateway.limiter import RateLimiter
from orchestrator.gateway.store import SQLStore

logger = logging.getLogger(__name__)
Runner = Callable[..., Awaitable[Any]]


class FenceKeeper:
    """Holds the fence for one ledger; :attr:`active` is set while it does and admits.

    Args:
        store: the SQL store (its engine carries the fence; it keeps the handed-over windows).
        run: runs a function on the ledger's database thread (``Ledger._run``).
        books: the ledger's books (their journal is replayed on taking over).
        keyring: the cached key rows (marked stale on taking over).
        limiter: the rate limiter whose windows are handed over.
        fence: builds the fence (None: no fence, the ledger admits at once).
        clock: wall-clock seconds; monotonic: monotonic seconds.
        poll_s: how often the fence is tried (while waiting) or checked (while held).
        outage_grace_s: how long the ledger keeps admitting without seeing its fence while
            the database is unreachable.
    """

    def __init__(
        self,
        store: SQLStore,
        run: Runner,
        *,
        books: Books,
        keyring: KeyRing,
        limiter: RateLimiter,
        fence: Callable[[Engine], Fence] | None,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        poll_s: float,
        outage_grace_s: float,
    ) -> None:
        self._store = store
        self._run = run
        self._books = books
        self._keyring = keyring
        self._limiter = limiter
        self._factory = fence
        self._clock = clock
        self._monotonic = monotonic
        self._poll_s = poll_s
        self._outage_grace_s = outage_grace_s
        self.fence: Fence | None = None
        self.active = asyncio.Event()  # set while this ledger holds the fence and admits

    async def start(self) -> asyncio.Task[None] | None:
        """Takes the fence if it is free (and takes over); returns the task that keeps it
        (None without a fence)."""
        if self._factory is None:
            await self.take_over()
            return None
        self.fence = self._factory(self._store.engine)
        if await self._run(self.fence.try_acquire):
            await self.take_over()
        return asyncio.create_task(self.keep())

    async def take_over(self) -> None:
        """Becomes the ledger that admits: replays what earlier ledgers left in the journal
        and continues the rate-limit windows the previous one handed over."""
        journal = self._books.journal
        if journal is not None:
            for segment in await self._run(journal.leftovers):
                replayed = await self._run(self._books.replay, segment)
                logger.warning("replayed %d usage records from %s", replayed, segment.name)
        # Key rows cached before (by lookups, or while another ledger held the fence) miss
        # what the replay and the other ledger debited.
        self._keyring.forget()
        windows = await self._run(self._store.take_rate_windows)
        offset = self._monotonic() - self._clock()  # epoch seconds -> this ledger's monotonic clock
        self._limiter.restore([(key, start + offset, requests, tokens) for key, start, requests, tokens in windows])
        self.active.set()

    async def keep(self) -> None:
        """Waits for the fence while another ledger holds it; once held, checks that it still
        is. A PostgreSQL session can drop: the fence is taken again at once if it is free,
        and admissions pause if another ledger has it. While the database is unreachable
        nobody can take it, so admissions go on (from cached keys) for ``outage_grace_s``."""
        held_at = self._monotonic()
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                if await self._check():
                    held_at = self._monotonic()
            except OrchestratorError:  # the database is unreachable
                if self.active.is_set() and self._monotonic() - held_at > self._outage_grace_s:
                    logger.error("the database is unreachable past the outage grace; admissions wait for it")
                    self.active.clear()
            except Exception:
                logger.exception("ledger fence check failed")

    async def _check(self) -> bool:
        # One pass of `keep`: returns whether this ledger holds the fence now.
        assert self.fence is not None
        if self.active.is_set():
            if await self._run(self.fence.still_held) or await self._run(self.fence.try_acquire):
                return True
            logger.error("another ledger took the fence; admissions wait until it is free")
            self.active.clear()
            return False
        if await self._run(self.fence.try_acquire):
            await self.take_over()
            return True
        return False

    async def hand_over(self) -> None:
        """Stops admitting and saves the rate-limit windows for the next ledger."""
        if self.active.is_set():
            self.active.clear()
            offset = self._clock() - self._monotonic()
            windows = [(key, start + offset, r, t) for key, start, r, t in self._limiter.export()]
            await self._run(self._store.save_rate_windows, windows)

    async def release(self) -> None:
        """Lets go of the fence."""
        if self.fence is not None:
            await self._run(self.fence.release)
