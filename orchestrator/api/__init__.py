"""The HTTP edge: FastAPI app factory, routes, SSE framing and error mapping (no ray)."""

from orchestrator.api.app import create_app
from orchestrator.api.backend import Backend, ChunkStream, Kind

__all__ = ["Backend", "ChunkStream", "Kind", "create_app"]
