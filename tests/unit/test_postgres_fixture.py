from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.postgres import PostgresServer


def test_postgres_url_reaches_a_server_on_loopback_only(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            version = connection.execute(text("select version()")).scalar_one()
            listen = connection.execute(text("show listen_addresses")).scalar_one()
    finally:
        engine.dispose()
    assert "PostgreSQL" in version
    if not os.environ.get("ORCH_TEST_POSTGRES_URL"):  # a server of our own, not one given from outside
        assert listen == "127.0.0.1"


def test_the_server_can_be_stopped_and_started_again_with_its_data(postgres: PostgresServer | None) -> None:
    if postgres is None:
        pytest.skip("ORCH_TEST_POSTGRES_URL names a server this test does not control")
    engine = create_engine(postgres.url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("create table if not exists outage_probe (n int)"))
            connection.execute(text("insert into outage_probe values (1)"))
        postgres.stop()
        try:
            with pytest.raises(OperationalError), engine.connect():
                pass
        finally:
            postgres.start()
        with engine.begin() as connection:
            assert connection.execute(text("select count(*) from outage_probe")).scalar_one() >= 1
            connection.execute(text("drop table outage_probe"))
    finally:
        engine.dispose()
