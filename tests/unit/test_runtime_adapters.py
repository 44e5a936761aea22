"""LoRA adapters added at run time: kept in the gateway database, added and removed through
the admin API and ``orchestrator adapters``, and learnt by every router from the database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.api.adapters import AdapterRefresher, table_source
from orchestrator.catalog import load_catalog
from orchestrator.engine.base import Engine
from orchestrator.errors import OrchestratorError
from orchestrator.gateway.adapters import AdapterEntry, AdapterTable, checked
from orchestrator.gateway.ledger import Ledger
from orchestrator.serving.adapters import adapter_id
from orchestrator.serving.model_route import route_app
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend, lru_cache
from tests.unit.conftest import ADMIN, TINY, write_catalog

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture
def two_models(tmp_path: Path) -> list[Path]:
    """tiny-a serves adapters (its entry sets `lora`); tiny-b serves none."""
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    return [write_catalog(tmp_path, {**TINY, "lora": {"max_loaded_per_replica": 2}}, other)]


@pytest.fixture
def table(tmp_path: Path) -> AdapterTable:
    made = AdapterTable(f"sqlite:///{tmp_path / 'g.db'}", migrate=True)
    made.open()
    return made


def entry(name: str = "tiny-a-chef", **fields: Any) -> AdapterEntry:
    return AdapterEntry.model_validate({"name": name, "base": "tiny-a", "path": f"/adapters/{name}", **fields})


def test_the_table_keeps_adds_and_removes(table: AdapterTable) -> None:
    now = datetime(2026, 12, 7, tzinfo=UTC)
    priced = entry(aliases=["chef"], pricing={"input_per_million": "0.000000001", "output_per_million": "3"})
    table.add(priced, now)
    table.add(entry("tiny-a-plain"), now)
    listed = table.list()
    assert [e.name for e in listed] == ["tiny-a-chef", "tiny-a-plain"]
    assert listed[0].pricing == priced.pricing and listed[0].aliases == ["chef"] and listed[1].pricing is None
    with pytest.raises(OrchestratorError) as dup:
        table.add(entry(), now)
    assert dup.value.code.value == "invalid_request"
    assert table.remove("tiny-a-plain").name == "tiny-a-plain"
    with pytest.raises(OrchestratorError) as gone:
        table.remove("tiny-a-plain")
    assert gone.value.code.value == "not_found"
    # Another connection (a restarted cluster) reads what was kept.
    again = AdapterTable(table.url)
    assert [e.name for e in again.list()] == ["tiny-a-chef"]


def test_run_time_adapters_resolve_beside_the_catalogs_and_misfits_are_left_out(two_models: list[Path]) -> None:
    catalog = load_catalog(two_models)
    skipped = catalog.set_runtime_adapters(
        [
            ("tiny-a", entry(aliases=["chef"]).spec()),
            ("tiny-b", entry("tiny-b-x").spec()),  # tiny-b serves no adapters
            ("nowhere", entry("x").spec()),
            ("tiny-a", entry("b").spec()),  # tiny-b's alias
        ]
    )
    assert len(skipped) == 3 and "serves no adapters" in skipped[0] and "already used" in skipped[2]
    chef = catalog.resolve("chef")
    assert (chef.name, chef.parent, str(chef.adapter.source.path)) == ("tiny-a-chef", "tiny-a", "/adapters/tiny-a-chef")  # type: ignore[union-attr]
    assert [s.name for s in catalog.listed] == ["tiny-a", "tiny-b", "tiny-a-chef"]
    catalog.set_runtime_adapters([])  # removed from the database
    with pytest.raises(OrchestratorError):
        catalog.resolve("chef")


@pytest.mark.parametrize(
    ("base", "name", "code"),
    [
        ("nowhere", "x", "model_not_found"),
        ("tiny-b", "tiny-b-x", "capability_not_supported"),
        ("tiny-a", "b", "invalid_request"),
    ],
)
def test_an_added_adapter_and_one_read_from_the_database_are_refused_by_the_same_rule(
    two_models: list[Path], base: str, name: str, code: str
) -> None:
    """The admin API and the CLI (checked) refuse what every router leaves out when it reads the
    table (set_runtime_adapters), for the same reason in the same words."""
    catalog = load_catalog(two_models)
    added = entry(name, base=base)
    with pytest.raises(OrchestratorError) as refused:
        checked(catalog, added)
    assert refused.value.code.value == code
    assert catalog.set_runtime_adapters([(base, added.spec())]) == [f"adapter {name!r}: {refused.value.message}"]


@pytest.fixture
async def app_http(two_models: list[Path], ledger: Ledger, table: AdapterTable) -> AsyncIterator[Any]:
    engines = {"tiny-a": FakeEngine(), "tiny-b": FakeEngine(words=["bee"])}
    catalog = load_catalog(two_models)
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger, adapters=table)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client, engines


async def test_an_adapter_added_through_the_admin_api_serves_at_once_and_removed_is_gone(
    app_http: Any, ledger: Ledger
) -> None:
    http, engines = app_http
    key = {"Authorization": f"Bearer {(await ledger.create_key(_limits())).key}"}
    body = {"name": "tiny-a-chef", "base": "a", "path": "/adapters/chef", "pricing": {"input_per_million": "4"}}
    assert (await http.post("/admin/adapters", json=body, headers=key)).status_code == 401  # admin key only
    added = await http.post("/admin/adapters", json=body, headers=ADMIN_AUTH)
    assert added.status_code == 201 and added.json()["base"] == "tiny-a"  # by display name
    resp = await http.post("/v1/chat/completions", json={**CHAT, "model": "tiny-a-chef"}, headers=key)
    assert resp.status_code == 200 and engines["tiny-a"].bodies[-1]["model"] == "tiny-a-chef"
    usage = resp.json()["usage"]
    assert Decimal(str(usage["cost"])) == Decimal(4) * usage["prompt_tokens"] / 1_000_000
    cards = {m["id"]: m for m in (await http.get("/v1/models", headers=key)).json()["data"]}
    assert cards["tiny-a-chef"]["parent"] == "tiny-a"
    listed = (await http.get("/admin/adapters", headers=ADMIN_AUTH)).json()["data"]
    assert [a["name"] for a in listed] == ["tiny-a-chef"]
    assert (await http.delete("/admin/adapters/tiny-a-chef", headers=ADMIN_AUTH)).status_code == 200
    gone = await http.post("/v1/chat/completions", json={**CHAT, "model": "tiny-a-chef"}, headers=key)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_not_found")
    again = await http.delete("/admin/adapters/tiny-a-chef", headers=ADMIN_AUTH)
    assert (again.status_code, again.json()["error"]["code"]) == (404, "not_found")


def _limits(**limits: Any) -> Any:
    from orchestrator.gateway.records import KeyLimits

    return KeyLimits(**limits)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"base": "nowhere"}, 404, "model_not_found"),
        ({"base": "tiny-b"}, 400, "capability_not_supported"),  # its entry sets no `lora`
        ({"name": "b"}, 400, "invalid_request"),  # tiny-b's alias
        ({"name": "has space"}, 400, "invalid_request"),
        ({"path": ""}, 400, "invalid_request"),
    ],
)
async def test_the_admin_api_refuses_adapters_that_cannot_serve(
    app_http: Any, body: dict[str, str], status: int, code: str
) -> None:
    http, _ = app_http
    full = {"name": "tiny-a-chef", "base": "tiny-a", "path": "/adapters/chef", **body}
    resp = await http.post("/admin/adapters", json=full, headers=ADMIN_AUTH)
    assert (resp.status_code, resp.json()["error"]["code"]) == (status, code)
    assert (await http.get("/admin/adapters", headers=ADMIN_AUTH)).json()["data"] == []


async def test_every_router_learns_an_added_adapter_from_the_database(
    two_models: list[Path], table: AdapterTable
) -> None:
    mine, theirs = load_catalog(two_models), load_catalog(two_models)
    other_router = AdapterRefresher(table_source(table), theirs, period_s=2)
    table.add(entry(), datetime.now(UTC))  # through this router, or the CLI
    with pytest.raises(OrchestratorError):
        theirs.resolve("tiny-a-chef")  # not read yet
    await other_router.refresh()
    assert theirs.resolve("tiny-a-chef").parent == "tiny-a"
    table.remove("tiny-a-chef")
    await other_router.refresh()
    with pytest.raises(OrchestratorError):
        theirs.resolve("tiny-a-chef")
    assert mine.adapters == ()


def test_the_cli_adds_lists_and_removes(
    two_models: list[Path], table: AdapterTable, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    monkeypatch.setenv("ORCH_DATABASE_URL", table.url)
    calls: list[str] = []
    for method in ("open", "close"):
        real = getattr(AdapterTable, method)
        monkeypatch.setattr(
            AdapterTable, method, lambda self, real=real, method=method: (calls.append(method), real(self))[1]
        )
    catalog = ["--catalog", str(two_models[0])]
    add = ["adapters", "add", "tiny-a-chef", "--base", "tiny-a", "--path", "/adapters/chef", "--alias", "chef"]
    assert main([*add, "--input-price", "2", *catalog]) == 0
    assert main([*add, *catalog]) == 1  # its name is taken now
    assert main(["adapters", "add", "x", "--base", "tiny-b", "--path", "/p", *catalog]) == 1  # no `lora`
    capsys.readouterr()
    assert main(["adapters", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["aliases"], a["pricing"]["input_per_million"]) for a in listed] == [
        ("tiny-a-chef", ["chef"], "2")
    ]
    assert main(["adapters", "remove", "tiny-a-chef"]) == 0
    assert main(["adapters", "remove", "tiny-a-chef"]) == 1
    assert calls == ["open", "close"] * 6  # each command closes its table, the refused ones too
    assert table.list() == []


async def test_a_replica_loads_a_run_time_adapter_from_the_folder_the_router_names(two_models: list[Path]) -> None:
    engine = FakeEngine()

    def factory(spec: Any, s: Settings) -> Engine:
        return engine  # type: ignore[return-value]

    spec = load_catalog(two_models).resolve("tiny-a").model_dump(mode="json")
    server = ModelServer(spec, Settings().model_dump(mode="json"), engine_factory=factory, adapter_cache=lru_cache)
    await server.complete("chat", {**CHAT, "model": "tiny-a-chef"}, "r", "/adapters/chef")
    async for _ in server.stream("chat", {**CHAT, "model": "tiny-a-chef"}, "s", "/adapters/chef"):
        pass
    chef = adapter_id("tiny-a-chef", "/adapters/chef")
    assert engine.adapter_log == [f"load {chef}"] and engine.adapters == {chef: "/adapters/chef"}


# ----------------------------------------------------------------------------- a model's own route


async def _until(done: Any) -> None:
    """Yields to the event loop until ``done()`` holds (the refresher reads every 10 ms)."""
    for _ in range(2000):
        if await done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the route never got there")


async def test_a_models_route_serves_its_run_time_adapters_by_their_own_names(
    two_models: list[Path], ledger: Ledger, table: AdapterTable
) -> None:
    """The base's own route learns adapters added and removed at run time through the gateway
    (its replica holds no database URL), with keys' scopes and prices by the adapter's names."""
    engine = FakeEngine()
    spec = load_catalog(two_models).resolve("tiny-a").model_dump(mode="json")
    settings = Settings(key_cache_seconds=0.01).model_dump(mode="json")
    server = ModelServer(spec, settings, engine_factory=lambda s, st: engine, adapter_cache=lru_cache)  # type: ignore[arg-type,return-value]
    app = route_app(server, ledger)
    base_only = {"Authorization": f"Bearer {(await ledger.create_key(_limits(models=['tiny-a']))).key}"}
    chef_only = {"Authorization": f"Bearer {(await ledger.create_key(_limits(models=['chef']))).key}"}
    table.add(entry(aliases=["chef"], pricing={"input_per_million": "4"}), datetime.now(UTC))
    table.add(entry("tiny-b-x", base="tiny-b"), datetime.now(UTC))  # another model's: not this route's
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):

        async def status(model: str, key: dict[str, str]) -> tuple[int, str]:
            resp = await http.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=key)
            return resp.status_code, "" if resp.status_code == 200 else resp.json()["error"]["code"]

        async def listed() -> bool:
            models = (await http.get("/v1/models", headers=chef_only)).json()["data"]
            return "tiny-a-chef" in {m["id"] for m in models}

        await _until(listed)
        assert await status("tiny-a-chef", base_only) == (403, "model_not_allowed")
        resp = await http.post("/v1/chat/completions", json={**CHAT, "model": "chef"}, headers=chef_only)
        assert resp.status_code == 200 and resp.json()["model"] == "tiny-a-chef"
        usage = resp.json()["usage"]
        assert Decimal(str(usage["cost"])) == Decimal(4) * usage["prompt_tokens"] / 1_000_000
        assert engine.adapters == {adapter_id("tiny-a-chef", "/adapters/tiny-a-chef"): "/adapters/tiny-a-chef"}
        assert await status("tiny-b-x", chef_only) == (404, "model_not_found")
        table.remove("tiny-a-chef")

        async def gone() -> bool:
            return await status("tiny-a-chef", chef_only) == (404, "model_not_found")

        await _until(gone)
