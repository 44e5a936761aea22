"""Key and workspace administration over a :class:`SQLStore` (synchronous).

Shared by the ``orchestrator keys`` command, which talks to the database directly, and by
the ledger behind ``/admin/keys``, which runs these on its database thread.
"""

from __future__ import annotations

import re
import secrets
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal, get_args

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.keys import generate_key, hash_key, key_hint
from orchestrator.gateway.records import CreatedKey, KeyInfo, KeyLimits, KeyRecord, Workspace
from orchestrator.gateway.store import BalanceOverflow, SQLStore

DEFAULT_WORKSPACE = "default"
WORKSPACE_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# Limits an update may reset to unlimited.
Clearable = Literal["models", "rpm", "tpm", "max_concurrent", "credits", "daily_limit", "monthly_limit"]
CLEARABLE: tuple[str, ...] = get_args(Clearable)
REPORT_GROUPS = ("key", "model", "day")


def _not_found(key_id: str) -> OrchestratorError:
    return OrchestratorError(ErrorCode.NOT_FOUND, f"No API key with id {key_id!r}.", param="id")


def create_key(store: SQLStore, limits: KeyLimits, *, workspace: str, pepper: bytes, now: datetime) -> CreatedKey:
    """Creates a key in ``workspace`` (created if new). Returns the plaintext key, which is
    never stored or shown again, with the key's public record.

    Raises:
        OrchestratorError: ``invalid_request`` for a malformed workspace id.
    """
    if not re.match(WORKSPACE_PATTERN, workspace):
        raise OrchestratorError(
            ErrorCode.INVALID_REQUEST, "A workspace id is 1-64 letters, digits, '.', '_' or '-'.", param="workspace"
        )
    store.ensure_workspace(workspace, now)
    plaintext = generate_key()
    fields = limits.model_dump(exclude_none=True)
    record = KeyRecord(
        id="key_" + secrets.token_hex(8),
        key_hash=hash_key(plaintext, pepper),
        hint=key_hint(plaintext),
        workspace_id=workspace,
        created_at=now,
        **{"name": "", "enabled": True, **fields},
    )
    store.insert_key(record)
    return CreatedKey(key=plaintext, info=record.info())


def get_key(store: SQLStore, key_id: str) -> KeyInfo:
    """Raises OrchestratorError ``not_found`` for an unknown id."""
    record = store.key_by_id(key_id)
    if record is None:
        raise _not_found(key_id)
    return record.info()


def update_key(
    store: SQLStore,
    key_id: str,
    limits: KeyLimits,
    *,
    clear: frozenset[str] = frozenset(),
    add_credits: Decimal | None = None,
) -> KeyInfo:
    """Sets the fields given in ``limits``; names in ``clear`` are set to unlimited (None);
    ``add_credits`` tops the balance up (starting a balance on a key that had none)."""
    if add_credits is not None and add_credits <= 0:
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, "add_credits must be positive.", param="add_credits")
    unknown = sorted(clear - set(CLEARABLE))
    if unknown:
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, f"Cannot clear {unknown[0]!r}.", param="clear")
    changes = limits.model_dump(exclude_none=True)
    changes.update(dict.fromkeys(clear))
    try:
        record = store.update_key(key_id, changes, add_credits)
    except BalanceOverflow as exc:
        raise OrchestratorError(ErrorCode.INVALID_REQUEST, str(exc), param="add_credits") from None
    if record is None:
        raise _not_found(key_id)
    return record.info()


def revoke_key(store: SQLStore, key_id: str, *, now: datetime) -> KeyInfo:
    """Revokes a key for good: it then gets 401 ``invalid_api_key``. Its usage stays."""
    record = store.update_key(key_id, {"enabled": False, "revoked_at": now})
    if record is None:
        raise _not_found(key_id)
    return record.info()


def set_workspace_enabled(store: SQLStore, workspace_id: str, enabled: bool) -> Workspace:
    """Locks or unlocks every key of a workspace."""
    if not store.set_workspace_enabled(workspace_id, enabled):
        raise OrchestratorError(ErrorCode.NOT_FOUND, f"No workspace {workspace_id!r}.", param="workspace")
    workspace = store.get_workspace(workspace_id)
    assert workspace is not None
    return workspace


def _day(value: str | None, *, end: bool) -> datetime | None:
    # A UTC day; as an upper bound the whole day is included. Full ISO times pass as given.
    if not value:
        return None
    try:
        if len(value) == 10:
            day = datetime.combine(date.fromisoformat(value), time())
            return day + timedelta(days=1) if end else day
        return datetime.fromisoformat(value)
    except ValueError:
        raise OrchestratorError(
            ErrorCode.INVALID_REQUEST, f"Invalid date {value!r}: use YYYY-MM-DD.", param="to" if end else "from"
        ) from None


def report_filters(
    *, key: str | None, model: str | None, start: str | None, end: str | None, group_by: str
) -> dict[str, Any]:
    """Turns a usage report's parameters as the admin API and the CLI take them (dates as
    ``YYYY-MM-DD``, ``group_by`` comma-separated) into :meth:`SQLStore.usage_report` arguments.

    Raises:
        OrchestratorError: ``invalid_request`` for a malformed date or an unknown group.
    """
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in REPORT_GROUPS]
    if unknown:
        raise OrchestratorError(
            ErrorCode.INVALID_REQUEST, f"Unknown group_by {unknown[0]!r}: use key, model, day.", param="group_by"
        )
    return {
        "key_id": key,
        "model": model,
        "start": _day(start, end=False),
        "end": _day(end, end=True),
        "group_by": groups,
    }
