"""Operating the orchestrator on real Ray Serve and real vLLM engines: scale to zero that
stays at zero, cold starts with keep-alives, a model that cannot start, queue-depth
autoscaling, shedding past the queue bound, deadlines on an engine that stops answering,
and `orchestrator status`. The models are described in conftest.OPS_MODELS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from orchestrator.status.exposition import parse_samples
from tests.integration.conftest import BIN, Deployment, _run, repeating

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Tell me a story about a cat."}]
LONG = {"max_tokens": 200, "extra_body": {"ignore_eos": True}}


def ops(deployment: Deployment, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=deployment.ops_base_url + "/v1", api_key="open", max_retries=0, timeout=timeout)


def stream_lines(url: str, body: dict, headers: dict | None = None, timeout: float = 240) -> list[str]:
    with httpx.stream("POST", url, json=body, headers=headers or {}, timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        return [line for line in resp.iter_lines() if line]


def wait_for(check, timeout_s: float, every_s: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def gauge(deployment: Deployment, name: str, **labels: str) -> float | None:
    """Reads one of our gauges from Ray's metrics export (summed over matching series)."""
    text = httpx.get(deployment.metrics_url, timeout=10).text
    values = [
        s.value for s in parse_samples(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


def test_scale_to_zero_model_stays_at_zero_under_probes(deployment: Deployment) -> None:
    base = deployment.ops_base_url
    assert deployment.running_replicas("model-tiny-zero", app="ops") == 0
    for _ in range(4):
        assert "tiny-zero" in [m.id for m in ops(deployment).models.list().data]
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        ready = httpx.get(base + "/health/ready", params={"model": "tiny-zero"}, timeout=10)
        assert ready.status_code == 200 and ready.json()["models"]["tiny-zero"]["state"] == "scaled_to_zero"
        assert httpx.get(base + "/health/live", timeout=10).status_code == 200
        assert httpx.get(base + "/v1/model/info", params={"model": "zero"}, timeout=10).status_code == 200
        assert httpx.get(deployment.metrics_url, timeout=10).status_code == 200
        time.sleep(3)
    assert deployment.running_replicas("model-tiny-zero", app="ops") == 0
    assert gauge(deployment, "ray_orchestrator_model_target_replicas", model="tiny-zero", application="ops") == 0


def test_cold_start_streams_keepalives_then_answers_and_returns_to_zero(deployment: Deployment) -> None:
    started = time.monotonic()
    body = {"model": "tiny-zero", "messages": USER, "max_tokens": 8, "stream": True}
    lines = stream_lines(deployment.ops_base_url + "/v1/chat/completions", body)
    cold_start_s = time.monotonic() - started
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: {"))
    assert lines[:first_data] and all(line == ": keep-alive" for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]
    assert deployment.running_replicas("model-tiny-zero", app="ops") == 1
    served_at = time.monotonic()
    back = wait_for(lambda: deployment.running_replicas("model-tiny-zero", app="ops") == 0, timeout_s=180, every_s=2)
    print(
        f"\ncold start {cold_start_s:.1f} s ({first_data} keep-alives); "
        f"back at zero {time.monotonic() - served_at:.1f} s after the answer (scale_to_zero_delay_s 15)"
    )
    assert back


def test_a_model_that_cannot_start_gets_503_and_only_it_is_unready(deployment: Deployment) -> None:
    base = deployment.ops_base_url
    with pytest.raises(openai.APIStatusError) as info:
        ops(deployment).chat.completions.create(model="tiny-nowhere", messages=USER, max_tokens=4)
    assert info.value.status_code == 503 and info.value.body["code"] == "model_unavailable"  # type: ignore[index]
    assert int(info.value.response.headers["retry-after"]) > 0
    # A stream's status is sent after 2 s (the keep-alive interval), before the 6 s bound:
    # keep-alives, then the same code as an error event, then [DONE].
    lines = stream_lines(base + "/v1/chat/completions", {"model": "tiny-nowhere", "messages": USER, "stream": True})
    assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "model_unavailable"

    def unready() -> dict | None:
        resp = httpx.get(base + "/health/ready", params={"model": "tiny-nowhere"}, timeout=10)
        return resp.json()["models"]["tiny-nowhere"] if resp.status_code == 503 else None

    detail = wait_for(unready, timeout_s=30)
    assert detail and detail["state"] == "starting" and detail["reason"], detail
    everything = httpx.get(base + "/health/ready", timeout=10)
    assert everything.status_code == 200 and everything.json()["status"] == "degraded"
    assert everything.json()["models"]["tiny-scale"]["ready"] is True


@contextmanager
def steady_load(client: openai.OpenAI, model: str, workers: int) -> Iterator[list[int]]:
    """Keeps ``workers`` long non-streaming completions running until the block ends (light
    on the client and the router, so the CPU goes to the engines); yields the statuses."""
    statuses: list[int] = []

    def once() -> None:
        try:
            client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=400, **{"extra_body": {"ignore_eos": True}}
            )
            statuses.append(200)
        except openai.APIStatusError as exc:
            statuses.append(exc.status_code)
        except openai.APIError:
            statuses.append(0)

    with repeating(once, threads=workers, join_timeout_s=300):
        yield statuses


def test_queue_depth_autoscaling_scales_up_under_load_and_back_down(deployment: Deployment) -> None:
    labels = {"model": "tiny-scale", "application": "ops"}
    timeline: list[tuple[float, str, int, float | None]] = []
    start = time.monotonic()

    def sample(phase: str) -> int:
        replicas = deployment.running_replicas("model-tiny-scale", app="ops")
        waiting = gauge(deployment, "ray_orchestrator_model_waiting_requests", **labels)
        timeline.append((time.monotonic() - start, phase, replicas, waiting))
        return replicas

    def show() -> str:
        rows = [f"{t:6.1f}  {phase:5}  {replicas:8}  {waiting}" for t, phase, replicas, waiting in timeline]
        return "\n".join(["  t(s)  phase  replicas  waiting", *rows])

    assert sample("idle") == 1
    # The engine runs 2 sequences at once; 4 clients keep ~2 waiting against a target of 1.
    # A second engine starts slowly beside a busy one on two cores: minutes, not seconds.
    with steady_load(ops(deployment, timeout=600), "tiny-scale", workers=4) as statuses:
        scaled = wait_for(lambda: sample("load") >= 2, timeout_s=480, every_s=3)
        for _ in range(2):
            sample("load")
    assert scaled, show()
    assert statuses and set(statuses) == {200}, statuses  # under the shedding bound nothing was refused
    back = wait_for(lambda: sample("after") == 1, timeout_s=240, every_s=3)
    print("\n" + show())
    assert back, show()


def test_past_the_queue_bound_requests_are_shed_at_once_and_settled(deployment: Deployment) -> None:
    created = deployment.admin("POST", "/admin/keys", json={"name": "shed"}).json()
    key, key_id = created["key"], created["info"]["id"]
    client = deployment.client(api_key=key, timeout=180)
    finished_at: list[float] = []
    refused: list[tuple[float, str, str]] = []

    def one(_: int) -> int:
        try:
            chunks = list(
                client.chat.completions.create(
                    model="tiny-b", messages=USER, stream=True, max_tokens=400, **{"extra_body": {"ignore_eos": True}}
                )
            )
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 400
            finished_at.append(time.monotonic())
            return 200
        except openai.APIStatusError as exc:
            refused.append((time.monotonic(), exc.body["code"], exc.response.headers.get("retry-after", "")))  # type: ignore[index]
            return exc.status_code

    # tiny-b: one replica holds 16 running + 2 waiting; the rest must be refused at once.
    n = 40
    with ThreadPoolExecutor(max_workers=n) as pool:
        statuses = list(pool.map(one, range(n)))
    shed = statuses.count(529)
    assert shed >= 1 and statuses.count(200) >= 18 and shed + statuses.count(200) == n, sorted(statuses)
    assert {code for _, code, _ in refused} == {"provider_overloaded"}
    assert all(retry == "1" for _, _, retry in refused)
    # Shed at once: every refusal came before the first admitted stream finished.
    assert max(t for t, _, _ in refused) < min(finished_at)
    # Every admitted request, shed ones included, left exactly one usage record.
    engine = sa.create_engine(deployment.database_url)

    def records() -> dict[int, int]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("select status_code, count(*) from usage_records where key_id = :k group by status_code"),
                {"k": key_id},
            )
            return {int(status): int(count) for status, count in rows}

    found = wait_for(lambda: (r := records()) and sum(r.values()) == n and r, timeout_s=30)
    engine.dispose()
    assert found == {200: n - shed, 529: shed}


def _engine_processes(deployment: Deployment, class_name: str) -> list[int]:
    """PIDs of the engine processes under every replica actor of a deployment."""
    script = """
import sys, psutil, ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
actors = list_actors(filters=[("class_name", "=", sys.argv[2]), ("state", "=", "ALIVE")])
print(" ".join(str(c.pid) for a in actors for c in psutil.Process(a.pid).children(recursive=True)))
"""
    done = _run(deployment.env, sys.executable, "-c", script, deployment.gcs_address, class_name)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(pid) for pid in done.stdout.split()]


def test_an_engine_that_stops_answering_gets_504_not_a_hung_client(deployment: Deployment) -> None:
    # tiny-c (the SQLite app) gives its engine 10 s; its app sends keep-alives every 2 s.
    created = deployment.admin("POST", "/admin/keys", base_url=deployment.sqlite_base_url, json={}).json()
    key, key_id = created["key"], created["info"]["id"]
    client = deployment.client(api_key=key, base_url=deployment.sqlite_base_url, timeout=120)
    pids = _engine_processes(deployment, "ServeReplica:sqlite:model-tiny-c")
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="tiny-c", prompt="Hello", max_tokens=8)
        assert info.value.status_code == 504 and info.value.body["code"] == "provider_timeout"  # type: ignore[index]
        body = {"model": "tiny-c", "prompt": "Hello", "max_tokens": 8, "stream": True}
        url = deployment.sqlite_base_url + "/v1/completions"
        lines = stream_lines(url, body, headers={"Authorization": f"Bearer {key}"})
        assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "provider_timeout"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # The engine answers again once it runs, and both timed-out requests were recorded as 504.
    resp = client.completions.create(model="tiny-c", prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    time.sleep(1)  # records reach the database every 100 ms here
    engine = sa.create_engine(deployment.sqlite_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select status_code, error_code, count(*) from usage_records where key_id = :k "
                "group by status_code, error_code"
            ),
            {"k": key_id},
        )
        found = {(int(s), e): int(n) for s, e, n in rows}
    engine.dispose()
    assert found.get((504, "provider_timeout")) == 2, found


def _status_rows(deployment: Deployment, *args: str) -> dict[tuple[str, str], dict[str, Any]]:
    done = subprocess.run(
        [str(BIN / "orchestrator"), "status", "--json", "--window", "2", *args],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frame = json.loads(done.stdout.strip().splitlines()[-1])
    return {(m["application"], m["model"]): m for m in frame["models"]}


def test_status_reports_every_model_from_the_running_cluster(deployment: Deployment) -> None:
    # Through the dashboard (RAY_DASHBOARD_ADDRESS is set), and by joining the cluster.
    rows = _status_rows(deployment)
    joined = _status_rows(deployment, "--address", deployment.gcs_address)
    assert set(joined) == set(rows)
    assert {key: row["deployment"] for key, row in joined.items()} == {
        key: row["deployment"] for key, row in rows.items()
    }
    expected = {("orchestrator", "tiny-a"), ("orchestrator", "tiny-b"), ("sqlite", "tiny-c"), ("ops", "tiny-scale")}
    assert expected <= set(rows), sorted(rows)
    assert rows[("orchestrator", "tiny-a")]["replicas"]["running"] == deployment.running_replicas("model-tiny-a")
    assert rows[("ops", "tiny-zero")]["replicas"]["running"] == 0
    assert rows[("ops", "tiny-scale")]["requests"]["running"] is not None
