"""A running Ray cluster as ``orchestrator status`` reads it: its nodes and Serve deployments.

:class:`RayCluster` imports Ray inside its methods, so building one is cheap and does no I/O;
:meth:`RayCluster.connect` does the connecting.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from orchestrator import ray_internals

CONNECT_TIMEOUT_S = 3.0

DeploymentKey = tuple[str, str]
"""(Serve application, deployment name)."""


class ClusterUnreachable(ConnectionError):
    """No Ray cluster can be reached; the message is one line for the user.

    A :class:`ConnectionError`, so callers that must not import Ray (this module's package
    does) can catch it by the built-in type.
    """


def reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Returns whether a TCP connection to host:port opens within ``timeout_s``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def host_and_port(address: str) -> tuple[str, int] | None:
    """Returns ``address`` (``host:port``, ``[v6]:port``) as (host, port), or None when it is not
    one (no port, or a port that is not a number from 0 to 65535)."""
    try:
        parts = urlsplit(f"//{address}")
        port = parts.port
    except ValueError:
        return None
    if parts.hostname is None or port is None:
        return None
    return parts.hostname, port


def is_loopback(host: str) -> bool:
    """Returns whether ``host`` is ``localhost`` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def deployments_from_serve_status(status: Any) -> dict[DeploymentKey, dict[str, Any]]:
    """Returns a ``ray.serve.status()`` result as ``{(application, deployment):
    {"status": "HEALTHY", "replica_states": {"RUNNING": 1}, "message": str}}`` (plain strings)."""

    def text(value: Any) -> str:
        return str(getattr(value, "value", value))

    return {
        (app_name, name): {
            "status": text(deployment.status),
            "replica_states": {text(state): int(count) for state, count in deployment.replica_states.items()},
            "message": deployment.message,
        }
        for app_name, app in status.applications.items()
        for name, deployment in app.deployments.items()
    }


class RayCluster:
    """This process's connection to a Ray cluster, in Serve's namespace.

    ``probe`` tells whether host:port accepts a TCP connection (:func:`reachable`; tests pass
    a fake to play a cluster that answers on some addresses only).
    """

    def __init__(self, probe: Callable[[str, int], bool] = reachable) -> None:
        self._probe = probe

    def bootstrap_address(self, address: str) -> str:
        """Returns the address to give ``ray.init``: ``auto`` found the way Ray finds it
        (``RAY_ADDRESS``, then the latest local cluster), checked to answer, so that a stale or
        wrong address fails at once instead of after Ray's retries (minutes).

        ``orchestrator serve``'s one-machine Ray listens on 127.0.0.1 only, while Ray resolves a
        loopback address to the machine's public one before connecting. When only loopback
        answers, Ray is told so (as ``orchestrator serve`` tells it, through
        ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), so it connects there and finds its raylet.

        Raises:
            ClusterUnreachable: no cluster is found, or nothing answers at its address.
        """
        from ray.util import get_node_ip_address

        try:
            target = ray_internals.ray_address_from_environment(address) if address == "auto" else address
        except ConnectionError as exc:
            raise ClusterUnreachable(f"cannot reach a Ray cluster at {address!r}: {_first_line(exc)}") from exc
        if target.startswith("ray://"):
            return target  # Ray Client: it has its own connection timeout
        parsed = host_and_port(target)
        shown = target if target == address else f"{address!r} ({target})"
        if parsed is None:
            raise ClusterUnreachable(f"cannot reach a Ray cluster at {shown}: not a host:port address")
        host, port = parsed
        if not is_loopback(host):
            if self._probe(host, port):
                return target
        elif self._probe(get_node_ip_address(), port):
            return target
        elif self._probe(host, port):
            ray_internals.connect_through_loopback()
            return target
        raise ClusterUnreachable(f"cannot reach a Ray cluster at {shown}: nothing answers there")

    def connect(self, address: str) -> None:
        """Connects this process to the Ray cluster at ``address`` (``auto``: the local one) in
        Serve's namespace.

        Raises:
            ClusterUnreachable: no cluster can be reached there.
        """
        import ray

        target = self.bootstrap_address(address)
        # ray.init turns token auth on from ~/.ray/auth_token (or RAY_AUTH_TOKEN) only for
        # address="auto". This passes the address it found, or the one given (which
        # `orchestrator serve` prints for its own token-auth cluster): use the token this
        # machine has, if any, as ray.init does for "auto".
        ray_internals.use_token_auth_if_available()
        try:
            ray.init(
                address=target,
                namespace="serve",
                logging_level=logging.ERROR,
                log_to_driver=False,
                configure_logging=False,
            )
        except Exception as exc:
            raise ClusterUnreachable(f"cannot reach a Ray cluster at {address!r}: {_first_line(exc)}") from exc

    def close(self) -> None:
        """Disconnects from Ray if connected (the cluster keeps running)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def nodes(self) -> list[dict[str, Any]]:
        """Returns ``ray.nodes()`` of the connected cluster (dead nodes included)."""
        import ray

        return list(ray.nodes())

    def serve_deployments(self) -> dict[DeploymentKey, dict[str, Any]]:
        """Returns the connected cluster's Serve deployments (see :func:`deployments_from_serve_status`).

        Raises:
            ClusterUnreachable: Serve's controller cannot be asked (the message says why, in one line).
        """
        from ray import serve

        try:
            return deployments_from_serve_status(serve.status())
        except Exception as exc:
            raise ClusterUnreachable(f"Serve status unavailable ({type(exc).__name__}: {exc})".splitlines()[0]) from exc

    def deployments(self) -> dict[DeploymentKey, dict[str, Any]]:
        """Returns :meth:`serve_deployments`; empty, after a warning on stderr, when Serve's
        controller cannot be asked."""
        try:
            return self.serve_deployments()
        except ClusterUnreachable as exc:
            print(f"warning: {exc}", file=sys.stderr)
            return {}
