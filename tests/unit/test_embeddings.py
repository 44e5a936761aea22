"""``POST /v1/embeddings`` at the HTTP edge, through the official openai SDK over the app
in-process (fake engines, the real SQLite ledger): routing by the model's task, the batch
bounds, bad input, metering, holds and limits."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest

from orchestrator.api.accounting import reservation
from orchestrator.catalog import Catalog, load_catalog
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.pricing import request_cost
from orchestrator.gateway.records import KeyLimits
from tests.fakes import FakeEngine
from tests.unit.conftest import EMBEDDER, TINY, write_catalog

EMBED = {
    **EMBEDDER,
    "pricing": {"input_per_million": "3"},
    "capabilities": {"json": False},
    "embedding": {"max_inputs": 4, "max_tokens": 50},
}
CHAT = {"model": "e", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return load_catalog([write_catalog(tmp_path, TINY, EMBED)])


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "embed-e": FakeEngine()}


async def _key(ledger: Ledger, **limits: object) -> str:
    return (await ledger.create_key(KeyLimits(**limits))).key  # type: ignore[arg-type]


async def _sdk(client: httpx2.AsyncClient, ledger: Ledger, **limits: object) -> openai.AsyncOpenAI:
    key = await _key(ledger, **limits)
    return openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=client, max_retries=0)


async def test_a_batch_through_the_sdk_is_one_metered_record(
    sdk_http: httpx2.AsyncClient, ledger: Ledger, catalog: Catalog
) -> None:
    client = await _sdk(sdk_http, ledger)
    # The SDK asks for base64 unless told otherwise, and decodes it.
    got = await client.embeddings.create(model="e", input=["one two", "three"])
    assert [d.embedding for d in got.data] == [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert got.model == "embed-e" and got.usage.prompt_tokens == 3 and got.usage.total_tokens == 3
    floats = await client.embeddings.create(model="embed-e", input=[[1, 2, 3, 4]], encoding_format="float")
    assert floats.data[0].embedding == [4.0, 0.0, 1.0]
    record = await ledger.generation(got.id, client.api_key)  # type: ignore[attr-defined]
    assert (record.model, record.prompt_tokens, record.completion_tokens) == ("embed-e", 3, 0)
    assert record.cost == request_cost(catalog.resolve("e").pricing, 3, 0) and record.cost > 0
    assert got.usage.model_extra["cost"] == pytest.approx(float(record.cost))  # type: ignore[index]
    await ledger.generation(floats.id, client.api_key)  # type: ignore[attr-defined]  # settled too
    rows = await ledger.usage_report()
    assert sum(int(r["requests"]) for r in rows) == 2  # one record per request, not per input


async def test_every_input_shape_and_options_reach_the_model(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    auth = {"Authorization": f"Bearer {await _key(ledger)}"}
    for given in ("one two", ["a", "b c"], [5, 6], [[5], [6, 7]]):
        body = {"model": "e", "input": given, "user": "u-1", "truncate_prompt_tokens": 8, "stream": True}
        resp = await http.post("/v1/embeddings", json=body, headers=auth)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")  # `stream` does not apply
        assert resp.json()["object"] == "list"
    assert engines["embed-e"].prompts == ["one two", ["a", "b c"], [5, 6], [[5], [6, 7]]]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", {"model": "e", "prompt": "hi"}),
        ("/v1/responses", {"model": "e", "input": "hi"}),
        ("/v1/messages", {**CHAT, "max_tokens": 8}),
        ("/v1/messages/count_tokens", CHAT),
        ("/v1/embeddings", {"model": "a", "input": "hi"}),
    ],
)
async def test_the_wrong_kind_of_model_is_400_naming_what_it_does(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine], path: str, body: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {await _key(ledger)}", "anthropic-version": "2023-06-01"}
    resp = await http.post(path, json=body, headers=headers)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_kind_mismatch" and error["param"] == "model"
    if body["model"] == "e":
        assert "embed-e is an embedding model" in error["message"] and "/v1/embeddings" in error["message"]
    else:
        assert "tiny-a is a text-generation model" in error["message"]
    assert not any(e.prompts for e in engines.values())
    assert await ledger.usage_report() == []


@pytest.mark.parametrize(
    ("given", "what"),
    [
        (["a", "b", "c", "d", "e"], "at most 4 inputs per request; this one has 5"),
        ([list(range(30)), list(range(21))], "at most 50 tokens per request; this one has 51"),
    ],
)
async def test_a_batch_past_the_entrys_bounds_is_400(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine], given: Any, what: str
) -> None:
    auth = {"Authorization": f"Bearer {await _key(ledger)}"}
    resp = await http.post("/v1/embeddings", json={"model": "e", "input": given}, headers=auth)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "input") and what in error["message"]
    assert engines["embed-e"].prompts == []
    # At the bound it passes.
    resp = await http.post("/v1/embeddings", json={"model": "e", "input": given[:-1]}, headers=auth)
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": [[1], []]}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": 7}, "input"),
        ({"encoding_format": "bytes"}, "encoding_format"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": "8"}, "dimensions"),
        ({"model": ""}, "model"),
    ],
)
async def test_bad_input_is_400(http: httpx.AsyncClient, ledger: Ledger, change: dict[str, Any], param: str) -> None:
    auth = {"Authorization": f"Bearer {await _key(ledger)}"}
    resp = await http.post("/v1/embeddings", json={"model": "e", "input": "x", **change}, headers=auth)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_request" and str(error["param"]).split(".")[0] == param


async def test_keys_limits_and_holds_apply(http: httpx.AsyncClient, ledger: Ledger) -> None:
    body = {"model": "e", "input": "x"}
    assert (await http.post("/v1/embeddings", json=body)).status_code == 401
    broke = await _key(ledger, credits=Decimal(0))
    resp = await http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {broke}"})
    assert resp.status_code == 402
    scoped = await _key(ledger, models=["tiny-a"])
    resp = await http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {scoped}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_not_allowed"
    once = {"Authorization": f"Bearer {await _key(ledger, rpm=1)}"}
    assert (await http.post("/v1/embeddings", json=body, headers=once)).status_code == 200
    again = await http.post("/v1/embeddings", json=body, headers=once)
    assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limit_exceeded"


async def test_models_list_says_each_models_task(http: httpx.AsyncClient, ledger: Ledger) -> None:
    auth = {"Authorization": f"Bearer {await _key(ledger)}"}
    models = (await http.get("/v1/models", headers=auth)).json()["data"]
    assert {m["id"]: m["task"] for m in models} == {"tiny-a": "generate", "embed-e": "embed"}


def test_an_embedding_holds_its_inputs_and_no_output(catalog: Catalog) -> None:
    spec = catalog.resolve("e")
    body = {"model": "e", "input": ["abcd"] * 3}
    size = len(json.dumps(body).encode())
    hold = reservation(body, size, spec, 0, embedding=True)
    # Every input a prompt of its own (at most a window each); nothing generated.
    assert hold.cost == request_cost(spec.pricing, size + 64 + 16 * 3, 0)
    assert hold.tokens == -(-size // 4) + 4 * 3
