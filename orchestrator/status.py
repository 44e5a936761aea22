"""``orchestrator status``: per model, replicas, queues, KV-cache use, tokens/s and errors/min
of a running cluster (``orchestrator serve``'s local Ray or a ``serve deploy``ed cluster).

The figures come from two places:

* the Prometheus text every alive Ray node exports on its ``MetricsExportPort``, where the
  autoscaling policy's gauges and the router's counters (:mod:`orchestrator.metrics`) arrive
  with Ray's ``ray_`` prefix (``_total`` on counters) and Ray's own labels (``WorkerId``,
  ``NodeAddress``, ...), which are summed over;
* ``ray.serve.status()``, for each model deployment's health and its RUNNING replicas. That
  count is authoritative; the running-replicas gauge can lag one export interval (~10 s).

Rates need two scrapes ``--window`` seconds apart; Ray's agents refresh their values about
every 10 s, so shorter windows jitter between 0 and double the true rate.

The logic (:func:`parse_samples`, :func:`summarize`, :func:`render_table`, :func:`to_json`,
:func:`frames`) is pure; the functions that talk to Ray and HTTP are small and import Ray
inside, so importing this module (and ``orchestrator --help``) stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

from orchestrator import metrics
from orchestrator.catalog import deployment_name

if TYPE_CHECKING:
    import httpx

# The model deployments' names all start so (see orchestrator.catalog.deployment_name).
MODEL_DEPLOYMENT_PREFIX = deployment_name("")
DEFAULT_WINDOW_S = 10.0
DEFAULT_WATCH_S = 5.0
HTTP_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
_PREFIX = "ray_orchestrator_"
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def exported_name(spec: metrics.MetricSpec) -> str:
    """Returns a metric's sample name as Ray exports it: ``ray_`` prefix, ``_total`` on counters."""
    return f"ray_{spec.name}_total" if spec.kind == "counter" else f"ray_{spec.name}"


TARGET_REPLICAS = exported_name(metrics.TARGET_REPLICAS)
RUNNING_REPLICAS = exported_name(metrics.RUNNING_REPLICAS)
WAITING_REQUESTS = exported_name(metrics.WAITING)
RUNNING_REQUESTS = exported_name(metrics.RUNNING)
KV_CACHE_USAGE = exported_name(metrics.KV_CACHE)
COMPLETION_TOKENS = exported_name(metrics.COMPLETION_TOKENS)
REQUESTS = exported_name(metrics.REQUESTS)

Key = tuple[str, str]
"""(Serve application, model display name)."""


class StatusError(Exception):
    """The cluster or its metrics cannot be read; the message is one line for the user."""


class Sample(NamedTuple):
    """One Prometheus sample: its name as exposed (counters end in ``_total``), labels, value."""

    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class ModelStatus:
    """One row: a model in one Serve application. ``None`` means unknown (no such series yet);
    rates are ``None`` only without a measuring window."""

    application: str
    model: str
    deployment: str
    status: str | None
    running_replicas: int | None
    target_replicas: int | None
    waiting_requests: float | None
    running_requests: float | None
    kv_cache_usage: float | None
    tokens_per_second: float | None
    errors_per_minute: float | None


# ----------------------------------------------------------------------------- parsing


def _relevant_lines(text: str, prefix: str) -> Iterator[str]:
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#"):
            parts = stripped.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2].startswith(prefix):
                yield stripped
        elif stripped.startswith(prefix):
            yield stripped


def parse_samples(text: str, prefix: str = _PREFIX) -> list[Sample]:
    """Returns the samples of the series whose names start with ``prefix`` (by default the
    orchestrator's), in text order. Other lines are dropped before parsing, which keeps a
    node's large exposition (Ray's, Serve's and vLLM's series) cheap to read. Samples whose
    value is not finite are dropped.

    Raises:
        ValueError: a kept line is not valid Prometheus text exposition.
    """
    from prometheus_client.parser import text_string_to_metric_families

    kept = "\n".join(_relevant_lines(text, prefix))
    return [
        Sample(sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(kept + "\n" if kept else "")
        for sample in family.samples
        if math.isfinite(sample.value)
    ]


def _series(texts: Iterable[str]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Returns every sample of the texts by (name, full label set), values of identical series summed."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = defaultdict(float)
    for text in texts:
        for sample in parse_samples(text):
            out[(sample.name, frozenset(sample.labels.items()))] += sample.value
    return out


def _key(labels: Iterable[tuple[str, str]]) -> Key:
    found = dict(labels)
    return found.get("application", ""), found.get("model", "")


# ----------------------------------------------------------------------------- summarizing


def gauge_values(series: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> dict[Key, float]:
    """Returns a gauge's value per (application, model).

    Several series can carry the same (application, model): Ray labels each with the
    ``WorkerId`` that wrote it, so a restarted Serve controller leaves its predecessor's
    series until Ray's agent evicts it (about two export intervals). The maximum is taken:
    for replicas it is what the cluster may be running during such a hand-over, and a stale
    series cannot be told from the live one by its labels, so the largest is the safe side.
    """
    out: dict[Key, float] = {}
    for (sample_name, labels), value in series.items():
        if sample_name == name:
            key = _key(labels)
            out[key] = max(value, out.get(key, value))
    return out


def counter_increases(
    before: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
    after: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    where: Callable[[Mapping[str, str]], bool] = lambda labels: True,
) -> dict[Key, float]:
    """Returns how much a counter grew per (application, model), summed over its series whose
    labels pass ``where``. A series absent before (a new router replica) or lower than before
    (a restarted process) counts from 0; a series absent after is ignored."""
    out: dict[Key, float] = defaultdict(float)
    for (sample_name, labels), value in after.items():
        if sample_name != name or not where(dict(labels)):
            continue
        previous = before.get((sample_name, labels), 0.0)
        out[_key(labels)] += value - previous if value >= previous else value
    return dict(out)


def is_server_error(labels: Mapping[str, str]) -> bool:
    """Returns whether a request series' ``status`` label is an HTTP status of 500 or more."""
    try:
        return int(labels.get("status", "")) >= 500
    except ValueError:
        return False


def _model_deployments(deployments: Mapping[Key, Mapping[str, Any]]) -> dict[Key, Mapping[str, Any]]:
    return {key: info for key, info in deployments.items() if key[1].startswith(MODEL_DEPLOYMENT_PREFIX)}


def _row_keys(
    gauges: Mapping[str, Mapping[Key, float]],
    rates: Iterable[Mapping[Key, float]],
    seen: Iterable[Key],
    deployments: Mapping[Key, Mapping[str, Any]],
) -> set[Key]:
    """Rows: models with a gauge, with traffic in the window, or with a deployment in Serve.
    Counters alone do not make a row: Ray keeps exporting a removed application's counters."""
    keys = {key for values in gauges.values() for key in values}
    keys |= {key for values in rates for key, value in values.items() if value > 0}
    by_deployment = {(app, deployment_name(model)): (app, model) for app, model in {*keys, *seen}}
    for app, name in deployments:
        keys.add(by_deployment.get((app, name), (app, name.removeprefix(MODEL_DEPLOYMENT_PREFIX))))
    return {key for key in keys if key[1] and key[1] != metrics.UNKNOWN_MODEL}


def _as_int(value: float | None) -> int | None:
    return None if value is None else round(value)


def summarize(
    before: Sequence[str],
    after: Sequence[str],
    window_s: float,
    deployments: Mapping[Key, Mapping[str, Any]],
) -> list[ModelStatus]:
    """Returns one row per (application, model), sorted by application then model.

    ``before`` and ``after`` are the exposition texts of two scrapes ``window_s`` seconds
    apart (any order of endpoints; series are matched by name and labels). Gauges are read
    from ``after``. ``deployments`` maps (application, deployment name) to
    ``{"status": str, "replica_states": {state: count}}`` as :func:`deployments_from_serve_status`
    gives; a model's deployment is matched by :func:`orchestrator.catalog.deployment_name`,
    and its RUNNING replicas replace the gauge's. A deployment with no series yet is shown
    under its name without ``model-`` (display names that had other characters replaced
    read differently until the model reports). A model with no counter series had no
    traffic: its rates are 0 (``None`` only when ``window_s`` is not positive).

    Raises:
        ValueError: a text is not Prometheus text exposition.
    """
    now, then = _series(after), _series(before)
    gauges = {
        name: gauge_values(now, name)
        for name in (TARGET_REPLICAS, RUNNING_REPLICAS, WAITING_REQUESTS, RUNNING_REQUESTS, KV_CACHE_USAGE)
    }
    tokens = counter_increases(then, now, COMPLETION_TOKENS)
    errors = counter_increases(then, now, REQUESTS, where=is_server_error)
    models = _model_deployments(deployments)
    seen = {_key(labels) for _, labels in now}
    rows = []
    for app, model in sorted(_row_keys(gauges, (tokens, errors), seen, models)):
        name = deployment_name(model)
        found = models.get((app, name))
        running = gauges[RUNNING_REPLICAS].get((app, model))
        if found is not None:
            running = float(found.get("replica_states", {}).get("RUNNING", 0))
        rows.append(
            ModelStatus(
                application=app,
                model=model,
                deployment=name,
                status=None if found is None else str(found.get("status")),
                running_replicas=_as_int(running),
                target_replicas=_as_int(gauges[TARGET_REPLICAS].get((app, model))),
                waiting_requests=gauges[WAITING_REQUESTS].get((app, model)),
                running_requests=gauges[RUNNING_REQUESTS].get((app, model)),
                kv_cache_usage=gauges[KV_CACHE_USAGE].get((app, model)),
                tokens_per_second=tokens.get((app, model), 0.0) / window_s if window_s > 0 else None,
                errors_per_minute=errors.get((app, model), 0.0) * 60.0 / window_s if window_s > 0 else None,
            )
        )
    return rows


# ----------------------------------------------------------------------------- output

COLUMNS = ("APP", "MODEL", "STATUS", "REPLICAS", "WAITING", "RUNNING", "KV%", "TOK/S", "ERR/MIN")
_LEFT_ALIGNED = 3  # APP, MODEL, STATUS


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _fixed(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.1f}"


def _cells(row: ModelStatus) -> tuple[str, ...]:
    return (
        row.application or "-",
        row.model,
        row.status or "-",
        f"{_count(row.running_replicas)}/{_count(row.target_replicas)}",
        _count(row.waiting_requests),
        _count(row.running_requests),
        _fixed(row.kv_cache_usage, 100.0),
        _fixed(row.tokens_per_second),
        _fixed(row.errors_per_minute),
    )


def render_table(rows: Sequence[ModelStatus]) -> str:
    """Returns the rows as an aligned text table with a header line (no trailing newline):
    text columns left-aligned, figures right-aligned, ``-`` for unknown figures, KV-cache
    use in percent, replicas as running/target."""
    table = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = []
    for line in table:
        cells = [
            cell.ljust(width) if i < _LEFT_ALIGNED else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3) -> float | int | None:
    if value is None:
        return None
    return int(value) if float(value).is_integer() else round(value, digits)


def to_json(rows: Sequence[ModelStatus], window_s: float) -> dict[str, Any]:
    """Returns one frame as a JSON-ready dict: ``{"window_s", "models": [...]}``, each model
    with ``application``, ``model``, ``deployment``, ``status``, ``replicas`` {running,
    target}, ``requests`` {waiting, running}, ``kv_cache_usage`` (0..1),
    ``tokens_per_second`` and ``errors_per_minute``; unknown figures are ``null``."""
    return {
        "window_s": round(window_s, 3),
        "models": [
            {
                "application": row.application,
                "model": row.model,
                "deployment": row.deployment,
                "status": row.status,
                "replicas": {"running": row.running_replicas, "target": row.target_replicas},
                "requests": {"waiting": _number(row.waiting_requests), "running": _number(row.running_requests)},
                "kv_cache_usage": None if row.kv_cache_usage is None else round(row.kv_cache_usage, 4),
                "tokens_per_second": None if row.tokens_per_second is None else round(row.tokens_per_second, 3),
                "errors_per_minute": None if row.errors_per_minute is None else round(row.errors_per_minute, 3),
            }
            for row in rows
        ],
    }


def write_frame(
    rows: Sequence[ModelStatus], window_s: float, out: TextIO, *, as_json: bool, watch: bool, clear: bool
) -> None:
    """Writes one frame: a JSON object on one line, or the table (after clearing the screen
    when ``clear``; with a caption line in watch mode)."""
    if as_json:
        out.write(json.dumps(to_json(rows, window_s)) + "\n")
    else:
        if clear:
            out.write(_CLEAR_SCREEN)
        if watch:
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            out.write(f"orchestrator status  {stamp}  rates over {window_s:.1f} s  (Ctrl-C to stop)\n\n")
        out.write(render_table(rows) + "\n")
        if not rows:
            out.write("(no model deployments and no model metrics found)\n")
    out.flush()


# ----------------------------------------------------------------------------- sampling


def _aligned(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Returns the before-texts for the endpoints that answered after; one that did not answer
    before stands in for itself, so its whole counters are not read as one window's increase."""
    return [before.get(url, text) for url, text in after.items()]


def frames(
    scrape: Callable[[], Mapping[str, str]],
    deployments: Callable[[], Mapping[Key, Mapping[str, Any]]],
    *,
    window_s: float,
    interval_s: float | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[list[ModelStatus], float]]:
    """Yields (rows, measured window in seconds): the first frame ``window_s`` after a first
    scrape, then, when ``interval_s`` is given, one every ``interval_s`` forever, each with
    rates since the frame before. ``scrape`` returns exposition text by endpoint.

    Raises:
        StatusError: from ``scrape``.
    """
    started = clock()
    before = scrape()
    sleep(window_s)
    while True:
        now = clock()
        after = scrape()
        window = now - started
        yield summarize(_aligned(before, after), list(after.values()), window, deployments()), window
        if interval_s is None:
            return
        before, started = after, now
        sleep(max(0.0, interval_s - (clock() - now)))


# ----------------------------------------------------------------------------- Ray and HTTP


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def metrics_urls(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Returns the ``/metrics`` URL of every alive node in a ``ray.nodes()`` list that has a
    metrics export port, without duplicates, in node order."""
    urls: dict[str, None] = {}
    for node in nodes:
        port, address = node.get("MetricsExportPort"), node.get("NodeManagerAddress")
        if node.get("Alive") and port and address:
            urls[f"http://{_host(str(address))}:{int(port)}/metrics"] = None
    return list(urls)


def reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Returns whether a TCP connection to host:port opens within ``timeout_s``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _bootstrap_address(address: str) -> str:
    """Returns the address to give ``ray.init``: ``auto`` found the way Ray finds it
    (``RAY_ADDRESS``, then the latest local cluster), checked to answer, so that a stale or
    wrong address fails at once instead of after Ray's retries (minutes).

    ``orchestrator serve``'s one-machine Ray listens on 127.0.0.1 only, while Ray resolves a
    loopback address to the machine's public one before connecting. When only loopback
    answers, Ray is told so (as ``orchestrator serve`` tells it, through
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), so it connects there and finds its raylet.

    Raises:
        StatusError: no cluster is found, or nothing answers at its address.
    """
    from ray._common.network_utils import is_localhost, parse_address
    from ray._private import ray_constants, services

    try:
        target = services.get_ray_address_from_environment(address, None) if address == "auto" else address
    except ConnectionError as exc:
        raise StatusError(f"cannot reach a Ray cluster at {address!r}: {_first_line(exc)}") from exc
    if target.startswith("ray://"):
        return target  # Ray Client: it has its own connection timeout
    parsed = parse_address(target)
    shown = target if target == address else f"{address!r} ({target})"
    if parsed is None:
        raise StatusError(f"cannot reach a Ray cluster at {shown}: not a host:port address")
    host, port = parsed[0], int(parsed[1])
    if not is_localhost(host):
        if reachable(host, port):
            return target
    elif reachable(services.get_node_ip_address(), port):
        return target
    elif reachable(host, port):
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        return target
    raise StatusError(f"cannot reach a Ray cluster at {shown}: nothing answers there")


def connect_ray(address: str) -> None:
    """Connects this process to the Ray cluster at ``address`` (``auto``: the local one) in
    Serve's namespace.

    Raises:
        StatusError: no cluster can be reached there.
    """
    import ray

    target = _bootstrap_address(address)
    try:
        ray.init(
            address=target,
            namespace="serve",
            logging_level=logging.ERROR,
            log_to_driver=False,
            configure_logging=False,
        )
    except Exception as exc:
        raise StatusError(f"cannot reach a Ray cluster at {address!r}: {_first_line(exc)}") from exc


def disconnect_ray() -> None:
    """Disconnects from Ray if connected (the cluster keeps running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def alive_nodes() -> list[dict[str, Any]]:
    """Returns ``ray.nodes()`` of the connected cluster (dead nodes included)."""
    import ray

    return list(ray.nodes())


def deployments_from_serve_status(status: Any) -> dict[Key, dict[str, Any]]:
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


def serve_deployments() -> dict[Key, dict[str, Any]]:
    """Returns the connected cluster's Serve deployments (see :func:`deployments_from_serve_status`);
    empty, after a warning on stderr, when Serve's controller cannot be asked."""
    from ray import serve

    try:
        return deployments_from_serve_status(serve.status())
    except Exception as exc:
        print(f"warning: Serve status unavailable ({type(exc).__name__}: {exc})".splitlines()[0], file=sys.stderr)
        return {}


def http_client() -> httpx.Client:
    """Returns the HTTP client used to scrape metrics."""
    import httpx

    return httpx.Client(timeout=HTTP_TIMEOUT_S)


def fetch_metrics(client: httpx.Client, urls: Sequence[str]) -> dict[str, str]:
    """Returns the body of every URL that answered 200 with Prometheus text, by URL in the
    given order (fetched concurrently; endpoints that fail are left out).

    Raises:
        StatusError: none answered.
    """
    import httpx

    def get(url: str) -> str | None:
        try:
            response = client.get(url)
            if response.status_code != 200:
                return None
            parse_samples(response.text)
        except (httpx.HTTPError, ValueError):
            return None
        return response.text

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(urls)))) as pool:
        bodies = list(pool.map(get, urls))
    found = {url: body for url, body in zip(urls, bodies, strict=True) if body is not None}
    if not found:
        shown = ", ".join(urls[:3]) + (f" and {len(urls) - 3} more" if len(urls) > 3 else "")
        raise StatusError(f"no metrics endpoint answered (tried {shown or 'none'})")
    return found


# ----------------------------------------------------------------------------- command


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _metrics_urls_for(ns: argparse.Namespace) -> list[str]:
    if ns.metrics_url:
        return list(dict.fromkeys(ns.metrics_url))
    urls = metrics_urls(alive_nodes())
    if not urls:
        raise StatusError("no alive Ray node exports metrics (no MetricsExportPort); pass --metrics-url")
    return urls


def _run(ns: argparse.Namespace, out: TextIO) -> int:
    urls = _metrics_urls_for(ns)
    interval = None if ns.watch is None else max(ns.watch, ns.window)
    if interval is None and sys.stderr.isatty():
        print(f"sampling metrics for {ns.window:g} s ...", file=sys.stderr)
    clear = interval is not None and not ns.json and out.isatty()
    with http_client() as client:
        for rows, window in frames(
            lambda: fetch_metrics(client, urls), serve_deployments, window_s=ns.window, interval_s=interval
        ):
            write_frame(rows, window, out, as_json=ns.json, watch=interval is not None, clear=clear)
    return 0


def status_command(ns: argparse.Namespace) -> int:
    """Runs ``orchestrator status``. Returns the exit code: 0, 1 (after a one-line message on
    stderr) when no Ray cluster can be reached or no metrics endpoint answers, 130 when a
    single sample is interrupted (Ctrl-C ends ``--watch`` with 0)."""
    address = ns.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        connect_ray(address)
        return _run(ns, sys.stdout)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0 if ns.watch is not None else 130
    finally:
        disconnect_ray()


def add_command(sub: Any) -> None:
    """Adds ``status`` to the ``orchestrator`` command (``sub``: its argparse subparsers)."""
    status = sub.add_parser(
        "status",
        help="Replicas, queues, KV cache, tokens/s and errors/min per model of a running cluster.",
        description=(
            "Per model and Serve application: deployment status, running/target replicas, waiting and running "
            "requests, KV-cache use, tokens/s and 5xx errors per minute, from the Ray nodes' metrics and "
            "ray.serve.status(). Rates are measured over --window seconds."
        ),
    )
    status.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_S,
        type=_positive_float,
        metavar="SECONDS",
        help=f"Redraw every SECONDS (default {DEFAULT_WATCH_S:g}, at least --window) until Ctrl-C.",
    )
    status.add_argument(
        "--window",
        type=_positive_float,
        default=DEFAULT_WINDOW_S,
        metavar="SECONDS",
        help=f"Seconds between the two samples rates are computed from (default {DEFAULT_WINDOW_S:g}; "
        "Ray exports every ~10 s).",
    )
    status.add_argument("--json", action="store_true", help="One JSON object per frame, one per line.")
    status.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else auto).")
    status.add_argument(
        "--metrics-url",
        action="append",
        metavar="URL",
        help="Prometheus endpoint to scrape instead of every alive Ray node's (repeatable).",
    )
    status.set_defaults(func=status_command)
