"""LoRA adapters: catalog entries of their own (names, prices, scopes) served on their base
model's replicas, loaded on first use and bounded per replica (least recently used out)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.catalog import Catalog, CatalogError, load_catalog
from orchestrator.engine.base import Engine
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.serving.adapters import adapter_id
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend, lru_cache
from tests.unit.conftest import ADMIN, TINY, write_catalog


def adapter(name: str, tmp_path: Path, **extra: object) -> dict[str, object]:
    return {"name": name, "source": {"kind": "local", "path": str(tmp_path / name)}, **extra}


@pytest.fixture
def lora_catalog(tmp_path: Path) -> Catalog:
    pirate = adapter("tiny-a-pirate", tmp_path, aliases=["pirate"], pricing={"input_per_million": "10"})
    entry = {**TINY, "adapters": [pirate, adapter("tiny-a-plain", tmp_path)], "lora": {"max_loaded_per_replica": 2}}
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    return load_catalog([write_catalog(tmp_path, entry, other)])


def test_an_adapter_resolves_to_an_entry_of_its_own_naming_its_base(lora_catalog: Catalog) -> None:
    spec = lora_catalog.resolve("pirate")
    assert (spec.name, spec.parent, spec.base_name) == ("tiny-a-pirate", "tiny-a", "tiny-a")
    assert spec.deployment_name == lora_catalog.resolve("tiny-a").deployment_name
    assert spec.pricing.input_per_million == Decimal(10) and spec.pricing.output_per_million == Decimal(0)
    # Without prices of its own, an adapter costs what its base costs.
    assert lora_catalog.resolve("tiny-a-plain").pricing == lora_catalog.resolve("tiny-a").pricing
    # Deployments are the base models only; clients see the adapters too.
    assert [s.name for s in lora_catalog] == ["tiny-a", "tiny-b"]
    assert [s.name for s in lora_catalog.listed] == ["tiny-a", "tiny-b", "tiny-a-pirate", "tiny-a-plain"]


def test_adapters_imply_lora_and_no_adapters_mean_none(tmp_path: Path) -> None:
    catalog = load_catalog([write_catalog(tmp_path, {**TINY, "adapters": [adapter("x", tmp_path)]})])
    lora = catalog.resolve("tiny-a").lora
    assert lora is not None and lora.max_loaded_per_replica == 4
    assert load_catalog([write_catalog(tmp_path, TINY)]).resolve("tiny-a").lora is None


@pytest.mark.parametrize(
    ("entry_adapters", "field", "message"),
    [
        ([{"name": "tiny-b"}], "models.1.adapters.0.name", "name 'tiny-b' already used by model 'tiny-b'"),
        ([{"name": "tiny-a"}], "models.1.adapters.0.name", "name 'tiny-a' already used by model 'tiny-a'"),
        ([{"name": "x"}, {"name": "y", "aliases": ["x"]}], "models.1.adapters.1.aliases.0", "already used"),
    ],
)
def test_adapter_names_clash_with_any_other_name(
    tmp_path: Path, entry_adapters: list[dict[str, Any]], field: str, message: str
) -> None:
    adapters = [adapter(str(a.pop("name")), tmp_path, **a) for a in entry_adapters]
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    with pytest.raises(CatalogError) as caught:
        load_catalog([write_catalog(tmp_path, other, {**TINY, "adapters": adapters})])
    assert any(p.field == field and message in p.message for p in caught.value.problems), caught.value


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"parent": "tiny-b"}, "parent is set by the catalog"),
        ({"engine_args": {"enable_lora": True}}, "engine_args may not set enable_lora"),
        ({"lora": {"max_rank": 7}}, "Input should be 1, 8, 16"),
    ],
)
def test_what_the_catalog_sets_for_lora_cannot_be_written(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load_catalog([write_catalog(tmp_path, {**TINY, **extra})])


@pytest.mark.engine  # imports vLLM
def test_engine_args_enable_lora_with_the_catalogs_bounds(lora_catalog: Catalog) -> None:
    from orchestrator.engine.vllm_engine import engine_args_for

    args = engine_args_for(lora_catalog.resolve("tiny-a"), "/w")
    assert (args["enable_lora"], args["max_loras"], args["max_cpu_loras"], args["max_lora_rank"]) == (True, 2, 2, 16)
    assert "enable_lora" not in engine_args_for(lora_catalog.resolve("tiny-b"), "/w")


# ----------------------------------------------------------------------------- the HTTP edge


@pytest.fixture
async def lora_http(lora_catalog: Catalog, ledger: Ledger) -> Any:
    engines = {"tiny-a": FakeEngine(), "tiny-b": FakeEngine(words=["bee"])}
    app = create_app(lora_catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client, engines


async def key(ledger: Ledger, **limits: object) -> dict[str, str]:
    created = await ledger.create_key(KeyLimits(**limits))  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {created.key}"}


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_models_list_shows_each_adapter_with_its_parent(lora_http: Any, ledger: Ledger) -> None:
    http, _ = lora_http
    cards = {m["id"]: m for m in (await http.get("/v1/models", headers=await key(ledger))).json()["data"]}
    assert cards["tiny-a-pirate"]["parent"] == "tiny-a" and cards["tiny-a-pirate"]["aliases"] == ["pirate"]
    assert cards["tiny-a"]["parent"] is None
    one = (await http.get("/v1/models/pirate", headers=await key(ledger))).json()
    assert one["id"] == "tiny-a-pirate" and one["pricing"]["input_per_million"] == "10"
    ready = await http.get("/health/ready", params={"model": "pirate"})
    assert ready.status_code == 200 and list(ready.json()["models"]) == ["tiny-a"]


async def test_an_adapter_runs_on_its_base_under_its_own_name_and_price(lora_http: Any, ledger: Ledger) -> None:
    http, engines = lora_http
    resp = await http.post("/v1/chat/completions", json={**CHAT, "model": "pirate"}, headers=await key(ledger))
    assert resp.status_code == 200, resp.text
    assert engines["tiny-a"].bodies[-1]["model"] == "tiny-a-pirate"
    usage = resp.json()["usage"]
    assert Decimal(str(usage["cost"])) == Decimal(10) * usage["prompt_tokens"] / 1_000_000  # output is free
    record = await http.get(
        "/v1/generation", params={"id": resp.json()["id"]}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert record.json()["data"]["model"] == "tiny-a-pirate"


async def test_key_scopes_apply_to_an_adapter_by_its_own_names(lora_http: Any, ledger: Ledger) -> None:
    http, engines = lora_http
    base_only = await key(ledger, models=["tiny-a"])
    refused = await http.post("/v1/chat/completions", json={**CHAT, "model": "tiny-a-pirate"}, headers=base_only)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "model_not_allowed")
    assert engines["tiny-a"].bodies == []
    adapter_only = await key(ledger, models=["tiny-a-pirate"])
    assert (
        await http.post("/v1/chat/completions", json={**CHAT, "model": "pirate"}, headers=adapter_only)
    ).status_code == 200
    base = await http.post("/v1/chat/completions", json={**CHAT, "model": "tiny-a"}, headers=adapter_only)
    assert base.status_code == 403


# ----------------------------------------------------------------------------- a replica


def replica(catalog: Catalog, engine: FakeEngine) -> ModelServer:
    def factory(spec: Any, s: Settings) -> Engine:
        return engine  # type: ignore[return-value]

    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    return ModelServer(spec, Settings().model_dump(mode="json"), engine_factory=factory, adapter_cache=lru_cache)


async def drain(server: ModelServer, model: str) -> None:
    async for _ in server.stream("chat", {**CHAT, "model": model}, "r"):
        pass


async def test_a_replica_loads_an_adapter_on_first_use_only(lora_catalog: Catalog, tmp_path: Path) -> None:
    engine = FakeEngine()
    server = replica(lora_catalog, engine)
    await server.complete("chat", {**CHAT, "model": "tiny-a"}, "r0")
    assert engine.adapter_log == []  # the base model's requests load nothing
    answer = await server.complete("chat", {**CHAT, "model": "tiny-a-pirate"}, "r1")
    frames = [f async for batch in server.stream("chat", {**CHAT, "model": "tiny-a-pirate"}, "r2") for f in batch]
    pirate = adapter_id("tiny-a-pirate", str(tmp_path / "tiny-a-pirate"))
    assert engine.adapter_log == [f"load {pirate}"]
    assert engine.adapters == {pirate: str(tmp_path / "tiny-a-pirate")}
    # vLLM runs it by its id; the client sees its display name.
    assert engine.bodies[-1]["model"] == pirate and answer["model"] == "tiny-a-pirate"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames if f.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {"tiny-a-pirate"}


def ids(tmp_path: Path, log: list[str]) -> list[str]:
    """The engine's adapter log with each adapter's id replaced by its name (the adapters of
    these tests have their folder under ``tmp_path``, named as they are)."""
    named = {adapter_id(n, str(tmp_path / n)): n for n in "pqr"}
    return [" ".join(named.get(word, word) for word in line.split()) for line in log]


async def test_a_replica_holds_at_most_its_bound_evicting_the_least_recently_used(tmp_path: Path) -> None:
    names = ["p", "q", "r"]
    entry = {**TINY, "adapters": [adapter(n, tmp_path) for n in names], "lora": {"max_loaded_per_replica": 2}}
    engine = FakeEngine()
    server = replica(load_catalog([write_catalog(tmp_path, entry)]), engine)
    for name in ["p", "q", "p", "r"]:  # q is the least recently used when r comes
        await server.complete("chat", {**CHAT, "model": name}, "x")
    assert ids(tmp_path, engine.adapter_log) == ["load p", "load q", "unload q", "load r"]
    assert ids(tmp_path, list(engine.adapters)) == ["p", "r"]


async def test_an_adapter_evicted_while_in_use_unloads_when_its_last_request_ends(tmp_path: Path) -> None:
    entry = {**TINY, "adapters": [adapter(n, tmp_path) for n in "pq"], "lora": {"max_loaded_per_replica": 1}}
    engine = FakeEngine()
    server = replica(load_catalog([write_catalog(tmp_path, entry)]), engine)
    stream = server.stream("chat", {**CHAT, "model": "p"}, "r")
    await anext(stream)  # p is loaded and its stream has begun
    await server.complete("chat", {**CHAT, "model": "q"}, "x")  # evicts p from the cache
    assert ids(tmp_path, list(engine.adapters)) == ["p", "q"]  # p still runs a stream: not unloaded under it
    await server.complete("chat", {**CHAT, "model": "p"}, "y")  # asked for again: it never left
    async for _ in stream:
        pass
    assert ids(tmp_path, engine.adapter_log) == ["load p", "load q", "unload q"]
    assert ids(tmp_path, list(engine.adapters)) == ["p"]


async def test_an_adapter_added_again_from_another_folder_runs_the_new_weights(tmp_path: Path) -> None:
    """A run-time adapter removed and added again under its name from another folder is
    another id: its requests load the new folder, though the old one is still held."""
    entry = {**TINY, "lora": {"max_loaded_per_replica": 2}}
    engine = FakeEngine()
    server = replica(load_catalog([write_catalog(tmp_path, entry)]), engine)
    old, new = adapter_id("x", "/adapters/old"), adapter_id("x", "/adapters/new")
    await server.complete("chat", {**CHAT, "model": "x"}, "r0", "/adapters/old")
    await server.complete("chat", {**CHAT, "model": "x"}, "r1", "/adapters/new")
    assert engine.adapters == {old: "/adapters/old", new: "/adapters/new"}
    assert engine.bodies[-1]["model"] == new != old
    await server.complete("chat", {**CHAT, "model": "y"}, "r2", "/adapters/y")  # the old x is the least recent
    assert engine.adapter_log[-2:] == [f"unload {old}", f"load {adapter_id('y', '/adapters/y')}"]


# ----------------------------------------------------------------------------- the router


class _Handle:
    """A deployment handle stand-in that records each call's multiplexed model id."""

    def __init__(self, sent: list[str | None], model_id: str | None = None) -> None:
        self.sent = sent
        self.model_id = model_id

    def options(self, *, multiplexed_model_id: str) -> _Handle:
        return _Handle(self.sent, multiplexed_model_id)

    def remote(self, *_: Any) -> Any:
        self.sent.append(self.model_id)
        return object()


async def test_the_router_sends_an_adapter_to_its_bases_replicas_with_its_multiplexed_id(tmp_path: Path) -> None:
    from orchestrator.serving.model_states import DeploymentState, ModelStates
    from orchestrator.serving.router import InFlight, Router

    entry = {
        **TINY,
        "engine_args": {"dtype": "float32", "max_num_seqs": 2},
        "overload": {"max_waiting_per_replica": 1},
        "adapters": [adapter("tiny-a-pirate", tmp_path)],
    }
    catalog = load_catalog([write_catalog(tmp_path, entry)])
    view = {("app", "model-tiny-a"): DeploymentState("HEALTHY", 1)}
    router = Router.__new__(Router)  # no Serve handles: the stand-in below
    router.states = ModelStates(catalog, {s.name: ("app", s.deployment_name) for s in catalog}, lambda: view)
    await router.states.refresh()
    router._cold_waiters, router._multiplexed, router.in_flight = {}, {}, InFlight(1)
    sent: list[str | None] = []
    router._stream = {"tiny-a": _Handle(sent)}  # type: ignore[dict-item]
    base, pirate = catalog.resolve("tiny-a"), catalog.resolve("tiny-a-pirate")
    streams = [router.stream(pirate, "chat", {}, "r0"), router.stream(base, "chat", {}, "r1")]
    streams.append(router.stream(pirate, "chat", {}, "r2"))
    pirate_id = adapter_id("tiny-a-pirate", str(tmp_path / "tiny-a-pirate"))
    assert sent == [pirate_id, None, pirate_id]
    # The adapter's requests take places of its base's replicas: one replica holds 3.
    with pytest.raises(OrchestratorError) as info:
        router.stream(pirate, "chat", {}, "r3")
    assert info.value.code is ErrorCode.PROVIDER_OVERLOADED and router.in_flight.counts == {"tiny-a": 3}
    # Tokens of an adapter are its base's: asked of the base's replicas (an adapter has no handle).
    asked: list[Any] = []

    class _Tokens:
        def remote(self, op: str, body: dict[str, Any]) -> Any:
            asked.append((op, body))
            return asyncio.sleep(0, result={"count": 1})

    router._tokens = {"tiny-a": _Tokens()}  # type: ignore[dict-item]
    assert await router.tokens(pirate, "tokenize", {"prompt": "hi"}) == {"count": 1}
    assert asked == [("tokenize", {"prompt": "hi"})]
