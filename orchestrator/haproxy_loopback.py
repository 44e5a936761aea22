"""The former module of ``orchestrator-haproxy``, now :mod:`orchestrator.ingress`: an install
made before the rename has a console script that still imports ``main`` from here."""

from orchestrator.ingress import main

__all__ = ["main"]
