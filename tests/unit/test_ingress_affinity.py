"""Affinity in orchestrator-haproxy: the requests of one session (an x-session-id header, else
the body's user or metadata.user_id), or without one those whose prompts begin alike, go to
one replica of their model while it is up and within its bounded load, on /v1 and on the
model's own route; requests with neither are balanced as Serve balances them, and so is
everything with ORCH_INGRESS_AFFINITY=0. Run by the bundled HAProxy in front of stand-in
replicas."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from orchestrator.ingress import HASH_BALANCE_FACTOR, PREFIX_BYTES, RING_WEIGHT, backend_sections, with_model_routes
from tests.unit.test_ingress_routes import CHAT, ROUTES, Ingress, catalog_apps, render, run_ingress

SESSIONS = [f"session-{i}" for i in range(12)]
# Two replicas where requests go one after another: HAProxy's bound is ceil(1.5 x (in flight
# + 1) / replicas) connections a replica, so with three, a replica that still counts the
# previous request's connection (HAProxy may not have closed it yet) is past it.
TWO = [[True], [True]]
THREE = [[True], [True], [True]]


def asked(
    ingress: Ingress,
    route: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> str:
    """The replica that answered a POST of ``body`` to ``path`` on ``route`` ("" for /v1)."""
    resp = ingress.client.post(f"{route}{path}", json={**CHAT, **body}, headers=headers or {})
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
    for ingress in run_ingress(tmp_path, "/", health=TWO):
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
        # Every request had the same prompt: the session, not the prompt, chose the replica.
        assert len(set(pinned.values())) > 1
        # With neither a session (or an empty one) nor a prompt, requests are balanced as before.
        empty = {"model": "e", "messages": []}
        spread = Counter(asked(ingress, "", empty) for _ in range(12))
        assert len(spread) == 2, spread
        blank = Counter(asked(ingress, "", empty, {"x-session-id": ""}) for _ in range(12))
        assert len(blank) == 2, blank


def _turns(turn: int) -> list[dict[str, Any]]:
    """What a conversation adds after its first messages by its turn ``turn``."""
    return [
        m
        for t in range(turn)
        for m in ({"role": "assistant", "content": f"a{t}"}, {"role": "user", "content": f"q{t}"})
    ]


def _text(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text}]


# A conversation's request at a turn, by dialect: its path and body (conversation c, turn t).
# What each keeps the same across turns is its prompt's beginning.
CONVERSATIONS: dict[str, tuple[str, Callable[[int, int], dict[str, Any]]]] = {
    "chat": (
        "/v1/chat/completions",
        lambda c, t: {"messages": [{"role": "user", "content": f"conversation {c}"}, *_turns(t)]},
    ),
    "chat, a system prompt in parts": (
        "/v1/chat/completions",
        lambda c, t: {
            "messages": [
                {"role": "system", "content": _text("You help.")},
                {"role": "user", "content": _text(f"conversation {c}")},
                *_turns(t),
            ]
        },
    ),
    "messages": (
        "/v1/messages",
        lambda c, t: {"system": f"conversation {c}", "messages": [{"role": "user", "content": "q"}, *_turns(t)]},
    ),
    "messages, system in blocks": (
        "/v1/messages",
        lambda c, t: {
            "system": _text("Be brief."),
            "messages": [{"role": "user", "content": _text(f"c {c}")}, *_turns(t)],
        },
    ),
    "completions, cut to the key's length": (
        "/v1/completions",
        lambda c, t: {"prompt": f"conversation {c} " + "x" * PREFIX_BYTES + f" turn {t}"},
    ),
    "completions, a list of prompts": ("/v1/completions", lambda c, t: {"prompt": [f"conversation {c}", f"turn {t}"]}),
    "responses, input items": (
        "/v1/responses",
        lambda c, t: {"input": [{"role": "user", "content": f"conversation {c}"}, *_turns(t)]},
    ),
    "responses, instructions": (
        "/v1/responses",
        lambda c, t: {"instructions": f"conversation {c}", "input": "q", "max_output_tokens": 8 + t},
    ),
}


@pytest.mark.parametrize("dialect", CONVERSATIONS)
def test_requests_whose_prompts_begin_alike_meet_on_one_replica(tmp_path: Path, dialect: str) -> None:
    path, conversation = CONVERSATIONS[dialect]
    for ingress in run_ingress(tmp_path, "/", health=TWO):
        pinned = {}
        for c in range(12):
            seen = {
                asked(ingress, route, {"model": "e", **conversation(c, t)}, path=path)
                for t in range(3)
                for route in ("", "/models/tiny-e")
            }
            assert len(seen) == 1, (c, seen)
            pinned[c] = seen.pop()
        assert len(set(pinned.values())) > 1, pinned  # conversations spread over the replicas


def test_a_long_shared_system_prompt_keys_every_request_that_starts_with_it(tmp_path: Path) -> None:
    system = {"role": "system", "content": "You answer in French. " * (PREFIX_BYTES // 10)}
    for ingress in run_ingress(tmp_path, "/", health=TWO):
        seen = Counter(
            asked(ingress, "", {"model": "e", "messages": [system, {"role": "user", "content": f"q{i}"}]})
            for i in range(12)
        )
        assert len(seen) == 1, seen


def test_a_busy_keys_replica_takes_no_more_than_its_bounded_share(tmp_path: Path) -> None:
    held = 6
    for ingress in run_ingress(tmp_path, "/", health=THREE):
        ask = partial(asked, ingress, "", {"model": "e"}, {"x-session-id": "hot", "x-hold": "3"})
        with ThreadPoolExecutor(held) as pool:  # held at once: each answered 3 s later
            replicas = [future.result() for future in [pool.submit(ask) for _ in range(held)]]
        counts = Counter(replicas)
        # Without the bound all six would go to the session's replica.
        assert len(counts) > 1, counts
        assert max(counts.values()) <= math.ceil(HASH_BALANCE_FACTOR / 100 * held / len(THREE)), counts


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


def test_a_killed_replicas_sessions_are_answered_by_a_live_one_at_once(tmp_path: Path) -> None:
    """Its worker killed (every socket closed at once, as when Ray kills a replica), a replica
    refuses connections: its sessions' next requests, sent before any health check can see it,
    are each answered by the live replica (HAProxy retries them elsewhere), and the other
    sessions stay where they were."""
    for ingress in run_ingress(tmp_path, "/", killable=2):

        def ask(session: str, ingress: Ingress = ingress) -> str:
            return asked(ingress, "", {"model": "e"}, {"x-session-id": session})

        before = {s: ask(s) for s in SESSIONS}
        with ThreadPoolExecutor(8) as pool:  # several pooled connections to each replica
            list(pool.map(ask, SESSIONS * 3))
        victim = before[SESSIONS[0]]
        child = ingress.children[int(victim.removeprefix("replica-"))]
        child.kill()
        child.wait(timeout=30)
        with ThreadPoolExecutor(8) as pool:  # asked() asserts each is answered (200)
            after = dict(zip(SESSIONS, pool.map(ask, SESSIONS), strict=True))
        assert victim not in after.values()
        assert {s: r for s, r in after.items() if before[s] != victim} == {
            s: r for s, r in before.items() if r != victim
        }


def test_many_keys_split_evenly_between_two_replicas(tmp_path: Path) -> None:
    """At HAProxy's default server weight the ring's arcs gave one of two replicas about 60% of
    the keys; with RING_WEIGHT, each gets half within the noise of 1,000 keys (sd 1.6%)."""
    for ingress in run_ingress(tmp_path, "/", health=TWO):
        counts = Counter(asked(ingress, "", {"model": "e"}, {"x-session-id": f"key {i}"}) for i in range(1000))
        assert len(counts) == 2 and max(counts.values()) <= 560, counts


def _listed_the_other_way(config: str) -> str:
    """Serve's config with the model's two replicas listed in the other order."""
    lines = config.splitlines(keepends=True)
    first, second = (
        next(i for i, line in enumerate(lines) if f"server SERVE_REPLICA__orchestrator-model-tiny-e-{n} " in line)
        for n in (0, 1)
    )
    lines[first], lines[second] = lines[second], lines[first]
    return "".join(lines)


def test_keys_keep_their_replica_when_serve_lists_the_replicas_in_another_order(tmp_path: Path) -> None:
    """HAProxy places a server on the ring by its id, by default its place in the list; the
    wrapper gives each an id from its name, so a reload that lists them otherwise moves no key."""
    keys = [f"key {i}" for i in range(40)]
    found = []
    for number, change in enumerate((lambda config: config, _listed_the_other_way)):
        for ingress in run_ingress(tmp_path / str(number), "/", health=TWO, serve_config=change):
            found.append({k: asked(ingress, "", {"model": "e"}, {"x-session-id": k}) for k in keys})
    assert found[0] == found[1]
    assert len(set(found[0].values())) == 2


def test_turned_off_every_request_is_balanced_as_serve_balances_it(tmp_path: Path) -> None:
    config = with_model_routes(render(tmp_path, catalog_apps(9001, [9002, 9003])), ROUTES, "/m.map", affinity=False)
    assert "balance hash" not in config and "orch_key" not in config and "set-path /models/tiny-e" in config
    for ingress in run_ingress(tmp_path, "/", health=THREE, environ={"ORCH_INGRESS_AFFINITY": "0"}):
        session = Counter(asked(ingress, "", {"model": "e"}, {"x-session-id": "s"}) for _ in range(12))
        prompt = Counter(asked(ingress, "", {"model": "e"}) for _ in range(12))
        assert len(session) == 3 and len(prompt) == 3, (session, prompt)


def test_each_model_backend_with_replicas_balances_by_affinity_with_bounded_load(tmp_path: Path) -> None:
    config = with_model_routes(render(tmp_path, catalog_apps(9001, [9002, 9003])), ROUTES, "/m.map")
    backends = backend_sections(config)
    backend = backends["http-orchestrator-model-tiny-e"]
    assert "balance hash var(txn.orch_key)" in backend and "hash-type consistent" in backend
    assert f"hash-balance-factor {HASH_BALANCE_FACTOR}" in backend
    assert backend.index(f"default-server weight {RING_WEIGHT}") < backend.index("server SERVE_REPLICA")
    # Serve's servers as Serve wrote them: checked, and observed for refused connections.
    assert backend.count("check observe layer4") == 2 and "option httpchk GET /-/healthz" in backend
    # Nothing for the router's backend or a model without replicas.
    assert "orch_key" not in backends["http-orchestrator"] + backends["http-orchestrator-model-zero"]
