"""``POST /tokenize`` and ``POST /detokenize`` at the HTTP edge (fake engines, the real SQLite
ledger): the gateway's keys and model scopes apply, nothing is metered, bad input is 400."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits


async def _key(ledger: Ledger, **limits: object) -> dict[str, str]:
    key = (await ledger.create_key(KeyLimits(**limits))).key  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {key}"}


async def test_tokenize_then_detokenize_round_trips(http: httpx.AsyncClient, ledger: Ledger) -> None:
    auth = await _key(ledger)
    told = await http.post("/tokenize", json={"model": "a", "prompt": "one two one"}, headers=auth)
    assert told.status_code == 200, told.text
    body = told.json()
    assert body["count"] == 3 and body["tokens"][0] == body["tokens"][2] != body["tokens"][1]
    back = await http.post("/detokenize", json={"model": "tiny-a", "tokens": body["tokens"]}, headers=auth)
    assert back.status_code == 200 and back.json() == {"prompt": "one two one"}


async def test_messages_are_tokenized_by_the_model_named(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, object]
) -> None:
    auth = await _key(ledger)
    body = {"model": "b", "messages": [{"role": "user", "content": "hi there"}], "return_token_strs": True}
    told = await http.post("/tokenize", json=body, headers=auth)
    assert told.status_code == 200
    assert told.json()["token_strs"] == ["<user>", "hi", "there"]
    # The model named got the request (its fake tokenizer learnt the words), not the other one.
    assert engines["tiny-b"].vocabulary and not engines["tiny-a"].vocabulary  # type: ignore[attr-defined]


async def test_free_and_outside_the_request_limits(http: httpx.AsyncClient, ledger: Ledger) -> None:
    auth = await _key(ledger, rpm=1, credits=Decimal(0))
    for _ in range(3):
        told = await http.post("/tokenize", json={"model": "a", "prompt": "x"}, headers=auth)
        assert told.status_code == 200
    assert await ledger.usage_report() == []
    # The same key is out of credits for a generation.
    chat = await http.post(
        "/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}]}, headers=auth
    )
    assert chat.status_code == 402


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_keys_and_scopes_apply(http: httpx.AsyncClient, ledger: Ledger, path: str) -> None:
    body = {"model": "a", "prompt": "x"} if path == "/tokenize" else {"model": "a", "tokens": [0]}
    assert (await http.post(path, json=body)).status_code == 401
    assert (await http.post(path, json=body, headers={"Authorization": "Bearer sk-orch-nope"})).status_code == 401
    scoped = await _key(ledger, models=["tiny-b"])
    denied = await http.post(path, json=body, headers=scoped)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    missing = await http.post(path, json={**body, "model": "nope"}, headers=scoped)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"model": "a"}, None),
        ("/tokenize", {"model": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, None),
        ("/tokenize", {"model": "a", "messages": [{"content": "x"}]}, None),
        ("/tokenize", {"model": "a", "prompt": 7}, "prompt"),
        ("/tokenize", {"model": "a", "prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
        ("/detokenize", {"model": "a", "tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"model": "a", "tokens": "1 2"}, "tokens"),
        ("/detokenize", {"model": "a", "tokens": [99]}, "tokens"),
        ("/detokenize", {"tokens": [1]}, "model"),
    ],
)
async def test_bad_input_is_400(
    http: httpx.AsyncClient, ledger: Ledger, path: str, body: dict[str, object], param: str | None
) -> None:
    resp = await http.post(path, json=body, headers=await _key(ledger))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param
