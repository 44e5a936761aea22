"""Ray Serve deployments: the only package that imports ray.

The import paths for Serve configs: ``orchestrator.serving:build_app`` (the whole catalog in
one application) and the three of :mod:`orchestrator.layout` (one application per model).
"""

from orchestrator.serving.builder import build_app, build_gateway_app, build_model_app, build_router_app

__all__ = ["build_app", "build_gateway_app", "build_model_app", "build_router_app"]
