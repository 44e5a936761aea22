"""One Serve application per model: a change to one entry changes only its application's
code version (as Serve computes it) and the router's."""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from orchestrator import layout
from orchestrator.catalog import ModelSpec, catalog_from_entries
from tests.unit.conftest import TINY

B = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
C = {**TINY, "name": "tiny-c", "aliases": ["c"], "backend_id": "org/tiny-c"}


def specs(*entries: dict[str, Any]) -> list[ModelSpec]:
    return list(catalog_from_entries(list(entries), origin="test"))


def versions(entries: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, str]:
    """Serve's code version of each application of the layout."""
    config = ServeDeploySchema.model_validate(layout.serve_config(specs(*entries), settings))
    return {app.name: get_app_code_version(app) for app in config.applications}


def test_changing_one_model_changes_only_its_application_and_the_routers() -> None:
    settings = {"usage_flush_ms": 100}
    before = versions([TINY, B], settings)
    assert set(before) == {
        "orchestrator",
        "orchestrator-gateway",
        "orchestrator-model-tiny-a",
        "orchestrator-model-tiny-b",
    }
    changed = versions([TINY, {**B, "aliases": ["b", "bee"]}], settings)
    assert {name for name in before if changed[name] != before[name]} == {"orchestrator", "orchestrator-model-tiny-b"}
    added = versions([TINY, B, C], settings)
    assert set(added) - set(before) == {"orchestrator-model-tiny-c"}
    assert {name for name in before if added[name] != before[name]} == {"orchestrator"}
    # A settings change reaches every application.
    moved = versions([TINY, B], {"usage_flush_ms": 200})
    assert all(moved[name] != before[name] for name in before)


def test_open_access_has_no_gateway_application_and_names_follow_the_router() -> None:
    apps = layout.applications(specs(TINY), {"open_access": True}, name="ops", route_prefix="/ops")
    # Each model answers on its own route, under the router's prefix.
    routes = [(a["name"], a["route_prefix"]) for a in apps]
    assert routes == [("ops", "/ops"), ("ops-model-tiny-a", "/ops/models/tiny-a")]
    for app in apps:
        ServeApplicationSchema.model_validate(app)
    assert layout.instance_of("ops-model-tiny-a", "model-tiny-a") == "ops"
    assert layout.instance_of("ops-gateway", layout.GATEWAY_DEPLOYMENT) == "ops"
    assert layout.instance_of("ops", "router") == "ops"  # the router's own application
    assert layout.instance_of("model-tiny-a", "model-tiny-a") == "model-tiny-a"


def test_entries_travel_whole_and_round_trip() -> None:
    (spec,) = specs({**TINY, "autoscaling": {"min_replicas": 0, "max_replicas": 3}})
    (again,) = specs(layout.entry(spec))
    assert again == spec


@pytest.mark.engine  # build_model_app checks engine_args against vLLM's
def test_the_three_builders(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import (
        UnsafeConfigError,
        build_gateway_app,
        build_model_app,
        build_router_app,
    )

    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    (spec,) = specs(TINY)
    model = build_model_app({"model": layout.entry(spec), "settings": {}})._bound_deployment
    assert model.name == spec.deployment_name and model._deployment_config.autoscaling_config is not None
    with pytest.raises(UnsafeConfigError, match="admin key"):
        build_router_app({"models": [layout.entry(spec)]})
    with pytest.raises(UnsafeConfigError, match="admin key"):
        build_gateway_app({})
    with pytest.raises(UnsafeConfigError, match="ORCH_KEY_PEPPER_FILE"):
        build_model_app({"model": layout.entry(spec), "settings": {"key_pepper": "x"}})
    router = build_router_app({"models": [layout.entry(spec)], "local": True})._bound_deployment
    # No handles: the router finds each model and the gateway in their own applications.
    assert router.name == "router" and router.init_args[2] is None and router.init_args[3] is None
    gateway = build_gateway_app({"local": True})._bound_deployment
    assert gateway.name == layout.GATEWAY_DEPLOYMENT and gateway._deployment_config.num_replicas == 1
