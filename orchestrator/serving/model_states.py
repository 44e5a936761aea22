"""The router's view of every model's deployment, refreshed from Serve's controller.

Health probes, cold-start bounds and ``/health/ready`` read this view; none of them calls
an engine, so a model scaled to zero stays at zero however often it is probed. Serve's own
replica health checks (``ModelServer.check_health``) decide whether a replica counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.api.backend import ModelHealth
from orchestrator.catalog import Catalog

logger = logging.getLogger(__name__)

REFRESH_S = 2.0
_UNHEALTHY = {"UNHEALTHY", "DEPLOY_FAILED"}


@dataclass(frozen=True)
class DeploymentState:
    """One deployment as Serve's controller last reported it."""

    status: str
    running: int
    message: str = ""


def _running(replica_states: dict[Any, int]) -> int:
    # Keys are Serve's ReplicaState, a str enum.
    return sum(n for state, n in replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def serve_states(app_name: str) -> dict[str, DeploymentState]:
    """Returns every deployment of the application (one controller call, blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        name: DeploymentState(
            status=str(getattr(d.status, "value", d.status)),
            running=_running(d.replica_states),
            message=d.message or "",
        )
        for name, d in app.deployments.items()
    }


class ModelStates:
    """Per-model replica state, refreshed every ``period_s`` in the background.

    Args:
        catalog: the models (deployment names and min_replicas).
        fetch: returns the current deployment states by deployment name (blocking; run in a
            thread).
        period_s: refresh interval.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        catalog: Catalog,
        fetch: Callable[[], dict[str, DeploymentState]],
        period_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self._fetch = fetch
        self._period_s = period_s
        self._clock = clock
        self._states: dict[str, DeploymentState] = {}
        self.refreshed_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Reads the controller once (keeps the previous view if that fails)."""
        try:
            self._states = await asyncio.to_thread(self._fetch)
            self.refreshed_at = self._clock()
        except Exception:
            logger.warning("could not read deployment states from Serve", exc_info=True)

    def start(self) -> None:
        """Starts the background refresh (idempotent; needs a running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._period_s)

    def running(self, model: str) -> int | None:
        """Running replicas of a model, or None before the first refresh."""
        spec = self.catalog.resolve(model)
        state = self._states.get(spec.deployment_name)
        return None if state is None else state.running

    def health(self) -> dict[str, ModelHealth]:
        """Returns every model's readiness (see :class:`~orchestrator.api.backend.ModelHealth`)."""
        return {spec.name: self._one(spec.deployment_name, spec.autoscaling.min_replicas) for spec in self.catalog}

    def _one(self, deployment: str, min_replicas: int) -> ModelHealth:
        state = self._states.get(deployment)
        if state is None:
            return ModelHealth(ready=False, state="unknown", reason="no state from Serve yet")
        if state.status in _UNHEALTHY:
            return ModelHealth(ready=False, state="unhealthy", replicas=state.running, reason=state.message)
        if state.running > 0:
            return ModelHealth(ready=True, state="serving", replicas=state.running)
        if min_replicas == 0 and state.status != "UPSCALING":
            return ModelHealth(ready=True, state="scaled_to_zero", reason="a replica starts on the first request")
        return ModelHealth(
            ready=False, state="starting", reason=state.message or "no running replica yet (starting or unscheduled)"
        )


def current_app_name() -> str:
    """The Serve application of the calling replica."""
    from ray import serve

    return str(serve.get_replica_context().app_name)


def states_fetcher(app_name: str) -> Callable[[], dict[str, DeploymentState]]:
    """Returns a fetch function for :class:`ModelStates` bound to one application."""

    def fetch() -> dict[str, Any]:
        return serve_states(app_name)

    return fetch
