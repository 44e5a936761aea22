"""The key ring: the ledger's cache of key rows, and authentication against it.

A key's row is read on the ledger's database thread and cached for ``key_cache_s``; its
cached balance is debited by each commit (:meth:`KeyRing.debit`), under the lock the
ledger's money view shares, so that an admission always reads a balance that agrees with
the costs still pending.

Failed authentications stay cheap: a hash seen for the first time is looked up on a lane of
its own (:mod:`~orchestrator.gateway.key_lookups`: bounded in number and in time), never on
the database thread that admissions of known keys wait on, and a hash found unknown is
refused without the database for ``unknown_key_ttl_s``.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import make_url

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.expiring_set import ExpiringSet
from orchestrator.gateway.key_lookups import KeyLookups
from orchestrator.gateway.keys import hash_key
from orchestrator.gateway.records import KeyRecord
from orchestrator.gateway.store import SQLStore

Runner = Callable[..., Awaitable[Any]]
UNKNOWN_KEY_TTL_S = 5.0  # how long a key found unknown is refused without asking the database
UNKNOWN_KEYS_MAX = 100_000  # unknown keys remembered at most (the oldest are forgotten first)
KEY_LOOKUPS = 4  # lookups of keys not cached, at once (more are refused with 503)
KEY_LOOKUP_TIMEOUT_S = 2.0


@dataclass
class KeyEntry:
    record: KeyRecord | None  # None: the key is gone (a row read again was deleted)
    workspace_enabled: bool
    fetched: float


class KeyRing:
    """Cached key rows by hash, and the hashes recently found unknown.

    Args:
        store: the SQL store the rows are read from.
        run: runs a function on the ledger's database thread (``Ledger._run``).
        lock: the lock of the ledger's money view (cached balances, pending costs).
        pepper: secret mixed into key hashes.
        monotonic: monotonic seconds (cache ages).
        key_cache_s: how long a row is trusted before it is read again.
        outage_grace_s: while the database is unreachable, how long past ``key_cache_s`` a
            cached key keeps being authenticated.
        unknown_key_ttl_s: how long a hash found unknown is refused without the database (a
            key made since through the ledger works at once; one made by the CLI, straight in
            the database, after this time).
        lookups: lookups of hashes not cached that may run at once (more get 503).
        lookup_timeout_s: how long one of them is waited for (then 503).
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
        unknown_key_ttl_s: float = UNKNOWN_KEY_TTL_S,
        lookups: int = KEY_LOOKUPS,
        lookup_timeout_s: float = KEY_LOOKUP_TIMEOUT_S,
    ) -> None:
        self._store = store
        self._run = run
        self.lock = lock
        self._pepper = pepper
        self._monotonic = monotonic
        self._key_cache_s = key_cache_s
        self._outage_grace_s = outage_grace_s
        self.entries: dict[str, KeyEntry] = {}
        self.unknown = ExpiringSet(unknown_key_ttl_s, UNKNOWN_KEYS_MAX, monotonic)
        self.lookups = KeyLookups(self._exists, limit=lookups, timeout_s=lookup_timeout_s)
        self._finding: dict[str, asyncio.Future[bool]] = {}  # lookups under way, by hash

    def open(self) -> None:
        """Starts the lookup lane: its own threads, except on an in-memory SQLite database,
        which every thread would see empty (its lookups run on the database thread)."""
        url = make_url(self._store.url)
        if url.get_backend_name() != "sqlite" or url.database not in (None, "", ":memory:"):
            self.lookups.open()

    def close(self) -> None:
        self.lookups.close()

    def hash(self, api_key: str) -> str:
        return hash_key(api_key, self._pepper)

    def _exists(self, key_hash: str) -> bool:
        # On the lookup lane: only whether the row exists. Its row is then read on the
        # database thread (load), where commits cannot slip between the read and the cache.
        return self._store.key_by_hash(key_hash) is not None

    def load(self, key_hash: str) -> KeyEntry:
        """Reads a key's row and its workspace's state, and caches them (a key that is gone
        leaves the cache). Runs on the database thread; the cache is filled there, under the
        lock, so a flush (same thread) can never slip between the read and the cache update."""
        record = self._store.key_by_hash(key_hash)
        enabled = True
        if record is not None:
            workspace = self._store.get_workspace(record.workspace_id)
            enabled = workspace is None or workspace.enabled
        entry = KeyEntry(record, enabled, self._monotonic())
        with self.lock:
            if record is None:
                self.entries.pop(key_hash, None)
            else:
                self.entries[key_hash] = entry
        return entry

    async def authenticate(self, api_key: str | None) -> KeyRecord:
        """Returns the key's record.

        Raises:
            OrchestratorError: 401 ``invalid_api_key`` (missing, unknown or revoked key),
            403 ``workspace_locked`` (key or workspace disabled), 503
            ``service_unavailable`` (the database is unreachable and the key's cached row,
            if any, is past the outage grace; or a key not cached could not be looked up:
            too many lookups under way, or one too slow).
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
        if entry is None and not await self._may_exist(key_hash):
            return _UNKNOWN
        try:
            loaded: KeyEntry = await self._run(self.load, key_hash)
        except OrchestratorError as exc:
            # The database is down: a key seen recently keeps working from its cached row
            # for `outage_grace_s`, then gets 503 like an unknown one.
            if entry is None or exc.code is not ErrorCode.SERVICE_UNAVAILABLE:
                raise
            if self._monotonic() - entry.fetched > self._key_cache_s + self._outage_grace_s:
                raise
            return entry
        if loaded.record is None:
            self.unknown.add(key_hash)
        return loaded

    async def _may_exist(self, key_hash: str) -> bool:
        # A hash not cached: refused at once if found unknown lately, else looked up once
        # however many requests carry it (a new key's first burst takes one place on the
        # lane, not one each), on the lookup lane (never on the database thread).
        if key_hash in self.unknown:
            return False
        finding = self._finding.get(key_hash)
        if finding is None:
            finding = asyncio.ensure_future(self._find(key_hash))
            self._finding[key_hash] = finding
            finding.add_done_callback(lambda done: self._found(key_hash, done))
        return await asyncio.shield(finding)  # a cancelled caller leaves the others their lookup

    async def _find(self, key_hash: str) -> bool:
        if self.lookups.running:
            exists: bool = await self.lookups.exists(key_hash)
        else:
            exists = await self._run(self._exists, key_hash)
        if not exists:
            self.unknown.add(key_hash)
        return exists

    def _found(self, key_hash: str, done: asyncio.Future[bool]) -> None:
        self._finding.pop(key_hash, None)
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone

    def created(self, api_key: str) -> None:
        """A key was just made through the ledger: it is no longer unknown."""
        self.unknown.discard(self.hash(api_key))

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
        """Marks cached key rows stale, one key's or all (None; then the unknown hashes are
        forgotten too): the next authentication reads them again. They stay cached
        meanwhile, and commits keep debiting them, so an admission already past
        authentication still reads a balance that agrees with the pending costs."""
        if key_id is None:
            self.unknown.clear()
        with self.lock:
            for entry in self.entries.values():
                if key_id is None or (entry.record is not None and entry.record.id == key_id):
                    entry.fetched = -math.inf


_UNKNOWN = KeyEntry(None, False, -math.inf)  # what a hash found unknown authenticates as
