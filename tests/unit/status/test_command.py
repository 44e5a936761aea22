"""The command: node discovery, scraping, frames, arguments, and runs against a fake cluster
and a mock HTTP transport (no Ray, no network)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import orchestrator.status
from orchestrator.status import command
from orchestrator.status.command import StatusError, fetch_metrics, frames, metrics_urls, status_command
from tests.unit.status.texts import (
    DEPLOYMENTS,
    HEAD,
    QWEN,
    ROUTER_A,
    ROUTER_B,
    SMOL,
    TINY,
    WORKER,
    counter,
    head_text,
    recent_texts,
    tokens,
    worker_text,
)

NODES = [
    {"Alive": True, "NodeManagerAddress": HEAD, "MetricsExportPort": 8080},
    {"Alive": True, "NodeManagerAddress": WORKER, "MetricsExportPort": 8080},
    {"Alive": False, "NodeManagerAddress": "10.0.0.3", "MetricsExportPort": 8080},
]


@dataclass
class FakeCluster:
    """Two alive nodes (and a dead one) with Serve's DEPLOYMENTS; records the calls made.
    With ``refusal``, ``connect`` raises ConnectionError with it (``{address}`` filled in)."""

    refusal: str | None = None
    calls: list[str] = field(default_factory=list)

    def connect(self, address: str) -> None:
        self.calls.append(f"connect {address}")
        if self.refusal is not None:
            raise ConnectionError(self.refusal.format(address=repr(address)))

    def close(self) -> None:
        self.calls.append("close")

    def nodes(self) -> list[dict[str, Any]]:
        return NODES

    def deployments(self) -> Mapping[tuple[str, str], Mapping[str, Any]]:
        return DEPLOYMENTS


@dataclass
class Run:
    """What one run of the command returned and wrote."""

    code: int
    out: str
    err: str


def run(argv: list[str], cluster: FakeCluster, answer: Callable[[httpx.Request], httpx.Response]) -> Run:
    """Runs ``orchestrator status ARGV`` against ``cluster``, HTTP answered by ``answer``."""
    out, err = io.StringIO(), io.StringIO()
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        code = status_command(parse(argv), cluster=cluster, http=client, out=out, err=err)
        assert not client.is_closed  # a given client belongs to the caller
    return Run(code, out.getvalue(), err.getvalue())


def test_discovery_skips_dead_nodes_and_nodes_without_metrics_port() -> None:
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
        {"Alive": False, "NodeManagerAddress": "10.0.0.9", "MetricsExportPort": 8080},
        {"Alive": True, "NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 0},
        {"Alive": True, "NodeManagerAddress": "fd00::3", "MetricsExportPort": 51234},
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
    ]
    assert metrics_urls(nodes) == ["http://10.0.0.1:8080/metrics", "http://[fd00::3]:51234/metrics"]


def test_fetch_metrics_keeps_endpoints_that_answer() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.1":
            return httpx.Response(200, text="ray_orchestrator_x 1\n")
        if request.url.host == "10.0.0.2":
            return httpx.Response(503)
        if request.url.host == "10.0.0.4":
            return httpx.Response(200, text='ray_orchestrator_x{model="m" 1\n')  # malformed
        raise httpx.ConnectError("refused", request=request)

    urls = [f"http://10.0.0.{i}:1/metrics" for i in (1, 2, 3, 4)]
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert fetch_metrics(client, urls) == {urls[0]: "ray_orchestrator_x 1\n"}
        with pytest.raises(StatusError, match=r"no metrics endpoint answered \(tried http://10.0.0.2"):
            fetch_metrics(client, urls[1:])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_frames_rates_between_consecutive_scrapes() -> None:
    def tok(value: float) -> str:
        return counter("ray_orchestrator_completion_tokens", "t", [tokens(HEAD, ROUTER_A, "llm", SMOL, value)]) + "\n"

    head, other = "http://head/metrics", "http://other/metrics"
    other_text = counter("ray_orchestrator_completion_tokens", "t", [tokens(WORKER, ROUTER_B, "llm", SMOL, 9e6)])
    scrapes = iter([{head: tok(0)}, {head: tok(100), other: other_text + "\n"}, {head: tok(400)}])
    clock = FakeClock()
    got = frames(lambda: next(scrapes), dict, window_s=10.0, interval_s=20.0, clock=clock, sleep=clock.sleep)
    rows, window = next(got)
    # "other" did not answer the first scrape: its total is not read as this window's increase
    assert (window, rows[0].tokens_per_second) == (10.0, 10.0)
    rows, window = next(got)
    assert (window, rows[0].tokens_per_second) == (20.0, 15.0)
    assert clock.slept == [10.0, 20.0]


def test_frames_single_shot_stops_after_one() -> None:
    clock = FakeClock()
    got = list(frames(lambda: {"u": ""}, dict, window_s=3.0, interval_s=None, clock=clock, sleep=clock.sleep))
    assert got == [([], 3.0)]


def test_frames_without_window_read_one_scrape_each() -> None:
    texts = recent_texts()
    scrapes = 0

    def scrape() -> dict[str, str]:
        nonlocal scrapes
        scrapes += 1
        return {"http://head/metrics": texts[0], "http://worker/metrics": texts[1]}

    clock = FakeClock()
    got = frames(scrape, lambda: DEPLOYMENTS, window_s=None, interval_s=None, clock=clock, sleep=clock.sleep)
    ((rows, window),) = list(got)
    assert (scrapes, clock.slept, window) == (1, [], 10.0)  # no waiting; the gauges' own window
    assert {r.model: r.tokens_per_second for r in rows}[SMOL] == 80.0

    watched = frames(scrape, lambda: DEPLOYMENTS, window_s=None, interval_s=5.0, clock=clock, sleep=clock.sleep)
    next(watched), next(watched), next(watched)
    assert (scrapes, clock.slept) == (4, [5.0, 5.0])


def test_frames_measure_a_window_when_the_cluster_keeps_no_recent_rates() -> None:
    """A cluster that exports counters but no recent-rate gauge (an older version): two scrapes."""
    scrapes = iter([{"u": head_text(before=True)}, {"u": head_text(before=False)}])
    clock = FakeClock()
    got = frames(lambda: next(scrapes), dict, window_s=None, interval_s=None, clock=clock, sleep=clock.sleep)
    rows, window = next(got)
    assert (clock.slept, window) == ([10.0], 10.0)
    assert {r.model: r.tokens_per_second for r in rows}[SMOL] == 60.0  # router A's +600 in 10 s
    scrapes = iter([{"u": head_text(before=True)}, {"u": head_text(before=False)}, {"u": head_text(before=False)}])
    watched = frames(lambda: next(scrapes), dict, window_s=None, interval_s=5.0, clock=clock, sleep=clock.sleep)
    next(watched), next(watched)
    assert clock.slept[-2:] == [10.0, 10.0]  # redrawn no faster than the window


def test_frames_without_window_need_none_before_any_traffic() -> None:
    clock = FakeClock()
    got = list(frames(lambda: {"u": ""}, dict, window_s=None, interval_s=None, clock=clock, sleep=clock.sleep))
    assert (got, clock.slept) == ([([], 10.0)], [])


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="orchestrator")
    command.add_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["status", *argv])


def test_arguments() -> None:
    ns = parse([])
    assert (ns.watch, ns.window, ns.json, ns.address, ns.metrics_url) == (None, None, False, None, None)
    assert ns.func is status_command
    assert parse(["--watch"]).watch == 5.0
    assert parse(["--watch", "2", "--window", "3", "--json"]).watch == 2.0
    assert parse(["--metrics-url", "http://a/metrics", "--metrics-url", "http://b/metrics"]).metrics_url == [
        "http://a/metrics",
        "http://b/metrics",
    ]
    with pytest.raises(SystemExit):
        parse(["--window", "0"])


def test_no_cluster_exits_1_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster(refusal="cannot reach a Ray cluster at {address}: Could not find any running Ray instance")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    done = run([], cluster, lambda request: httpx.Response(200))
    assert done.code == 1
    assert done.err == "error: cannot reach a Ray cluster at '10.0.0.1:6379': Could not find any running Ray instance\n"
    assert cluster.calls == ["connect 10.0.0.1:6379", "close"]


def test_command_prints_json_frame(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    scrapes: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        scrapes.append(request.url.host)
        before = scrapes.count(request.url.host) == 1
        text = head_text(before=before) if request.url.host == HEAD else worker_text(before=before)
        return httpx.Response(200, text=text)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = FakeCluster()
    done = run(["--json", "--window", "0.01"], cluster, answer)
    assert done.code == 0
    frame = json.loads(done.out)
    assert [m["model"] for m in frame["models"]] == ["fresh-model", QWEN, SMOL, TINY]
    assert frame["models"][2]["replicas"] == {"running": 1, "target": 2}
    assert frame["window_s"] > 0
    assert sorted(scrapes) == [HEAD, HEAD, WORKER, WORKER]
    assert cluster.calls == ["connect auto", "close"]
    assert done.err == ""
    assert capsys.readouterr() == ("", "")  # all output went to the given streams


def test_command_by_default_scrapes_each_node_once(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = {HEAD: recent_texts()[0], WORKER: recent_texts()[1]}
    scrapes: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        scrapes.append(request.url.host)
        return httpx.Response(200, text=texts[request.url.host])

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    done = run(["--json"], FakeCluster(), answer)
    assert done.code == 0 and sorted(scrapes) == [HEAD, WORKER]
    frame = json.loads(done.out)
    assert frame["window_s"] == 10.0
    smol = next(m for m in frame["models"] if m["model"] == SMOL)
    assert (smol["tokens_per_second"], smol["prefix_cache_hit_rate"]) == (80.0, 0.5)


def test_command_exits_1_when_no_endpoint_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = FakeCluster()
    done = run(
        ["--address", "ray://head:10001", "--metrics-url", "http://x:1/m"], cluster, lambda r: httpx.Response(404)
    )
    assert done.code == 1
    assert done.err == "error: no metrics endpoint answered (tried http://x:1/m)\n"
    assert cluster.calls == ["connect ray://head:10001", "close"]


def test_watch_ends_with_0_on_ctrl_c() -> None:
    answered = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal answered
        answered += 1
        if answered > 3:
            raise KeyboardInterrupt
        return httpx.Response(200, text=worker_text(before=False))

    done = run(["--watch", "0.01", "--window", "0.01", "--metrics-url", "http://w/metrics"], FakeCluster(), answer)
    assert done.code == 0
    assert (
        done.out.count("APP  ") == 2 and "rates over" in done.out and "\x1b[2J" not in done.out
    )  # no tty: no clearing


def test_module_imports_neither_ray_nor_http() -> None:
    """``orchestrator --help`` imports this package; Ray, httpx and the parser load on use."""
    forbidden = ["ray", "httpx", "prometheus_client"]
    code = f"import sys, orchestrator.status; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_surface() -> None:
    assert all(hasattr(orchestrator.status, name) for name in orchestrator.status.__all__)
    assert {"add_command", "ModelStatus"} <= set(orchestrator.status.__all__)
