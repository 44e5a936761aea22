"""Serve replicas' gRPC servers on loopback, for ``orchestrator serve``'s one-machine cluster.

Every Serve 2.60 replica starts a gRPC server for handle streams (``_on_initialized`` in
``ray/serve/_private/replica.py``) on ``[::]:0``: every interface, and no setting chooses
the address (ray-project/ray#64544 asks for a port range; nothing asks for a host yet).
Other replicas and proxies reach it at the replica's Ray node address, which ``orchestrator
serve`` sets to 127.0.0.1, so binding it there loses nothing.

:func:`bind_replicas_to_loopback` is a Ray worker-process setup hook (public:
``ray.init(runtime_env={"worker_process_setup_hook": SETUP_HOOK})``; Ray runs it in each
worker before any actor starts there). The private name it replaces is wrapped in
:func:`orchestrator.ray_internals.wrap_replica_grpc_bind`; should a Ray upgrade rename it, the
hook warns instead of failing the worker, tests/unit/test_ray_internals.py fails, and so does
the serve-command integration test, which lists every listening socket.
"""

from __future__ import annotations

import logging

from orchestrator.ray_internals import wrap_replica_grpc_bind

logger = logging.getLogger(__name__)

SETUP_HOOK = "orchestrator.grpc_loopback.bind_replicas_to_loopback"
_WILDCARDS = ("[::]", "0.0.0.0", "::", "")


def loopback_address(address: str) -> str:
    """Returns a gRPC ``host:port`` bind address with a wildcard host replaced by 127.0.0.1."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in _WILDCARDS else address


def bind_replicas_to_loopback() -> bool:
    """Makes this worker's Serve replicas bind their gRPC server to 127.0.0.1. Returns whether
    it did (False, after a warning, if Serve no longer binds through the wrapped name)."""
    if wrap_replica_grpc_bind(loopback_address):
        return True
    logger.warning("Serve's replica module has no add_port_to_grpc_server: its gRPC server keeps Serve's address")
    return False
