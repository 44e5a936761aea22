"""The OpenAPI document is a contract the app keeps: schemathesis generates valid and invalid
requests for every operation from ``/openapi.json``, sends them to the app in-process (fake
engines, a real SQLite ledger), and checks every answer: no server error, a documented status,
content type and headers, and a body that matches the documented schema (for a stream, every
event). Valid requests mostly name a model from the document's ``examples`` (the catalog's
names), so that they get past name resolution to the engines.

CI sends ``EXAMPLES`` (70) requests per operation and mode. The longer run sends 16,003 across
the routes, the Messages and Responses ones included (about 4 minutes here; its last result:
no failure, and 1,068 of the 1,600 valid chat, completions, Messages and Responses requests
answered 200 by an engine):

    ORCH_CONTRACT_EXAMPLES=400 .venv/bin/pytest tests/unit/test_contract.py -s
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import positive_data_acceptance

from orchestrator.api import create_app
from orchestrator.catalog import Catalog, load_catalog
from orchestrator.gateway.adapters import AdapterTable
from orchestrator.gateway.journal import UsageJournal
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.records import MAX_RATE, KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import ADMIN, EMBEDDER, TINY, write_catalog

EXAMPLES = int(os.environ.get("ORCH_CONTRACT_EXAMPLES", "70"))  # per operation and mode; few inputs run out sooner
MIN_CASES = 2000
BODY_LIMIT = 4096  # small, so that some generated bodies get the 413
# Given whole, so that no schemathesis.toml found around changes what is checked. How this API
# refuses an invalid request: 400, 401 (an invalid key), 404 (an unknown id), 413 (too big).
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "413"]}}}
# Refusals of valid requests that no schema can foresee, as (code, param): more output tokens
# than the model's context window (which differs per model), a body over the server's limit (a
# setting), a top-up that would take the key's balance past 1e9 USD (depends on the balance),
# tools, images, guided JSON or reasoning asked of a model whose catalog entry lacks them.
UNFORESEEABLE = {
    ("capability_not_supported", "model"),
    ("model_kind_mismatch", "model"),  # each model's task is in /v1/models, not in the schema
    ("context_length_exceeded", "max_tokens"),
    ("context_length_exceeded", "max_completion_tokens"),
    ("context_length_exceeded", "max_output_tokens"),
    ("payload_too_large", None),
    ("invalid_request", "add_credits"),
    ("invalid_request", "tokens"),  # a token id past the model's vocabulary
    ("invalid_request", "input"),  # an embeddings batch past its model's bounds
}
# Spellings the router also resolves, beside the document's examples (names are case-blind).
SPELLINGS = ("TINY-B",)
GENERATION = ("POST /v1/chat/completions", "POST /v1/completions")


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    """The unit tests' two text models and an embedding model."""
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    return load_catalog([write_catalog(tmp_path, TINY, other, EMBEDDER)])


@pytest.fixture
def engines() -> dict[str, FakeEngine]:
    return {"tiny-a": FakeEngine(), "tiny-b": FakeEngine(words=["bee"]), "embed-e": FakeEngine()}


def keyed_app(catalog: Catalog, engines: dict[str, FakeEngine], folder: Path, keys: dict[str, str]) -> FastAPI:
    """Returns the app of the API tests (with a small body limit), whose lifespan starts its
    ledger and puts a new API key into ``keys["user"]``: schemathesis serves the app from an
    event loop of its own, and the ledger must live on that loop."""
    ledger = Ledger(SQLStore(f"sqlite:///{folder / 'g.db'}"), UsageJournal(folder / "j"), flush_interval_s=0.05)
    # No failed-authentication throttle: the generated cases send thousands of bad keys from
    # one address, and its 429 would hide the rest of the app from them (test_auth_abuse.py
    # tests it; its 429 is documented on every route with credentials).
    settings = Settings(admin_key=ADMIN, max_body_bytes=BODY_LIMIT, auth_failures_per_address=0)
    adapters = AdapterTable(ledger.store.url)
    app = create_app(catalog, LocalBackend(engines), settings, gateway=ledger, adapters=adapters)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        await ledger.start()
        try:
            # Limits that generated requests never reach, so that answers carry the rate-limit headers.
            limits = KeyLimits(name="contract", rpm=MAX_RATE, tpm=MAX_RATE)
            keys["user"] = (await ledger.create_key(limits, "contract")).key
            async with inner(app) as state:
                yield state
        finally:
            await ledger.stop()

    app.router.lifespan_context = lifespan
    return app


def contract_schema(app: FastAPI, keys: dict[str, str]) -> schemathesis.BaseSchema:
    """Returns the app's schema, whose generated requests carry the admin key for ``/admin``
    and the API key elsewhere (health routes ignore it)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(CONFIG))

    @schema.auth(refresh_interval=None)
    class Keys:
        def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
            return keys["admin" if case.path.startswith("/admin") else "user"]

        def set(self, case: schemathesis.Case, data: str, context: schemathesis.AuthContext) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


def modes(operation: schemathesis.APIOperation) -> tuple[GenerationMode, ...]:
    """Returns the generation modes that apply: an operation without any input (not even
    credentials) has no invalid requests."""
    inputs = (operation.path_parameters, operation.query, operation.headers, operation.body)
    if any(len(parameters) for parameters in inputs):
        return (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return (GenerationMode.POSITIVE,)


def cases(
    operation: schemathesis.APIOperation, mode: GenerationMode, known: dict[str, list[str]]
) -> st.SearchStrategy[schemathesis.Case]:
    """Returns the operation's generated requests. In valid ones, a parameter (or body field)
    named in ``known`` mostly takes one of its known values: a random model name or id only
    ever reaches the 404."""
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is not GenerationMode.POSITIVE:
        return strategy

    @st.composite
    def with_known_values(draw: st.DrawFn) -> schemathesis.Case:
        case = draw(strategy)
        body = case.body if isinstance(case.body, dict) else {}
        for values in (case.path_parameters, case.query, body):
            for name in sorted(set(known) & set(values or {})):
                # Sampled last, the generated value is the one drawn least often.
                values[name] = draw(st.sampled_from([*known[name], values[name]]))
        return case

    return with_known_values()


def remember(case: schemathesis.Case, response: schemathesis.Response, known: dict[str, list[str]]) -> None:
    """Keeps the ids that valid requests created: generations, and keys made through the
    admin API (never the test's own key, which must stay valid)."""
    if response.status_code not in (200, 201) or "json" not in response.headers.get("content-type", [""])[0]:
        return
    body = json.loads(response.content)
    if str(body.get("id", "")).startswith("gen-"):
        known["id"].append(body["id"])
    if case.method == "POST" and case.path == "/admin/keys":
        known["key_id"].append(body["info"]["id"])
        known["workspace_id"].append(body["info"]["workspace_id"])


def accepts_valid_requests(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Any) -> Any:
    """``positive_data_acceptance``, except for the :data:`UNFORESEEABLE` refusals."""
    if response.status_code in (400, 413):
        error = json.loads(response.content)["error"]
        if (error["code"], error["param"]) in UNFORESEEABLE:
            return None
    return positive_data_acceptance(ctx, response, case)


def model_examples(schema: schemathesis.BaseSchema) -> list[str]:
    """Returns the ``examples`` of the chat body's ``model``: the catalog's names."""
    body = schema.raw_schema["components"]["schemas"]["ChatCompletionRequest"]
    return list(body["properties"]["model"]["examples"])


def run(operation: schemathesis.APIOperation, mode: GenerationMode, known: dict[str, list[str]]) -> Counter[int]:
    """Sends up to ``EXAMPLES`` generated requests and validates every answer.

    Returns:
        How many got each status.

    Raises:
        schemathesis.errors.FailureGroup: an answer broke the contract (after Hypothesis
        shrank the request).
    """
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same requests on every run
        database=None,
        # Generated bodies are large by design, and a loaded machine is slow: neither is a failure.
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases(operation, mode, known))
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            excluded_checks=[positive_data_acceptance], additional_checks=[accepts_valid_requests]
        )
        statuses[response.status_code] += 1
        remember(case, response, known)

    check()
    return statuses


def test_every_answer_is_documented(catalog: Catalog, engines: dict[str, FakeEngine], tmp_path: Path) -> None:
    keys = {"admin": ADMIN}
    schema = contract_schema(keyed_app(catalog, engines, tmp_path, keys), keys)
    models = [*model_examples(schema), *SPELLINGS]
    assert {"tiny-a", "a", "org/tiny-b"} <= set(models)
    known: dict[str, list[str]] = {"model": models, "model_id": models, "id": [], "key_id": [], "workspace_id": []}
    answered: dict[str, Counter[int]] = {}
    try:
        for operation in (result.ok() for result in schema.get_all_operations()):
            for mode in modes(operation):
                answered[f"{operation.label} ({mode.value})"] = run(operation, mode, known)
    finally:
        shutdown_lifespans()
    for label, statuses in answered.items():
        print(f"{statuses.total():5} {label}: " + ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items())))
    assert sum(statuses.total() for statuses in answered.values()) >= MIN_CASES, answered
    # Valid generation requests get past name resolution: most reach an engine.
    for route in GENERATION:
        valid = answered[f"{route} (positive)"]
        assert valid[200] > valid.total() / 2, (route, valid)
    assert answered["POST /v1/embeddings (positive)"][200] > 0, answered["POST /v1/embeddings (positive)"]
