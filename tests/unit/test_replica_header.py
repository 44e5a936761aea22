"""A model replica names itself in every HTTP response of its route (x-orch-replica), streamed
or not, errors included, so that which replica answered can be seen from outside
(orchestrator/ingress.py's affinity)."""

from __future__ import annotations

import json

import httpx

from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.serving.model_route import route_app
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings
from tests.fakes import FakeEngine

CHAT = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _server(catalog: Catalog, engine: FakeEngine) -> ModelServer:
    spec = catalog.resolve("tiny-a").model_dump(mode="json")
    settings = Settings(max_body_bytes=1024).model_dump(mode="json")
    return ModelServer(spec, settings, engine_factory=lambda s, st: engine)  # type: ignore[arg-type,return-value]


async def test_every_response_names_the_replica(catalog: Catalog) -> None:
    app = route_app(_server(catalog, FakeEngine(words=["one", "two"])), None, replica="abc123")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        plain = await http.post("/v1/chat/completions", json=CHAT)
        streamed = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        missing = await http.get("/missing")
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "one two"
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert missing.status_code == 404
    assert [r.headers.get_list("x-orch-replica") for r in (plain, streamed, missing)] == [["abc123"]] * 3


async def test_error_responses_name_the_replica_too(catalog: Catalog, ledger: Ledger) -> None:
    """Refusals of every layer: the body limit (before the app), the key check, the app's own
    error envelope, an engine failing before a stream's first frame (the error's status) and
    after it (200 with an error event)."""
    down = OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "down")
    engines = {"before": FakeEngine(fail_before_first=down), "after": FakeEngine(fail_after=1)}
    key = {"Authorization": f"Bearer {(await ledger.create_key(KeyLimits())).key}"}
    answers: dict[str, httpx.Response] = {}
    for when, engine in engines.items():
        app = route_app(_server(catalog, engine), ledger, replica="abc123")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            if when == "before":
                answers["payload_too_large"] = await http.post("/v1/chat/completions", content=b"x" * 2048)
                answers["invalid_api_key"] = await http.post("/v1/chat/completions", json=CHAT)
                unknown = {**CHAT, "model": "nope"}
                answers["model_not_found"] = await http.post("/v1/chat/completions", json=unknown, headers=key)
            streamed = await http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=key)
            answers[f"stream failing {when} its first frame"] = streamed
    codes = {name: _error_code(resp) for name, resp in answers.items()}
    assert codes == {
        "payload_too_large": "payload_too_large",
        "invalid_api_key": "invalid_api_key",
        "model_not_found": "model_not_found",
        "stream failing before its first frame": "provider_unavailable",
        "stream failing after its first frame": "provider_unavailable",
    }
    assert [r.status_code for r in answers.values()] == [413, 401, 404, 502, 200]
    named = {name: r.headers.get_list("x-orch-replica") for name, r in answers.items()}
    assert named == {name: ["abc123"] for name in answers}


def _error_code(resp: httpx.Response) -> str:
    """The error code of a JSON error envelope, or of a stream's error event."""
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
        return str(events[-1]["error"]["code"])
    return str(resp.json()["error"]["code"])


async def test_without_a_replica_id_no_header_is_added(catalog: Catalog) -> None:
    app = route_app(_server(catalog, FakeEngine()), None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        resp = await http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200 and "x-orch-replica" not in resp.headers and "x-request-id" not in resp.headers
