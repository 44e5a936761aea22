"""vLLM orchestrator: many LLMs behind one OpenAI-compatible API on Ray Serve.

The public surface is small and import-light (no ray, no vllm):
catalog loading, the error taxonomy and settings. The Serve application builder is
``orchestrator.serving:build_app``.
"""

from orchestrator.catalog import Catalog, CatalogError, ModelSpec, load_catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.settings import Settings

__all__ = [
    "Catalog",
    "CatalogError",
    "ErrorCode",
    "ModelSpec",
    "OrchestratorError",
    "Settings",
    "load_catalog",
]
__version__ = "0.1.0"
