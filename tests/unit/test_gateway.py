from __future__ import annotations

from decimal import Decimal

import pytest

from orchestrator.catalog import Pricing
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway import KEY_PREFIX, RateLimiter, generate_key, hash_key, key_hint, request_cost, verify_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_have_prefix_are_unique_and_verify() -> None:
    key = generate_key()
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert generate_key() != key
    stored = hash_key(key, b"pepper")
    assert key not in stored
    assert verify_key(key, stored, b"pepper")
    assert not verify_key(key + "x", stored, b"pepper")
    assert not verify_key(key, stored, b"other-pepper")
    assert key_hint(key).endswith(key[-4:]) and key[len(KEY_PREFIX) : -4] not in key_hint(key)


def test_cost_is_exact_decimal_per_million() -> None:
    pricing = Pricing(input_per_million=Decimal("0.15"), output_per_million=Decimal("0.60"))
    assert request_cost(pricing, 1_000_000, 0) == Decimal("0.15")
    assert request_cost(pricing, 1234, 567) == Decimal("0.0005253")
    assert request_cost(pricing, 0, 0) == 0
    with pytest.raises(ValueError):
        request_cost(pricing, -1, 0)


def test_exactly_rpm_requests_pass_in_a_window() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    decisions = [limiter.admit("k", rpm=5, tpm=None, tokens=10) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    refused = decisions[-1].headers()
    assert refused["x-ratelimit-remaining-requests"] == "0" and refused["Retry-After"] == "60"
    clock.now += 59.5
    assert not limiter.admit("k", rpm=5, tpm=None, tokens=10).allowed
    clock.now += 0.5
    fresh = limiter.admit("k", rpm=5, tpm=None, tokens=10)
    assert fresh.allowed and fresh.remaining_requests == 4


def test_token_reservation_settles_to_usage() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    first = limiter.admit("k", rpm=None, tpm=1000, tokens=800)
    assert first.allowed and first.remaining_tokens == 200
    assert not limiter.admit("k", rpm=None, tpm=1000, tokens=300).allowed
    limiter.settle("k", first.window_start, reserved=800, used=100)
    second = limiter.admit("k", rpm=None, tpm=1000, tokens=300)
    assert second.allowed and second.remaining_tokens == 600
    headers = second.headers()
    assert headers["x-ratelimit-limit-tokens"] == "1000" and "Retry-After" not in headers


def test_a_request_above_the_tokens_per_minute_is_400_naming_the_limit_not_429() -> None:
    # A 429 would carry Retry-After, and SDKs retry it for ever: no window can ever admit it.
    clock = Clock()
    limiter = RateLimiter(clock)
    with pytest.raises(OrchestratorError) as refused:
        limiter.admit("k", rpm=10, tpm=1000, tokens=1001)
    error = refused.value
    assert (error.code, error.status) == (ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT, 400)
    assert "tokens-per-minute limit (tpm) of 1000" in error.message and "1001 tokens" in error.message
    assert "Retry-After" not in error.headers
    # Nothing was reserved, and a request of exactly the limit passes.
    assert limiter.admit("k", rpm=1, tpm=1000, tokens=1000).allowed


def test_a_key_admitting_no_request_refuses_with_400_naming_the_limit() -> None:
    with pytest.raises(OrchestratorError) as refused:
        RateLimiter(Clock()).admit("k", rpm=0, tpm=None, tokens=1)
    assert refused.value.code is ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT and "(rpm) is 0" in refused.value.message


def test_keys_are_limited_separately_and_stale_settle_ignored() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    old = limiter.admit("a", rpm=1, tpm=100, tokens=50)
    assert limiter.admit("b", rpm=1, tpm=100, tokens=50).allowed
    clock.now += 61
    limiter.admit("a", rpm=1, tpm=100, tokens=90)
    limiter.settle("a", old.window_start, reserved=50, used=0)  # previous window: no effect
    assert not limiter.admit("a", rpm=5, tpm=100, tokens=20).allowed
