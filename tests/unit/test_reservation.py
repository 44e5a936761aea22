"""What a request reserves at admission: tokens for the per-minute limit, and its worst-case
cost for the balance and spend limits (n and prompt lists multiply the output; best_of, which
vLLM ignores, is refused unless 1 and so reserves nothing)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import httpx
import pytest

from orchestrator.api.accounting import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    TEMPLATE_TOKENS_PER_REQUEST,
    reservation,
)
from orchestrator.catalog import Catalog
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.pricing import request_cost
from orchestrator.gateway.records import KeyLimits
from tests.fakes import FakeEngine
from tests.unit.test_gateway_api import CHAT, auth


def _bytes(body: dict) -> int:
    return len(json.dumps(body).encode())


def test_chat_reserves_every_choice(catalog: Catalog) -> None:
    spec = catalog.resolve("a")  # context window 512; $1.5 in, $2 out per million
    body = {**CHAT, "max_tokens": 10, "n": 3}
    got = reservation(body, _bytes(body), spec, 10)
    prompt = -(-_bytes(body) // 4) + 4
    assert got.tokens == prompt + 10 * 3
    worst_prompt = _bytes(body) + TEMPLATE_TOKENS_PER_REQUEST + TEMPLATE_TOKENS_PER_MESSAGE
    assert got.cost == request_cost(spec.pricing, worst_prompt, 30)


def test_n_and_prompt_lists_multiply(catalog: Catalog) -> None:
    spec = catalog.resolve("a")
    body = {"model": "a", "prompt": ["x", "y", "z", "w"], "max_tokens": 5, "n": 3, "best_of": 1}
    got = reservation(body, _bytes(body), spec, 5)
    assert got.tokens == -(-_bytes(body) // 4) + 4 + 5 * 3 * 4
    assert got.cost == request_cost(spec.pricing, _bytes(body) + 64 + 16, 5 * 3 * 4)
    token_ids = {"model": "a", "prompt": [1, 2, 3], "max_tokens": 5}  # one prompt, given as ids
    assert reservation(token_ids, _bytes(token_ids), spec, 5).cost == request_cost(
        spec.pricing, _bytes(token_ids) + 80, 5
    )


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("best_of", [2, 128, 0, 2.0, "x", "1", True, [1], {"n": 1}])
async def test_best_of_other_than_one_is_refused_not_billed(
    http: httpx.AsyncClient, ledger: Ledger, route: str, best_of: object
) -> None:
    # vLLM 0.32 ignores best_of, so the router refuses it rather than bill for sequences
    # nobody generates (and a malformed one never reaches the reservation's arithmetic).
    key = (await ledger.create_key(KeyLimits())).key
    body = {**CHAT, "best_of": best_of} if "chat" in route else {"model": "a", "prompt": "hi", "best_of": best_of}
    resp = await http.post(route, json=body, headers=auth(key))
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "best_of")
    for allowed in (1, 1.0, None):
        assert (await http.post(route, json={**body, "best_of": allowed}, headers=auth(key))).status_code == 200


def test_without_max_tokens_the_whole_window_is_held(catalog: Catalog) -> None:
    spec = catalog.resolve("a")
    body = {"model": "a", "prompt": "x" * 4000}
    got = reservation(body, _bytes(body), spec, None)
    assert got.cost == request_cost(spec.pricing, 512, 512)  # the prompt bound is the window too
    assert got.tokens == 512 + 1  # the per-minute estimate: the window, and at least one output token


async def test_fifty_concurrent_streams_through_the_api_cannot_overrun_a_balance(
    http: httpx.AsyncClient, ledger: Ledger, catalog: Catalog, engines: dict[str, FakeEngine]
) -> None:
    engines["tiny-a"].token_delay_s = 0.02  # the admitted streams overlap
    body = {**CHAT, "max_tokens": 100, "stream": True}
    hold = reservation(body, _bytes(body), catalog.resolve("a"), 100).cost
    created = await ledger.create_key(KeyLimits(credits=hold * 5 + hold / 2))  # covers 5.5 worst cases

    async def one() -> int:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth(created.key)) as resp:
            await resp.aread()
            return resp.status_code

    statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert statuses.count(402) >= 1 and statuses.count(200) >= 5 and set(statuses) == {200, 402}, statuses
    await ledger.flush()
    info = await ledger.get_key(created.info.id)
    assert info.credits is not None and info.credits >= 0
    report = await ledger.usage_report(group_by=["key"])
    assert report[0]["requests"] == statuses.count(200)
    assert Decimal(str(report[0]["cost"])) == hold * 5 + hold / 2 - info.credits


def test_an_undeclared_input_field_does_not_change_a_chats_reservation(catalog: Catalog) -> None:
    """Only the embeddings route counts ``input``: a chat body carrying one (generation bodies
    allow undeclared fields) can neither shrink its hold (one message instead of 50) nor
    inflate it."""
    spec = catalog.resolve("a")
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}] * 50, "max_tokens": 5}
    for extra in ("x", ["x"] * 100):
        body = {**chat, "input": extra}
        assert reservation(body, _bytes(body), spec, 5) == reservation(chat, _bytes(body), spec, 5)
