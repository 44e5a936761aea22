"""LoRA adapters on one ModelServer replica: loaded on first use, at most
``lora.max_loaded_per_replica`` held, the least recently used unloaded past that.

Which adapters a replica holds, and the LRU order, are Ray Serve's model multiplexing
(``serve.multiplexed``): the replica reports the adapters it holds to Serve, and a router
handle called with ``multiplexed_model_id`` prefers replicas that hold that id. An adapter
that Serve evicts while requests still run on it is unloaded when the last of them ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator.catalog import ModelSpec
from orchestrator.engine.base import Engine

Loader = Callable[[str], Awaitable[Any]]
"""Returns the held adapter of a name, loading it first if the replica does not hold it."""

CacheFactory = Callable[[Loader, int], Loader]
"""Wraps a loader into a bounded LRU of ``capacity`` adapters. Evicting one awaits the held
object's ``__del__``."""


def serve_multiplexed(load: Loader, capacity: int) -> Loader:
    """Ray Serve's multiplexing as the replica's adapter cache (only inside a replica)."""
    from ray import serve

    async def held(name: str) -> Any:
        return await load(name)

    wrapped: Loader = serve.multiplexed(max_num_models_per_replica=capacity)(held)
    return wrapped


@dataclass
class _State:
    users: int = 0
    evicted: bool = False


class _Held:
    """What the cache holds for one adapter; evicting it unloads the adapter once unused."""

    def __init__(self, owner: ReplicaAdapters, name: str) -> None:
        self.name = name
        self._owner = owner
        # An instance attribute, so only the cache calls it (the garbage collector looks up
        # __del__ on the class, which has none).
        self.__del__ = self._evict

    async def _evict(self) -> None:
        await self._owner.evict(self.name)


class ReplicaAdapters:
    """The adapters of one replica's model. No I/O until a request names an adapter.

    Args:
        spec: the base model's catalog entry (its ``adapters`` say where each one's files are).
        engine: the replica's engine.
        cache: wraps the loader into the bounded LRU (Serve's multiplexing by default).
    """

    def __init__(self, spec: ModelSpec, engine: Engine, cache: CacheFactory = serve_multiplexed) -> None:
        self.paths = {a.name: str(a.source.path) for a in spec.adapters}
        self._engine = engine
        self._cache_factory = cache
        self._capacity = spec.lora.max_loaded_per_replica if spec.lora is not None else 0
        self._cache: Loader | None = None
        self.loaded: dict[str, _State] = {}  # in the engine, with the requests using each

    async def _load(self, name: str) -> _Held:
        state = self.loaded.get(name)
        if state is not None:
            state.evicted = False  # evicted while in use and asked for again: it never left
        else:
            await self._engine.load_adapter(name, self.paths[name])
            self.loaded[name] = _State()
        return _Held(self, name)

    async def evict(self, name: str) -> None:
        """Unloads the adapter now, or when its last request ends."""
        state = self.loaded.get(name)
        if state is None:
            return
        state.evicted = True
        if state.users == 0:
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        del self.loaded[name]
        await self._engine.unload_adapter(name)

    @asynccontextmanager
    async def using(self, model: Any, path: str | None = None) -> AsyncIterator[None]:
        """Holds the adapter named ``model`` loaded while the block runs: one of the catalog
        entry's, or, with ``path``, one added at run time (its folder); nothing for any other
        name (the base model's requests).

        Raises:
            OrchestratorError: the engine cannot load the adapter.
        """
        if path is not None and isinstance(model, str):
            self.paths[model] = path
        if model not in self.paths:
            yield
            return
        if self._cache is None:
            self._cache = self._cache_factory(self._load, self._capacity)
        await self._cache(model)
        state = self.loaded[model]
        state.users += 1
        try:
            yield
        finally:
            state.users -= 1
            if state.users == 0 and state.evicted and self.loaded.get(model) is state:
                await self._unload(model)
