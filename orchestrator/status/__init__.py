"""``orchestrator status``: per model, replicas, queues, KV-cache use, tokens/s and errors/min
of a running cluster (``orchestrator serve``'s local Ray or a ``serve deploy``ed cluster).

:mod:`~orchestrator.status.exposition` reads Ray's Prometheus text,
:mod:`~orchestrator.status.summary` turns two scrapes and Serve's deployments into rows,
:mod:`~orchestrator.status.display` prints them and :mod:`~orchestrator.status.command` runs
the command against an injected cluster and HTTP client. Nothing here imports Ray, httpx or
the Prometheus parser until the command runs, so ``orchestrator --help`` stays fast.
"""

from orchestrator.status.command import Cluster, StatusError, add_command, status_command
from orchestrator.status.summary import ModelStatus, summarize

__all__ = ["Cluster", "ModelStatus", "StatusError", "add_command", "status_command", "summarize"]
