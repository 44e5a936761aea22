"""Usage records for tests that settle admissions with a ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import Admission, UsageRecord


def record(ledger: Ledger, admission: Admission, cost: str = "0.25", **extra: object) -> UsageRecord:
    """The record of an admitted request, at the ledger's clock's time."""
    return UsageRecord(
        request_id=admission.request_id,
        key_id=admission.key_id,
        workspace_id=admission.workspace_id,
        model="tiny-a",
        prompt_tokens=10,
        completion_tokens=5,
        cost=Decimal(cost),
        latency_ms=12.5,
        created_at=datetime.fromtimestamp(ledger._clock(), UTC),
        **extra,  # type: ignore[arg-type]
    )
