"""Change one model, leave the rest alone: ``serve deploy`` of a config laid out by
orchestrator/layout.py that changes model B's entry, then one that adds model C, while
model A streams without pause. A's replicas keep their actors and none of its requests
fails; B and C serve after their change; the router, which Serve restarts because its
args hold the catalog, drains its old replica without failing a request."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest

from orchestrator.catalog import catalog_from_entries
from orchestrator.engine.weights import build_tiny_llama
from orchestrator.layout import applications
from tests.integration.conftest import Deployment, _wait_ready, answers_within, ask, steady_load, tiny_entry

pytestmark = pytest.mark.integration

NAME = "rollout"  # the router's application; route /rollout, open mode


def _config(base: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The session's config plus the rollout apps (the others stay exactly as they are)."""
    config = copy.deepcopy(base)
    specs = catalog_from_entries(entries, origin="test")
    # One router replica: the harder case, since no second replica serves while it rolls.
    settings = {"open_access": True, "keepalive_seconds": 2, "router_replicas": 1}
    config["applications"] += applications(specs, settings, name=NAME, route_prefix=f"/{NAME}")
    return config


def test_changing_and_adding_a_model_leaves_the_others_streaming(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = build_tiny_llama(tmp_path_factory.mktemp("rollout") / "tiny", seed=7)
    a = tiny_entry("tiny-r1", "r1", weights)
    b = tiny_entry("tiny-r2", "r2", weights)
    c = tiny_entry("tiny-r3", "r3", weights)
    base = copy.deepcopy(deployment.config)
    deployment.redeploy(_config(base, [a, b]))
    try:
        base_url = f"{deployment.base_url}/{NAME}"
        _wait_ready(base_url, deployment.env, ["tiny-r1", "tiny-r2"])
        client = deployment.client(base_url=base_url, api_key="none")
        models_before = deployment.replica_actors(f"{NAME}-model-tiny-r1#")
        others_before = deployment.replica_actors("orchestrator-model-tiny-a#")
        routers_before = deployment.replica_actors(f"{NAME}#router#")
        assert len(models_before) == 1 and len(others_before) == 1 and len(routers_before) == 1
        timeline = []
        with steady_load(client, "r1", streams=2) as load:
            time.sleep(3)
            changed_b = {**b, "aliases": ["r2", "r2-v2"]}  # only a new router and a new B know it
            deployment.redeploy(_config(base, [a, changed_b]))
            timeline.append(("B changed, serving as r2-v2 after", answers_within(client, "r2-v2", "ok", 600, [])))
            deployment.redeploy(_config(base, [a, changed_b, c]))
            timeline.append(("C added, serving after", answers_within(client, "r3", "ok", 600, [])))
            time.sleep(3)
        print(f"\nrollout: {timeline}; {load.completed} streams on A, {len(load.failures)} failed")
        assert load.completed > 0 and load.failures == [], load.failures
        # A's replica, and the main app's models, are the same actors; the router is new.
        assert deployment.replica_actors(f"{NAME}-model-tiny-r1#") == models_before
        assert deployment.replica_actors("orchestrator-model-tiny-a#") == others_before
        routers_after = deployment.replica_actors(f"{NAME}#router#")
        assert len(routers_after) == 1 and routers_after != routers_before
        assert ask(client, "r1") == ask(client, "r2") == "ok"
    finally:
        deployment.redeploy(base)  # the rollout apps go; the session's stay as they were
