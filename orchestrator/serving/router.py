"""The Router deployment: the FastAPI ingress that dispatches to ModelServer replicas.

It never imports vllm. Only plain data crosses the handles: the request body (dict), the
request id, and back batches of SSE frames (lists of str) or the response dict.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestrator.api import Kind, create_app
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.serving.gateway_server import remote_gateway
from orchestrator.settings import Settings

HEALTH_TIMEOUT_S = 5.0


class Router:
    """Implements :class:`orchestrator.api.Backend` over Serve deployment handles.

    Args:
        specs: catalog entries as plain dicts (``ModelSpec.model_dump``).
        settings: settings as a plain dict.
        handles: model display name -> the ModelServer deployment handle.
        gateway: the gateway deployment's handle (None: open mode, no keys).
    """

    def __init__(
        self,
        specs: list[dict[str, Any]],
        settings: dict[str, Any],
        handles: dict[str, DeploymentHandle],
        gateway: DeploymentHandle | None = None,
    ) -> None:
        self.catalog = Catalog([ModelSpec.model_validate(s) for s in specs])
        self.settings = Settings(**settings)
        self.gateway = None if gateway is None else remote_gateway(gateway)
        self._complete = {name: h.options(method_name="complete") for name, h in handles.items()}
        # Streams come back as a generator; each item is one batch of SSE frames.
        self._stream = {name: h.options(method_name="stream", stream=True) for name, h in handles.items()}
        self._health = {name: h.options(method_name="health") for name, h in handles.items()}

    def __serve_build_asgi_app__(self) -> Any:
        # Serve's proxy assigns X-Request-Id (keeping a sane client one) and echoes it.
        return create_app(self.catalog, self, self.settings, gateway=self.gateway, echo_request_id=False)

    async def complete(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._complete[spec.name].remote(kind, body, request_id)
        return result

    def stream(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> Any:
        return self._stream[spec.name].remote(kind, body, request_id)

    async def health(self) -> dict[str, bool]:
        async def one(name: str) -> bool:
            try:
                return bool(await asyncio.wait_for(self._health[name].remote(), HEALTH_TIMEOUT_S))
            except Exception:
                return False

        names = list(self._health)
        return dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))


RouterDeployment = serve.ingress()(Router)
