"""docs/openapi.json is generated from the app; this fails when the two drift.

Regenerate with: .venv/bin/python -m tests.unit.test_openapi
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.api import create_app
from orchestrator.catalog import load_catalog
from orchestrator.gateway.adapters import AdapterTable
from orchestrator.gateway.ledger import Ledger
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings
from tests.fakes import LocalBackend

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "openapi.json"


def current() -> dict[str, Any]:
    # A ledger that is never started (its constructor does no I/O) puts the admin routes in.
    gateway = Ledger(SQLStore("sqlite://"))
    adapters = AdapterTable("sqlite://")  # never opened: it puts the /admin/adapters routes in
    app = create_app(load_catalog([REPO / "catalog"]), LocalBackend({}), Settings(), gateway=gateway, adapters=adapters)
    return app.openapi()


def test_openapi_document_is_current() -> None:
    assert json.loads(DOC.read_text()) == current(), "run: .venv/bin/python -m tests.unit.test_openapi"


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_every_reference_resolves() -> None:
    document = current()
    for ref in set(refs(document)):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]
    assert "$defs" not in json.dumps(document)


def test_errors_are_the_envelope_and_never_422() -> None:
    for path, operations in current()["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, f"{method} {path}"
            # The Messages routes answer in Anthropic's envelope, every other route in OpenAI's.
            envelope = "AnthropicErrorResponse" if path.startswith("/v1/messages") else "ErrorResponse"
            for status in ("405", "500"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{envelope}"}, f"{method} {path} {status}"
            assert "X-Request-Id" in responses["200" if "200" in responses else "201"]["headers"]


def test_every_model_a_client_names_has_the_catalogs_names_as_examples() -> None:
    document = current()
    names = [name for spec in load_catalog([REPO / "catalog"]) for name in spec.names]
    assert "tiny-random" in names and "tiny" in names
    schemas = document["components"]["schemas"]
    for body in ("ChatCompletionRequest", "CompletionRequest"):
        assert schemas[body]["properties"]["model"]["examples"] == names
    parameters = {
        (path, parameter["name"]): parameter["schema"]
        for path, operations in document["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", ())
    }
    for where in (("/v1/models/{model_id}", "model_id"), ("/v1/model/info", "model"), ("/health/ready", "model")):
        assert parameters[where]["examples"] == names, where
    assert "examples" not in parameters[("/admin/usage", "model")]  # display names only there


def test_open_mode_documents_no_credentials() -> None:
    app = create_app(load_catalog([REPO / "catalog"]), LocalBackend({}), Settings())
    document = app.openapi()
    assert "securitySchemes" not in document["components"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert "security" not in chat and not {"401", "402", "403"} & set(chat["responses"])
    assert not [path for path in document["paths"] if path.startswith("/admin")]


if __name__ == "__main__":
    DOC.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {DOC}")
