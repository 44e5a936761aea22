from __future__ import annotations

import os

from sqlalchemy import create_engine, text


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
