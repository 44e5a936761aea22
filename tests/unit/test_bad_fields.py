"""Every bad field is a 4xx, never a 500: Hypothesis sends each route's bodies (and queries)
with random JSON values in the fields the code reads, declared or not (``best_of`` on chat,
``stream_options`` members...), and random extra fields, through the real app (fake engines,
a real SQLite ledger, so admission, reservation and settlement all run). Every answer is
below 500, and every refusal is the error envelope with its code's status.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.api import create_app
from orchestrator.catalog import Catalog
from orchestrator.errors import ErrorCode
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN

EXAMPLES = 150  # per test

# Scalars that loose parsers turn into something else ("1" into 1, "false" into True...),
# non-finite numbers (Python's JSON reads `Infinity` and `NaN`), and numbers past 64 bits.
_TRICKY = st.sampled_from(["1", "0", "true", "false", "x", "", "Infinity", "NaN", "1e400", 2**64, -(2**63) - 1])
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | _TRICKY
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

# What the router, the fake engine or vLLM's layer reads from a generation body, declared by
# the protocol models or not.
GENERATION_FIELDS = (
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "messages",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "prompt",
    "echo",
    "suffix",
)
KEY_FIELDS = (
    "name",
    "models",
    "rpm",
    "tpm",
    "max_concurrent",
    "credits",
    "daily_limit",
    "monthly_limit",
    "enabled",
    "workspace",
    "clear",
    "add_credits",
)
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMPLETION = {"model": "tiny-b", "prompt": "hi", "max_tokens": 8}


def field_values(names: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of ``names`` (and ``stream_options``' members, and unknown names) with random
    JSON values."""
    nested = st.fixed_dictionaries(
        {}, optional={"include_usage": JSON_VALUES, "continuous_usage_stats": JSON_VALUES, "other": JSON_VALUES}
    )
    value = {name: nested | JSON_VALUES if name == "stream_options" else JSON_VALUES for name in names}
    known = st.fixed_dictionaries({}, optional=value)
    return st.tuples(known, st.dictionaries(st.text(min_size=1, max_size=10), JSON_VALUES, max_size=2)).map(
        lambda pair: {**pair[1], **pair[0]}
    )


def check_answer(response: httpx.Response, stream: bool | None = None) -> None:
    """Below 500; a refusal is the envelope, with the status its code has. A generation
    answered 200 is a stream exactly when ``stream`` (the body's ``stream`` is ``true``)."""
    assert response.status_code < 500, response.text
    if response.status_code < 300:
        streamed = response.headers["content-type"].startswith("text/event-stream")
        if streamed:
            assert response.text.endswith("data: [DONE]\n\n"), response.text
        assert stream is None or streamed == stream, response.text
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param", "request_id"}, error
    code = ErrorCode(error["code"])
    assert code.http_status == response.status_code and code.error_type == error["type"], error
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["request_id"] == response.headers["x-request-id"]


@contextmanager
def served(catalog: Catalog, folder: Path) -> Iterator[Callable[..., httpx.Response]]:
    """Yields a function that sends one request to the keyed app (on an event loop of its
    own, as Hypothesis calls the test synchronously) with a fresh API key, or the admin key."""
    engines = {"tiny-a": FakeEngine(), "tiny-b": FakeEngine(words=["bee"])}
    ledger = Ledger(SQLStore(f"sqlite:///{folder / 'g.db'}"), UsageJournal(folder / "j"), flush_interval_s=0.05)
    app = create_app(catalog, LocalBackend(engines), Settings(admin_key=ADMIN), gateway=ledger)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with asyncio.Runner() as runner:
        runner.run(ledger.start())
        client = httpx.AsyncClient(transport=transport, base_url="http://test")
        try:
            key = runner.run(ledger.create_key(KeyLimits())).key
            keys = {"user": key, "admin": ADMIN}

            def send(method: str, path: str, *, body: Any = None, params: Any = None, admin: bool = False) -> Any:
                headers = {"Authorization": f"Bearer {keys['admin' if admin else 'user']}"}
                content = None if body is None else json.dumps(body)  # `Infinity` and `NaN` as Python writes them
                if content is not None:
                    headers["Content-Type"] = "application/json"
                request = client.request(method, path, content=content, params=params, headers=headers)
                return runner.run(request)

            yield send
        finally:
            runner.run(client.aclose())
            runner.run(ledger.stop())


_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_generation_fields_of_any_json_value_never_give_a_server_error(catalog: Catalog, tmp_path: Path) -> None:
    statuses: Counter[tuple[str, int]] = Counter()
    with served(catalog, tmp_path) as send:

        @_SETTINGS
        @given(route=st.sampled_from(["chat", "completion"]), fields=field_values(GENERATION_FIELDS))
        def check(route: str, fields: dict[str, Any]) -> None:
            base = CHAT if route == "chat" else COMPLETION
            path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
            answer = send("POST", path, body={**base, **fields})
            statuses[route, answer.status_code] += 1
            check_answer(answer, stream=fields.get("stream") is True)

        check()
    # Both routes were also answered, not only refused: the random fields reached the engines.
    assert statuses["chat", 200] and statuses["completion", 200], statuses


def test_best_of_not_finite_or_not_a_number_is_a_400_on_chat(catalog: Catalog, tmp_path: Path) -> None:
    # The two examples, as a fixed regression beside the random search.
    with served(catalog, tmp_path) as send:
        for value in ("x", math.inf):
            response = send("POST", "/v1/chat/completions", body={**CHAT, "best_of": value})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "best_of"


def test_undeclared_fields_named_like_the_requests_methods_are_no_server_error(
    catalog: Catalog, tmp_path: Path
) -> None:
    # Undeclared fields are kept as attributes (vLLM's extensions); one named like a method the
    # router calls must not hide it (a random search found `forwarded`).
    names = ("forwarded", "output_budget", "capabilities_used", "model_dump")
    with served(catalog, tmp_path) as send:
        for base, path in ((CHAT, "/v1/chat/completions"), (COMPLETION, "/v1/completions")):
            for name in names:
                response = send("POST", path, body={**base, name: 5})
                assert response.status_code < 500, (path, name, response.text)


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("chat", {"stream": "false"}, "stream"),  # a loose parser's False, but the router streamed
        ("chat", {"stream": 1}, "stream"),
        ("chat", {"n": "2"}, "n"),
        ("chat", {"n": True}, "n"),
        ("chat", {"max_tokens": "5"}, "max_tokens"),
        ("chat", {"stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
        ("chat", {"temperature": "0.5"}, "temperature"),
        ("chat", {"logprobs": 1}, "logprobs"),
        ("completion", {"prompt": [True, 2]}, "prompt"),
        ("completion", {"echo": "yes"}, "echo"),
    ],
)
def test_a_value_of_another_json_type_is_refused_not_converted(
    catalog: Catalog, tmp_path: Path, route: str, fields: dict[str, Any], param: str
) -> None:
    base, path = (CHAT, "/v1/chat/completions") if route == "chat" else (COMPLETION, "/v1/completions")
    with served(catalog, tmp_path) as send:
        answer = send("POST", path, body={**base, **fields})
        check_answer(answer)
        assert answer.status_code == 400 and answer.json()["error"]["param"].startswith(param), answer.text
        # An integer written as 2.0 is still an integer, as JSON Schema has it.
        assert send("POST", path, body={**base, "n": 2.0, "max_tokens": 4.0}).status_code == 200


def test_admin_bodies_of_any_json_value_never_give_a_server_error(catalog: Catalog, tmp_path: Path) -> None:
    with served(catalog, tmp_path) as send:
        created = send("POST", "/admin/keys", body={"name": "target"}, admin=True).json()["info"]

        @_SETTINGS
        @given(
            operation=st.sampled_from(["create", "update", "workspace"]),
            fields=field_values(KEY_FIELDS),
            enabled=JSON_VALUES,
        )
        def check(operation: str, fields: dict[str, Any], enabled: Any) -> None:
            if operation == "create":
                answer = send("POST", "/admin/keys", body=fields, admin=True)
            elif operation == "update":
                answer = send("PATCH", f"/admin/keys/{created['id']}", body=fields, admin=True)
            else:
                answer = send("PATCH", "/admin/workspaces/other", body={**fields, "enabled": enabled}, admin=True)
            check_answer(answer)

        check()


def test_query_parameters_of_any_text_never_give_a_server_error(catalog: Catalog, tmp_path: Path) -> None:
    routes = {
        "/v1/generation": ("id",),
        "/v1/model/info": ("model",),
        "/health/ready": ("model",),
        "/admin/usage": ("key", "model", "from", "to", "group_by"),
    }
    with served(catalog, tmp_path) as send:

        @_SETTINGS
        @given(path=st.sampled_from(sorted(routes)), data=st.data())
        def check(path: str, data: st.DataObject) -> None:
            text = st.text(max_size=20) | _TRICKY.map(str)
            params = data.draw(st.fixed_dictionaries({}, optional={name: text for name in routes[path]}))
            check_answer(send("GET", path, params=params, admin=path.startswith("/admin")))

        check()
