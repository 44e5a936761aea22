"""Numeric fields of keys stay inside what their columns hold: the store refuses a top-up
past the bound, and the CLI answers out-of-range values with one line and writes nothing.
(The admin API's side is in test_gateway_api.py.)"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.errors import OrchestratorError
from orchestrator.gateway import admin
from orchestrator.gateway.records import MAX_USD, KeyLimits
from orchestrator.gateway.store import SQLStore


def test_store_refuses_a_top_up_past_the_bound_on_a_key_without_balance(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'g.db'}")
    store.open()
    try:
        created = admin.create_key(store, KeyLimits(), workspace="default", pepper=b"p" * 32, now=datetime.now(UTC))
        key_id = created.info.id
        with pytest.raises(OrchestratorError, match="exceed") as info:
            admin.update_key(store, key_id, KeyLimits(), add_credits=MAX_USD + 1)
        assert info.value.code == "invalid_request" and info.value.param == "add_credits"
        assert admin.get_key(store, key_id).credits is None
        assert admin.update_key(store, key_id, KeyLimits(), add_credits=MAX_USD).credits == MAX_USD
    finally:
        store.close()


@pytest.mark.parametrize(
    "args",
    [["--credits", "1e30"], ["--rpm", "1000000000000"], ["--daily-limit", "-5"], ["--tpm", "0"]],
)
def test_cli_refuses_out_of_range_in_one_line(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{tmp_path / 'g.db'}")
    assert main(["keys", "create", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["keys", "list"]) == 0
    assert "sk-orch" not in capsys.readouterr().out


def test_concurrent_top_ups_cannot_pass_the_bound_together(db_url: str) -> None:
    """Ten top-ups of 5 USD at once on a balance 10 USD below the bound: the check is in the
    same UPDATE as the increment, so exactly two pass and the balance ends at the bound."""
    from concurrent.futures import ThreadPoolExecutor
    from decimal import Decimal

    store = SQLStore(db_url)
    store.open()
    try:
        now = datetime.now(UTC)
        created = admin.create_key(store, KeyLimits(credits=MAX_USD - 10), workspace="default", pepper=b"", now=now)

        def top_up(_: int) -> bool:
            try:
                admin.update_key(store, created.info.id, KeyLimits(), add_credits=Decimal(5))
                return True
            except OrchestratorError:
                return False

        with ThreadPoolExecutor(max_workers=10) as pool:
            passed = list(pool.map(top_up, range(10)))
        assert passed.count(True) == 2
        assert admin.get_key(store, created.info.id).credits == MAX_USD
    finally:
        store.close()
