"""``orchestrator serve``: a local Ray, the catalog prepared and deployed, Ctrl-C to stop."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil

from orchestrator import grpc_loopback, ingress, ray_internals
from orchestrator.catalog import CatalogError
from orchestrator.layout import ingress_routes
from orchestrator.settings import FAST_INGRESS_ENV, Settings
from orchestrator.status.snapshot import SnapshotWriter, default_directory
from orchestrator.warden import reap
from orchestrator.warden import start as start_warden

logger = logging.getLogger(__name__)


def serve_forever(
    *,
    catalog: list[str] | None,
    host: str | None,
    port: int | None,
    metrics_port: int | None = None,
    open_access: bool = False,
) -> int:
    """Runs until SIGINT/SIGTERM. Returns the process exit code (2 when it would serve
    open mode on a non-loopback address without ``open_access``, or when a port it is given
    is one Ray or Serve opens too)."""
    given = {"open_access": open_access, "metrics_port": metrics_port, "catalog": catalog, "host": host, "port": port}
    settings = Settings(**{key: value for key, value in given.items() if value})  # type: ignore[arg-type]
    try:
        settings = _access_mode(settings)
    except ExposedOpenMode as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _ray_environment(settings)
    clash = port_clash(
        {"--port": settings.port, "--metrics-port": settings.metrics_port}, internal_ports(settings.fast_ingress)
    )
    if clash:
        print(f"error: {clash}", file=sys.stderr)
        return 2

    from orchestrator.engine.weights import prepare_weights
    from orchestrator.serving.builder import load_validated_catalog

    try:
        models = load_validated_catalog(settings.catalog)
    except CatalogError as exc:
        print(f"catalog is invalid:\n{exc}", file=sys.stderr)
        return 1
    if settings.fast_ingress:
        # Read by orchestrator-haproxy, which Serve's HAProxy manager starts (after this).
        os.environ.setdefault(ingress.ROUTES_ENV, json.dumps(ingress_routes(models)))
    # Prepare weights here, with progress bars, so replicas start from the cache.
    for spec in models:
        print(f"Preparing {spec.name} ...", flush=True)
        prepare_weights(spec.source, settings.cache_dir, progress=True)

    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.layout import model_route, serve_config

    # Replicas reserve logical CPUs; vLLM's worker processes are not Ray tasks, so a small
    # machine may hold more replicas than it has cores.
    needed = sum(s.resources.cpus for s in models) + 1
    warden = start_warden()  # once this command is gone, however it ends, ends what it started
    ray.init(
        # A cluster of its own, even when `ray start` left one running on this machine (which
        # ray.init() would otherwise join).
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        **ray_internals.init_options(node_ip_address="127.0.0.1", metrics_export_port=settings.metrics_port),
        # Serve's replicas bind their gRPC servers (handle streams) to 127.0.0.1, the node
        # address above, instead of every interface.
        runtime_env={"worker_process_setup_hook": grpc_loopback.SETUP_HOOK},
    )
    # A plain flag, polled: a handler that calls threading.Event.set() can deadlock when a
    # second signal (a double Ctrl-C, or `timeout` forwarding one) lands inside the first.
    stop: list[bool] = []
    snapshot: SnapshotWriter | None = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        print("Starting engines (about a minute on a CPU) ...", flush=True)
        # The config `orchestrator serve-config` writes for a cluster (one application per
        # model), deployed as `serve run CONFIG` deploys one. Secrets stay out of the apps'
        # args; Ray's processes inherit this process's environment.
        config = ServeDeploySchema.model_validate(
            serve_config(models, settings.shareable(), host=settings.host, port=settings.port, local=True)
        )
        ray_internals.deploy_config(config)
        apps = [app.name for app in config.applications]
        while not stop and not _running(apps):
            time.sleep(1)
        if not stop:
            url = f"http://{settings.host}:{settings.port}/v1"
            print(f"\nServing OpenAI-compatible API at {url}", flush=True)
            for spec in models:
                names = ", ".join(spec.names[1:])
                print(f"  model {spec.name}" + (f"  (also: {names})" if names else ""), flush=True)
                own = f"http://{settings.host}:{settings.port}{model_route(spec)}/v1"
                print(f"    its own route, without the router: {own}", flush=True)
            print(f"Metrics (Prometheus text) at {_metrics_url()}", flush=True)
            gcs = ray.get_runtime_context().gcs_address
            # What `orchestrator status` reads of the cluster, so that it need not join Ray.
            snapshot = _snapshot_writer(gcs)
            _write_if_due(snapshot)
            print(f"Ray cluster at {gcs}: orchestrator status --address {gcs}", flush=True)
            print("Press Ctrl-C to stop.", flush=True)
            while not stop:
                _write_if_due(snapshot)
                time.sleep(0.2)
    finally:
        print("\nShutting down ...", flush=True)
        _remove(snapshot)
        # Everything this command started, engines and HAProxy included: if Serve's graceful
        # shutdown times out (it can on a busy machine), ray.shutdown() kills the Ray workers
        # and their own children (vLLM's engine processes, HAProxy) would outlive them.
        started = [p for p in psutil.Process().children(recursive=True) if p.pid != warden.pid]
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            reap(started)
    return 0


def _ray_environment(settings: Settings) -> None:
    """Sets what Ray and Serve read from the environment (when first imported, and in every
    process they start), keeping any value already set."""
    if settings.fast_ingress:
        # Serve reads these when ray.serve is first imported (handle defaults are fixed
        # then), so they are set before anything imports ray; Ray's processes inherit them.
        for key, value in FAST_INGRESS_ENV.items():
            os.environ.setdefault(key, value)
        wrapper = shutil.which("orchestrator-haproxy", path=str(Path(sys.executable).parent))
        if wrapper:
            # Serve runs HAProxy through the wrapper (orchestrator/ingress.py), which sends
            # generation requests on /v1 straight to their model's application
            # (ORCH_INGRESS_ROUTES, set once the catalog is loaded; ORCH_INGRESS_AFFINITY=0 in
            # this command's environment reaches it the same way) and, on a loopback host,
            # moves HAProxy's stats and metrics listeners (every interface in Serve's config)
            # to loopback.
            os.environ.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", wrapper)
            if not is_loopback(settings.host):
                os.environ.setdefault(ingress.LOOPBACK_ENV, "0")
        if is_loopback(settings.host):
            # HAProxy sends its log to an address (Serve's default: syslog on 127.0.0.1:514)
            # from a UDP socket bound to every interface; the local syslog socket needs none.
            os.environ.setdefault("RAY_SERVE_HAPROXY_LOG_TARGET", "/dev/log")
    # A one-machine cluster: Ray then takes 127.0.0.1 as the node address, so its own
    # servers (the metrics export among them) listen on loopback only. Without it Ray
    # resolves even an explicit 127.0.0.1 to the machine's public address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


OPEN_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! OPEN MODE: no admin key (ORCH_ADMIN_KEY) and no API keys in {db}.
!! Anyone who can reach {host}:{port} can use every model; nothing is limited or
!! metered. For local use only. Create a key to turn auth on:
!!   orchestrator keys create --name me
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


class ExposedOpenMode(Exception):
    """Open mode would be chosen implicitly on an address other machines can reach."""


def is_loopback(host: str) -> bool:
    """Returns whether ``host`` is a loopback name or address (only this machine reaches it)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _access_mode(settings: Settings) -> Settings:
    """Open mode when there is neither an admin key nor any API key; says so loudly.

    Raises:
        ExposedOpenMode: that open mode would listen beyond loopback and was not asked for
            (``--open`` or ``ORCH_OPEN_ACCESS``).
    """
    if settings.open_access:
        print(OPEN_BANNER.format(db="(forced by ORCH_OPEN_ACCESS)", host=settings.host, port=settings.port))
        return settings
    if settings.admin_key is not None:
        return settings
    from orchestrator.gateway.store import SQLStore

    store = SQLStore(settings.resolved_database_url())
    store.open()
    try:
        keys = store.count_keys()
    finally:
        store.close()
    if keys:
        print(f"API keys required ({keys} in the database); the admin API is off until ORCH_ADMIN_KEY is set.")
        return settings
    from sqlalchemy.engine import make_url

    db = make_url(settings.resolved_database_url()).render_as_string(hide_password=True)
    if not is_loopback(settings.host):
        raise ExposedOpenMode(
            f"no admin key (ORCH_ADMIN_KEY) and no API keys in {db}, so anyone reaching {settings.host}:"
            f"{settings.port} could use every model unmetered. Create a key (orchestrator keys create), "
            "or pass --open to serve open mode on this address anyway."
        )
    print(OPEN_BANNER.format(db=db, host=settings.host, port=settings.port), flush=True)
    return settings.model_copy(update={"open_access": True})


def _metrics_url() -> str:
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _snapshot_writer(address: str) -> SnapshotWriter:
    from orchestrator.serving.cluster import RayCluster

    cluster = RayCluster()  # this process is connected already: it reads, never connects
    return SnapshotWriter(default_directory(), address, cluster.nodes, cluster.serve_deployments)


def _write_if_due(snapshot: SnapshotWriter) -> None:
    try:
        snapshot.write_if_due()
    except OSError as exc:
        logger.warning("cannot write the cluster's status for orchestrator status: %s", exc)


def _remove(snapshot: SnapshotWriter | None) -> None:
    if snapshot is not None:
        snapshot.remove()


def _running(apps: list[str]) -> bool:
    """Whether every application runs. Raises RuntimeError when one failed to deploy."""
    from ray import serve

    found = serve.status().applications
    for name in apps:
        status = found.get(name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy of {name} failed: {status.message}")
    return all(name in found and found[name].status == "RUNNING" for name in apps)


def internal_ports(fast_ingress: bool) -> list[tuple[range, str]]:
    """Returns the fixed ports Ray and Serve open on ``orchestrator serve``'s machine besides
    the API and metrics ports, each with what opens it, as Ray reads them (so after the
    environment is set: each variable named moves its port)."""
    agent = ray_internals.dashboard_agent_port()
    ports = [(range(agent, agent + 1), "the HTTP port of Ray's dashboard agent")]
    if not fast_ingress:
        return ports
    named = {
        "the port of Serve's fallback proxy": "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "HAProxy's stats port": "RAY_SERVE_HAPROXY_STATS_PORT",
        "HAProxy's metrics port": "RAY_SERVE_HAPROXY_METRICS_PORT",
    }
    for what, name in named.items():
        port = ray_internals.serve_constant(name)
        ports.append((range(port, port + 1), f"{what} ({name})"))
    low = ray_internals.serve_constant("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT")
    high = ray_internals.serve_constant("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")
    where = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, _MAX_HTTP_PORT"
    ports.append((range(low, high + 1), f"in Serve's range for replicas' HTTP ports, {low}-{high} ({where})"))
    return ports


def port_clash(ports: dict[str, int | None], internal: list[tuple[range, str]]) -> str | None:
    """Returns one line naming the clash when two of ``ports`` (option: port; None is unset)
    are the same or one is among the ``internal`` ports (:func:`internal_ports`); else None."""
    given = [(option, port) for option, port in ports.items() if port is not None]
    for index, (option, port) in enumerate(given):
        for other, taken in given[:index]:
            if port == taken:
                return f"{other} and {option} are both {port}; give them different ports"
        for span, what in internal:
            if port in span:
                return f"{option} {port} is {what}; choose another {option}"
    return None
