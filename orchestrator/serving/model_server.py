"""The ModelServer deployment: one per catalog model, wrapping one engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from orchestrator.catalog import ModelSpec
from orchestrator.engine.base import Engine, Kind
from orchestrator.engine.batching import batch_frames
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.protocol.tokens import TokensOp
from orchestrator.serving.adapters import CacheFactory, Renamer, ReplicaAdapters, serve_multiplexed
from orchestrator.serving.log_buffers import LogBufferTargets
from orchestrator.settings import Settings

# Sent with 529: a shed request may retry soon, when a running request has finished.
SHED_RETRY_AFTER_S = 1

logger = logging.getLogger(__name__)


def _vllm_engine(spec: ModelSpec, settings: Settings) -> Engine:
    from orchestrator.engine.vllm_engine import VLLMEngine
    from orchestrator.serving.telemetry import RaySink

    return VLLMEngine(spec, settings, RaySink())


class ModelServer:
    """Serves one catalog model and its LoRA adapters (a request whose ``model`` names one
    runs it, loaded on first use: :mod:`orchestrator.serving.adapters`). The constructor does
    no I/O; :meth:`start` loads the engine.

    Args:
        spec: the catalog entry as a plain dict.
        settings: settings as a plain dict.
        engine_factory: builds the engine (vLLM by default; tests may inject another).
        adapter_cache: the bounded LRU of LoRA adapters (Serve's multiplexing by default).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        settings: dict[str, Any],
        engine_factory: Callable[[ModelSpec, Settings], Engine] = _vllm_engine,
        adapter_cache: CacheFactory = serve_multiplexed,
    ) -> None:
        self.spec = ModelSpec.model_validate(spec)
        # A model replica needs no secret: any its environment supplies is dropped.
        self.settings = Settings(**settings).without_secrets()
        # vLLM's logging setup closes Serve's log handlers; start() mends them (log_buffers.py).
        self._log_targets = LogBufferTargets()
        self.engine = engine_factory(self.spec, self.settings)
        self.adapters = ReplicaAdapters(self.spec, self.engine, adapter_cache)
        self._batch_s = self.settings.stream_batch_ms / 1000.0
        self._batches_per_s = self.settings.stream_batches_per_second
        # Requests in this replica (running in the engine or waiting for a slot), counted
        # here because the engine's own figures lag by a step.
        self.in_flight = 0
        self.streams = 0  # of which streaming

    async def start(self) -> None:
        """Loads the weights and starts the engine."""
        await self.engine.start()
        if self._log_targets.restore():
            logger.info("restored the log handlers vLLM's logging setup closed")
        logger.info("model %s ready", self.spec.name)

    def _admit(self) -> None:
        """Sheds the request when the engine's queue is full.

        Raises:
            OrchestratorError: ``provider_overloaded`` (529, ``Retry-After``) when this replica
                already holds as many requests as its engine runs at once plus the catalog's
                ``overload.max_waiting_per_replica``.
        """
        bound = self.engine.load().capacity + self.spec.overload.max_waiting_per_replica
        if self.in_flight >= bound:
            raise OrchestratorError(
                ErrorCode.PROVIDER_OVERLOADED,
                f"Model {self.spec.name} is overloaded ({self.in_flight} requests queued or running per replica); "
                "retry shortly.",
                headers={"Retry-After": str(SHED_RETRY_AFTER_S)},
            )

    async def complete(
        self, kind: Kind, body: dict[str, Any], request_id: str, adapter_path: str | None = None
    ) -> dict[str, Any]:
        """Returns the whole response body; raises ``OrchestratorError`` on failure (529 when
        shed). ``adapter_path``: the folder of an adapter added at run time that ``body``
        names (the catalog's own are known here)."""
        self._admit()
        self.in_flight += 1
        try:
            async with self.adapters.using(body.get("model"), adapter_path) as served:
                if served is None:
                    return await self.engine.complete(kind, body, request_id)
                result = await self.engine.complete(kind, {**body, "model": served}, request_id)
                return {**result, "model": body["model"]}  # vLLM names the adapter by its id
        finally:
            self.in_flight -= 1

    def batch_interval_s(self) -> float:
        """How far apart one stream's batches are sent now: the streams in flight share
        ``stream_batches_per_second``, at most ``stream_batch_ms`` apart. A lone stream
        (at ordinary token rates) gets every chunk as it comes."""
        return min(self._batch_s, self.streams / self._batches_per_s)

    async def stream(
        self, kind: Kind, body: dict[str, Any], request_id: str, adapter_path: str | None = None, *, batch: bool = True
    ) -> AsyncGenerator[list[str]]:
        """Yields batches of SSE frames: the first token at once, then batches whose interval
        grows with the streams in flight (:meth:`batch_interval_s`); without ``batch``, every
        frame alone (for a caller in this process: nothing crosses a handle). ``adapter_path``
        as for :meth:`complete`.

        Cancelling the caller (client disconnect) closes this generator, which aborts the
        request inside the engine. Raises 529 ``provider_overloaded`` before the first batch
        when shed, and the engine's error when the adapter it names cannot be loaded.
        """
        self._admit()
        self.in_flight += 1
        self.streams += 1
        try:
            eager = 1 if kind == "completion" else 2  # chat's first frame is the role alone
            async with self.adapters.using(body.get("model"), adapter_path) as served:
                if served is None:
                    frames = self.engine.stream(kind, body, request_id)
                    rename = None
                else:
                    frames = self.engine.stream(kind, {**body, "model": served}, request_id)
                    rename = Renamer(served, body["model"])  # vLLM names the adapter by its id
                async for frames_out in batch_frames(frames, self.batch_interval_s if batch else 0.0, eager=eager):
                    yield frames_out if rename is None else rename(frames_out)
        finally:
            self.in_flight -= 1
            self.streams -= 1

    async def count_tokens(self, body: dict[str, Any]) -> int:
        """Returns the prompt tokens of an Anthropic Messages body under the model's chat
        template (never shed: it runs no generation)."""
        return await self.engine.count_tokens(body)

    async def tokens(self, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        """Returns vLLM's ``/tokenize`` or ``/detokenize`` answer (never shed: it runs no
        generation)."""
        return await self.engine.tokens(op, body)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler gets from this replica (serving/autoscaling.py reads it):
        the engine's waiting and running requests, KV-cache use and batch capacity."""
        load = self.engine.load()
        return {
            "waiting": float(load.waiting),
            "running": float(load.running),
            "kv_cache": load.kv_cache_usage,
            "capacity": float(load.capacity),
        }

    async def health(self) -> bool:
        """Returns True when the engine answers its health check."""
        try:
            await self.engine.check_health()
        except Exception:
            return False
        return True

    async def check_health(self) -> None:
        """Serve's replica health check: raising marks the replica unhealthy, and Serve
        replaces it (a dead engine cannot recover in place)."""
        await self.engine.check_health()

    def num_unfinished_requests(self) -> int:
        """Returns the requests waiting or running in the engine."""
        return self.engine.num_unfinished_requests()

    async def shutdown(self) -> None:
        await self.engine.shutdown()


class ServedModelServer(ModelServer):
    """What Serve instantiates: Serve awaits an async constructor before routing traffic
    to the replica, so the engine is started there."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
        super().__init__(*args, **kwargs)
        await self.start()

    async def __del__(self) -> None:  # type: ignore[misc]
        # Serve calls __del__ on graceful replica shutdown; stop the engine processes.
        await self.shutdown()
