"""Fixtures for every test folder: a throwaway PostgreSQL database."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.postgres import PostgresServer, find_bin_dir, running_postgres


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer | None]:
    """A throwaway PostgreSQL server for the session (None when ``ORCH_TEST_POSTGRES_URL`` names one).

    Missing PostgreSQL binaries fail the test rather than skip it: CI installs PostgreSQL, so their absence
    is a CI defect.
    """
    if os.environ.get("ORCH_TEST_POSTGRES_URL"):
        yield None
        return
    try:
        find_bin_dir()
    except FileNotFoundError as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None
    with running_postgres(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer | None) -> str:
    """SQLAlchemy URL of an empty PostgreSQL database for the session:
    ``postgresql+psycopg://orch@127.0.0.1:<port>/orch`` (superuser ``orch``, trust auth), or
    ``ORCH_TEST_POSTGRES_URL`` when set."""
    return postgres.url if postgres is not None else os.environ["ORCH_TEST_POSTGRES_URL"]
