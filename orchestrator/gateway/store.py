"""The gateway's SQL store (SQLAlchemy Core): keys, workspaces and usage records.

Synchronous on purpose: the ledger runs every call on one dedicated thread, which keeps
the database and the ledger's in-memory view in step (see ``ledger.py``). SQLite (the
embedded default) and PostgreSQL (clusters) run the same statements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, String, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import make_url

from orchestrator.gateway.database import upgrade
from orchestrator.gateway.records import MAX_USD, KeyRecord, UsageRecord, Workspace
from orchestrator.gateway.schema import api_keys, rate_windows, usage_records, workspaces

NANO = Decimal("1e9")
_MONEY_FIELDS = ("credits", "daily_limit", "monthly_limit")


class BalanceOverflow(ValueError):
    """A top-up would take a balance past what the API accepts (records.MAX_USD)."""


def to_nusd(amount: Decimal | None) -> int | None:
    """USD → whole nanodollars (the database unit)."""
    return None if amount is None else int((amount * NANO).to_integral_value())


def from_nusd(amount: int | None) -> Decimal | None:
    """Whole nanodollars → USD."""
    return None if amount is None else Decimal(int(amount)) / NANO


def make_engine(url: str) -> Engine:
    """Returns an engine for ``url``; SQLite files get their folder, WAL and a busy timeout
    so the CLI and a running server can share one file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # Day grouping reads timestamps as text: keep the session in UTC.
        return create_engine(url, pool_pre_ping=True, connect_args={"options": "-c timezone=utc"})
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(conn: Any, _record: Any) -> None:
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _utc(data: dict[str, Any]) -> dict[str, Any]:
    # SQLite hands back naive datetimes; every stored time is UTC.
    for name in ("created_at", "revoked_at"):
        value = data.get(name)
        if isinstance(value, datetime) and value.tzinfo is None:
            data[name] = value.replace(tzinfo=UTC)
    return data


def _key_from_row(row: Any) -> KeyRecord:
    data = _utc(dict(row._mapping))
    data["models"] = json.loads(data["models"] or "[]")
    for name in _MONEY_FIELDS:
        data[name] = from_nusd(data.pop(name + "_nusd"))
    return KeyRecord.model_validate(data)


def _usage_from_row(row: Any) -> UsageRecord:
    data = _utc(dict(row._mapping))
    data["cost"] = from_nusd(data.pop("cost_nusd"))
    return UsageRecord.model_validate(data)


def _usage_row(record: UsageRecord) -> dict[str, Any]:
    data = record.model_dump()
    data["cost_nusd"] = to_nusd(data.pop("cost"))
    return data


class SQLStore:
    """Keys, workspaces and usage in a SQL database. No I/O until :meth:`open`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("store is not open")
        return self._engine

    def open(self) -> None:
        """Connects and applies pending schema migrations."""
        self._engine = make_engine(self.url)
        upgrade(self._engine)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- workspaces -------------------------------------------------------------------

    def ensure_workspace(self, workspace_id: str, now: datetime) -> Workspace:
        """Returns the workspace, creating it (enabled) if it does not exist."""
        with self.engine.begin() as conn:
            row = conn.execute(select(workspaces).where(workspaces.c.id == workspace_id)).first()
            if row is None:
                values = {"id": workspace_id, "name": workspace_id, "enabled": True, "created_at": now}
                conn.execute(insert(workspaces).values(**values))
                return Workspace.model_validate(values)
            return Workspace.model_validate(_utc(dict(row._mapping)))

    def get_workspace(self, workspace_id: str) -> Workspace | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(workspaces).where(workspaces.c.id == workspace_id)).first()
        return None if row is None else Workspace.model_validate(_utc(dict(row._mapping)))

    def list_workspaces(self) -> list[Workspace]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(workspaces).order_by(workspaces.c.created_at)).all()
        return [Workspace.model_validate(_utc(dict(r._mapping))) for r in rows]

    def set_workspace_enabled(self, workspace_id: str, enabled: bool) -> bool:
        """Returns False when no such workspace exists."""
        with self.engine.begin() as conn:
            done = conn.execute(update(workspaces).where(workspaces.c.id == workspace_id).values(enabled=enabled))
        return bool(done.rowcount)

    # -- keys -------------------------------------------------------------------------

    def insert_key(self, key: KeyRecord) -> None:
        data = key.model_dump()
        data["models"] = json.dumps(data["models"])
        for name in _MONEY_FIELDS:
            data[name + "_nusd"] = to_nusd(data.pop(name))
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**data))

    def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash)).first()
        return None if row is None else _key_from_row(row)

    def key_by_id(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return None if row is None else _key_from_row(row)

    def list_keys(self) -> list[KeyRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        return [_key_from_row(r) for r in rows]

    def count_keys(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(api_keys)).scalar_one())

    def update_key(self, key_id: str, changes: dict[str, Any], add_credits: Decimal | None = None) -> KeyRecord | None:
        """Applies ``changes`` (KeyRecord field names, USD amounts) and adds ``add_credits``
        to the balance (an atomic increment, safe beside concurrent debits); returns the new
        record, or None when there is no such key.

        Raises:
            BalanceOverflow: the top-up would take the balance past ``MAX_USD`` (nothing changed).
        """
        values = dict(changes)
        if "models" in values:
            values["models"] = json.dumps(values["models"] or [])
        for name in _MONEY_FIELDS:
            if name in values:
                values[name + "_nusd"] = to_nusd(values.pop(name))
        where = [api_keys.c.id == key_id]
        if add_credits is not None:
            balance = func.coalesce(api_keys.c.credits_nusd, 0)
            values["credits_nusd"] = balance + to_nusd(add_credits)
            # In the same statement, so concurrent top-ups cannot pass the bound together.
            where.append(balance <= to_nusd(MAX_USD - add_credits))
        with self.engine.begin() as conn:
            updated = conn.execute(update(api_keys).where(*where).values(**values)).rowcount if values else 1
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is not None and not updated:
            raise BalanceOverflow(f"The balance would exceed {MAX_USD} USD.")
        return None if row is None else _key_from_row(row)

    # -- usage ------------------------------------------------------------------------

    def write_usage(self, records: Sequence[UsageRecord]) -> list[UsageRecord]:
        """Inserts the records not stored yet and debits their keys' credits, in one
        transaction. Returns the records that were new: replaying a batch (after a crash)
        neither duplicates a record nor debits twice."""
        if not records:
            return []
        ids = [r.request_id for r in records]
        with self.engine.begin() as conn:
            seen = set(
                conn.execute(select(usage_records.c.request_id).where(usage_records.c.request_id.in_(ids))).scalars()
            )
            fresh = [r for r in dict((r.request_id, r) for r in records).values() if r.request_id not in seen]
            if fresh:
                conn.execute(insert(usage_records), [_usage_row(r) for r in fresh])
            debits: dict[str, int] = {}
            for r in fresh:
                if r.key_id is not None and r.cost:
                    debits[r.key_id] = debits.get(r.key_id, 0) + int(to_nusd(r.cost) or 0)
            for key_id, amount in sorted(debits.items()):
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == key_id, api_keys.c.credits_nusd.is_not(None))
                    .values(credits_nusd=api_keys.c.credits_nusd - amount)
                )
        return fresh

    def usage(self, request_id: str) -> UsageRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(usage_records).where(usage_records.c.request_id == request_id)).first()
        return None if row is None else _usage_from_row(row)

    def spend_since(self, key_id: str, since: datetime) -> Decimal:
        """Returns the key's recorded spend from ``since`` on, in USD."""
        query = select(func.coalesce(func.sum(usage_records.c.cost_nusd), 0)).where(
            usage_records.c.key_id == key_id, usage_records.c.created_at >= since
        )
        with self.engine.connect() as conn:
            return from_nusd(int(conn.execute(query).scalar_one())) or Decimal(0)

    def usage_report(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        group_by: Iterable[str] = ("key", "model", "day"),
    ) -> list[dict[str, Any]]:
        """Sums requests, tokens and cost per group (any of ``key``, ``model``, ``day``;
        ``day`` is the UTC date), within ``[start, end)``. Rows are sorted by group."""
        c = usage_records.c
        columns = {"key": c.key_id, "model": c.model, "day": func.substr(func.cast(c.created_at, String()), 1, 10)}
        groups = [g for g in ("key", "model", "day") if g in set(group_by)]
        keys = [columns[g].label(g) for g in groups]
        query = select(
            *keys,
            func.count().label("requests"),
            func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(c.cost_nusd), 0).label("cost_nusd"),
        )
        if key_id is not None:
            query = query.where(c.key_id == key_id)
        if model is not None:
            query = query.where(c.model == model)
        if start is not None:
            query = query.where(c.created_at >= start)
        if end is not None:
            query = query.where(c.created_at < end)
        if keys:
            query = query.group_by(*keys).order_by(*keys)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            data = dict(row._mapping)
            cost = from_nusd(int(data.pop("cost_nusd"))) or Decimal(0)
            data.update(
                requests=int(data["requests"]),
                prompt_tokens=int(data["prompt_tokens"]),
                completion_tokens=int(data["completion_tokens"]),
                cost=cost,
            )
            out.append(data)
        return out

    # -- handover between ledgers -------------------------------------------------------

    def save_rate_windows(self, windows: Sequence[tuple[str, float, int, int]]) -> None:
        """Replaces the stored windows by ``windows`` ((key id, epoch start, requests, tokens))."""
        with self.engine.begin() as conn:
            conn.execute(delete(rate_windows))
            if windows:
                rows = [{"key_id": k, "started_at": s, "requests": r, "tokens": t} for k, s, r, t in windows]
                conn.execute(insert(rate_windows), rows)

    def take_rate_windows(self) -> list[tuple[str, float, int, int]]:
        """Returns the stored windows and deletes them (each handover is taken once)."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(rate_windows)).all()
            conn.execute(delete(rate_windows))
        return [(r.key_id, float(r.started_at), int(r.requests), int(r.tokens)) for r in rows]
