"""A running cluster read through Ray's dashboard over HTTP, without joining the cluster.

Serve's deployments come from ``GET /api/serve/applications/``, Serve's REST API (what
``serve status`` reads); the metrics endpoints from ``GET /api/prometheus/sd``, the dashboard's
Prometheus HTTP service discovery. A cluster with token authentication gets the
token Ray's clients use (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or
``~/.ray/auth_token``) as a bearer token.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

Key = tuple[str, str]


class DashboardError(ConnectionError):
    """The dashboard cannot be reached or did not answer as one; the message is one line naming its address."""


def auth_token(environ: Mapping[str, str], home: Path) -> str | None:
    """Returns the Ray token found as Ray's clients find it, or None."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else home / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def nodes_from_targets(body: Any) -> list[dict[str, Any]]:
    """Returns the ``host:port`` targets of a Prometheus HTTP service discovery answer
    (``[{"targets": [...], "labels": {...}}]``, what ``/api/prometheus/sd`` gives: every alive
    node's metrics export address, and the dashboard's and autoscaler's own when they export)
    as alive nodes with the ``ray.nodes()`` fields the command reads.

    Raises:
        ValueError: the answer is not a list of target groups, or a target has no numeric port.
    """
    if not isinstance(body, list):
        raise ValueError("not a list of target groups")
    nodes = []
    for group in body:
        for target in group.get("targets", []):
            host, _, port = str(target).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"not a host:port target: {target!r}")
            nodes.append({"Alive": True, "NodeManagerAddress": host.strip("[]"), "MetricsExportPort": int(port)})
    return nodes


def deployments_from_details(body: Mapping[str, Any]) -> dict[Key, dict[str, Any]]:
    """Returns a ``/api/serve/applications/`` answer (Serve's ``ServeInstanceDetails``) as
    ``{(application, deployment): {"status": str, "replica_states": {state: count}, "message": str}}``,
    the shape :meth:`orchestrator.serving.cluster.RayCluster.deployments` gives."""
    found: dict[Key, dict[str, Any]] = {}
    for app_name, app in (body.get("applications") or {}).items():
        for name, deployment in (app.get("deployments") or {}).items():
            states: dict[str, int] = {}
            for replica in deployment.get("replicas") or []:
                states[replica["state"]] = states.get(replica["state"], 0) + 1
            found[(app_name, name)] = {
                "status": deployment.get("status"),
                "replica_states": states,
                "message": deployment.get("message", ""),
            }
    return found


def _reason(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Dashboard:
    """A cluster as :class:`orchestrator.status.command.Cluster` needs it, read from the
    dashboard at the URL given to :meth:`connect` with the client ``http`` makes (called
    there: a client of its own, closed by :meth:`close`); ``token`` is sent as a bearer token."""

    def __init__(self, http: Callable[[], httpx.Client], token: str | None = None) -> None:
        self._make_client = http
        self._token = token
        self._client: httpx.Client | None = None
        self._url = ""

    def _get(self, path: str) -> Any:
        """Returns the JSON body of GET ``path``.

        Raises:
            DashboardError: no answer, a status other than 200, or a body that is not JSON.
        """
        import httpx

        assert self._client is not None, "connect first"
        url = self._url + path
        try:
            response = self._client.get(url)
        except httpx.HTTPError as exc:
            raise DashboardError(f"cannot reach Ray's dashboard at {self._url}: {_reason(exc)}") from exc
        if response.status_code != 200:
            reason = (response.text.strip().splitlines() or [response.reason_phrase])[0][:200]
            raise DashboardError(
                f"Ray's dashboard at {self._url} answered {response.status_code} to GET {path}: {reason}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise DashboardError(f"Ray's dashboard at {self._url} answered GET {path} with no JSON") from exc

    def connect(self, address: str) -> None:
        """Checks that the dashboard at ``address`` (``http://host:port``; a bare ``host:port``
        is taken as http) answers ``GET /api/version``.

        Raises:
            DashboardError: it does not.
        """
        self._url = (address if "://" in address else f"http://{address}").rstrip("/")
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._client = self._make_client()
        self._client.headers.update(headers)
        self._get("/api/version")

    def close(self) -> None:
        """Closes the client :meth:`connect` made."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def nodes(self) -> list[dict[str, Any]]:
        """Returns the cluster's metrics endpoints as alive nodes (see :func:`nodes_from_targets`).

        Raises:
            DashboardError: the dashboard did not answer, or not with a target list.
        """
        body = self._get("/api/prometheus/sd")
        try:
            return nodes_from_targets(body)
        except (ValueError, AttributeError) as exc:
            raise DashboardError(f"Ray's dashboard at {self._url} gave no metrics targets: {exc}") from exc

    def deployments(self) -> dict[Key, dict[str, Any]]:
        """Returns Serve's deployments (see :func:`deployments_from_details`); empty, after a
        warning on stderr, when the dashboard cannot give them."""
        try:
            return deployments_from_details(self._get("/api/serve/applications/"))
        except (DashboardError, KeyError, TypeError, AttributeError) as exc:
            print(f"warning: Serve status unavailable ({exc})".splitlines()[0], file=sys.stderr)
            return {}


def dashboard_from_environment(http: Callable[[], httpx.Client]) -> Dashboard:
    """Returns a :class:`Dashboard` with the token this machine has for Ray, if any."""
    return Dashboard(http, auth_token(os.environ, Path.home()))
