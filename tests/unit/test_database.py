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
