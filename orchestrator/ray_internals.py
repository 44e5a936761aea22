"""Every private or internal Ray interface the orchestrator relies on, one small function each.

Ray 2.60 has no public API for these; each function names the public one it waits for. The
rest of the package calls only these functions, so a Ray upgrade that moves one breaks here,
and ``tests/unit/test_ray_internals.py`` checks the installed Ray still provides each (the
name, the parameters passed, the shape used), failing with a message that names the use.

Nothing from Ray is imported at module level: every function imports what it touches when
called, so importing this module stays as cheap as ``orchestrator --help`` needs.

The environment variables the orchestrator sets or names for Ray are listed in
:data:`INTERNAL_VARIABLES` (read only by Ray's private constants modules; the test sets each
and checks the constant it moves) and :data:`DOCUMENTED_VARIABLES` (named in Ray's docs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle
    from ray.serve.schema import ServeDeploySchema

_SERVE_CONSTANTS = "ray.serve._private.constants"
_RAY_CONSTANTS = "ray._private.ray_constants"

INTERNAL_VARIABLES: dict[str, tuple[str, str]] = {
    # variable: (the private module that reads it, the constant it sets there)
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": (_SERVE_CONSTANTS, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"),
    "RAY_SERVE_HAPROXY_BINARY_PATH": (_SERVE_CONSTANTS, "RAY_SERVE_HAPROXY_BINARY_PATH"),
    "RAY_SERVE_HAPROXY_LOG_TARGET": (_SERVE_CONSTANTS, "RAY_SERVE_HAPROXY_LOG_TARGET"),
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": (_SERVE_CONSTANTS, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"),
    "RAY_SERVE_HAPROXY_STATS_PORT": (_SERVE_CONSTANTS, "RAY_SERVE_HAPROXY_STATS_PORT"),
    "RAY_SERVE_HAPROXY_METRICS_PORT": (_SERVE_CONSTANTS, "RAY_SERVE_HAPROXY_METRICS_PORT"),
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": (_SERVE_CONSTANTS, "RAY_SERVE_HAPROXY_TUNE_BUFSIZE"),
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": (_SERVE_CONSTANTS, "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"),
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": (_SERVE_CONSTANTS, "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"),
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": (_RAY_CONSTANTS, "ENABLE_RAY_CLUSTER"),
}
"""Environment variables Ray reads only in its private constants modules (no Ray document
names them); waiting for Serve and Ray options that take these values."""

DOCUMENTED_VARIABLES = frozenset(
    {
        "RAY_ADDRESS",  # ray.init, `ray` CLI
        "RAY_DASHBOARD_ADDRESS",  # `ray job`, `serve` CLI
        "RAY_AUTH_MODE",  # Ray token authentication
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_SERVE_ENABLE_HA_PROXY",  # Serve's high-throughput guide
        "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    }
)
"""Environment variables Ray's documentation names."""


def init_options(*, node_ip_address: str, metrics_export_port: int | None) -> dict[str, Any]:
    """Returns the ``ray.init`` keyword arguments that start a local node on ``node_ip_address``
    with its metrics export on ``metrics_export_port`` (None: Ray picks one).

    Uses ``ray.init``'s hidden options ``_node_ip_address`` and ``_metrics_export_port`` ("unstable
    and may change without notice"). Waits for: public ``ray.init`` parameters for what
    ``ray start --node-ip-address --metrics-export-port`` take.
    """
    return {"_node_ip_address": node_ip_address, "_metrics_export_port": metrics_export_port}


def deploy_config(config: ServeDeploySchema) -> None:
    """Starts Serve with the config's proxy location and HTTP options and applies the config
    (its applications become the goal state), as ``serve run CONFIG`` does.

    Uses ``ray.serve._private.api.serve_start`` and the client's ``deploy_apps``. Waits for: a
    Python API that applies a Serve config; the public ways (``serve deploy``, the dashboard's
    ``PUT /api/serve/applications/``) need the dashboard, which ``orchestrator serve`` leaves off.
    """
    from ray.serve._private import api

    client = api.serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    client.deploy_apps(config)


def deployment_handle(deployment: str, app: str) -> DeploymentHandle:
    """Returns a handle to ``deployment`` of application ``app`` without asking Serve's controller
    whether it exists yet (a call waits for its replicas like any cold deployment's).

    Uses ``serve.get_deployment_handle(..., _check_exists=False)`` (a DeveloperAPI with an
    internal flag). Waits for: a public way to name a deployment of an application that is
    still being built.
    """
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app, _check_exists=False)


def dashboard_agent_port() -> int:
    """Returns the HTTP port Ray's dashboard agent listens on by default.

    Reads ``ray._private.ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT``. Waits for: the
    default being published (``ray start --dashboard-agent-listen-port`` documents only the flag).
    """
    from ray._private import ray_constants

    return int(ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)


def serve_constant(name: str) -> int:
    """Returns Serve's port setting ``name`` (one of :data:`INTERNAL_VARIABLES`' Serve constants)
    as Serve read it from the environment when first imported.

    Reads ``ray.serve._private.constants``. Waits for: Serve's HTTP options naming the ports of its
    fallback proxy, HAProxy's stats and metrics listeners and the replicas' direct-ingress range.

    Raises:
        KeyError: ``name`` is not one of the Serve constants listed in :data:`INTERNAL_VARIABLES`.
    """
    module, attribute = INTERNAL_VARIABLES[name]
    if module != _SERVE_CONSTANTS:
        raise KeyError(name)
    from ray.serve._private import constants

    return int(getattr(constants, attribute))


def ray_address_from_environment(address: str) -> str:
    """Returns the cluster address ``ray.init(address)`` would connect to: ``RAY_ADDRESS`` if
    set, else ``address`` unless it is ``auto``, else the latest cluster started on this machine.

    Uses ``ray._private.services.get_ray_address_from_environment``. Waits for: a public lookup
    of the address ``ray.init("auto")`` resolves (it resolves it internally).

    Raises:
        ConnectionError: ``auto`` and no cluster runs on this machine.
    """
    from ray._private import services

    return str(services.get_ray_address_from_environment(address, None))


def connect_through_loopback() -> None:
    """Makes Ray treat this machine as a one-machine cluster (node address 127.0.0.1) from now
    on, in this process and the processes it starts, as ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    does when set before Ray is imported.

    Sets that variable and overwrites ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, which Ray
    read at import. Waits for: a ``ray.init`` option to connect through a loopback address
    instead of resolving it to the machine's public one.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def use_token_auth_if_available() -> bool:
    """Turns Ray's token authentication on for this process when ``RAY_AUTH_MODE`` is unset and
    a token is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), as
    ``ray.init(address="auto")`` does itself. Returns whether token authentication is on.

    Uses ``ray._private.authentication.authentication_token_setup.maybe_enable_token_auth_if_token_available``.
    Waits for: a ``ray.init`` option to use the token for an explicit address; the public
    ``RAY_AUTH_MODE=token`` counts only when set before Ray is imported.
    """
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))


def wrap_replica_grpc_bind(rewrite: Callable[[str], str]) -> bool:
    """Makes every Serve replica started in this process from now on bind its gRPC server (handle
    streams) to ``rewrite(address)`` instead of Serve's ``[::]:0``. Returns False when Serve no
    longer binds through the wrapped name; wrapping twice wraps once.

    Replaces ``ray.serve._private.replica.add_port_to_grpc_server``, the name the replica module
    binds with. Waits for: a bind address for that server in Serve's options
    (ray-project/ray#64544 and its open pull request #64623 add a port range; nothing asks
    for a host yet).
    """
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        return False
    if getattr(bind, "rewritten", False):
        return True

    def rewritten(server: Any, address: str) -> int:
        return int(bind(server, rewrite(address)))

    rewritten.rewritten = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = rewritten
    return True
