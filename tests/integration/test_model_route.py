"""A model's own route (``/models/<name>/v1``) through real Ray Serve and a real vLLM tiny
model: its replicas answer without the router, and keys, limits, credits and metering stay
the gateway's, shared exactly with requests through the router."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, Deployment, engine_unfinished, open_stream

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def _route(deployment: Deployment) -> str:
    return deployment.base_url + "/models/tiny-a"


def test_the_route_answers_for_its_model_alone(deployment: Deployment) -> None:
    route = deployment.client(base_url=_route(deployment), timeout=120)
    # The model's application answered, not the router (which lists every model).
    assert [m.id for m in route.models.list()] == ["tiny-a", "tiny-a-lora", "tiny-a-lora-2"]  # and its adapters
    assert len(deployment.client().models.list().data) > 1
    assert route.chat.completions.create(model="a", messages=USER, max_tokens=2).choices  # by alias
    with pytest.raises(openai.NotFoundError) as info:
        route.chat.completions.create(model="tiny-b", messages=USER, max_tokens=2)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        deployment.client(api_key="sk-orch-not-a-key", base_url=_route(deployment)).models.list()
    # The admin API stays on the router's route.
    admin = httpx.get(_route(deployment) + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 404


def test_limits_and_credits_are_shared_exactly_with_the_router(deployment: Deployment) -> None:
    created = deployment.admin("POST", "/admin/keys", json={"credits": "1", "rpm": 6}).json()
    key, key_id = created["key"], created["info"]["id"]
    route = deployment.client(api_key=key, base_url=_route(deployment), timeout=120)
    raw = route.chat.completions.with_raw_response.create(model="tiny-a", messages=USER, max_tokens=4)
    assert raw.headers["x-ratelimit-limit-requests"] == "6"
    assert raw.headers["x-ratelimit-remaining-requests"] == "5"
    chunks = list(route.chat.completions.create(model="tiny-a", messages=USER, max_tokens=4, stream=True))
    usage = chunks[-1].usage
    assert usage is not None and Decimal(str(usage.model_extra["cost"])) > 0  # type: ignore[index]
    ids = [raw.parse().id, chunks[0].id]

    # Four requests are left this minute: of 10 at once, half on each route, exactly 4 pass.
    router = deployment.client(api_key=key, timeout=120)

    def one(i: int) -> int:
        client = route if i % 2 else router
        try:
            ids.append(client.completions.create(model="tiny-a", prompt="Hello", max_tokens=2).id)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(one, range(10)))
    assert sorted(statuses) == [200] * 4 + [429] * 6

    # Every generation has its record whichever route served it, and the balance is the
    # credits less exactly their costs.
    costs = [Decimal(str(deployment.record(gen_id)["cost"])) for gen_id in ids]
    time.sleep(1)  # the flusher runs every 100 ms
    info = deployment.admin("GET", f"/admin/keys/{key_id}").json()
    assert Decimal(info["credits"]) == Decimal(1) - sum(costs)
    report = deployment.admin("GET", "/admin/usage", params={"key": key_id, "group_by": "key"}).json()["data"]
    assert report[0]["requests"] == 6


def test_a_client_leaving_the_route_mid_stream_ends_it_in_the_engine(deployment: Deployment) -> None:
    slow = {"model": "tiny-a", "messages": USER, "max_tokens": 480, "stream": True, "ignore_eos": True}
    with open_stream(deployment, slow, base_url=_route(deployment)) as lines:
        first = next(line for line in lines if line.startswith("data: "))
        for _ in range(6):
            next(lines)
    gen_id = first.split('"id":"', 1)[1].split('"', 1)[0]
    record = deployment.record(gen_id)
    assert record["cancelled"] is True and record["status_code"] == 499
    assert 0 < record["completion_tokens"] < 480
    deadline = time.monotonic() + 30
    while engine_unfinished(deployment, "model-tiny-a") and time.monotonic() < deadline:
        time.sleep(1)
    assert engine_unfinished(deployment, "model-tiny-a") == 0


def test_a_burst_past_the_replicas_places_is_refused_at_once_with_retry_after(deployment: Deployment) -> None:
    # tiny-b's replica holds 16 running + 2 waiting and sheds the rest with 529; Serve itself
    # turns away what comes past its max_ongoing_requests (those places + 8) with 503.
    route = deployment.client(base_url=deployment.base_url + "/models/tiny-b", timeout=180)
    refused: list[tuple[int, str]] = []

    def one(_: int) -> int:
        try:
            chunks = list(
                route.chat.completions.create(
                    model="tiny-b", messages=USER, stream=True, max_tokens=200, extra_body={"ignore_eos": True}
                )
            )
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 200
            return 200
        except openai.APIStatusError as exc:
            refused.append((exc.status_code, exc.response.headers.get("retry-after", "")))
            return exc.status_code

    n = 60
    with ThreadPoolExecutor(max_workers=n) as pool:
        statuses = list(pool.map(one, range(n)))
    assert statuses.count(200) >= 18 and set(statuses) <= {200, 529, 503}, sorted(statuses)
    assert statuses.count(529) >= 1 and all(retry == "1" for _, retry in refused), refused
    assert engine_unfinished(deployment, "model-tiny-b") == 0
