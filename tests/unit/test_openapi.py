"""docs/openapi.json is generated from the app; this fails when the two drift.

Regenerate with: .venv/bin/python -m tests.unit.test_openapi
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.api import create_app
from orchestrator.catalog import load_catalog
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings
from tests.fakes import LocalBackend

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "openapi.json"


def current() -> dict[str, Any]:
    # A ledger that is never started (its constructor does no I/O) puts the admin routes in.
    gateway = Ledger(SQLStore("sqlite://"))
    app = create_app(load_catalog([REPO / "catalog"]), LocalBackend({}), Settings(), gateway=gateway)
    return app.openapi()


def test_openapi_document_is_current() -> None:
    assert json.loads(DOC.read_text()) == current(), "run: .venv/bin/python -m tests.unit.test_openapi"


if __name__ == "__main__":
    DOC.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {DOC}")
