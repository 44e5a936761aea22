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

from orchestrator.api.backend import ModelHealth
from orchestrator.catalog import Catalog
from orchestrator.serving.cluster import DeploymentKey as Location
from orchestrator.serving.cluster import deployments_from_serve_status

logger = logging.getLogger(__name__)

REFRESH_S = 2.0
# How old the view may be when a decision needs it fresh (:meth:`ModelStates.recheck`).
RECHECK_S = 0.25
_UNHEALTHY = {"UNHEALTHY", "DEPLOY_FAILED"}


@dataclass(frozen=True)
class DeploymentState:
    """One deployment as Serve's controller last reported it."""

    status: str
    running: int
    message: str = ""


def serve_states() -> dict[Location, DeploymentState]:
    """Returns every deployment of every application (one controller call, blocking)."""
    from ray import serve

    return {
        key: DeploymentState(
            status=found["status"], running=found["replica_states"].get("RUNNING", 0), message=found["message"] or ""
        )
        for key, found in deployments_from_serve_status(serve.status()).items()
    }


class ModelStates:
    """Per-model replica state, refreshed every ``period_s`` in the background.

    Args:
        catalog: the models (min_replicas).
        locations: each model's deployment, by display name.
        fetch: returns the current deployment states by location (blocking; run in a
            thread).
        period_s: refresh interval.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        catalog: Catalog,
        locations: dict[str, Location],
        fetch: Callable[[], dict[Location, DeploymentState]],
        period_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self._locations = locations
        self._fetch = fetch
        self._period_s = period_s
        self._clock = clock
        self._states: dict[Location, DeploymentState] = {}
        self.refreshed_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._recheck: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        """Reads the controller once (keeps the previous view if that fails)."""
        try:
            self._states = await asyncio.to_thread(self._fetch)
            self.refreshed_at = self._clock()
        except Exception:
            logger.warning("could not read deployment states from Serve", exc_info=True)

    async def recheck(self, max_age_s: float = RECHECK_S) -> None:
        """Refreshes the view now unless it is younger than ``max_age_s``. Callers at the same
        time share one controller call, so a burst makes at most one call per refresh."""
        if self.refreshed_at is not None and self._clock() - self.refreshed_at < max_age_s:
            return
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.ensure_future(self.refresh())
        # A caller cancelled while waiting leaves the shared call to the others.
        await asyncio.shield(self._recheck)

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
        state = self._states.get(self._locations[spec.base_name])
        return None if state is None else state.running

    def health(self) -> dict[str, ModelHealth]:
        """Returns every model's readiness (see :class:`~orchestrator.api.backend.ModelHealth`)."""
        return {s.name: self._one(self._locations[s.name], s.autoscaling.min_replicas) for s in self.catalog}

    def _one(self, location: Location, min_replicas: int) -> ModelHealth:
        state = self._states.get(location)
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
