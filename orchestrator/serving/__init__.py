"""Ray Serve deployments: the only package that imports ray.

``orchestrator.serving:build_app`` is the import path for Serve configs.
"""

from orchestrator.serving.builder import build_app

__all__ = ["build_app"]
