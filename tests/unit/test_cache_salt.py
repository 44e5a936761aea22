"""Tenant isolation in the prompt-prefix cache: the salt the engine gets for each request,
on every dialect, with fake engines behind the real app and ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.api.cache_salt import cache_salt, salted
from orchestrator.catalog import Catalog, load_catalog
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import TINY, write_catalog

USER = [{"role": "user", "content": "hi"}]
# One request per dialect, each asking tiny-a (or the shared entry) for a few tokens.
DIALECTS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": USER, "max_tokens": 4},
    "/v1/completions": {"prompt": "hi", "max_tokens": 4},
    "/v1/messages": {"messages": USER, "max_tokens": 4},
    "/v1/responses": {"input": "hi", "max_output_tokens": 4, "store": False},
}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    shared = {**TINY, "name": "shared-s", "aliases": ["s"], "backend_id": "org/shared-s", "shared_prefix_cache": True}
    return load_catalog([write_catalog(tmp_path, TINY, shared)])


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "shared-s": FakeEngine()}


async def key(ledger: Ledger, workspace: str) -> dict[str, str]:
    created = await ledger.create_key(KeyLimits(), workspace=workspace)
    return {"Authorization": f"Bearer {created.key}"}


async def salt_sent(
    http: httpx.AsyncClient, engine: FakeEngine, path: str, headers: dict[str, str], **extra: Any
) -> Any:
    body = {"model": extra.pop("model", "tiny-a"), **DIALECTS[path], **extra}
    resp = await http.post(path, json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return engine.bodies[-1].get("cache_salt")


def test_salt_is_per_workspace_and_combines_the_clients() -> None:
    assert cache_salt("team-a", None) != cache_salt("team-b", None)
    assert cache_salt("team-a", None) == cache_salt("team-a", None)
    # A client's salt splits its workspace's cache, but cannot name another workspace's.
    assert cache_salt("team-a", "x") not in (cache_salt("team-a", None), cache_salt("team-b", "x"), "x")
    # Where the workspace and the salt meet cannot be moved to forge another pair.
    assert cache_salt("a", "b,c") != cache_salt("a,b", "c")
    assert cache_salt("team-a", "x", shared=True) == "x" and cache_salt(None, "x") == "x"
    assert salted({"cache_salt": "x", "model": "m"}, None, shared=True) == {"cache_salt": "x", "model": "m"}
    assert salted({"model": "m"}, None) == {"model": "m"}


@pytest.mark.parametrize("path", list(DIALECTS))
async def test_every_dialect_salts_by_workspace(
    http: httpx.AsyncClient, engines: dict[str, FakeEngine], ledger: Ledger, path: str
) -> None:
    engine = engines["tiny-a"]
    a1, a2, b = await key(ledger, "team-a"), await key(ledger, "team-a"), await key(ledger, "team-b")
    salt_a = await salt_sent(http, engine, path, a1)
    assert salt_a == cache_salt("team-a", None)
    # Two keys of one workspace share its cache; another workspace gets another salt.
    assert await salt_sent(http, engine, path, a2) == salt_a
    assert await salt_sent(http, engine, path, b) == cache_salt("team-b", None) != salt_a
    # A client that sends team-a's salt itself still does not reach team-a's cache.
    assert await salt_sent(http, engine, path, b, cache_salt=salt_a) not in (salt_a, None)


@pytest.mark.parametrize("path", list(DIALECTS))
async def test_streams_are_salted_too(
    http: httpx.AsyncClient, engines: dict[str, FakeEngine], ledger: Ledger, path: str
) -> None:
    headers = await key(ledger, "team-a")
    body = {"model": "tiny-a", **DIALECTS[path], "stream": True}
    async with http.stream("POST", path, json=body, headers=headers) as resp:
        assert resp.status_code == 200
        await resp.aread()
    assert engines["tiny-a"].bodies[-1]["cache_salt"] == cache_salt("team-a", None)


async def test_a_shared_entry_keeps_the_clients_salt(
    http: httpx.AsyncClient, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    engine = engines["shared-s"]
    a, b = await key(ledger, "team-a"), await key(ledger, "team-b")
    assert await salt_sent(http, engine, "/v1/chat/completions", a, model="s") is None
    assert await salt_sent(http, engine, "/v1/chat/completions", b, model="s", cache_salt="mine") == "mine"


async def test_open_mode_passes_the_clients_salt(catalog: Catalog, engines: dict[str, FakeEngine]) -> None:
    app = create_app(catalog, LocalBackend(engines), Settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert await salt_sent(http, engines["tiny-a"], "/v1/chat/completions", {}) is None
        assert await salt_sent(http, engines["tiny-a"], "/v1/completions", {}, cache_salt="own") == "own"


@pytest.mark.parametrize("salt", ["", 7, ["x"], "x" * 129, "a/b", "a@b"])
@pytest.mark.parametrize("path", list(DIALECTS))
async def test_a_bad_salt_is_400_naming_it(http: httpx.AsyncClient, ledger: Ledger, path: str, salt: Any) -> None:
    headers = await key(ledger, "team-a")
    resp = await http.post(path, json={"model": "tiny-a", **DIALECTS[path], "cache_salt": salt}, headers=headers)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "cache_salt" in (error.get("param") or error.get("message", ""))
