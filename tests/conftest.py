"""Fixtures for every test folder: a throwaway PostgreSQL database."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.postgres import find_bin_dir, running_postgres


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL of an empty PostgreSQL database for the session.

    The URL is ``postgresql+psycopg://orch@127.0.0.1:<port>/orch`` (superuser ``orch``, trust auth).

    ``ORCH_TEST_POSTGRES_URL``, when set, is yielded instead of starting a server. Missing PostgreSQL
    binaries fail the test rather than skip it: CI installs PostgreSQL, so its absence is a CI defect.
    """
    if url := os.environ.get("ORCH_TEST_POSTGRES_URL"):
        yield url
        return
    try:
        find_bin_dir()
    except FileNotFoundError as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None
    with running_postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url
