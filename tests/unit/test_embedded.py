"""`orchestrator serve` runs open only with neither an admin key nor any API key."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.embedded import _access_mode
from orchestrator.gateway import admin
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings


def test_open_only_without_keys_and_admin_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    assert _access_mode(Settings(database_url=url)).open_access
    assert "OPEN MODE" in capsys.readouterr().out
    assert not _access_mode(Settings(database_url=url, admin_key="x" * 20)).open_access
    store = SQLStore(url)
    store.open()
    admin.create_key(store, KeyLimits(), workspace="default", pepper=b"", now=datetime.now(UTC))
    store.close()
    assert not _access_mode(Settings(database_url=url)).open_access
    assert "API keys required" in capsys.readouterr().out
