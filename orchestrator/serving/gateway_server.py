"""The gateway deployment: the one ledger all router replicas share, and a client for it.

A single replica holds the ledger, so rate limits and balances are exact however many
routers run (docs/ARCHITECTURE.md says why this beats a per-router limiter or Redis here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from orchestrator.errors import find_error
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import Admission, CreatedKey, KeyInfo, KeyLimits, UsageRecord, Workspace
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings


def ledger_for(settings: Settings) -> Ledger:
    """Returns the ledger the settings describe (database, journal, pepper, timings)."""
    return Ledger(
        SQLStore(settings.resolved_database_url()),
        UsageJournal(settings.journal_dir()),
        pepper=settings.key_pepper.encode(),
        flush_interval_s=settings.usage_flush_ms / 1000.0,
        key_cache_s=settings.key_cache_seconds,
    )


class GatewayServer:
    """What Serve runs: the ledger, started in the async constructor (so the replica only
    takes traffic once the database is migrated and leftover journals are replayed) and
    flushed on graceful shutdown. Serve calls the ledger's methods through the handle."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        self.ledger = ledger_for(Settings(**settings))
        await self.ledger.start()

    async def __del__(self) -> None:  # type: ignore[misc]
        await self.ledger.stop()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs one ledger method (the router's only entry point)."""
        if method.startswith("_") or not hasattr(self.ledger, method):
            raise AttributeError(method)
        return await getattr(self.ledger, method)(*args, **kwargs)


class RemoteGateway:
    """Implements :class:`~orchestrator.gateway.base.Gateway` over the deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._call = handle.options(method_name="call")

    async def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._call.remote(method, *args, **kwargs)
        except Exception as exc:
            # Give the edge the OrchestratorError itself, not Ray's wrapper around it.
            found = find_error(exc)
            if found is None or found is exc:
                raise
            raise found from None

    async def authenticate(self, api_key: str | None) -> KeyInfo:
        return await self._run("authenticate", api_key)  # type: ignore[no-any-return]

    async def admit(self, api_key: str | None, model_names: Sequence[str], tokens: int, request_id: str) -> Admission:
        return await self._run("admit", api_key, list(model_names), tokens, request_id)  # type: ignore[no-any-return]

    async def settle(self, admission: Admission, record: UsageRecord) -> bool:
        return bool(await self._run("settle", admission, record))

    async def generation(self, generation_id: str, api_key: str | None, *, admin: bool = False) -> UsageRecord:
        return await self._run("generation", generation_id, api_key, admin=admin)  # type: ignore[no-any-return]

    async def usage_report(self, **filters: Any) -> list[dict[str, Any]]:
        return await self._run("usage_report", **filters)  # type: ignore[no-any-return]

    async def create_key(self, limits: KeyLimits, workspace: str = "default") -> CreatedKey:
        return await self._run("create_key", limits, workspace)  # type: ignore[no-any-return]

    async def list_keys(self) -> list[KeyInfo]:
        return await self._run("list_keys")  # type: ignore[no-any-return]

    async def get_key(self, key_id: str) -> KeyInfo:
        return await self._run("get_key", key_id)  # type: ignore[no-any-return]

    async def update_key(self, key_id: str, limits: KeyLimits, clear: frozenset[str] = frozenset()) -> KeyInfo:
        return await self._run("update_key", key_id, limits, clear)  # type: ignore[no-any-return]

    async def revoke_key(self, key_id: str) -> KeyInfo:
        return await self._run("revoke_key", key_id)  # type: ignore[no-any-return]

    async def list_workspaces(self) -> list[Workspace]:
        return await self._run("list_workspaces")  # type: ignore[no-any-return]

    async def set_workspace_enabled(self, workspace_id: str, enabled: bool) -> Workspace:
        return await self._run("set_workspace_enabled", workspace_id, enabled)  # type: ignore[no-any-return]
