"""Key lookups: whether a key hash exists, asked of the database on a lane of its own.

Unknown keys (a flood of random tokens) must not queue ahead of the ledger's own database
work (key refreshes, spend loads, flushes), which runs on the ledger's one database thread.
So the first lookup of a hash runs on this lane instead: at most ``limit`` at once (more are
refused at once), each waited for at most ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy.exc import InterfaceError, OperationalError

from orchestrator.errors import ErrorCode, OrchestratorError


def unreachable() -> OrchestratorError:
    """503 ``service_unavailable`` for a database that cannot be reached."""
    return OrchestratorError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "The gateway's database is unreachable; retry shortly.",
        headers={"Retry-After": "5"},
    )


class KeyLookups:
    """A bounded, timed lane of database threads for finding keys by hash.

    Args:
        find: returns whether a key with the given hash exists (runs on the lane's threads).
        limit: lookups running or queued at once; more are refused (503, ``Retry-After: 1``).
            A lookup that timed out still counts until its database call returns, so the
            database never has more than ``limit`` of them.
        timeout_s: how long a caller waits for its lookup (then 503).
    """

    def __init__(self, find: Callable[[str], bool], *, limit: int, timeout_s: float) -> None:
        self._find = find
        self.limit = limit
        self._timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(limit)
        self._lane: ThreadPoolExecutor | None = None

    def open(self) -> None:
        self._lane = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="ledger-keys")

    @property
    def running(self) -> bool:
        """Whether the lane runs (:meth:`open` was called, :meth:`close` not since)."""
        return self._lane is not None

    def close(self) -> None:
        """Stops the lane; lookups still queued are dropped (their callers get 503)."""
        if self._lane is not None:
            self._lane.shutdown(wait=False, cancel_futures=True)
            self._lane = None

    async def exists(self, key_hash: str) -> bool:
        """Returns whether a key with ``key_hash`` exists.

        Raises:
            OrchestratorError: 503 ``service_unavailable`` when ``limit`` lookups are already
            under way, when this one takes longer than ``timeout_s``, or when the database
            cannot be reached.
        """
        if self._lane is None:
            raise OrchestratorError(ErrorCode.SERVICE_UNAVAILABLE, "The gateway is not running.")
        if not self._slots.acquire(blocking=False):
            raise OrchestratorError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "The gateway is checking too many unknown keys; retry shortly.",
                headers={"Retry-After": "1"},
            )
        try:
            future = self._lane.submit(self._find, key_hash)
        except RuntimeError:  # the lane was closed meanwhile
            self._slots.release()
            raise
        future.add_done_callback(self._free)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
        except TimeoutError:
            raise OrchestratorError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "Looking up this API key took too long; retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        except (OperationalError, InterfaceError) as exc:
            raise unreachable() from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # Dropped by close(), not a cancellation of the caller.
                raise OrchestratorError(ErrorCode.SERVICE_UNAVAILABLE, "The gateway is stopping.") from None
            raise

    def _free(self, _: Future[bool]) -> None:
        self._slots.release()
