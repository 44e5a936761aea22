"""The gateway through real Ray Serve (two router replicas), real vLLM tiny models, a real
PostgreSQL server (main app) and SQLite (second app), driven by the openai SDK."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import BIN, Deployment, _run, engine_unfinished, open_stream, replica_killer

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def status_and_code(exc: openai.APIStatusError) -> tuple[int, str]:
    return exc.status_code, exc.body["code"]  # type: ignore[index]


def refused(client: openai.OpenAI, model: str = "tiny-a") -> tuple[int, str]:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, messages=USER, max_tokens=2)
    return status_and_code(info.value)


def test_every_gateway_code_through_the_sdk(deployment: Deployment) -> None:
    assert refused(deployment.client(api_key="sk-orch-not-a-key")) == (401, "invalid_api_key")
    limited = deployment.client(api_key=deployment.new_key(models=["tiny-b", "smollm2*"]))
    assert refused(limited) == (403, "model_not_allowed")
    assert limited.chat.completions.create(model="b", messages=USER, max_tokens=2).choices
    assert refused(deployment.client(api_key=deployment.new_key(enabled=False))) == (403, "workspace_locked")
    locked = deployment.client(api_key=deployment.new_key(workspace="team-locked"))
    assert deployment.admin("PATCH", "/admin/workspaces/team-locked", json={"enabled": False}).status_code == 200
    assert refused(locked) == (403, "workspace_locked")
    assert refused(deployment.client(api_key=deployment.new_key(credits="0"))) == (402, "insufficient_credits")
    assert refused(deployment.client(api_key=deployment.new_key(daily_limit="0"))) == (402, "key_limit_exceeded")
    # About 131 tokens reserved: one fits in 200 per minute and uses over 100; a second waits (429).
    tight = deployment.client(api_key=deployment.new_key(tpm=200))
    tight.chat.completions.create(model="tiny-a", messages=USER, max_tokens=100, extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as info:
        tight.chat.completions.create(model="tiny-a", messages=USER, max_tokens=100)
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) >= 1
    # More than the whole limit could never pass: 400, not a 429 that SDKs retry for ever.
    with pytest.raises(openai.BadRequestError) as never:
        deployment.client(api_key=deployment.new_key(tpm=50)).chat.completions.create(
            model="tiny-a", messages=USER, max_tokens=100
        )
    assert never.value.body["code"] == "request_too_large_for_limit"  # type: ignore[index]
    # The key never comes back in an error.
    assert (
        "sk-orch-not-a-key"
        not in httpx.post(
            deployment.base_url + "/v1/chat/completions",
            json={"model": "tiny-a", "messages": USER},
            headers={"Authorization": "Bearer sk-orch-not-a-key"},
        ).text
    )


def test_rate_limit_headers_and_cost_in_usage(deployment: Deployment) -> None:
    client = deployment.client(api_key=deployment.new_key(rpm=100, tpm=100_000))
    raw = client.chat.completions.with_raw_response.create(model="tiny-a", messages=USER, max_tokens=4)
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "100" and headers["x-ratelimit-remaining-requests"] == "99"
    assert headers["x-ratelimit-limit-tokens"] == "100000" and headers["x-ratelimit-reset-tokens"].endswith("s")
    usage = raw.parse().usage
    assert usage is not None
    expected = Decimal(usage.prompt_tokens * 1 + usage.completion_tokens * 2) / 1_000_000  # catalog: $1/M in, $2/M out
    assert Decimal(str(usage.model_extra["cost"])) == expected  # type: ignore[index]
    chunks = list(client.chat.completions.create(model="tiny-a", messages=USER, max_tokens=4, stream=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.model_extra["cost"] > 0  # type: ignore[index]


def _router_replicas(deployment: Deployment) -> int:
    status = yaml.safe_load(_run(deployment.env, str(BIN / "serve"), "status", timeout=60).stdout)
    router = status["applications"]["orchestrator"]["deployments"]["router"]
    return int(router["replica_states"].get("RUNNING", 0))


def _served_by_router_replica(deployment: Deployment) -> dict[str, float]:
    """Completions requests on tiny-b counted by each router replica (its own metric series)."""
    from orchestrator.status.exposition import parse_samples

    counts: dict[str, float] = {}
    for sample in parse_samples(httpx.get(deployment.metrics_url, timeout=30).text):
        labels = sample.labels
        if (
            sample.name == "ray_orchestrator_requests_total"
            and labels.get("application") == "orchestrator"
            and labels.get("deployment") == "router"
            and labels.get("model") == "tiny-b"
            and labels.get("route") == "/v1/completions"
        ):
            counts[labels["replica"]] = counts.get(labels["replica"], 0.0) + sample.value
    return counts


def test_limits_are_exact_across_two_router_replicas(deployment: Deployment) -> None:
    assert _router_replicas(deployment) == 2
    before = _served_by_router_replica(deployment)
    n, extra = 6, 6
    client = deployment.client(api_key=deployment.new_key(rpm=n), timeout=120)

    def one(_: int) -> int:
        try:
            client.completions.create(model="tiny-b", prompt="Hello", max_tokens=1)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(max_workers=n + extra) as pool:
        statuses = list(pool.map(one, range(n + extra)))
    assert sorted(statuses) == [200] * n + [429] * extra
    # Both router replicas really served (and counted) some of them: the limit held across
    # two routers, not within one. Replicas report their metrics every second here.
    deadline = time.monotonic() + 30
    while True:
        after = _served_by_router_replica(deployment)
        served = {replica: after[replica] - before.get(replica, 0.0) for replica in after}
        if sum(served.values()) >= n + extra or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sum(served.values()) == n + extra and len([r for r, c in served.items() if c > 0]) == 2, served


def _lookup(deployment: Deployment, gen_id: str, key: str, base_url: str | None = None) -> httpx.Response:
    return httpx.get(
        (base_url or deployment.base_url) + "/v1/generation",
        params={"id": gen_id},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_generation_lookup_straight_after_the_response(deployment: Deployment) -> None:
    key, other = deployment.new_key(), deployment.new_key()
    client = deployment.client(api_key=key)
    resp = client.chat.completions.create(model="tiny-a", messages=USER, max_tokens=5)
    found = _lookup(deployment, resp.id, key)
    assert found.status_code == 200, found.text
    data = found.json()["data"]
    assert resp.usage is not None and data["completion_tokens"] == resp.usage.completion_tokens
    assert data["model"] == "tiny-a" and data["streamed"] is False and data["latency_ms"] > 0
    eos = {"ignore_eos": True}  # random weights may sample EOS before 5 tokens
    chunks = list(client.completions.create(model="tiny-b", prompt="Hi", max_tokens=5, stream=True, extra_body=eos))
    streamed = _lookup(deployment, chunks[0].id, key).json()["data"]
    assert streamed["streamed"] is True and streamed["ttft_ms"] > 0 and streamed["finish_reason"] == "length"
    assert streamed["completion_tokens"] == 5 and streamed["tokens_per_s"] > 0
    refused = _lookup(deployment, resp.id, other)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    assert deployment.admin("GET", "/v1/generation", params={"id": resp.id}).status_code == 200


def test_credits_debited_once_when_the_client_disconnects(deployment: Deployment) -> None:
    created = deployment.admin("POST", "/admin/keys", json={"credits": "1"}).json()
    key, key_id = created["key"], created["info"]["id"]
    slow = {"model": "tiny-b", "messages": USER, "max_tokens": 480, "stream": True, "ignore_eos": True}
    with open_stream(deployment, slow, key) as lines:
        first = next(lines)
        for _ in range(6):
            next(lines)
    gen_id = first.split('"id":"', 1)[1].split('"', 1)[0]
    record = deployment.record(gen_id)
    assert record["cancelled"] is True and record["status_code"] == 499
    assert record["prompt_tokens"] > 0 and 0 < record["completion_tokens"] < 480
    deadline = time.monotonic() + 30
    while engine_unfinished(deployment, "model-tiny-b") and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(1)  # the flusher runs every 100 ms
    info = deployment.admin("GET", f"/admin/keys/{key_id}").json()
    assert Decimal(info["credits"]) == Decimal(1) - Decimal(str(record["cost"]))
    usage = deployment.admin("GET", "/admin/usage", params={"key": key_id, "group_by": "key"}).json()["data"]
    assert usage[0]["requests"] == 1


def test_cli_key_works_against_the_running_server(deployment: Deployment) -> None:
    made = deployment.cli("keys", "create", "--name", "from-cli", "--models", "tiny-*", "--rpm", "30")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-orch-")
    client = deployment.client(api_key=key)
    assert client.chat.completions.create(model="a", messages=USER, max_tokens=2).choices
    assert refused(client, "smollm2") == (403, "model_not_allowed")
    listed = deployment.cli("keys", "list")
    assert "from-cli" in listed.stdout and key not in listed.stdout
    report = deployment.cli("usage", "--group-by", "model", "--json")
    assert '"model": "tiny-a"' in report.stdout


def test_sqlite_app_meters_and_limits(deployment: Deployment) -> None:
    made = deployment.cli("keys", "create", "--rpm", "2", "--credits", "5", database_url=deployment.sqlite_url)
    key = made.stdout.strip().splitlines()[-1]
    client = deployment.client(api_key=key, base_url=deployment.sqlite_base_url)
    resp = client.chat.completions.create(model="c", messages=USER, max_tokens=3)
    found = _lookup(deployment, resp.id, key, base_url=deployment.sqlite_base_url)
    assert found.status_code == 200 and found.json()["data"]["model"] == "tiny-c"
    client.chat.completions.create(model="c", messages=USER, max_tokens=3)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="c", messages=USER, max_tokens=3)
    # The main app's keys are not valid here: each app has its own database.
    assert refused(deployment.client(base_url=deployment.sqlite_base_url), "c") == (401, "invalid_api_key")
    time.sleep(1)
    shown = deployment.cli("usage", "--group-by", "key", "--json", database_url=deployment.sqlite_url)
    assert '"requests": 2' in shown.stdout


def test_model_replica_dying_mid_stream_is_billed_once(deployment: Deployment) -> None:
    base = deployment.sqlite_base_url
    created = deployment.admin("POST", "/admin/keys", base_url=base, json={"credits": "1"}).json()
    key, key_id = created["key"], created["info"]["id"]
    killer = replica_killer(deployment, "sqlite#model-tiny-c")
    assert killer.stdout is not None and killer.stdin is not None
    body = {"model": "c", "messages": USER, "max_tokens": 480, "stream": True, "ignore_eos": True}
    with open_stream(deployment, body, key, base_url=base) as lines:
        first = next(lines)
        for _ in range(4):
            next(lines)
        killer.stdin.write("kill\n")
        killer.stdin.flush()
        assert killer.stdout.readline().strip() == "killed"
        rest = [line for line in lines if line]
    killer.wait(timeout=60)
    assert rest[-1] == "data: [DONE]" and '"code":"provider_unavailable"' in rest[-2]
    gen_id = first.split('"id":"', 1)[1].split('"', 1)[0]
    record = _lookup(deployment, gen_id, key, base_url=base).json()["data"]
    assert record["status_code"] == 502 and record["error_code"] == "provider_unavailable"
    assert record["cancelled"] is False and 0 < record["completion_tokens"] < 480 and record["prompt_tokens"] > 0
    time.sleep(1)  # flushed every 100 ms
    info = deployment.admin("GET", f"/admin/keys/{key_id}", base_url=base).json()
    assert Decimal(info["credits"]) == Decimal(1) - Decimal(str(record["cost"]))
    # Serve replaces the replica; the app recovers. Until Serve has noticed the death and
    # started a new replica, requests for the model fail with a 5xx (502/503/504).
    client = deployment.client(api_key=key, base_url=base, timeout=120)
    deadline = time.monotonic() + 300
    while True:
        try:
            reply = client.chat.completions.create(model="c", messages=USER, max_tokens=2)
            break
        except openai.APIStatusError as err:
            assert err.status_code >= 500, err
            assert time.monotonic() < deadline, f"model c did not recover: {err}"
            time.sleep(3)
    assert reply.choices


def test_fifty_concurrent_requests_cannot_overrun_a_balance(deployment: Deployment) -> None:
    """Credits cover about 5 requests at their worst case: some of 50 concurrent requests get
    402, and the balance ends at or above 0, equal to the credits less the recorded costs."""
    from orchestrator.api.accounting import TEMPLATE_TOKENS_PER_MESSAGE, TEMPLATE_TOKENS_PER_REQUEST
    from orchestrator.catalog import Pricing
    from orchestrator.gateway.pricing import request_cost

    info = httpx.get(
        deployment.base_url + "/v1/model/info",
        params={"model": "tiny-a"},
        headers={"Authorization": f"Bearer {deployment.api_key}"},
        timeout=30,
    ).json()
    body = {"model": "tiny-a", "messages": USER, "max_tokens": 64, "stream": True, "ignore_eos": True}
    content = json.dumps(body).encode()
    worst_prompt = len(content) + TEMPLATE_TOKENS_PER_REQUEST + TEMPLATE_TOKENS_PER_MESSAGE
    hold = request_cost(Pricing.model_validate(info["pricing"]), worst_prompt, 64)
    credits = hold * Decimal("5.5")
    created = deployment.admin("POST", "/admin/keys", json={"credits": str(credits)}).json()
    key, key_id = created["key"], created["info"]["id"]
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}

    def one(_: int) -> int:
        with (
            httpx.Client(timeout=300) as http,
            http.stream("POST", deployment.base_url + "/v1/chat/completions", content=content, headers=headers) as resp,
        ):
            resp.read()
            return resp.status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(one, range(50)))
    assert set(statuses) == {200, 402} and statuses.count(200) >= 5, sorted(statuses)
    time.sleep(1)  # flushed every 100 ms
    balance = Decimal(deployment.admin("GET", f"/admin/keys/{key_id}").json()["credits"])
    usage = deployment.admin("GET", "/admin/usage", params={"key": key_id, "group_by": "key"}).json()["data"]
    assert usage[0]["requests"] == statuses.count(200)
    assert balance >= 0 and balance == credits - Decimal(str(usage[0]["cost"])), (balance, usage)


def test_a_cut_short_stream_with_several_choices_is_billed_for_all(deployment: Deployment) -> None:
    created = deployment.admin("POST", "/admin/keys", json={"credits": "1"}).json()
    body = {"model": "tiny-b", "messages": USER, "max_tokens": 300, "n": 4, "stream": True, "ignore_eos": True}
    seen: dict[int, int] = {}
    with open_stream(deployment, body, created["key"]) as lines:
        for line in lines:
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            gen_id = chunk["id"]
            for choice in chunk["choices"]:
                if (choice.get("delta") or {}).get("content"):
                    seen[choice["index"]] = seen.get(choice["index"], 0) + 1
            if len(seen) == 4 and sum(seen.values()) >= 40:
                break
    record = deployment.record(gen_id)
    assert record["cancelled"] is True and record["completion_tokens"] < 4 * 300
    # Every choice's tokens are billed, not only the last one's (about a quarter of them).
    assert record["completion_tokens"] >= sum(seen.values()), (record["completion_tokens"], seen)


def test_workspaces_never_share_cached_prefixes(deployment: Deployment) -> None:
    # ~300 prompt tokens of the tiny model: more than one KV block, inside its 512 window.
    prefix = "The quick brown fox jumps over the lazy dog. " * 30
    messages = [{"role": "system", "content": prefix}, {"role": "user", "content": "Tell me a story."}]
    tag = secrets.token_hex(4)  # fresh workspaces: nothing of theirs is cached yet

    def cached(api_key: str, base_url: str | None = None) -> int:
        client = deployment.client(api_key=api_key, base_url=base_url)
        usage = client.chat.completions.create(model="tiny-a", messages=messages, max_tokens=1).usage  # type: ignore[arg-type]
        assert usage is not None and usage.prompt_tokens > 200
        return usage.prompt_tokens_details.cached_tokens or 0  # type: ignore[union-attr]

    first, second = deployment.new_key(workspace=f"cache-a-{tag}"), deployment.new_key(workspace=f"cache-a-{tag}")
    other = deployment.new_key(workspace=f"cache-b-{tag}")
    assert cached(first) == 0
    # Another key of the same workspace reuses the prefix; another workspace does not,
    # on the router's route or the model's own, nor in the Messages dialect.
    assert cached(second) > 0
    assert cached(other, deployment.base_url + "/models/tiny-a") == 0
    messages_api = anthropic.Anthropic(api_key=first, base_url=deployment.base_url, max_retries=0)
    reply = messages_api.messages.create(
        model="tiny-a", system=prefix, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=1
    )
    assert (reply.usage.cache_read_input_tokens or 0) > 0
    fresh = deployment.new_key(workspace=f"cache-c-{tag}")
    reply = messages_api.with_options(api_key=fresh).messages.create(
        model="tiny-a", system=prefix, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=1
    )
    assert (reply.usage.cache_read_input_tokens or 0) == 0


def test_a_flood_of_random_keys_leaves_a_streaming_key_served(deployment: Deployment) -> None:
    """Thousands of requests with random keys from 16 clients while a valid key streams on the
    SQLite app (one router replica): every valid stream completes; the flood gets 401 until
    its address is throttled, then 429 ``authentication_throttled`` (or 503 while more lookups
    than the lane holds are under way), never anything else."""
    base_url = deployment.sqlite_base_url
    key = deployment.new_key(base_url=base_url)
    body = {"model": "c", "messages": USER, "max_tokens": 16, "stream": True}
    stop = threading.Event()
    flood: Counter[tuple[int, str]] = Counter()
    lock = threading.Lock()

    def flooder() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                headers = {"Authorization": f"Bearer sk-orch-{uuid.uuid4().hex}"}
                resp = http.post(base_url + "/v1/chat/completions", json=body, headers=headers)
                with lock:
                    flood[(resp.status_code, resp.json()["error"]["code"])] += 1

    def stream() -> bool:
        with open_stream(deployment, body, key=key, base_url=base_url) as lines:
            return [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"

    assert stream()  # before the flood: its router has seen the key succeed
    with ThreadPoolExecutor(max_workers=16) as pool:
        flooders = [pool.submit(flooder) for _ in range(16)]
        try:
            completed = [stream() for _ in range(10)]
            while sum(flood.values()) < 2000 and not any(f.done() for f in flooders):
                completed.append(stream())
        finally:
            stop.set()
        for f in flooders:
            f.result()
    assert all(completed) and len(completed) >= 10, completed
    assert sum(flood.values()) >= 2000
    assert set(flood) <= {(401, "invalid_api_key"), (429, "authentication_throttled"), (503, "service_unavailable")}, (
        flood
    )
    assert flood[(429, "authentication_throttled")] > 0
    time.sleep(10)  # the throttle's window ends: later tests from this address are not refused
