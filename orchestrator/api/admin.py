"""``/admin/*``: keys, workspaces and usage reports. Every route needs the admin key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api.auth import AdminGuard
from orchestrator.gateway.admin import DEFAULT_WORKSPACE, WORKSPACE_PATTERN, Clearable, report_filters
from orchestrator.gateway.base import Gateway
from orchestrator.gateway.records import CreatedKey, KeyInfo, KeyLimits, PositiveUsd, Workspace
from orchestrator.protocol.values import Boolean


class KeyCreate(KeyLimits):
    """``POST /admin/keys`` body."""

    workspace: str = Field(default=DEFAULT_WORKSPACE, pattern=WORKSPACE_PATTERN, description="Workspace id.")


class KeyUpdate(KeyLimits):
    """``PATCH /admin/keys/{id}`` body: fields given are set; names in ``clear`` become unlimited."""

    clear: list[Clearable] = Field(default_factory=list)
    add_credits: PositiveUsd | None = Field(
        default=None,
        description="USD added to the balance (atomic, safe beside running requests); "
        "the balance after it is at most 1e9 USD.",
    )


# Checked here, so that what the OpenAPI document says is what is accepted (the CLI, through
# `report_filters`, also takes full ISO times and loose lists).
_DAY: dict[str, Any] = {"pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "json_schema_extra": {"format": "date"}}
_GROUPS = "^( *(key|model|day) *(, *(key|model|day) *)*)?$"


class WorkspaceUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: Boolean


def admin_router(gateway: Gateway, admin_key: str | None) -> APIRouter:
    """Returns the admin routes, all behind the admin key."""
    router = APIRouter(prefix="/admin", dependencies=[Depends(AdminGuard(admin_key))], tags=["admin"])

    @router.post("/keys", status_code=201)
    async def create_key(body: KeyCreate) -> CreatedKey:
        """Creates a key. The plaintext key is in this response only."""
        limits = KeyLimits.model_validate(body.model_dump(exclude={"workspace"}))
        return await gateway.create_key(limits, body.workspace)

    @router.get("/keys")
    async def list_keys() -> dict[str, list[KeyInfo]]:
        return {"data": await gateway.list_keys()}

    @router.get("/keys/{key_id}")
    async def show_key(key_id: str) -> KeyInfo:
        return await gateway.get_key(key_id)

    @router.patch("/keys/{key_id}")
    async def update_key(key_id: str, body: KeyUpdate) -> KeyInfo:
        limits = KeyLimits.model_validate(body.model_dump(exclude={"clear", "add_credits"}))
        return await gateway.update_key(key_id, limits, frozenset(body.clear), body.add_credits)

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str) -> KeyInfo:
        """Revokes the key for good (401 from then on); its usage is kept."""
        return await gateway.revoke_key(key_id)

    @router.get("/workspaces")
    async def list_workspaces() -> dict[str, list[Workspace]]:
        return {"data": await gateway.list_workspaces()}

    @router.patch("/workspaces/{workspace_id}")
    async def update_workspace(workspace_id: str, body: WorkspaceUpdate) -> Workspace:
        """Locks (``enabled: false``) or unlocks every key of the workspace."""
        return await gateway.set_workspace_enabled(workspace_id, body.enabled)

    @router.get("/usage")
    async def usage(
        key: str | None = Query(default=None, description="Key id."),
        model: str | None = Query(default=None, description="Model display name."),
        start: str | None = Query(None, alias="from", description="First UTC day, YYYY-MM-DD.", **_DAY),
        end: str | None = Query(None, alias="to", description="Last UTC day, YYYY-MM-DD (included).", **_DAY),
        group_by: str = Query(
            default="key,model,day", pattern=_GROUPS, description="Comma-separated: key, model, day."
        ),
    ) -> dict[str, Any]:
        """Requests, tokens and cost (USD) per group."""
        filters = report_filters(key=key, model=model, start=start, end=end, group_by=group_by)
        rows = await gateway.usage_report(**filters)
        return {"data": [{**r, "cost": float(r["cost"])} for r in rows], "group_by": filters["group_by"]}

    return router
