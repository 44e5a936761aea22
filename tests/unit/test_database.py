"""Migrations applied to an empty database, and the models kept in step with them."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from orchestrator.gateway.database import downgrade, upgrade
from orchestrator.gateway.schema import metadata


def test_migrations_create_schema_on_empty_database(tmp_path: Path) -> None:
    engine = upgrade(f"sqlite:///{tmp_path / 'orch.db'}")
    tables = set(inspect(engine).get_table_names())
    assert {"workspaces", "api_keys", "usage_records", "alembic_version"} <= tables
    key_columns = {c["name"] for c in inspect(engine).get_columns("api_keys")}
    assert {
        "key_hash",
        "rpm",
        "tpm",
        "credits_nusd",
        "daily_limit_nusd",
        "monthly_limit_nusd",
        "enabled",
        "revoked_at",
    } <= key_columns
    engine.dispose()


def test_schema_matches_latest_migration(tmp_path: Path) -> None:
    engine = upgrade(f"sqlite:///{tmp_path / 'orch.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], f"schema.py and migrations disagree; add a migration: {diff}"
    engine.dispose()


def test_downgrade_to_base_removes_tables(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'orch.db'}")
    upgrade(engine)
    downgrade(engine)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_money_columns_convert_to_nanodollars_and_back(tmp_path: Path) -> None:
    from sqlalchemy import text

    engine = create_engine(f"sqlite:///{tmp_path / 'orch.db'}")
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO workspaces VALUES ('w', 'w', 1, '2026-11-01 00:00:00')"))
        conn.execute(
            text(
                "INSERT INTO api_keys (id, key_hash, hint, name, workspace_id, models, credits, enabled, created_at) "
                "VALUES ('k', 'h', 'x', 'n', 'w', '[]', 1.5, 1, '2026-11-01 00:00:00')"
            )
        )
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT credits_nusd, daily_limit_nusd FROM api_keys")).one() == (1_500_000_000, None)
    downgrade(engine, "0001")
    with engine.connect() as conn:
        assert float(conn.execute(text("SELECT credits FROM api_keys")).scalar_one()) == 1.5
    engine.dispose()


def test_migrations_on_postgresql(postgres_url: str) -> None:
    from sqlalchemy import text

    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS migrations_test"))
        conn.execute(text("CREATE DATABASE migrations_test"))
    engine.dispose()
    engine = upgrade(postgres_url.rsplit("/", 1)[0] + "/migrations_test")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    downgrade(engine)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
