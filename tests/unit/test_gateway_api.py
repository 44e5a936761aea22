"""The HTTP edge with the real ledger (SQLite) and fake engines: every gateway code, the
rate-limit headers, cost, generation lookup, settlement of abandoned streams, admin API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.api.accounting import RequestMeter, Settler
from orchestrator.api.backend import Kind
from orchestrator.api.generation import _MeteredStream
from orchestrator.api.sse import StreamHead, drive
from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import MAX_USD, Admission, KeyLimits, UsageRecord
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def new_key(ledger: Ledger, **limits: object) -> str:
    return (await ledger.create_key(KeyLimits(**limits))).key  # type: ignore[arg-type]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def code(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["code"])


async def test_every_admission_code(http: httpx.AsyncClient, ledger: Ledger) -> None:
    cases = [
        ({}, 401, "invalid_api_key"),
        (auth("sk-orch-unknown"), 401, "invalid_api_key"),
        (auth(await new_key(ledger, models=["tiny-b"])), 403, "model_not_allowed"),
        (auth(await new_key(ledger, enabled=False)), 403, "workspace_locked"),
        (auth(await new_key(ledger, credits=Decimal(0))), 402, "insufficient_credits"),
        (auth(await new_key(ledger, daily_limit=Decimal(0))), 402, "key_limit_exceeded"),
    ]
    for headers, status, expected in cases:
        resp = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert (resp.status_code, code(resp)) == (status, expected)
        assert "sk-orch-unknown" not in resp.text


async def test_locked_workspace(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = (await ledger.create_key(KeyLimits(), "team-x")).key
    assert (await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status_code == 200
    await ledger.set_workspace_enabled("team-x", False)
    resp = await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert (resp.status_code, code(resp)) == (403, "workspace_locked")


async def test_bad_key_gets_401_before_body_errors(http: httpx.AsyncClient, ledger: Ledger) -> None:
    resp = await http.post("/v1/chat/completions", json={"model": "nope"}, headers=auth("sk-orch-x"))
    assert (resp.status_code, code(resp)) == (401, "invalid_api_key")
    resp = await http.post("/v1/chat/completions", json={"model": "nope"}, headers=auth(await new_key(ledger)))
    assert (resp.status_code, code(resp)) == (400, "invalid_request")
    assert (await http.get("/v1/models")).status_code == 401


async def test_rate_limit_headers_and_429(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = await new_key(ledger, rpm=2, tpm=10_000)
    ok = await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert ok.headers["x-ratelimit-limit-requests"] == "2" and ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert ok.headers["x-ratelimit-limit-tokens"] == "10000"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 10_000
    assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    streamed = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
    refused = await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert (refused.status_code, code(refused)) == (429, "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_request_above_the_tokens_per_minute_is_400_naming_the_limit(
    http: httpx.AsyncClient, ledger: Ledger
) -> None:
    # The reservation counts max_tokens: 200 of them can never fit a 100-token minute, so
    # the answer is no 429 (whose Retry-After SDKs follow for ever) but a 400.
    key = await new_key(ledger, tpm=100)
    resp = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 200}, headers=auth(key))
    assert (resp.status_code, code(resp)) == (400, "request_too_large_for_limit")
    assert "tokens-per-minute limit (tpm) of 100" in resp.json()["error"]["message"]
    assert "retry-after" not in resp.headers
    assert (await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status_code == 200


async def test_a_request_no_window_could_admit_is_refused_before_a_busy_key_says_429(ledger: Ledger) -> None:
    key = await new_key(ledger, tpm=100, max_concurrent=1)
    await ledger.admit(key, ["tiny-a"], 60, "running")  # holds the key's one slot and 60 tokens
    with pytest.raises(OrchestratorError) as too_large:
        await ledger.admit(key, ["tiny-a"], 101, "too-large")
    assert too_large.value.code is ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT
    with pytest.raises(OrchestratorError) as busy:  # fits a minute: a retry can pass
        await ledger.admit(key, ["tiny-a"], 30, "waits")
    assert busy.value.code is ErrorCode.RATE_LIMIT_EXCEEDED and "retry-after" in map(str.lower, busy.value.headers)


async def test_cost_in_usage_and_lookup_right_after(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = await new_key(ledger, credits=Decimal(1))
    resp = await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    usage = resp.json()["usage"]
    # catalog prices: 1.5 USD/M input, 2 USD/M output
    expected = (Decimal("1.5") * usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1_000_000
    assert Decimal(str(usage["cost"])) == expected
    gen_id = resp.json()["id"]
    found = await http.get("/v1/generation", params={"id": gen_id}, headers=auth(key))
    data = found.json()["data"]
    assert data["id"] == gen_id and data["streamed"] is False and data["status_code"] == 200
    assert Decimal(str(data["cost"])) == expected and data["finish_reason"] == "stop"
    other = await http.get("/v1/generation", params={"id": gen_id}, headers=auth(await new_key(ledger)))
    assert (other.status_code, code(other)) == (404, "not_found")
    assert (await http.get("/v1/generation", params={"id": gen_id}, headers=auth(ADMIN))).status_code == 200


async def test_stream_usage_chunk_has_cost_and_record_has_ttft(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = await new_key(ledger)
    resp = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert ": usage" not in resp.text  # the trailer never reaches clients
    blocks = [b for b in resp.text.split("\n\n") if b]
    usage = json.loads(blocks[-2].removeprefix("data: "))["usage"]
    assert usage["cost"] > 0
    gen_id = json.loads(blocks[0].removeprefix("data: "))["id"]
    data = (await http.get("/v1/generation", params={"id": gen_id}, headers=auth(key))).json()["data"]
    assert data["streamed"] is True and data["ttft_ms"] is not None and data["completion_tokens"] == 4


async def test_engine_failure_mid_stream_is_recorded(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    engines["tiny-a"].fail_after = 2
    key = await new_key(ledger, credits=Decimal(1))
    resp = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    assert '"code":"provider_unavailable"' in resp.text and resp.text.endswith("data: [DONE]\n\n")
    gen_id = json.loads(resp.text.split("\n\n")[0].removeprefix("data: "))["id"]
    data = (await http.get("/v1/generation", params={"id": gen_id}, headers=auth(key))).json()["data"]
    assert data["status_code"] == 502 and data["error_code"] == "provider_unavailable"
    assert data["completion_tokens"] == 2 and data["cost"] > 0  # billed for what was produced


async def test_abandoned_stream_settles_once(catalog: Catalog, ledger: Ledger) -> None:
    key = (await ledger.create_key(KeyLimits(credits=Decimal(1)))).key
    spec = catalog.resolve("a")
    engine = FakeEngine(words=["w"] * 50, token_delay_s=0.01)
    admission = await ledger.admit(key, spec.names, 100, "gone-1")
    settler = Settler(ledger)
    meter = RequestMeter(spec, admission, streamed=True, first_token_batch=1)
    head = StreamHead(LocalBackend({"tiny-a": engine}).stream(spec, "chat", {**CHAT, "model": "tiny-a"}, "gone-1"))
    body = drive(head, request_id="gone-1", observer=_MeteredStream(meter, settler))
    for _ in range(4):
        await anext(body)
    await body.aclose()  # what Starlette does when the client disconnects
    await settler.drain()
    record = await ledger.generation("gen-gone-1", key)
    assert record.cancelled and record.status_code == 499 and 1 <= record.completion_tokens < 50
    assert record.prompt_tokens > 0
    # A late duplicate settlement (e.g. a retry) changes nothing.
    assert not await ledger.settle(Admission(request_id="gone-1", key_id=admission.key_id), record)
    await ledger.flush()
    info = (await ledger.list_keys())[0]
    assert info.credits == Decimal(1) - record.cost


async def test_admin_api(http: httpx.AsyncClient) -> None:
    assert code(await http.get("/admin/keys")) == "invalid_api_key"
    assert (await http.get("/admin/keys", headers=auth("not-the-admin-key"))).status_code == 401
    created = await http.post("/admin/keys", json={"name": "app", "rpm": 5, "credits": "2.5"}, headers=auth(ADMIN))
    assert created.status_code == 201
    key, info = created.json()["key"], created.json()["info"]
    assert key.startswith("sk-orch-") and "key_hash" not in info and info["credits"] == "2.5"
    assert (await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status_code == 200
    listed = (await http.get("/admin/keys", headers=auth(ADMIN))).json()["data"]
    assert [k["id"] for k in listed] == [info["id"]] and key not in json.dumps(listed)
    patched = await http.patch(f"/admin/keys/{info['id']}", json={"rpm": 9, "clear": ["credits"]}, headers=auth(ADMIN))
    assert patched.json()["rpm"] == 9 and patched.json()["credits"] is None
    usage = (await http.get("/admin/usage", params={"group_by": "key,model"}, headers=auth(ADMIN))).json()
    assert usage["data"][0]["key"] == info["id"] and usage["data"][0]["requests"] == 1
    bad = await http.get("/admin/usage", params={"group_by": "colour"}, headers=auth(ADMIN))
    assert (bad.status_code, code(bad)) == (400, "invalid_request")
    assert (await http.delete(f"/admin/keys/{info['id']}", headers=auth(ADMIN))).json()["revoked_at"]
    resp = await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert (resp.status_code, code(resp)) == (401, "invalid_api_key")
    missing = await http.get("/admin/keys/key_nope", headers=auth(ADMIN))
    assert (missing.status_code, code(missing)) == (404, "not_found")


async def test_repeated_request_id_header_is_billed_each_time(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = await new_key(ledger)
    same = {**auth(key), "x-request-id": "fixed-id"}
    ids = [(await http.post("/v1/chat/completions", json=CHAT, headers=same)).json()["id"] for _ in range(2)]
    assert ids[0] != ids[1]
    for gen_id in ids:  # a lookup waits for the settlement
        assert (await http.get("/v1/generation", params={"id": gen_id}, headers=auth(key))).status_code == 200
    rows = await ledger.usage_report(group_by=["key"])
    assert rows[0]["requests"] == 2


async def test_abandoned_non_streaming_request_is_recorded(
    http: httpx.AsyncClient, ledger: Ledger, engines: dict[str, FakeEngine]
) -> None:
    import asyncio

    started = asyncio.Event()

    class Slow(FakeEngine):
        async def complete(self, kind: Kind, body: dict, request_id: str) -> dict:  # type: ignore[override]
            self.seen = request_id
            started.set()
            await asyncio.sleep(30)
            return {}

    slow = engines["tiny-a"] = Slow()
    key = await new_key(ledger)
    call = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT, headers=auth(key)))
    await started.wait()
    call.cancel()  # the client gives up
    with contextlib.suppress(asyncio.CancelledError):
        await call
    record = await ledger.generation("gen-" + slow.seen, key)
    assert record.cancelled and record.status_code == 499 and not record.streamed


async def test_anthropic_style_x_api_key_header(http: httpx.AsyncClient, ledger: Ledger) -> None:
    key = await new_key(ledger)
    assert (await http.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": key})).status_code == 200
    resp = await http.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "sk-orch-wrong"})
    assert (resp.status_code, code(resp)) == (401, "invalid_api_key")


@pytest.mark.parametrize(
    "body",
    [
        {"credits": "1e30"},
        {"credits": "-1"},
        {"credits": "NaN"},
        {"daily_limit": "1000000001"},
        {"monthly_limit": "Infinity"},
        {"rpm": 1_000_000_000_000},
        {"tpm": 2**31},
        {"models": ["m"] * 257},
        {"models": [""]},
    ],
)
async def test_admin_api_refuses_out_of_range(http: httpx.AsyncClient, body: dict) -> None:
    resp = await http.post("/admin/keys", json=body, headers=auth(ADMIN))
    assert (resp.status_code, code(resp)) == (400, "invalid_request"), resp.text
    assert resp.json()["error"]["param"].split(".")[0] == next(iter(body))  # models.0 names the entry
    assert (await http.get("/admin/keys", headers=auth(ADMIN))).json()["data"] == []


async def test_the_largest_values_are_stored_exactly(http: httpx.AsyncClient) -> None:
    body = {"credits": str(MAX_USD), "daily_limit": "0.000000001", "rpm": 1_000_000_000, "tpm": 1_000_000_000}
    created = await http.post("/admin/keys", json=body, headers=auth(ADMIN))
    assert created.status_code == 201, created.text
    info = (await http.get(f"/admin/keys/{created.json()['info']['id']}", headers=auth(ADMIN))).json()
    assert Decimal(info["credits"]) == MAX_USD and Decimal(info["daily_limit"]) == Decimal("1e-9")
    assert info["rpm"] == info["tpm"] == 1_000_000_000


async def test_top_ups_cannot_take_a_balance_past_the_bound(http: httpx.AsyncClient) -> None:
    created = await http.post("/admin/keys", json={"credits": "999999999"}, headers=auth(ADMIN))
    key_id = created.json()["info"]["id"]
    over = await http.patch(f"/admin/keys/{key_id}", json={"add_credits": "2", "rpm": 5}, headers=auth(ADMIN))
    assert (over.status_code, code(over)) == (400, "invalid_request") and over.json()["error"]["param"] == "add_credits"
    info = (await http.get(f"/admin/keys/{key_id}", headers=auth(ADMIN))).json()
    assert Decimal(info["credits"]) == Decimal(999999999) and info["rpm"] is None  # nothing changed
    ok = await http.patch(f"/admin/keys/{key_id}", json={"add_credits": "1"}, headers=auth(ADMIN))
    assert Decimal(ok.json()["credits"]) == MAX_USD
    too_big = await http.patch(f"/admin/keys/{key_id}", json={"add_credits": "1e30"}, headers=auth(ADMIN))
    assert (too_big.status_code, code(too_big)) == (400, "invalid_request")


class _SlowAdmission:
    """The ledger, with admissions that finish only when released."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.ledger, name)

    async def admit(self, *args: object, **kwargs: object) -> Admission:
        self.started.set()
        await self.release.wait()
        return await self.ledger.admit(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_client_leaving_during_admission_is_settled_once(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
    slow = _SlowAdmission(ledger)
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=slow)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        call = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=auth(created.key)))
        await slow.started.wait()
        call.cancel()  # the client leaves while the gateway is admitting it
        with contextlib.suppress(asyncio.CancelledError):
            await call
        slow.release.set()  # the gateway admits it after all
        for _ in range(1000):  # up to 10 s on a loaded machine
            await asyncio.sleep(0.01)
            if not ledger.holds.admitted and ledger.books.settled:  # admitted, then settled
                break
    assert ledger.holds.admitted == {}  # its holds and its lookup wait are released
    await ledger.flush()
    report = await ledger.usage_report(group_by=["key"])
    assert [(row["key"], row["requests"]) for row in report] == [(created.info.id, 1)]
    # Its one record (found through the database: the flusher may have written it already).
    engine = ledger.store.engine
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("select status_code, cancelled, cost_nusd from usage_records").all()
    assert [(int(r[0]), bool(r[1]), int(r[2])) for r in rows] == [(499, True, 0)]


class _RestartingGateway:
    """The ledger behind a gateway that answers 503 (restarting) to the first settlements."""

    def __init__(self, ledger: Ledger, failures: int) -> None:
        self.ledger = ledger
        self.failures = failures
        self.attempts = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.ledger, name)

    async def settle(self, admission: Admission, record: UsageRecord) -> bool:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OrchestratorError(ErrorCode.SERVICE_UNAVAILABLE, "restarting", headers={"Retry-After": "1"})
        return await self.ledger.settle(admission, record)


async def test_settlement_is_retried_while_the_gateway_restarts(catalog: Catalog, ledger: Ledger) -> None:
    created = await ledger.create_key(KeyLimits(credits=Decimal(1)))
    spec = catalog.resolve("a")
    gateway = _RestartingGateway(ledger, failures=3)
    settler = Settler(gateway, first_retry_s=0.01)  # type: ignore[arg-type]
    admission = await ledger.admit(created.key, spec.names, 10, "r1", cost=Decimal("0.01"))
    meter = RequestMeter(spec, admission, streamed=False)
    meter.on_response({"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "choices": [{}]})
    task = settler.finish(meter, 200)
    await asyncio.sleep(0.005)
    assert settler.spooled == 1  # waiting for the gateway
    await task
    assert gateway.attempts == 4 and settler.spooled == 0
    assert (await ledger.generation("gen-r1", created.key)).completion_tokens == 4
    await ledger.flush()
    assert (await ledger.get_key(created.info.id)).credits == Decimal(1) - meter.cost()


async def test_settlement_gives_up_after_its_bound(
    catalog: Catalog, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    created = await ledger.create_key(KeyLimits())
    spec = catalog.resolve("a")
    settler = Settler(_RestartingGateway(ledger, failures=10**6), retry_for_s=0.1, first_retry_s=0.01)  # type: ignore[arg-type]
    admission = await ledger.admit(created.key, spec.names, 10, "r2")
    await settler.finish(RequestMeter(spec, admission, streamed=False), 200)
    assert settler.spooled == 0 and "unrecorded usage" in caplog.text
    # A full spool does not wait: the record is logged at once.
    full = Settler(_RestartingGateway(ledger, failures=10**6), max_spooled=0, first_retry_s=10)  # type: ignore[arg-type]
    await asyncio.wait_for(full.finish(RequestMeter(spec, admission, streamed=False), 200), timeout=1)


async def test_a_body_over_the_limit_is_413_before_anything_else(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN, max_body_bytes=2048), gateway=ledger)

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted while read
        for _ in range(4):
            yield b" " * 1000

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        # FastAPI parses admin bodies itself; the limit is hit before it reads (not its 400),
        # and before the key check, as when the size is declared.
        for path in ("/admin/keys", "/v1/chat/completions"):
            resp = await client.post(path, content=chunks(), headers=auth(ADMIN))
            assert (resp.status_code, code(resp)) == (413, "payload_too_large"), path


async def test_a_settlement_runs_outside_its_requests_context(catalog: Catalog, ledger: Ledger) -> None:
    """In a Ray actor the request's context marks the calls made under it as the request's
    children, which Ray cancels with the request; a settlement must not be one of them."""
    import contextvars

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="fresh")
    seen: list[str] = []

    class Watching(_RestartingGateway):
        async def settle(self, admission: Admission, record: UsageRecord) -> bool:
            seen.append(marker.get())
            return await self.ledger.settle(admission, record)

    created = await ledger.create_key(KeyLimits())
    spec = catalog.resolve("a")
    settler = Settler(Watching(ledger, failures=0))  # type: ignore[arg-type]
    admission = await ledger.admit(created.key, spec.names, 10, "ctx-1")
    marker.set("the request's")
    await settler.finish(RequestMeter(spec, admission, streamed=False), 200)
    assert seen == ["fresh"]


async def test_a_running_router_renews_its_holds_and_admits_under_the_id_it_renews(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    renewals: list[str] = []

    class Renewing(_RestartingGateway):
        async def renew(self, holder: str) -> None:  # recorded, not passed on
            renewals.append(holder)
            if len(renewals) == 1:
                raise OrchestratorError(ErrorCode.SERVICE_UNAVAILABLE, "restarting")

    settings = Settings(admin_key=ADMIN, admission_ttl_seconds=1)
    app = create_app(catalog, LocalBackend(engines), settings, gateway=Renewing(ledger, failures=0))  # type: ignore[arg-type]
    key = await new_key(ledger)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            assert (await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status_code == 200
        await asyncio.sleep(0.6)
    # Every 0.25 s (a quarter of the TTL) from startup, on past a failed renewal, one id.
    assert len(renewals) >= 3 and len(set(renewals)) == 1, renewals
    assert set(ledger.holds.holders) == set(renewals)  # the request was admitted under it
    count = len(renewals)
    await asyncio.sleep(0.4)
    assert len(renewals) == count  # stopped with the app


async def test_max_concurrent_from_the_admin_api_and_the_cli_with_its_headers(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's cap on requests running at once, set through the admin API (and the CLI,
    on the same database): the second concurrent request gets 429 with the concurrency
    headers, and a slot frees when a request ends."""
    from orchestrator.cli import main

    engines["tiny-a"].first_delay_s = 0.5
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        made = await http.post("/admin/keys", json={"max_concurrent": 1}, headers=auth(ADMIN))
        assert made.status_code == 201 and made.json()["info"]["max_concurrent"] == 1
        key = made.json()["key"]

        async def second() -> httpx.Response:
            await asyncio.sleep(0.1)  # the first request is running
            return await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))

        slow = {**CHAT, "stream": True}  # its first token comes after 0.5 s
        first, refused = await asyncio.gather(http.post("/v1/chat/completions", json=slow, headers=auth(key)), second())
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-concurrency"] == "1"
        assert first.headers["x-ratelimit-remaining-concurrency"] == "0"
        assert (refused.status_code, code(refused)) == (429, "rate_limit_exceeded")
        assert refused.headers["x-ratelimit-remaining-concurrency"] == "0" and refused.headers["retry-after"] == "1"
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status_code == 200
    # The CLI sets the same field in the database.
    monkeypatch.setenv("ORCH_DATABASE_URL", str(ledger.store.engine.url.render_as_string(hide_password=False)))
    assert main(["keys", "create", "--max-concurrent", "3", "--name", "cli-capped"]) == 0
    (info,) = [k for k in await ledger.list_keys() if k.name == "cli-capped"]
    assert info.max_concurrent == 3
