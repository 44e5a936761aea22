"""Abuse: failed authentications stay cheap and bounded. Unknown keys are remembered for a
short time (no database), lookups of keys not cached are bounded in number and in time and
run beside the ledger's database thread (a valid key's admissions never wait on them), and a
client address that keeps failing gets 429 before its requests reach the gateway."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.api.auth import client_address
from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway import admin
from orchestrator.gateway.expiring_set import ExpiringSet
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits, KeyRecord
from orchestrator.gateway.store import SQLStore
from orchestrator.gateway.throttle import FailureThrottle
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.usage import record

NAMES = ["tiny-a", "a", "org/tiny-a"]
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class WatchedStore(SQLStore):
    """Counts key lookups by hash; lookups of hashes other than ``free`` block while ``gate``
    is clear (``entered`` counts the lookups that reached the database)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.lookups: list[str] = []
        self.free: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        self.lookups.append(key_hash)
        if key_hash not in self.free:
            self.entered.release()
            self.gate.wait()
        return super().key_by_hash(key_hash)


def random_key() -> str:
    return "sk-orch-" + uuid.uuid4().hex


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path) -> WatchedStore:
    return WatchedStore(f"sqlite:///{tmp_path / 'g.db'}")


def new_ledger(store: SQLStore, tmp_path: Path, clock: Clock, **kwargs: Any) -> Ledger:
    return Ledger(
        store, UsageJournal(tmp_path / "journal"), clock=clock, monotonic=clock, flush_interval_s=3600, fence=None,
        **kwargs,
    )  # fmt: skip


@pytest.fixture
async def ledger(store: WatchedStore, tmp_path: Path, clock: Clock) -> AsyncIterator[Ledger]:
    ledger = new_ledger(store, tmp_path, clock, unknown_key_ttl_s=5.0, key_lookups=2, key_lookup_timeout_s=30.0)
    await ledger.start()
    yield ledger
    store.gate.set()
    await ledger.stop()


async def refused(call: Any) -> OrchestratorError:
    with pytest.raises(OrchestratorError) as info:
        await call
    return info.value


async def entered(store: WatchedStore, count: int) -> None:
    """Waits until ``count`` blocked lookups reached the store."""
    for _ in range(count):
        assert await asyncio.to_thread(store.entered.acquire, True, 30)


# -- the negative cache ---------------------------------------------------------------


async def test_an_unknown_key_is_refused_again_without_the_database(
    ledger: Ledger, store: WatchedStore, clock: Clock
) -> None:
    key = random_key()
    for _ in range(3):
        assert (await refused(ledger.authenticate(key))).code is ErrorCode.INVALID_API_KEY
    assert len(store.lookups) == 1  # the first failure only
    clock.now += 5.0  # its time is up: asked again
    assert (await refused(ledger.authenticate(key))).code is ErrorCode.INVALID_API_KEY
    assert len(store.lookups) == 2


async def test_a_key_found_unknown_works_at_once_once_made_through_the_ledger(
    ledger: Ledger, store: WatchedStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token a client tried before it existed (here: one the generator is made to pick)
    authenticates as soon as the admin API creates it; one the CLI creates straight in the
    database, once the unknown key's time is up."""
    tried, by_cli = random_key(), random_key()
    for token in (tried, by_cli):
        assert (await refused(ledger.authenticate(token))).code is ErrorCode.INVALID_API_KEY
    monkeypatch.setattr(admin, "generate_key", lambda: tried)
    await ledger.create_key(KeyLimits())
    assert (await ledger.authenticate(tried)).enabled
    monkeypatch.setattr(admin, "generate_key", lambda: by_cli)
    await asyncio.to_thread(
        admin.create_key, store, KeyLimits(), workspace="default", pepper=b"", now=datetime.now(UTC)
    )
    assert (await refused(ledger.authenticate(by_cli))).code is ErrorCode.INVALID_API_KEY
    clock.now += 5.0
    assert (await ledger.authenticate(by_cli)).enabled


def test_the_expiring_set_forgets_its_oldest_past_its_bound() -> None:
    clock = Clock()
    members = ExpiringSet(ttl_s=10, max_size=3, monotonic=clock)
    for n in range(5):
        members.add(n)
    assert len(members) == 3 and [n in members for n in range(5)] == [False, False, True, True, True]
    clock.now += 10
    assert 4 not in members


# -- lookups bounded in number and in time ----------------------------------------------


async def test_lookups_past_the_bound_are_refused_at_once(ledger: Ledger, store: WatchedStore) -> None:
    store.gate.clear()
    waiting = [asyncio.create_task(ledger.authenticate(random_key())) for _ in range(2)]
    await entered(store, 2)  # both lookups hold the database
    excess = await refused(asyncio.wait_for(ledger.authenticate(random_key()), 30))  # (a hang fails it)
    assert excess.code is ErrorCode.SERVICE_UNAVAILABLE and excess.headers["Retry-After"] == "1"
    assert len(store.lookups) == 2  # the excess never reached the database
    store.gate.set()
    for task in waiting:
        assert (await refused(task)).code is ErrorCode.INVALID_API_KEY


async def test_a_slow_lookup_gets_503_and_holds_its_place_until_the_database_answers(
    store: WatchedStore, tmp_path: Path, clock: Clock
) -> None:
    ledger = new_ledger(store, tmp_path, clock, key_lookups=1, key_lookup_timeout_s=0.05)
    await ledger.start()
    try:
        store.gate.clear()
        slow = await refused(ledger.authenticate(random_key()))
        assert slow.code is ErrorCode.SERVICE_UNAVAILABLE and "too long" in slow.message
        # Its database call still runs: the lane stays full until it returns.
        assert "too many" in (await refused(ledger.authenticate(random_key()))).message
        assert len(store.lookups) == 1
        store.gate.set()
        for _ in range(100):
            try:
                await ledger.authenticate(random_key())
            except OrchestratorError as exc:
                if exc.code is ErrorCode.INVALID_API_KEY:
                    break
                await asyncio.sleep(0.01)
        else:
            pytest.fail("the lane never freed its place")
    finally:
        store.gate.set()
        await ledger.stop()


async def test_a_new_keys_first_burst_takes_one_lookup(ledger: Ledger, store: WatchedStore) -> None:
    """Fifty concurrent first requests of a key not cached yet, with room for two lookups:
    they share one, and every one of them is authenticated."""
    created = await ledger.create_key(KeyLimits())
    store.gate.clear()
    burst = [asyncio.create_task(ledger.authenticate(created.key)) for _ in range(50)]
    await entered(store, 1)
    store.gate.set()
    assert [info.id for info in await asyncio.gather(*burst)] == [created.info.id] * 50


# -- a valid key never waits on the flood ----------------------------------------------


async def test_a_valid_keys_admissions_never_queue_behind_lookups_of_unknown_keys(
    ledger: Ledger, store: WatchedStore, clock: Clock
) -> None:
    """Thousands of random keys while every lookup they start is stuck in the database: the
    valid key keeps being admitted and settled, its row is read again whenever its cache
    ages out (on the ledger's database thread), its spend is loaded, and flushes commit."""
    created = await ledger.create_key(KeyLimits(credits=Decimal(100), daily_limit=Decimal(100)))
    store.free.add(ledger.keyring.hash(created.key))
    await ledger.authenticate(created.key)
    store.gate.clear()
    flood = [asyncio.create_task(ledger.authenticate(random_key())) for _ in range(3000)]
    await entered(store, 1)  # lookups of random keys are stuck in the database

    async def valid_traffic() -> int:
        admitted = 0
        for n in range(20):
            clock.now += 3.0  # past key_cache_s: the key's row is read again
            clock.now += 86_400 if n % 5 == 0 else 0  # a new day: its spend is loaded again
            admission = await ledger.admit(created.key, NAMES, 10, f"valid-{n}", cost=Decimal("0.01"))
            await ledger.settle(admission, record(ledger, admission, cost="0.01"))
            await ledger.flush()
            admitted += 1
        return admitted

    assert await asyncio.wait_for(valid_traffic(), 30) == 20  # (a hang, not a speed, fails this)
    store.gate.set()
    outcomes = await asyncio.gather(*flood, return_exceptions=True)
    codes = {o.code for o in outcomes if isinstance(o, OrchestratorError)}
    assert len(outcomes) == 3000 and codes <= {ErrorCode.INVALID_API_KEY, ErrorCode.SERVICE_UNAVAILABLE}
    assert all(isinstance(o, OrchestratorError) for o in outcomes)
    report = await ledger.usage_report(key_id=created.info.id, group_by=["key"])
    assert report[0]["requests"] == 20


# -- the throttle by client address ------------------------------------------------------


def test_the_throttle_refuses_an_address_past_its_failures_until_the_window_ends() -> None:
    clock = Clock()
    throttle = FailureThrottle(max_failures=3, window_s=10, monotonic=clock)
    for _ in range(3):
        assert throttle.refusal("198.51.100.1") is None
        throttle.failed("198.51.100.1")
    clock.now += 4
    refusal = throttle.refusal("198.51.100.1")
    assert refusal is not None and refusal.code is ErrorCode.AUTHENTICATION_THROTTLED and refusal.status == 429
    assert refusal.headers["Retry-After"] == "6"
    assert throttle.refusal("198.51.100.2") is None  # others are not affected
    clock.now += 6
    assert throttle.refusal("198.51.100.1") is None
    assert FailureThrottle(max_failures=0, window_s=10, monotonic=clock).refusal("x") is None


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("198.51.100.7", "203.0.113.9", [], "198.51.100.7"),  # no trusted proxy: the header is ignored
        ("198.51.100.7", "203.0.113.9", ["10.0.0.0/8"], "198.51.100.7"),  # an untrusted peer's header too
        ("10.0.0.2", "203.0.113.9", ["10.0.0.0/8"], "203.0.113.9"),
        ("10.0.0.2", "1.2.3.4, 203.0.113.9, 10.0.0.5", ["10.0.0.0/8"], "203.0.113.9"),  # forged hops left of it
        ("10.0.0.2", "10.0.0.9", ["10.0.0.0/8"], "10.0.0.9"),  # every hop trusted: the first
        ("10.0.0.2", "", ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", "not-an-ip, 203.0.113.9", ["10.0.0.0/8"], "203.0.113.9"),
    ],
)
def test_the_client_address_believes_forwarded_for_only_from_trusted_proxies(
    peer: str, forwarded: str, trusted: list[str], expected: str
) -> None:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    networks = [ipaddress.ip_network(n) for n in trusted]
    assert client_address({"client": (peer, 5000), "headers": headers}, networks) == expected


def throttled_app(
    catalog: Catalog, ledger: Ledger, clock: Clock, **settings: Any
) -> Callable[[str], httpx.AsyncClient]:
    app = create_app(
        catalog,
        LocalBackend({"tiny-a": FakeEngine(), "tiny-b": FakeEngine()}),
        Settings(auth_failures_per_address=3, auth_failure_window_seconds=10, **settings),
        gateway=ledger,
        monotonic=clock,
    )

    def client(peer: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(peer, 4000))
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    return client


async def test_an_address_that_keeps_failing_gets_429_before_the_gateway(
    catalog: Catalog, ledger: Ledger, store: WatchedStore, clock: Clock
) -> None:
    client = throttled_app(catalog, ledger, clock)
    valid = (await ledger.create_key(KeyLimits())).key
    async with client("198.51.100.1") as abuser, client("198.51.100.2") as other:
        assert (await abuser.post("/v1/chat/completions", json=CHAT, headers=bearer(valid))).status_code == 200
        for _ in range(3):
            resp = await abuser.post("/v1/chat/completions", json=CHAT, headers=bearer(random_key()))
            assert resp.status_code == 401
        asked = len(store.lookups)
        resp = await abuser.post("/v1/chat/completions", json=CHAT, headers=bearer(random_key()))
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "authentication_throttled"
        assert resp.headers["Retry-After"] == "10" and resp.headers["x-request-id"]
        assert (await abuser.get("/v1/models", headers=bearer(random_key()))).status_code == 429
        anthropic = await abuser.post("/v1/messages", json={}, headers={"x-api-key": random_key()})
        assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
        assert len(store.lookups) == asked  # none of them reached the database
        # Health checks (a load balancer's, from the same address) and requests without
        # credentials (nothing to look up) are not refused.
        assert (await abuser.get("/health")).status_code == 200
        assert (await abuser.post("/v1/chat/completions", json=CHAT)).status_code == 401
        # The key that succeeded from that address still passes; other addresses are not throttled.
        assert (await abuser.post("/v1/chat/completions", json=CHAT, headers=bearer(valid))).status_code == 200
        assert (await other.post("/v1/chat/completions", json=CHAT, headers=bearer(random_key()))).status_code == 401
        clock.now += 10
        assert (await abuser.post("/v1/chat/completions", json=CHAT, headers=bearer(random_key()))).status_code == 401


async def test_a_trusted_proxys_forwarded_for_names_the_throttled_client(
    catalog: Catalog, ledger: Ledger, clock: Clock
) -> None:
    client = throttled_app(catalog, ledger, clock, trusted_proxies=["127.0.0.0/8"])
    async with client("127.0.0.1") as proxy, client("198.51.100.9") as direct:

        async def status(via: httpx.AsyncClient, forwarded: str) -> int:
            headers = {**bearer(random_key()), "x-forwarded-for": forwarded}
            return (await via.post("/v1/chat/completions", json=CHAT, headers=headers)).status_code

        assert [await status(proxy, "203.0.113.5") for _ in range(4)] == [401, 401, 401, 429]
        assert await status(proxy, "203.0.113.6") == 401  # another client behind the same proxy
        # A client that is not a trusted proxy cannot escape its own throttle with the header.
        assert [await status(direct, f"203.0.113.{n}") for n in range(10, 14)] == [401, 401, 401, 429]


async def test_the_throttle_vouches_for_the_token_the_gateway_checked(
    catalog: Catalog, ledger: Ledger, clock: Clock
) -> None:
    """With two Authorization headers the gateway checks the first; the throttle reads the same one."""
    client = throttled_app(catalog, ledger, clock)
    valid = (await ledger.create_key(KeyLimits())).key
    async with client("198.51.100.1") as caller:
        twice = httpx.Headers([("authorization", f"Bearer {valid}"), ("authorization", f"Bearer {random_key()}")])
        assert (await caller.post("/v1/chat/completions", json=CHAT, headers=twice)).status_code == 200
        for _ in range(3):
            assert (
                await caller.post("/v1/chat/completions", json=CHAT, headers=bearer(random_key()))
            ).status_code == 401
        # The address is throttled now; the key that succeeded is vouched for.
        assert (await caller.post("/v1/chat/completions", json=CHAT, headers=bearer(valid))).status_code == 200


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
