"""``orchestrator serve`` as a user runs it: its metrics port, and ``orchestrator status``
(once and ``--watch``) against its cluster, under traffic; every socket its processes listen
on is on loopback; an engine ends with its replica's worker; killed with SIGKILL it leaves
nothing behind and starts again on the same port; Ctrl-C leaves nothing behind.

It also shows HAProxy sending a generation request on the router's /v1 straight to its
model's application (orchestrator/ingress.py), with the key's limits holding there.

Its own Ray cluster, beside the session's: the environment has no RAY_* variables and its
own HOME (so its own Ray token and an empty gateway database), and an admin key, with which
the fixture makes the API key the tests use. The tests run in order on one command, then on
the one started again after the SIGKILL."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psutil
import pytest
import yaml

from orchestrator.engine.weights import build_tiny_llama
from orchestrator.status.exposition import parse_samples
from tests.integration.conftest import BIN, free_port, steady_load, tiny_entry

pytestmark = pytest.mark.integration


# Ours, measured at the router and by the scaling policy, and vLLM's from the model's
# replica (labelled model_name), by model; Serve's for the model's deployment.
WANTED = {
    "ray_serve_autoscaling_target_replicas",
    "ray_orchestrator_requests_total",
    "ray_orchestrator_time_to_first_token_seconds_bucket",
    "ray_orchestrator_model_running_replicas",
    "ray_orchestrator_model_waiting_requests",
    "ray_vllm_generation_tokens_total",
    "ray_vllm_time_to_first_token_seconds_bucket",
}


ADMIN_KEY = "serve-command-admin-" + secrets.token_hex(8)


class Served:
    def __init__(self, proc: subprocess.Popen[str], env: dict[str, str], port: int, lines: list[str]) -> None:
        self.proc, self.env, self.port, self.lines = proc, env, port, lines
        self.catalog = Path()
        self.api_key = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None, route: str = "") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}{route}/v1", api_key=api_key or self.api_key, max_retries=0, timeout=120
        )

    def new_key(self, **limits: object) -> dict[str, Any]:
        """Creates an API key through the admin API; returns the answer (``key``, ``info``)."""
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        resp = httpx.post(f"{self.base_url}/admin/keys", headers=headers, json=limits, timeout=60)
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    def tree(self) -> list[psutil.Process]:
        """The command and every process under it."""
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    @property
    def metrics_port(self) -> int:
        return int(self.line(r"Metrics \(Prometheus text\) at http://[\d.]+:(\d+)/").group(1))

    def line(self, pattern: str) -> re.Match[str]:
        found = [m for line in self.lines if (m := re.search(pattern, line))]
        assert found, self.lines
        return found[0]

    def status(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        address = self.line(r"Ray cluster at (\S+):").group(1)
        return subprocess.run(
            [str(BIN / "orchestrator"), "status", "--address", address, *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip


def _start(env: dict[str, str], catalog: Path, port: int, metrics_port: int) -> Served:
    """Starts ``orchestrator serve`` and returns it once it says it serves."""
    proc = subprocess.Popen(
        [str(BIN / "orchestrator"), "serve", "--catalog", str(catalog), "--port", str(port),
         "--metrics-port", str(metrics_port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("Press Ctrl-C"):
            break
    assert lines and lines[-1].startswith("Press Ctrl-C"), "\n".join(lines[-40:])
    return Served(proc, env, port, lines)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("serve-command")
    catalog = work / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(tiny_entry("tiny-e", "e", build_tiny_llama(work / "tiny-e", seed=5))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ORCH_"))}
    env |= {"HOME": str(work / "home"), "RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "1000"}
    env["ORCH_ADMIN_KEY"] = ADMIN_KEY
    # Ray 2.60's raylet kills a dead worker's process group, which holds the worker's vLLM
    # engines; it cannot once the raylet is gone too (serve killed with SIGKILL), which is how
    # engines were left behind. Off here, so that what is tested is what holds without it.
    env["RAY_process_group_cleanup_enabled"] = "0"
    served = _start(env, catalog, free_port(), free_port())
    served.catalog = catalog
    served.api_key = served.new_key(name="serve-command")["key"]
    try:
        yield served
    finally:
        proc = served.proc  # the command started last
        if proc.poll() is None:  # a test failed before Ctrl-C: everything it started goes
            left = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for process in left:  # HAProxy, say, holds fixed ports the next run needs
                with contextlib.suppress(psutil.Error):
                    process.kill()


def test_serve_prints_its_metrics_port_which_serves_every_series(served: Served) -> None:
    url = served.line(r"Metrics \(Prometheus text\) at (\S+)").group(1)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
    client = served.client()
    resp = client.chat.completions.create(model="e", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="e", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    )
    assert len(list(stream)) > 1  # a time to first token
    # The model's own route, through HAProxy straight to the model's replica.
    own = served.line(r"its own route, without the router: (\S+)").group(1)
    assert own == f"http://127.0.0.1:{served.port}/models/tiny-e/v1"
    route = openai.OpenAI(base_url=own, api_key=served.api_key, max_retries=0)
    assert [m.id for m in route.models.list()] == ["tiny-e"]
    chunks = list(route.completions.create(model="e", prompt="Hi", max_tokens=4, stream=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    names: set[str] = set()
    deadline = time.monotonic() + 120
    # Under load: Ray stops exporting a gauge that is not set again.
    with steady_load(client, "e", streams=1) as load:
        while time.monotonic() < deadline:  # Ray exports every second here
            samples = parse_samples(httpx.get(url, timeout=30).text, prefix="ray_")  # ours, vLLM's, Serve's
            names = {s.name for s in samples if "tiny-e" in (s.labels.get("model"), s.labels.get("model_name"))}
            # Serve's, labelled by deployment: the model's ModelServer.
            names |= {s.name for s in samples if s.labels.get("deployment") == "model-tiny-e"}
            if names >= WANTED:
                break
            time.sleep(2)
    assert not load.failures, load.failures
    assert names >= WANTED, sorted(names)


def _requests_by_deployment(served: Served) -> dict[tuple[str, str, str], float]:
    """ray_orchestrator_requests_total of model tiny-e by the deployment that counted it (the
    router's, or the model's when its own application answered), route and status."""
    text = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=30).text
    counts: dict[tuple[str, str, str], float] = defaultdict(float)
    for sample in parse_samples(text, prefix="ray_orchestrator_requests"):
        if sample.name == "ray_orchestrator_requests_total" and sample.labels.get("model") == "tiny-e":
            labels = sample.labels
            counts[(labels.get("deployment", ""), labels.get("route", ""), labels.get("status", ""))] += sample.value
    return counts


def _increase(before: dict[Any, float], after: dict[Any, float], **where: str) -> float:
    """How much the counts matching ``where`` (deployment, route, status) grew."""

    def total(counts: dict[Any, float]) -> float:
        found = 0.0
        for (deployment, route, status), value in counts.items():
            labels = {"deployment": deployment, "route": route, "status": status}
            found += value if all(labels[name] == wanted for name, wanted in where.items()) else 0
        return found

    return total(after) - total(before)


def test_v1_sends_a_catalog_models_requests_straight_to_its_application(served: Served) -> None:
    before = _requests_by_deployment(served)
    key = served.new_key(rpm=3)["key"]
    client = served.client(key)
    messages = anthropic.Anthropic(base_url=served.base_url, api_key=key, max_retries=0, timeout=120)
    user = [{"role": "user", "content": "Hi"}]
    # By alias, display name and backend id, in two dialects, within the key's 3 a minute.
    raw = client.chat.completions.with_raw_response.create(model="e", messages=user, max_tokens=2)  # type: ignore[arg-type]
    assert raw.headers["x-ratelimit-limit-requests"] == "3" and raw.headers["x-ratelimit-remaining-requests"] == "2"
    chunks = list(client.completions.create(model="tiny-e", prompt="Hi", max_tokens=2, stream=True))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    reply = messages.messages.create(model="test-org/tiny-e", max_tokens=2, messages=user)  # type: ignore[arg-type]
    assert reply.usage.output_tokens == 2
    # The fourth this minute is refused on /v1, in each dialect's envelope.
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="e", messages=user, max_tokens=2)  # type: ignore[arg-type]
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError) as told:
        messages.messages.create(model="e", max_tokens=2, messages=user)  # type: ignore[arg-type]
    assert told.value.body["type"] == "error" and told.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    # The model's application counted every one of them (the only 429s and Messages requests
    # of model tiny-e here); the router none.
    deadline = time.monotonic() + 120
    after = _requests_by_deployment(served)
    mine = {"deployment": "model-tiny-e"}
    while time.monotonic() < deadline and (
        _increase(before, after, **mine, status="429") < 2
        or _increase(before, after, **mine, route="/v1/messages", status="200") < 1
    ):
        time.sleep(1)  # Ray exports every second here
        after = _requests_by_deployment(served)
    assert _increase(before, after, **mine, status="429") == 2, (before, after)
    assert _increase(before, after, **mine, route="/v1/messages", status="200") == 1, (before, after)
    assert _increase(before, after, **mine, route="/v1/chat/completions", status="200") >= 1, (before, after)
    assert _increase(before, after, deployment="router") == 0, (before, after)
    # A name outside the catalog still gets the router's answer.
    with pytest.raises(openai.NotFoundError) as unknown:
        served.client().chat.completions.create(model="nope", messages=user, max_tokens=2)  # type: ignore[arg-type]
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as unknown_message:
        anthropic.Anthropic(base_url=served.base_url, api_key=served.api_key, max_retries=0).messages.create(
            model="nope",
            max_tokens=2,
            messages=user,  # type: ignore[arg-type]
        )
    assert unknown_message.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def test_status_once_and_watching_under_traffic(served: Served, tmp_path: Path) -> None:
    client = served.client()
    # Without Ray: `orchestrator serve` publishes what status reads of its cluster, and the
    # rates are the gauges of one scrape. A `ray` that cannot be imported proves it.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('orchestrator status imported ray')\n")
    no_ray = {**served.env, "PYTHONPATH": os.pathsep.join([str(tmp_path), served.env.get("PYTHONPATH", "")])}
    address = served.line(r"Ray cluster at (\S+):").group(1)
    published = Path(served.env["HOME"]) / ".cache" / "orchestrator" / "clusters" / f"{address.replace(':', '_')}.json"
    assert published.is_file()
    # A system prompt of ~270 tokens (longer than a KV-cache block), repeated: the prefix cache hits.
    shared = [{"role": "system", "content": " ".join(f"rule {i}" for i in range(40))}]
    with steady_load(client, "e", streams=2) as load:
        for _ in range(3):
            client.chat.completions.create(
                model="e", messages=[*shared, {"role": "user", "content": "hi"}], max_tokens=2
            )
        time.sleep(5)  # a few streams, so the processes' recent rates see tokens
        done = subprocess.run(
            [str(BIN / "orchestrator"), "status", "--address", address, "--json"],
            env=no_ray, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        # Through an exec that restores SIGINT's default: a shell's background job (how a
        # suite may be run) starts with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt, so Ctrl-C would not reach the command.
        watch = subprocess.Popen(
            [sys.executable, "-c", _WITH_SIGINT, str(BIN / "orchestrator"), "status",
             "--address", served.line(r"Ray cluster at (\S+):").group(1), "--json", "--watch", "3", "--window", "3"],
            env={**served.env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert watch.stdout is not None
        lines = [watch.stdout.readline() for _ in range(2)]
        watch.send_signal(signal.SIGINT)
        code: int | None = None
        try:
            code = watch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            watch.send_signal(signal.SIGABRT)  # the fault handler writes every thread's stack to stderr
            watch.wait(timeout=30)
        stderr = watch.stderr.read() if watch.stderr else ""
        if code != 0:
            print("orchestrator status --watch after Ctrl-C; its stderr:", stderr)  # whole, unlike the assertion's
        assert all(lines) and code == 0, (lines, code, stderr[-2000:])  # Ctrl-C: 0
        frames = [json.loads(line) for line in lines]
    assert load.completed > 0 and not load.failures, load.failures
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])["models"]
    assert (row["application"], row["model"], row["status"]) == ("orchestrator", "tiny-e", "HEALTHY")
    assert row["replicas"] == {"running": 1, "target": 1}
    assert row["tokens_per_second"] > 0 and row["errors_per_minute"] == 0
    assert row["prefix_cache_hit_rate"] is not None and 0 < row["prefix_cache_hit_rate"] <= 1
    assert row["requests"]["waiting"] is not None and row["requests"]["running"] is not None
    assert row["kv_cache_usage"] is not None and 0 <= row["kv_cache_usage"] <= 1
    for frame in frames:
        (watched,) = frame["models"]
        assert watched["model"] == "tiny-e" and watched["tokens_per_second"] > 0


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # ::ffff:127.0.0.1
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _listeners(processes: list[psutil.Process]) -> dict[str, set[str]]:
    """Each process's listening TCP sockets and unconnected UDP sockets, as ``host:port``, by
    ``name[pid]``."""
    found: dict[str, set[str]] = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            sockets = {
                f"{c.laddr.ip}:{c.laddr.port}"
                for c in process.net_connections("inet")
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
            }
            if sockets:
                found[f"{process.name()}[{process.pid}]"] = sockets
    return found


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def _until_gone(processes: list[psutil.Process], deadline_s: float) -> list[psutil.Process]:
    """Polls until none of the processes runs, for up to ``deadline_s``; returns those that still do."""
    deadline = time.monotonic() + deadline_s
    while (alive := _alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _names(processes: list[psutil.Process]) -> list[str]:
    names = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(f"{process.name()}[{process.pid}]")
    return names


def _answers(served: Served, deadline_s: float) -> bool:
    """Polls a chat completion of model e until one succeeds, for up to ``deadline_s``."""
    client = served.client()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with contextlib.suppress(openai.OpenAIError):
            client.chat.completions.create(model="e", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            return True
        time.sleep(2)
    return False


def test_every_listener_is_on_loopback(served: Served) -> None:
    listeners = _listeners(served.tree())
    addresses = {address for found in listeners.values() for address in found}
    assert f"127.0.0.1:{served.port}" in addresses, listeners  # HAProxy's: the listing sees the tree
    beyond = {
        name: found for name, found in listeners.items() if not all(_loopback(a.rsplit(":", 1)[0]) for a in found)
    }
    assert not beyond, f"listening beyond loopback: {beyond}"


def test_an_engine_ends_with_its_replicas_worker(served: Served) -> None:
    from importlib.metadata import entry_points

    plugins = {p.name: p.value for p in entry_points(group="vllm.general_plugins")}
    assert plugins.get("orchestrator_lifeline") == "orchestrator.engine.lifeline:arm", (
        "vLLM finds the engines' lifeline through the project's entry point: reinstall it (pip install -e .)"
    )
    (worker,) = [p for p in served.tree() if "model-tiny-e" in " ".join(p.cmdline()) and "ServeReplica" in p.name()]
    engines = worker.children(recursive=True)
    assert any(p.name().startswith("VLLM") for p in engines), _names(engines)
    worker.kill()  # as the out-of-memory killer would: nothing in the worker runs
    left = _until_gone(engines, deadline_s=120)
    assert not left, f"outlived their replica's worker: {_names(left)}"
    assert _answers(served, deadline_s=600), "Serve did not replace the model's replica"


def test_killed_with_sigkill_it_leaves_nothing_and_starts_again(served: Served) -> None:
    tree = served.tree()
    assert any(p.name().startswith("VLLM") for p in tree) and any(p.name() == "haproxy" for p in tree), _names(tree)
    served.proc.kill()
    served.proc.wait()
    left = _until_gone(tree[1:], deadline_s=10)  # the bound
    assert not left, f"outlived orchestrator serve: {_names(left)}"
    again = _start(served.env, served.catalog, served.port, served.metrics_port)
    served.proc, served.lines = again.proc, again.lines  # the fixture stops this one
    assert _answers(served, deadline_s=120)


def test_ctrl_c_stops_everything_it_started(served: Served) -> None:
    started = psutil.Process(served.proc.pid).children(recursive=True)
    assert any("VLLM" in " ".join(p.cmdline()) or p.name().startswith("VLLM") for p in started if p.is_running())
    address = served.line(r"Ray cluster at (\S+):").group(1)
    published = Path(served.env["HOME"]) / ".cache" / "orchestrator" / "clusters" / f"{address.replace(':', '_')}.json"
    assert published.is_file()
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(timeout=180) == 0
    alive = _until_gone(started, deadline_s=30)
    assert not alive, _names(alive)
    assert not published.exists()  # what it published for orchestrator status is gone with it
