"""The ledger's administration (``/admin/*``): :mod:`~orchestrator.gateway.admin`'s
operations run on the ledger's database thread, each followed by what the key ring must
forget so that the change applies to the next request at once."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from orchestrator.gateway import admin
from orchestrator.gateway.keyring import KeyRing
from orchestrator.gateway.records import CreatedKey, KeyInfo, KeyLimits, Workspace
from orchestrator.gateway.store import SQLStore

Runner = Callable[..., Awaitable[Any]]


class Administration:
    """Keys and workspaces, changed through the ledger.

    Args:
        store: the SQL store.
        run: runs a function on the ledger's database thread (``Ledger._run``).
        keyring: the cached key rows.
        pepper: secret mixed into key hashes.
        clock: wall-clock seconds (creation and revocation times).
    """

    def __init__(
        self, store: SQLStore, run: Runner, keyring: KeyRing, *, pepper: bytes, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._run = run
        self._keyring = keyring
        self._pepper = pepper
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def create_key(self, limits: KeyLimits, workspace: str = admin.DEFAULT_WORKSPACE) -> CreatedKey:
        store, pepper, now = self._store, self._pepper, self._now()
        created: CreatedKey = await self._run(
            lambda: admin.create_key(store, limits, workspace=workspace, pepper=pepper, now=now)
        )
        self._keyring.created(created.key)  # it may have been found unknown (guessed) before
        return created

    async def list_keys(self) -> list[KeyInfo]:
        return [r.info() for r in await self._run(self._store.list_keys)]

    async def get_key(self, key_id: str) -> KeyInfo:
        info: KeyInfo = await self._run(admin.get_key, self._store, key_id)
        return info

    async def update_key(
        self,
        key_id: str,
        limits: KeyLimits,
        clear: frozenset[str] = frozenset(),
        add_credits: Decimal | None = None,
    ) -> KeyInfo:
        store = self._store
        info: KeyInfo = await self._run(
            lambda: admin.update_key(store, key_id, limits, clear=clear, add_credits=add_credits)
        )
        self._keyring.forget(key_id)
        return info

    async def revoke_key(self, key_id: str) -> KeyInfo:
        store, now = self._store, self._now()
        info: KeyInfo = await self._run(lambda: admin.revoke_key(store, key_id, now=now))
        self._keyring.forget(key_id)
        return info

    async def list_workspaces(self) -> list[Workspace]:
        workspaces: list[Workspace] = await self._run(self._store.list_workspaces)
        return workspaces

    async def set_workspace_enabled(self, workspace_id: str, enabled: bool) -> Workspace:
        workspace: Workspace = await self._run(admin.set_workspace_enabled, self._store, workspace_id, enabled)
        self._keyring.forget()
        return workspace
