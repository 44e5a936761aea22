"""Applying the versioned schema migrations (Alembic) to a database URL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine) -> Config:
    """Returns an Alembic config bound to ``engine`` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> Engine:
    """Brings the database to ``revision`` and returns its engine."""
    engine = create_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    command.upgrade(alembic_config(engine), revision)
    return engine


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Takes the database back to ``revision``."""
    command.downgrade(alembic_config(engine), revision)
