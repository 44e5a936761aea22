"""The key ring: the ledger's cache of key rows, and authentication against it.

A key's row is read on the ledger's database thread and cached for ``key_cache_s``; its
cached balance is debited by each commit (:meth:`KeyRing.debit`), under the lock the
ledger's money view shares, so that an admission always reads a balance that agrees with
the costs still pending.
"""

from __future__ import annotations

import hmac
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.keys import hash_key
from orchestrator.gateway.records import KeyRecord
from orchestrator.gateway.store import SQLStore

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]
_UNKNOWN_CACHE_MAX = 10_000


@dataclass
class KeyEntry:
    record: KeyRecord | None  # None: no such key (cached to spare the database)
    workspace_enabled: bool
    fetched: float


class KeyRing:
    """Cached key rows by hash.

    Args:
        store: the SQL store the rows are read from.
        run: runs a function on the ledger's database thread (``Ledger._run``).
        lock: the lock of the ledger's money view (cached balances, pending costs).
        pepper: secret mixed into key hashes.
        monotonic: monotonic seconds (cache ages).
        key_cache_s: how long a row is trusted before it is read again.
        outage_grace_s: while the database is unreachable, how long past ``key_cache_s`` a
            cached key keeps being authenticated.
    """

    def __init__(
        self,
        store: SQLStore,
        run: Runner,
        lock: threading.Lock,
        *,
        pepper: bytes,
        monotonic: Callable[[], float],
        key_cache_s: float,
        outage_grace_s: float,
    ) -> None:
        self._store = store
        self._run = run
        self.lock = lock
        self._pepper = pepper
        self._monotonic = monotonic
        self._key_cache_s = key_cache_s
        self._outage_grace_s = outage_grace_s
        self.entries: dict[str, KeyEntry] = {}

    def hash(self, api_key: str) -> str:
        return hash_key(api_key, self._pepper)

    def load(self, key_hash: str) -> KeyEntry:
        """Reads a key's row and its workspace's state, and caches them. Runs on the database
        thread; the cache is filled there, under the lock, so a flush (same thread) can
        never slip between the read and the cache update."""
        record = self._store.key_by_hash(key_hash)
        enabled = True
        if record is not None:
            workspace = self._store.get_workspace(record.workspace_id)
            enabled = workspace is None or workspace.enabled
        entry = KeyEntry(record, enabled, self._monotonic())
        with self.lock:
            if record is None and len(self.entries) > _UNKNOWN_CACHE_MAX:
                self.entries = {h: e for h, e in self.entries.items() if e.record is not None}
            self.entries[key_hash] = entry
        return entry

    async def authenticate(self, api_key: str | None) -> KeyRecord:
        """Returns the key's record.

        Raises:
            OrchestratorError: 401 ``invalid_api_key`` (missing, unknown or revoked key),
            403 ``workspace_locked`` (key or workspace disabled), 503
            ``service_unavailable`` (the database is unreachable and the key's cached row,
            if any, is past the outage grace).
        """
        if not api_key:
            raise OrchestratorError(
                ErrorCode.INVALID_API_KEY, "Missing API key. Send it as `Authorization: Bearer <key>`."
            )
        key_hash = self.hash(api_key)
        entry = await self._entry(key_hash)
        record = entry.record
        # The lookup was by hash; the constant-time comparison makes the check explicit.
        if record is None or record.revoked_at is not None or not hmac.compare_digest(record.key_hash, key_hash):
            raise OrchestratorError(ErrorCode.INVALID_API_KEY, "Invalid API key.")
        if not record.enabled or not entry.workspace_enabled:
            what = "This API key is disabled." if not record.enabled else "This key's workspace is disabled."
            raise OrchestratorError(ErrorCode.WORKSPACE_LOCKED, what)
        return record

    async def _entry(self, key_hash: str) -> KeyEntry:
        entry = self.entries.get(key_hash)
        if entry is not None and self._monotonic() - entry.fetched <= self._key_cache_s:
            return entry
        try:
            loaded: KeyEntry = await self._run(self.load, key_hash)
            return loaded
        except OrchestratorError as exc:
            # The database is down: a key seen recently keeps working from its cached row
            # for `outage_grace_s`, then gets 503 like an unknown one.
            if entry is None or exc.code is not ErrorCode.SERVICE_UNAVAILABLE:
                raise
            if self._monotonic() - entry.fetched > self._key_cache_s + self._outage_grace_s:
                raise
            return entry

    def current(self, key: KeyRecord) -> KeyRecord | None:
        """The cached row of ``key`` as it is now (its balance debited by the commits since
        it was read), or None when it is gone. Call it holding :attr:`lock`."""
        entry = self.entries.get(key.key_hash)
        return entry.record if entry is not None else None

    def debit(self, debited: dict[str, Decimal]) -> None:
        """Takes what a commit debited in the database (by key id) off the cached balances.
        Call it holding :attr:`lock`."""
        for entry in self.entries.values():
            key = entry.record
            if key is not None and key.id in debited and key.credits is not None:
                entry.record = key.model_copy(update={"credits": key.credits - debited[key.id]})

    def forget(self, key_id: str | None = None) -> None:
        """Marks cached key rows stale, one key's or all (None): the next authentication reads
        them again. They stay cached meanwhile, and commits keep debiting them, so an
        admission already past authentication still reads a balance that agrees with the
        pending costs."""
        with self.lock:
            for entry in self.entries.values():
                if key_id is None or (entry.record is not None and entry.record.id == key_id):
                    entry.fetched = -math.inf
