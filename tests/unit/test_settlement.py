"""Every admitted request is settled exactly once, and its generation stopped, whatever
cancels it: the client leaving while it is admitted, before the response's body takes its
first step (a disconnect already waiting when the response starts, or the first send
failing), or mid-stream. The app is called as an ASGI server calls it, so that Starlette's
own handling of the disconnect runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from orchestrator.api import create_app
from orchestrator.api.backend import ChunkStream, Kind
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import Admission, KeyLimits, UsageRecord
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}


class CountingGateway:
    """The ledger, counting settlements per request id; admissions can be held back."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.settled: Counter[str] = Counter()
        self.records: list[UsageRecord] = []
        self.admitting = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    def __getattr__(self, name: str) -> object:
        return getattr(self.ledger, name)

    async def admit(self, *args: Any, **kwargs: Any) -> Admission:
        self.admitting.set()
        await self.release.wait()
        return await self.ledger.admit(*args, **kwargs)

    async def settle(self, admission: Admission, record: UsageRecord) -> bool:
        self.settled[record.request_id] += 1
        self.records.append(record)
        return await self.ledger.settle(admission, record)


class WatchedBackend(LocalBackend):
    """Fake engines whose streams count their ``cancel`` calls (the upstream stopped)."""

    def __init__(self, engines: dict[str, FakeEngine]) -> None:
        super().__init__(engines)
        self.started = 0
        self.cancelled = 0

    def stream(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> ChunkStream:
        inner = super().stream(spec, kind, body, request_id)
        self.started += 1
        backend = self

        class Watched:
            def __aiter__(self) -> Watched:
                return self

            async def __anext__(self) -> list[str]:
                return await anext(inner)

            def cancel(self) -> None:
                backend.cancelled += 1
                inner.cancel()

        return Watched()


def scope(key: str, spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def call(
    app: Any, key: str, *, disconnect: asyncio.Event, spec_version: str = "2.3", send: Callable[..., Any] | None = None
) -> list[dict[str, Any]]:
    """Calls the app as a server does; ``receive`` answers the body, then a disconnect once
    ``disconnect`` is set. Returns what the app sent."""
    sent: list[dict[str, Any]] = []
    body = [{"type": "http.request", "body": json.dumps(CHAT).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def record(message: dict[str, Any]) -> None:
        sent.append(message)
        if send is not None:
            await send(message)

    with contextlib.suppress(OSError, Exception):
        await app(scope(key, spec_version), receive, record)
    return sent


async def settled(gateway: CountingGateway, ledger: Ledger) -> UsageRecord:
    """Waits (bounded) for the ledger to hold no admitted request; returns the one record."""
    for _ in range(500):
        if not ledger.holds.admitted and gateway.records:
            break
        await asyncio.sleep(0.01)
    assert ledger.holds.admitted == {}, "an admitted request was never settled: it still holds"
    assert list(gateway.settled.values()) == [1], gateway.settled
    (record,) = gateway.records
    return record


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(words=["w"] * 200, token_delay_s=0.005), "tiny-b": FakeEngine()}


async def start(catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger) -> tuple[Any, ...]:
    gateway = CountingGateway(ledger)
    backend = WatchedBackend(engines)
    app = create_app(catalog, backend, Settings(admin_key=ADMIN), gateway=gateway)  # type: ignore[arg-type]
    key = (await ledger.create_key(KeyLimits(credits=Decimal(1)))).key
    return app, gateway, backend, key


async def test_a_disconnect_waiting_before_the_body_starts_settles_once_and_stops_the_stream(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    # Starlette's response listens for the disconnect beside the body and cancels the body's
    # task at its first wait, here the send of the response's start: the stream driver
    # never takes a step.
    app, gateway, backend, key = await start(catalog, engines, ledger)
    gone = asyncio.Event()
    gone.set()

    async def start_waits(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            await asyncio.sleep(0)

    sent = await call(app, key, disconnect=gone, send=start_waits)
    assert not [m for m in sent if m["type"] == "http.response.body" and m.get("body")]  # nothing streamed
    record = await settled(gateway, ledger)
    assert (record.status_code, record.cancelled, record.streamed) == (499, True, True)
    assert backend.started == 1 and backend.cancelled >= 1
    for _ in range(100):  # the fake engine's generator closes once cancelled
        if engines["tiny-a"].running == 0:
            break
        await asyncio.sleep(0.01)
    assert engines["tiny-a"].running == 0


async def test_a_failing_first_send_settles_once_and_stops_the_stream(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    # ASGI 2.4 servers raise OSError from `send` once the client has gone; Starlette turns it
    # into ClientDisconnect before the body was iterated.
    app, gateway, backend, key = await start(catalog, engines, ledger)

    async def broken(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            raise OSError("client gone")

    await call(app, key, disconnect=asyncio.Event(), spec_version="2.4", send=broken)
    record = await settled(gateway, ledger)
    assert (record.status_code, record.cancelled) == (499, True)
    assert backend.started == 1 and backend.cancelled >= 1


async def test_a_disconnect_mid_stream_settles_once_with_what_was_produced(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    app, gateway, backend, key = await start(catalog, engines, ledger)
    gone = asyncio.Event()
    frames = 0

    async def count(message: dict[str, Any]) -> None:
        nonlocal frames
        frames += message.get("body", b"").count(b"data: ")
        if frames >= 5:
            gone.set()  # the client leaves after a few tokens

    await call(app, key, disconnect=gone, send=count)
    record = await settled(gateway, ledger)
    assert (record.status_code, record.cancelled) == (499, True)
    assert 1 <= record.completion_tokens < 200 and record.cost > 0  # billed for what it produced
    assert backend.started == 1 and backend.cancelled >= 1


async def test_a_client_leaving_during_admission_is_settled_once_and_never_streams(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    app, gateway, backend, key = await start(catalog, engines, ledger)
    gateway.release.clear()
    request = asyncio.ensure_future(call(app, key, disconnect=asyncio.Event()))
    await gateway.admitting.wait()
    request.cancel()  # the server cancels the request task: the client left
    with contextlib.suppress(asyncio.CancelledError):
        await request
    gateway.release.set()  # the gateway admits it after all
    record = await settled(gateway, ledger)
    assert (record.status_code, record.cancelled, record.completion_tokens) == (499, True, 0)
    assert backend.started == 0  # no generation was started, so there is none to stop


async def test_a_stream_that_completes_is_settled_once(
    catalog: Catalog, engines: dict[str, FakeEngine], ledger: Ledger
) -> None:
    engines["tiny-a"].words = ["w"] * 3
    app, gateway, backend, key = await start(catalog, engines, ledger)
    sent = await call(app, key, disconnect=asyncio.Event())
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    record = await settled(gateway, ledger)
    assert (record.status_code, record.cancelled, record.completion_tokens) == (200, False, 3)
    assert backend.cancelled == 0
