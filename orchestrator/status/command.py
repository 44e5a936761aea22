"""The ``orchestrator status`` command: arguments, scraping the nodes' metrics, frames.

The figures come from two places:

* the Prometheus text every alive Ray node exports on its ``MetricsExportPort``
  (:mod:`orchestrator.status.exposition` reads it);
* Serve's status, for each model deployment's health and its RUNNING replicas.

Both are reached through collaborators given to :func:`status_command`: a :class:`Cluster`
and an ``httpx.Client``. The default cluster is Ray's dashboard read over HTTP
(:class:`orchestrator.status.dashboard.Dashboard`) when the address is a dashboard URL
(``http://`` or ``https://``, from ``--address``, ``RAY_DASHBOARD_ADDRESS`` or ``RAY_ADDRESS``);
else the snapshot a running ``orchestrator serve`` publishes of its cluster
(:class:`orchestrator.status.snapshot.PublishedCluster`), when there is a fresh one for the
address; otherwise :class:`orchestrator.serving.cluster.RayCluster`, which joins the cluster
as a driver. They are imported only when the command runs, so ``orchestrator --help`` stays fast.

By default each frame is one scrape: rates are the recent-rate gauges the routers and model
replicas export (:func:`orchestrator.status.summary.summarize_recent`). A cluster that exports
the orchestrator's counters but none of those gauges (an older version) is measured as with
``--window``: two scrapes that many seconds apart, rates from the counters' increase; Ray's
agents refresh their values about every 10 s, so shorter windows jitter between 0 and double
the true rate.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from orchestrator.metrics import RATE_WINDOW_S
from orchestrator.status.display import write_frame
from orchestrator.status.exposition import COMPLETION_TOKENS, RECENT_RATES, REQUESTS, Key, parse_samples
from orchestrator.status.snapshot import default_directory, find_snapshot
from orchestrator.status.summary import ModelStatus, summarize, summarize_recent

if TYPE_CHECKING:
    import httpx

DEFAULT_WINDOW_S = 10.0
DEFAULT_WATCH_S = 5.0
HTTP_TIMEOUT_S = 5.0


class StatusError(Exception):
    """The cluster or its metrics cannot be read; the message is one line for the user."""


class Cluster(Protocol):
    """The running cluster, as the command needs it."""

    def connect(self, address: str) -> None:
        """Connects to the cluster at ``address`` (``auto``: the local one).

        Raises:
            ConnectionError: no cluster can be reached there; the message is one line for the user.
        """

    def close(self) -> None:
        """Disconnects if connected; called also after a failed :meth:`connect`."""

    def nodes(self) -> Sequence[Mapping[str, Any]]:
        """Returns the cluster's nodes as ``ray.nodes()`` gives them (dead nodes included)."""
        ...

    def deployments(self) -> Mapping[Key, Mapping[str, Any]]:
        """Returns Serve's deployments by (application, deployment name), as
        :func:`orchestrator.status.summary.summarize` takes them."""
        ...


def _default_cluster(address: str) -> Cluster:
    if is_dashboard_url(address):
        from orchestrator.status.dashboard import dashboard_from_environment

        return dashboard_from_environment(_http_client)
    published = find_snapshot(default_directory(), address)
    if published is not None:
        from orchestrator.status.snapshot import PublishedCluster

        return PublishedCluster(published)
    # Imported here: orchestrator.serving imports Ray, which only a running command needs.
    from orchestrator.serving.cluster import RayCluster

    return RayCluster()


def is_dashboard_url(address: str) -> bool:
    """Returns whether ``address`` names Ray's dashboard (an http or https URL) rather than the
    cluster itself (``host:port``, ``ray://...`` or ``auto``)."""
    return address.lower().startswith(("http://", "https://"))


def cluster_address(given: str | None, environ: Mapping[str, str]) -> str:
    """Returns the address to read: ``--address`` if given, else ``RAY_DASHBOARD_ADDRESS``, else
    ``RAY_ADDRESS``, else ``auto`` (the local cluster)."""
    return given or environ.get("RAY_DASHBOARD_ADDRESS") or environ.get("RAY_ADDRESS") or "auto"


def _http_client() -> httpx.Client:
    import httpx

    return httpx.Client(timeout=HTTP_TIMEOUT_S)


def _aligned(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Returns the before-texts for the endpoints that answered after; one that did not answer
    before stands in for itself, so its whole counters are not read as one window's increase."""
    return [before.get(url, text) for url, text in after.items()]


def has_recent_rates(texts: Iterable[str]) -> bool:
    """Returns whether one scrape gives rates: it has a recent-rate gauge, or none of the
    orchestrator's counters either (no traffic yet, so no rates to measure).

    Raises:
        ValueError: a text is not Prometheus text exposition.
    """
    names = {sample.name for text in texts for sample in parse_samples(text)}
    return bool(names & set(RECENT_RATES)) or not names & {COMPLETION_TOKENS, REQUESTS}


def _windowed(
    before: Mapping[str, str],
    started: float,
    scrape: Callable[[], Mapping[str, str]],
    deployments: Callable[[], Mapping[Key, Mapping[str, Any]]],
    window_s: float,
    interval_s: float | None,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> Iterator[tuple[list[ModelStatus], float]]:
    """Frames of two scrapes each (the first, ``before``, began at ``started``), see :func:`frames`."""
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


def frames(
    scrape: Callable[[], Mapping[str, str]],
    deployments: Callable[[], Mapping[Key, Mapping[str, Any]]],
    *,
    window_s: float | None,
    interval_s: float | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    fallback_window_s: float = DEFAULT_WINDOW_S,
) -> Iterator[tuple[list[ModelStatus], float]]:
    """Yields (rows, window in seconds the rates cover). ``scrape`` returns exposition text
    by endpoint.

    Without ``window_s``, each frame is one scrape, rates from the recent-rate gauges (their
    window, :data:`orchestrator.metrics.RATE_WINDOW_S`); when the first scrape has no such
    gauge but the orchestrator's counters (see :func:`has_recent_rates`), frames are measured
    as with ``window_s=fallback_window_s`` (and ``interval_s`` at least that). With ``window_s``, the first frame comes
    ``window_s`` after a first scrape, rates from the counters' increase (the measured window).
    When ``interval_s`` is given, a frame follows every ``interval_s`` forever (with a window,
    rates since the frame before).

    Raises:
        StatusError: from ``scrape``.
    """
    started = clock()
    first = scrape()
    if window_s is None and not has_recent_rates(first.values()):
        window_s = fallback_window_s
        interval_s = None if interval_s is None else max(interval_s, window_s)
    if window_s is not None:
        yield from _windowed(first, started, scrape, deployments, window_s, interval_s, clock, sleep)
        return
    texts = first
    while True:
        started = clock()
        yield summarize_recent(list(texts.values()), deployments()), RATE_WINDOW_S
        if interval_s is None:
            return
        sleep(max(0.0, interval_s - (clock() - started)))
        texts = scrape()


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _metrics_urls_for(ns: argparse.Namespace, cluster: Cluster) -> list[str]:
    if ns.metrics_url:
        return list(dict.fromkeys(ns.metrics_url))
    try:
        nodes = cluster.nodes()
    except ConnectionError as exc:  # the dashboard's; converted as in _connect
        raise StatusError(str(exc)) from exc
    urls = metrics_urls(nodes)
    if not urls:
        raise StatusError("no alive Ray node exports metrics (no MetricsExportPort); pass --metrics-url")
    return urls


def _connect(cluster: Cluster, address: str) -> None:
    """Connects ``cluster`` to ``address``.

    Raises:
        StatusError: the cluster's ConnectionError, same message; converted only here, so that
            other connection errors (a closed stdout pipe is one) are not mistaken for it.
    """
    try:
        cluster.connect(address)
    except ConnectionError as exc:
        raise StatusError(str(exc)) from exc


def _run(ns: argparse.Namespace, cluster: Cluster, http: httpx.Client | None, out: TextIO, err: TextIO) -> int:
    urls = _metrics_urls_for(ns, cluster)
    interval = None if ns.watch is None else max(ns.watch, ns.window or 0.0)
    if interval is None and ns.window is not None and err.isatty():
        print(f"sampling metrics for {ns.window:g} s ...", file=err)
    clear = interval is not None and not ns.json and out.isatty()
    # A client of our own is closed here; a given one belongs to the caller.
    with nullcontext(http) if http is not None else _http_client() as client:
        for rows, window in frames(
            lambda: fetch_metrics(client, urls), cluster.deployments, window_s=ns.window, interval_s=interval
        ):
            write_frame(rows, window, out, as_json=ns.json, watch=interval is not None, clear=clear)
    return 0


def status_command(
    ns: argparse.Namespace,
    *,
    cluster: Cluster | None = None,
    http: httpx.Client | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Runs ``orchestrator status`` with the parsed arguments ``ns``, against ``cluster``
    (default: a new :class:`~orchestrator.status.dashboard.Dashboard` for a dashboard URL, else a
    new :class:`~orchestrator.serving.cluster.RayCluster`; see :func:`cluster_address`), scraping with ``http``
    (default: a client of its own), writing frames to ``out`` and messages to ``err`` (default:
    ``sys.stdout`` and ``sys.stderr``). It connects, and closes ``cluster`` in any case.

    Returns the exit code: 0, 1 (after a one-line message on ``err``) when no Ray cluster or
    dashboard can be reached or no metrics endpoint answers, 130 when a single sample is interrupted (Ctrl-C
    ends ``--watch`` with 0).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    address = cluster_address(ns.address, os.environ)
    try:
        # Built inside the try: importing Ray takes seconds, and Ctrl-C then is a quiet exit too.
        if cluster is None:
            cluster = _default_cluster(address)
        _connect(cluster, address)
        return _run(ns, cluster, http, out, err)
    except StatusError as exc:
        print(f"error: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 0 if ns.watch is not None else 130
    finally:
        if cluster is not None:
            cluster.close()


def add_command(sub: Any) -> None:
    """Adds ``status`` to the ``orchestrator`` command (``sub``: its argparse subparsers)."""
    status = sub.add_parser(
        "status",
        help="Replicas, queues, KV cache, tokens/s, errors/min and prefix-cache hits per model of a running cluster.",
        description=(
            "Per model and Serve application: deployment status, running/target replicas, waiting and running "
            "requests, KV-cache use, tokens/s, 5xx errors per minute and prefix-cache hit rate, from the Ray "
            "nodes' metrics and Serve's status (through Ray's dashboard when the address is its URL, else from "
            "what a running `orchestrator serve` publishes of its cluster, else by joining the cluster). Rates "
            f"are the last {RATE_WINDOW_S:g} s as the routers and model replicas report them, or measured over "
            "--window seconds."
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
        default=None,
        metavar="SECONDS",
        help="Measure rates from two samples SECONDS apart (Ray exports every ~10 s) instead of reading the "
        f"rates the processes keep over their last {RATE_WINDOW_S:g} s (default; a cluster that keeps none is "
        f"measured over {DEFAULT_WINDOW_S:g} s).",
    )
    status.add_argument("--json", action="store_true", help="One JSON object per frame, one per line.")
    status.add_argument(
        "--address",
        help="Ray's dashboard URL (http://HOST:PORT, read over HTTP: fastest) or the Ray cluster's address "
        "(HOST:PORT, ray://..., auto; joined as a driver). Default: RAY_DASHBOARD_ADDRESS, else RAY_ADDRESS, "
        "else auto.",
    )
    status.add_argument(
        "--metrics-url",
        action="append",
        metavar="URL",
        help="Prometheus endpoint to scrape instead of every alive Ray node's (repeatable).",
    )
    status.set_defaults(func=status_command)
