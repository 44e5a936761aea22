"""Router metrics through the HTTP edge: every request counted once, by code; latency,
tokens and cost by model; gateway backlog; bounded labels."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.metrics import ALL, GatewayMetrics, MemorySink
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
ROUTE = "/v1/chat/completions"


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(
        SQLStore(f"sqlite:///{tmp_path / 'g.db'}"),
        UsageJournal(tmp_path / "j"),
        flush_interval_s=0.02,
        metrics=GatewayMetrics(gateway_sink := MemorySink()),
    )
    ledger.sink = gateway_sink  # type: ignore[attr-defined]
    await ledger.start()
    yield ledger
    await ledger.stop()


class DelayedAdmission:
    """The ledger, whose admissions first await ``delay()`` (a slow or hanging gateway)."""

    def __init__(self, inner: Ledger, delay: Callable[[], Awaitable[object]]) -> None:
        self.inner = inner
        self.delay = delay

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def admit(self, *args: object, **kwargs: object) -> object:
        await self.delay()
        return await self.inner.admit(*args, **kwargs)  # type: ignore[arg-type]


def requests(sink: MemorySink, model: str, status: str, code: str) -> object:
    return sink.get("orchestrator_requests", model=model, route=ROUTE, status=status, code=code)


async def test_every_outcome_is_counted_by_code(catalog: Catalog, ledger: Ledger) -> None:
    sink = MemorySink()
    engines = {"tiny-a": FakeEngine(words=["x", "y", "z"], token_delay_s=0.01), "tiny-b": FakeEngine()}
    backend = LocalBackend(engines, batch_s=0.0)
    app = create_app(catalog, backend, Settings(), gateway=ledger, metrics=sink)
    key = (await ledger.create_key(KeyLimits(rpm=3), workspace="team-a")).key
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post(ROUTE, json=CHAT, headers=headers)).status_code == 200
        resp = await http.post(ROUTE, json={**CHAT, "stream": True}, headers=headers)
        assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
        engines["tiny-a"].fail_before_first = OrchestratorError(
            ErrorCode.PROVIDER_OVERLOADED, "full", headers={"Retry-After": "1"}
        )
        shed = await http.post(ROUTE, json=CHAT, headers=headers)
        assert shed.status_code == 529 and shed.headers["retry-after"] == "1"
        assert (await http.post(ROUTE, json=CHAT, headers=headers)).status_code == 429  # rpm=3
        assert (await http.post(ROUTE, json={**CHAT, "model": "gpt-9"}, headers=headers)).status_code == 404
        assert (await http.post(ROUTE, json=CHAT, headers={"Authorization": "Bearer sk-orch-nope"})).status_code == 401
    await asyncio.sleep(0.1)  # settlements run in their own tasks

    assert requests(sink, "tiny-a", "200", "ok") == 2
    assert requests(sink, "tiny-a", "529", "provider_overloaded") == 1
    assert requests(sink, "tiny-a", "429", "rate_limit_exceeded") == 1
    assert requests(sink, "unknown", "404", "model_not_found") == 1
    assert requests(sink, "tiny-a", "401", "invalid_api_key") == 1
    assert sink.get("orchestrator_rejected_requests", model="tiny-a", reason="shed", code="provider_overloaded") == 1
    assert sink.get("orchestrator_rejected_requests", model="tiny-a", reason="rate_limited", code="rate_limit_exceeded")
    assert sink.get("orchestrator_rejected_requests", model="tiny-a", reason="rejected", code="invalid_api_key") == 1
    # Tokens and cost of the two answered requests (the shed one produced and cost nothing).
    assert sink.get("orchestrator_completion_tokens", model="tiny-a") == 6
    # The recent rates get the same amounts (MemorySink sums them): tokens, and the 529 as a 5xx.
    assert sink.get("orchestrator_recent_completion_tokens_per_second", model="tiny-a") == 6
    assert sink.get("orchestrator_recent_server_errors_per_second", model="tiny-a") == 1
    assert sink.get("orchestrator_recent_server_errors_per_second", model="unknown") is None  # a 404
    cost = sink.get("orchestrator_cost_usd", model="tiny-a")
    assert isinstance(cost, float) and Decimal(str(cost)) > 0
    # Latency: one TTFT for the stream, a duration for each of the three admitted requests,
    # and the two gaps between the stream's three content chunks (each arrived alone).
    assert len(sink.get("orchestrator_time_to_first_token_seconds", model="tiny-a", route=ROUTE)) == 1  # type: ignore[arg-type]
    assert len(sink.get("orchestrator_request_duration_seconds", model="tiny-a", route=ROUTE)) == 3  # type: ignore[arg-type]
    gaps = sink.get("orchestrator_inter_token_latency_seconds", model="tiny-a", route=ROUTE)
    assert isinstance(gaps, list) and len(gaps) == 2 and all(g >= 0.005 for g in gaps)
    # Labels stay bounded: no request ids, no keys, nothing from the body but a known model.
    for name, series in sink.values.items():
        for labels in series:
            values = dict(labels).values()
            assert not any(v.startswith(("sk-", "gen-")) or v == "gpt-9" for v in values), (name, labels)
    # The gateway reported its backlog (all flushed by now) and flush times.
    gateway = ledger.sink  # type: ignore[attr-defined]
    assert gateway.get("orchestrator_gateway_pending_records") == 0
    assert gateway.get("orchestrator_gateway_journal_segments") >= 1
    assert len(gateway.get("orchestrator_gateway_flush_duration_seconds")) >= 1


def test_names_follow_the_house_convention() -> None:
    names = [spec.name for spec in ALL]
    assert len(set(names)) == len(names)
    assert all(n.startswith("orchestrator_") for n in names)
    requests_spec = next(s for s in ALL if s.name == "orchestrator_requests")
    # Ray exports counters with `_total`: orchestrator_requests -> ray_orchestrator_requests_total.
    assert requests_spec.kind == "counter" and "key" not in requests_spec.labels
    assert any(s.name.endswith("time_to_first_token_seconds") and s.kind == "histogram" for s in ALL)
    assert any(s.name.endswith("cost_usd") and s.kind == "counter" for s in ALL)


# Label names whose values would come one per key, workspace, user or request: each value is a
# series Prometheus keeps, so their number would grow with what admins and clients create.
UNBOUNDED_LABEL = re.compile(r"key|workspace|request|user|session|trace|owner|id$", re.IGNORECASE)


def test_no_metric_is_labelled_by_key_workspace_or_request() -> None:
    assert UNBOUNDED_LABEL.search("key_id") and UNBOUNDED_LABEL.search("request_id")
    assert UNBOUNDED_LABEL.search("api_key") and UNBOUNDED_LABEL.search("workspace")
    for spec in ALL:
        unbounded = [label for label in spec.labels if UNBOUNDED_LABEL.search(label)]
        assert not unbounded, f"{spec.name} is labelled {unbounded}"


async def test_spend_per_key_is_in_the_usage_report_and_cost_is_one_series_per_model(
    catalog: Catalog, ledger: Ledger
) -> None:
    """Keys in different workspaces add to one cost series per model; what each key spent is
    in the admin API's usage report, and the two agree."""
    sink = MemorySink()
    engines = {"tiny-a": FakeEngine(words=["x", "y"]), "tiny-b": FakeEngine()}
    backend = LocalBackend(engines, batch_s=0.0)
    app = create_app(catalog, backend, Settings(admin_key=ADMIN), gateway=ledger, metrics=sink)
    first = await ledger.create_key(KeyLimits(), workspace="team-a")
    second = await ledger.create_key(KeyLimits(), workspace="team-b")
    sent = {first.info.id: 1, second.info.id: 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        for created in (first, second, second):
            headers = {"Authorization": f"Bearer {created.key}"}
            assert (await http.post(ROUTE, json=CHAT, headers=headers)).status_code == 200
        for _ in range(500):  # settlements run in their own tasks
            await ledger.flush()
            if sum(row["requests"] for row in await ledger.usage_report(group_by=["key"])) == 3:
                break
            await asyncio.sleep(0.01)
        resp = await http.get("/admin/usage", params={"group_by": "key"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200
    spent = {row["key"]: (row["requests"], Decimal(str(row["cost"]))) for row in resp.json()["data"]}
    assert {key: requests for key, (requests, _) in spent.items()} == sent
    assert spent[second.info.id][1] == 2 * spent[first.info.id][1] > 0  # the same request, twice
    assert list(sink.values["orchestrator_cost_usd"]) == [(("model", "tiny-a"),)]
    total = sink.get("orchestrator_cost_usd", model="tiny-a")
    assert total == pytest.approx(float(sum(cost for _, cost in spent.values())))


async def test_latency_counts_from_arrival_and_timeouts_and_cold_starts_are_counted_and_settled(
    catalog: Catalog, ledger: Ledger
) -> None:
    """TTFT and duration include the gateway's admission (what the client waits for); 504
    provider_timeout and 503 model_unavailable are counted by reason and settled."""
    slow = DelayedAdmission(ledger, lambda: asyncio.sleep(0.3))
    sink = MemorySink()
    engines = {"tiny-a": FakeEngine(words=["x"]), "tiny-b": FakeEngine()}
    app = create_app(catalog, LocalBackend(engines, batch_s=0.0), Settings(), gateway=slow, metrics=sink)  # type: ignore[arg-type]
    key = (await ledger.create_key(KeyLimits(), workspace="team-a")).key
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post(ROUTE, json={**CHAT, "stream": True}, headers=headers)).status_code == 200
        for code, status in ((ErrorCode.PROVIDER_TIMEOUT, 504), (ErrorCode.MODEL_UNAVAILABLE, 503)):
            engines["tiny-a"].fail_before_first = OrchestratorError(code, "no answer")
            assert (await http.post(ROUTE, json=CHAT, headers=headers)).status_code == status
    await asyncio.sleep(0.1)
    (ttft,) = sink.get("orchestrator_time_to_first_token_seconds", model="tiny-a", route=ROUTE)  # type: ignore[misc]
    assert ttft >= 0.3  # the engine answered at once; the client waited for admission
    durations = sink.get("orchestrator_request_duration_seconds", model="tiny-a", route=ROUTE)
    assert isinstance(durations, list) and len(durations) == 3 and min(durations) >= 0.3
    assert requests(sink, "tiny-a", "504", "provider_timeout") == 1
    assert requests(sink, "tiny-a", "503", "model_unavailable") == 1
    assert sink.get("orchestrator_rejected_requests", model="tiny-a", reason="timeout", code="provider_timeout") == 1
    assert sink.get("orchestrator_rejected_requests", model="tiny-a", reason="shed", code="model_unavailable") == 1
    (row,) = await ledger.usage_report(group_by=["key"])
    assert row["requests"] == 3  # each settled: one record apiece


async def test_an_admission_past_the_gateway_deadline_gets_503_and_is_settled_when_it_comes(
    catalog: Catalog, ledger: Ledger
) -> None:
    """A gateway that hangs cannot hold a request: past ``gateway_timeout_seconds`` the
    client gets 503 with Retry-After. The gateway still admits it later; that admission is
    settled at once (one record, nothing billed, its holds released) and counted once."""
    release = asyncio.Event()
    hanging = DelayedAdmission(ledger, release.wait)
    sink = MemorySink()
    engines = {"tiny-a": FakeEngine(words=["x"]), "tiny-b": FakeEngine()}
    settings = Settings(gateway_timeout_seconds=0.2)
    app = create_app(catalog, LocalBackend(engines, batch_s=0.0), settings, gateway=hanging, metrics=sink)  # type: ignore[arg-type]
    created = await ledger.create_key(KeyLimits(credits=Decimal("1"), max_concurrent=1))
    headers = {"Authorization": f"Bearer {created.key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        resp = await http.post(ROUTE, json={**CHAT, "stream": True}, headers=headers)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.json()["error"]["code"] == "service_unavailable" and "0.2 s" in resp.json()["error"]["message"]
    release.set()  # the gateway answers after all
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not ledger.holds.admitted and ledger.books.settled:
            break
    assert ledger.holds.admitted == {} and ledger.holds.running == {} and ledger.holds.held_cost == {}  # nothing held
    await ledger.flush()
    (row,) = await ledger.usage_report(group_by=["key"])
    assert row["requests"] == 1 and row["cost"] == 0
    with ledger.store.engine.connect() as conn:
        rows = conn.exec_driver_sql("select status_code, error_code, completion_tokens from usage_records").all()
    assert [tuple(r) for r in rows] == [(503, "service_unavailable", 0)]
    assert requests(sink, "tiny-a", "503", "service_unavailable") == 1  # counted once, not again at settlement
    # The key's one concurrent slot is free again: the next request runs.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        assert (await http.post(ROUTE, json=CHAT, headers=headers)).status_code == 200


async def test_many_concurrent_admissions_past_the_deadline_leak_no_hold(catalog: Catalog, ledger: Ledger) -> None:
    """Eight requests at once against a key that may run eight, all given up on at the
    deadline and all admitted afterwards: every late admission is settled, so the key's
    eight slots and its credits are free again (a leaked hold would refuse the next round)."""
    release = asyncio.Event()
    hanging = DelayedAdmission(ledger, release.wait)
    engines = {"tiny-a": FakeEngine(words=["x"]), "tiny-b": FakeEngine()}
    # The first round waits for `release` whatever the deadline; a second lets the second round's
    # admissions through on a busy machine.
    settings = Settings(gateway_timeout_seconds=1.0)
    app = create_app(catalog, LocalBackend(engines, batch_s=0.0), settings, gateway=hanging)  # type: ignore[arg-type]
    created = await ledger.create_key(KeyLimits(credits=Decimal("1"), max_concurrent=8))
    headers = {"Authorization": f"Bearer {created.key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        first = await asyncio.gather(*(http.post(ROUTE, json=CHAT, headers=headers) for _ in range(8)))
        assert [r.status_code for r in first] == [503] * 8
        release.set()
        for _ in range(1000):
            await asyncio.sleep(0.01)
            if len(ledger.books.settled) == 8:
                break
        assert len(ledger.books.settled) == 8 and ledger.holds.admitted == {} and ledger.holds.running == {}
        assert ledger.holds.held_cost == {}
        second = await asyncio.gather(*(http.post(ROUTE, json=CHAT, headers=headers) for _ in range(8)))
        assert [r.status_code for r in second] == [200] * 8
    await ledger.flush()
    (row,) = await ledger.usage_report(group_by=["key"])
    assert row["requests"] == 16
