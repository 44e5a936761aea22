"""LoRA adapters on one ModelServer replica: loaded on first use, at most
``lora.max_loaded_per_replica`` held, the least recently used unloaded past that.

Which adapters a replica holds, and the LRU order, are Ray Serve's model multiplexing
(``serve.multiplexed``): the replica reports the adapters it holds to Serve, and a router
handle called with ``multiplexed_model_id`` prefers replicas that hold that id. An adapter
that Serve evicts while requests still run on it is unloaded when the last of them ends.

An adapter is held under its :func:`adapter_id` (its name and a digest of its folder), the
multiplexed id and vLLM's LoRA name alike: an adapter removed and added again under the
same name from another folder is another id, so its requests load the new weights while
the old ones wait for the LRU to evict them.
"""

from __future__ import annotations

import hashlib
import json
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


def adapter_id(name: str, path: str) -> str:
    """Returns the id the adapter ``name`` with its files in folder ``path`` is held under on
    a replica: Serve's multiplexed model id (the router sends the same) and vLLM's LoRA name."""
    return f"{name}@{hashlib.sha256(path.encode()).hexdigest()[:12]}"


class Renamer:
    """Gives stream frames of an adapter's request its display name: vLLM names the model of
    each chunk by the LoRA name it runs, the adapter's id (``"model":"<id>"`` in its compact
    JSON)."""

    def __init__(self, served: str, name: str) -> None:
        self._old = '"model":' + json.dumps(served)
        self._new = '"model":' + json.dumps(name)

    def __call__(self, frames: list[str]) -> list[str]:
        return [f.replace(self._old, self._new, 1) for f in frames]


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

    def __init__(self, owner: ReplicaAdapters, served: str) -> None:
        self.served = served
        self._owner = owner
        # An instance attribute, so only the cache calls it (the garbage collector looks up
        # __del__ on the class, which has none).
        self.__del__ = self._evict

    async def _evict(self) -> None:
        await self._owner.evict(self.served)


class ReplicaAdapters:
    """The adapters of one replica's model. No I/O until a request names an adapter.

    Args:
        spec: the base model's catalog entry (its ``adapters`` say where each one's files are).
        engine: the replica's engine.
        cache: wraps the loader into the bounded LRU (Serve's multiplexing by default).
    """

    def __init__(self, spec: ModelSpec, engine: Engine, cache: CacheFactory = serve_multiplexed) -> None:
        self.catalog_paths = {a.name: str(a.source.path) for a in spec.adapters}
        self._paths: dict[str, str] = {}  # every adapter id asked for here: its folder (a few bytes each)
        self._engine = engine
        self._cache_factory = cache
        self._capacity = spec.lora.max_loaded_per_replica if spec.lora is not None else 0
        self._cache: Loader | None = None
        self.loaded: dict[str, _State] = {}  # by adapter id: in the engine, with the requests using each

    async def _load(self, served: str) -> _Held:
        state = self.loaded.get(served)
        if state is not None:
            state.evicted = False  # evicted while in use and asked for again: it never left
        else:
            await self._engine.load_adapter(served, self._paths[served])
            self.loaded[served] = _State()
        return _Held(self, served)

    async def evict(self, served: str) -> None:
        """Unloads the adapter of id ``served`` now, or when its last request ends."""
        state = self.loaded.get(served)
        if state is None:
            return
        state.evicted = True
        if state.users == 0:
            await self._unload(served)

    async def _unload(self, served: str) -> None:
        del self.loaded[served]
        await self._engine.unload_adapter(served)

    def _folder(self, model: Any, path: str | None) -> str | None:
        if not isinstance(model, str):
            return None
        return path if path is not None else self.catalog_paths.get(model)

    @asynccontextmanager
    async def using(self, model: Any, path: str | None = None) -> AsyncIterator[str | None]:
        """Holds the adapter named ``model`` loaded while the block runs and yields the name
        the engine knows it by (its :func:`adapter_id`): one of the catalog entry's adapters,
        or, with ``path``, one added at run time (its folder). Yields None, loading nothing,
        for any other name (the base model's requests).

        Raises:
            OrchestratorError: the engine cannot load the adapter.
        """
        folder = self._folder(model, path)
        if folder is None:
            yield None
            return
        served = adapter_id(model, folder)
        self._paths[served] = folder
        if self._cache is None:
            self._cache = self._cache_factory(self._load, self._capacity)
        await self._cache(served)
        state = self.loaded[served]
        state.users += 1
        try:
            yield served
        finally:
            state.users -= 1
            if state.users == 0 and state.evicted and self.loaded.get(served) is state:
                await self._unload(served)
