from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import httpx2
import pytest
import yaml

from orchestrator.api import create_app
from orchestrator.catalog import Catalog, load_catalog
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.store import SQLStore
from orchestrator.serving.gateway_server import LedgerActor
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend

ADMIN = "admin-key-for-tests-0123456789"

TINY = {
    "name": "tiny-a",
    "aliases": ["a"],
    "backend_id": "org/tiny-a",
    "source": {"kind": "tiny_random", "seed": 1},
    "context_window": 512,
    "engine_args": {"dtype": "float32"},
    "pricing": {"input_per_million": "1.5", "output_per_million": "2"},
}
# A tiny embedding model (task: embed).
EMBEDDER = {
    "name": "embed-e",
    "aliases": ["e"],
    "backend_id": "org/embed-e",
    "task": "embed",
    "source": {"kind": "tiny_random", "seed": 5},
    "context_window": 256,
}


def write_catalog(folder: Path, *entries: dict) -> Path:
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    return path


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    return load_catalog([write_catalog(tmp_path, TINY, other)])


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), UsageJournal(tmp_path / "j"), flush_interval_s=0.05)
    await ledger.start()
    yield ledger
    await ledger.stop()


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "tiny-b": FakeEngine(words=["bee"])}


@pytest.fixture
async def http(catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture
async def sdk_http(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> AsyncIterator[httpx2.AsyncClient]:
    """The app for the official SDKs, which bring their own httpx (httpx2)."""
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orch.db'}"
    # One fresh database per test on the shared server.
    base: str = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    name = "t_" + uuid.uuid4().hex[:12]
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
async def actor(tmp_path: Path) -> AsyncIterator[LedgerActor]:
    """The ledger actor's class, run in this process (its channel included), on SQLite."""
    ledger = Ledger(SQLStore(f"sqlite:///{tmp_path / 'g.db'}"), UsageJournal(tmp_path / "j"))
    actor = LedgerActor({}, ledger=ledger)
    await actor.start()
    yield actor
    await actor.stop()
