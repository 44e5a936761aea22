"""Session affinity in orchestrator-haproxy: the requests of one session (an x-session-id
header, else the body's user or metadata.user_id) go to one replica of their model while it
is up, on /v1 and on the model's own route; requests without one are balanced as Serve
balances them. Run by the bundled HAProxy in front of stand-in replicas."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.ingress import HASH_BALANCE_FACTOR, with_model_routes
from tests.unit.test_ingress_routes import CHAT, ROUTES, Ingress, catalog_apps, render, run_ingress

SESSIONS = [f"session-{i}" for i in range(12)]


def asked(ingress: Ingress, route: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    """The replica that answered a chat completion on ``route`` ("" for /v1)."""
    resp = ingress.client.post(f"{route}/v1/chat/completions", json={**CHAT, **body}, headers=headers or {})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["server"])


def ways(session: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """The three ways to name a session: body and headers of a request for model e."""
    return [
        ({"model": "e"}, {"x-session-id": session}),
        ({"model": "e", "user": session}, {}),
        ({"model": "e", "metadata": {"user_id": session}}, {}),
    ]


def test_each_session_keeps_one_replica_on_both_routes(tmp_path: Path) -> None:
    for ingress in run_ingress(tmp_path, "/", health=[[True], [True], [True]]):
        pinned = {}
        for session in SESSIONS:
            seen = {
                asked(ingress, route, body, headers)
                for body, headers in ways(session)
                for route in ("", "/models/tiny-e")
                for _ in range(3)
            }
            assert len(seen) == 1, (session, seen)
            pinned[session] = seen.pop()
        assert len(set(pinned.values())) > 1  # sessions spread over the replicas
        # Without a session (or with an empty one), requests are balanced as before.
        spread = Counter(asked(ingress, "", {"model": "e"}) for _ in range(12))
        assert len(spread) == 3, spread
        blank = Counter(asked(ingress, "", {"model": "e"}, {"x-session-id": ""}) for _ in range(12))
        assert len(blank) == 3, blank


def test_a_replica_that_goes_down_gives_up_only_its_own_sessions(tmp_path: Path) -> None:
    health = [[True], [True], [True]]
    for ingress in run_ingress(tmp_path, "/", health=health):
        before = {s: asked(ingress, "", {"model": "e"}, {"x-session-id": s}) for s in SESSIONS}
        gone = before[SESSIONS[0]]
        health[int(gone.removeprefix("replica-"))][0] = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until HAProxy's checks mark it down
            if asked(ingress, "", {"model": "e"}, {"x-session-id": SESSIONS[0]}) != gone:
                break
            time.sleep(0.1)
        after = {s: asked(ingress, "", {"model": "e"}, {"x-session-id": s}) for s in SESSIONS}
        assert gone not in after.values()
        assert {s: r for s, r in after.items() if before[s] != gone} == {s: r for s, r in before.items() if r != gone}


def test_the_affinity_backend_tracks_the_models_replicas_with_bounded_load(tmp_path: Path) -> None:
    config = with_model_routes(render(tmp_path, catalog_apps(9001, [9002, 9003])), ROUTES, "/m.map")
    backend = config[config.index("\nbackend http-orchestrator-model-tiny-e-orch-affinity") :]
    assert "balance hash var(txn.orch_session)" in backend and "hash-type consistent" in backend
    assert f"hash-balance-factor {HASH_BALANCE_FACTOR}" in backend
    tracked = [line.split()[-1] for line in backend.splitlines() if line.strip().startswith("server ")]
    assert tracked == [f"http-orchestrator-model-tiny-e/SERVE_REPLICA__orchestrator-model-tiny-e-{i}" for i in (0, 1)]
    use = "use_backend http-orchestrator-model-tiny-e-orch-affinity if is_http-orchestrator-model-tiny-e"
    assert config.index(use) < config.index("use_backend http-orchestrator-model-tiny-e if")
    # None for the router's backend or a model without replicas.
    assert "http-orchestrator-orch-affinity" not in config and "model-zero-orch-affinity" not in config
