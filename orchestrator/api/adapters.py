"""LoRA adapters added at run time, on the HTTP edge: ``/admin/adapters`` (behind the admin
key, on the router) and the refresher that keeps an app's catalog in step with the database.

Each router replica reads the ``adapters`` table every ``key_cache_seconds``, so an adapter
added or removed through any replica (or the CLI) reaches every replica within that period;
the replica that took the call applies it at once. A model replica answering on its own
route reads the same table as often through the gateway's ledger
(:mod:`orchestrator.serving.model_route`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from fastapi import APIRouter, Depends

from orchestrator.api.auth import AdminGuard
from orchestrator.catalog import Catalog
from orchestrator.gateway.adapters import AdapterEntry, AdapterTable, checked

logger = logging.getLogger(__name__)

AdapterSource = Callable[[], Awaitable[Sequence[AdapterEntry]]]
"""Returns every adapter added at run time (the database's ``adapters`` table)."""


def table_source(table: AdapterTable) -> AdapterSource:
    """Reads ``table`` on a thread (the event loop never waits on the database)."""

    async def read() -> Sequence[AdapterEntry]:
        return await asyncio.to_thread(table.list)

    return read


class AdapterRefresher:
    """Applies the stored adapters to ``catalog`` every ``period_s`` seconds.

    Args:
        source: reads the stored adapters.
        catalog: this app's catalog (its run-time adapters are replaced on each refresh).
        period_s: seconds between reads.
    """

    def __init__(self, source: AdapterSource, catalog: Catalog, period_s: float) -> None:
        self.source = source
        self.catalog = catalog
        self.period_s = period_s
        self._skipped: list[str] = []

    async def refresh(self) -> None:
        """Reads the stored adapters once and applies them (a failed read keeps what was
        applied)."""
        try:
            entries = await self.source()
        except Exception:
            logger.warning("could not read the adapters table; keeping the adapters known", exc_info=True)
            return
        skipped = self.catalog.set_runtime_adapters((e.base, e.spec()) for e in entries)
        if skipped != self._skipped:
            for problem in skipped:
                logger.warning("run-time adapter left out: %s", problem)
            self._skipped = skipped

    async def run(self) -> None:
        """Refreshes until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.period_s)


def adapters_router(table: AdapterTable, refresher: AdapterRefresher, admin_key: str | None) -> APIRouter:
    """Returns ``/admin/adapters`` on ``table``, behind the admin key; ``refresher`` (of this
    app's catalog) applies each change at once."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(AdminGuard(admin_key))], tags=["admin"])
    catalog = refresher.catalog

    @router.post("/adapters", status_code=201)
    async def add_adapter(body: AdapterEntry) -> AdapterEntry:
        """Adds a LoRA adapter to a catalog model that serves adapters (its entry sets `lora`).
        Every router serves it within `key_cache_seconds`; no replica restarts."""
        await refresher.refresh()  # what other routers or the CLI added counts too
        entry = checked(catalog, body)
        added = await asyncio.to_thread(table.add, entry, datetime.now(UTC))
        await refresher.refresh()
        return added

    @router.get("/adapters")
    async def list_adapters() -> dict[str, list[AdapterEntry]]:
        """The adapters added at run time (the catalog's own are in `/v1/models`)."""
        return {"data": await asyncio.to_thread(table.list)}

    @router.delete("/adapters/{name}")
    async def remove_adapter(name: str) -> AdapterEntry:
        """Removes an adapter added at run time: new requests for it get 404; replicas unload
        it when their least-recently-used bound evicts it."""
        removed = await asyncio.to_thread(table.remove, name)
        await refresher.refresh()
        return removed

    return router
