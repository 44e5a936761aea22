"""Stored responses of the Responses API: kept in the gateway's database, per workspace, so
that ``previous_response_id``, ``GET`` and ``DELETE /v1/responses/{id}`` work on any router
replica and after a restart. Synchronous SQL, run on the ledger's database thread."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.schema import stored_responses

DEFAULT_WORKSPACE_BYTES = 64 * 2**20


def not_found(response_id: str) -> OrchestratorError:
    """Another workspace's response is as unknown as one that never existed."""
    return OrchestratorError(ErrorCode.NOT_FOUND, f"No stored response {response_id!r}.", param="response_id")


class ResponseArchive:
    """The stored responses of every workspace, at most ``workspace_bytes`` per workspace.

    Args:
        engine: returns the database engine (the ledger's store's, once open).
        workspace_bytes: the bound on one workspace's stored responses (their JSON, in bytes).
    """

    def __init__(self, engine: Any, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> None:
        self._engine = engine
        self.workspace_bytes = workspace_bytes

    @property
    def engine(self) -> Engine:
        return self._engine()  # type: ignore[no-any-return]

    def history(self, workspace_id: str, response_id: str) -> list[dict[str, Any]]:
        """Returns the conversation a new turn continues: the stored response's input items,
        earlier turns included, then its output items.

        Raises:
            OrchestratorError: ``not_found`` (also for another workspace's response).
        """
        row = self._row(workspace_id, response_id)
        output = json.loads(row.body).get("output") or []
        return [*json.loads(row.history), *output]

    def room(self, workspace_id: str) -> None:
        """Raises ``storage_limit_exceeded`` when the workspace's stored responses already take
        its whole bound."""
        if self._used(workspace_id) >= self.workspace_bytes:
            raise _full(self.workspace_bytes)

    def put(self, workspace_id: str, key_id: str | None, body: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Keeps a response (once: a repeated id is kept as first stored).

        Raises:
            OrchestratorError: ``storage_limit_exceeded`` past the workspace's bound.
        """
        body_json, history_json = json.dumps(body), json.dumps(history)
        size = len(body_json) + len(history_json)
        if self._used(workspace_id) + size > self.workspace_bytes:
            raise _full(self.workspace_bytes)
        values = {
            "id": body["id"],
            "workspace_id": workspace_id,
            "key_id": key_id,
            "body": body_json,
            "history": history_json,
            "size_bytes": size,
            "created_at": datetime.now(UTC),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(stored_responses).values(**values))
        except IntegrityError:
            return

    def get(self, workspace_id: str, response_id: str) -> dict[str, Any]:
        """Returns the stored Response.

        Raises:
            OrchestratorError: ``not_found`` (also for another workspace's response).
        """
        return dict(json.loads(self._row(workspace_id, response_id).body))

    def delete(self, workspace_id: str, response_id: str) -> None:
        """Forgets a response.

        Raises:
            OrchestratorError: ``not_found`` (also for another workspace's response).
        """
        where = (stored_responses.c.id == response_id) & (stored_responses.c.workspace_id == workspace_id)
        with self.engine.begin() as conn:
            if not conn.execute(delete(stored_responses).where(where)).rowcount:
                raise not_found(response_id)

    def _row(self, workspace_id: str, response_id: str) -> Any:
        where = (stored_responses.c.id == response_id) & (stored_responses.c.workspace_id == workspace_id)
        with self.engine.connect() as conn:
            row = conn.execute(select(stored_responses).where(where)).first()
        if row is None:
            raise not_found(response_id)
        return row

    def _used(self, workspace_id: str) -> int:
        total = func.coalesce(func.sum(stored_responses.c.size_bytes), 0)
        with self.engine.connect() as conn:
            return int(conn.execute(select(total).where(stored_responses.c.workspace_id == workspace_id)).scalar_one())


def _full(limit: int) -> OrchestratorError:
    return OrchestratorError(
        ErrorCode.STORAGE_LIMIT_EXCEEDED,
        f"This workspace's stored responses take their whole bound ({limit} bytes). Delete some "
        "(DELETE /v1/responses/{id}) or send store: false.",
        param="store",
    )
