"""Readiness from the router's view of deployments: per model, no engine calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from orchestrator.api import create_app
from orchestrator.catalog import Catalog, load_catalog
from orchestrator.layout import model_app_name
from orchestrator.serving.model_states import DeploymentState, ModelStates
from orchestrator.settings import Settings
from tests.fakes import FakeEngine, LocalBackend
from tests.unit.conftest import TINY, write_catalog

BROKEN = DeploymentState("UNHEALTHY", 0, "another application's")


class StatesBackend(LocalBackend):
    """The fake backend, with readiness from a ModelStates fed by a fake controller."""

    def __init__(self, catalog: Catalog, view: dict[str, DeploymentState], *, own_apps: bool = False) -> None:
        super().__init__({spec.name: FakeEngine() for spec in catalog})
        self.fetches = 0

        def app(deployment: str) -> str:
            # The router's application "app", or each model in one of its own (orchestrator.layout).
            return model_app_name("app", deployment) if own_apps else "app"

        # Every application's deployments, as Serve reports them; another app's are ignored.
        def fetch() -> dict[tuple[str, str], DeploymentState]:
            self.fetches += 1
            return {**{(app(name), name): state for name, state in view.items()}, ("other", "model-tiny-a"): BROKEN}

        locations = {spec.name: (app(spec.deployment_name), spec.deployment_name) for spec in catalog}
        self.states = ModelStates(catalog, locations, fetch)

    def health(self):  # type: ignore[no-untyped-def]
        return self.states.health()


def zero_catalog(tmp_path: Path) -> Catalog:
    zero = {**TINY, "name": "tiny-z", "aliases": ["z"], "backend_id": "org/z", "autoscaling": {"min_replicas": 0}}
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    return load_catalog([write_catalog(tmp_path, TINY, other, zero)])


@pytest.mark.parametrize("own_apps", [False, True])
async def test_one_broken_model_leaves_the_others_ready(tmp_path: Path, own_apps: bool) -> None:
    catalog = zero_catalog(tmp_path)
    view = {
        "model-tiny-a": DeploymentState("HEALTHY", 2),
        "model-tiny-b": DeploymentState("UNHEALTHY", 0, "replica failed its health check"),
        "model-tiny-z": DeploymentState("HEALTHY", 0),
    }
    backend = StatesBackend(catalog, view, own_apps=own_apps)
    await backend.states.refresh()
    app = create_app(catalog, backend, Settings())
    engine_calls_before = sum(e.running for e in backend.engines.values())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        resp = await http.get("/health/ready")
        assert resp.status_code == 200
        body = resp.json()
        assert body["status"] == "degraded"
        assert body["models"]["tiny-a"] == {"ready": True, "state": "serving", "replicas": 2, "reason": ""}
        assert body["models"]["tiny-b"]["ready"] is False and body["models"]["tiny-b"]["state"] == "unhealthy"
        assert body["models"]["tiny-b"]["reason"] == "replica failed its health check"
        # Scaled to zero counts as ready: the first request starts a replica.
        assert body["models"]["tiny-z"]["state"] == "scaled_to_zero" and body["models"]["tiny-z"]["ready"]
        # Per model: by any of its names.
        assert (await http.get("/health/ready", params={"model": "b"})).status_code == 503
        assert (await http.get("/health/ready", params={"model": "org/tiny-a"})).status_code == 200
        assert (await http.get("/health")).json() == body
        assert (await http.get("/health/live")).status_code == 200
    # Probes read the view; they neither called an engine nor the controller again.
    assert sum(e.running for e in backend.engines.values()) == engine_calls_before
    assert backend.fetches == 1


async def test_nothing_ready_is_503_and_unknown_before_the_first_refresh(tmp_path: Path) -> None:
    catalog = zero_catalog(tmp_path)
    view = {
        "model-tiny-a": DeploymentState("UPDATING", 0, "waiting for resources"),
        "model-tiny-b": DeploymentState("DEPLOY_FAILED", 0, "boom"),
        "model-tiny-z": DeploymentState("UPSCALING", 0),
    }
    backend = StatesBackend(catalog, view)
    assert {m.state for m in backend.states.health().values()} == {"unknown"}
    assert backend.states.running("tiny-a") is None
    await backend.states.refresh()
    health = backend.states.health()
    assert health["tiny-a"].state == "starting" and health["tiny-a"].reason == "waiting for resources"
    assert health["tiny-z"].state == "starting"  # a cold start in progress is not ready yet
    assert backend.states.running("z") == 0
    app = create_app(catalog, backend, Settings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        resp = await http.get("/health/ready")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"


async def test_a_failed_refresh_keeps_the_last_view(tmp_path: Path) -> None:
    catalog = zero_catalog(tmp_path)
    calls = []

    def fetch() -> dict[tuple[str, str], DeploymentState]:
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("controller restarting")
        return {("app", "model-tiny-a"): DeploymentState("HEALTHY", 1)}

    states = ModelStates(catalog, {spec.name: ("app", spec.deployment_name) for spec in catalog}, fetch)
    await states.refresh()
    await states.refresh()
    assert states.running("tiny-a") == 1 and len(calls) == 2


async def test_a_recheck_reads_the_controller_once_for_a_burst_and_not_when_the_view_is_fresh(tmp_path: Path) -> None:
    catalog = zero_catalog(tmp_path)
    now = [100.0]
    calls = []

    def fetch() -> dict[tuple[str, str], DeploymentState]:
        calls.append(1)
        return {("app", "model-tiny-a"): DeploymentState("HEALTHY", len(calls))}

    locations = {spec.name: ("app", spec.deployment_name) for spec in catalog}
    states = ModelStates(catalog, locations, fetch, clock=lambda: now[0])
    await states.refresh()
    now[0] += 0.1
    await states.recheck(max_age_s=0.25)
    assert len(calls) == 1  # the view is 0.1 s old: no controller call
    now[0] += 1.0
    await asyncio.gather(*(states.recheck(max_age_s=0.25) for _ in range(20)))
    assert len(calls) == 2 and states.running("tiny-a") == 2  # twenty callers, one fresh read
