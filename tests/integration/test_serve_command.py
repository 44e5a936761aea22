"""``orchestrator serve`` as a user runs it: its metrics port, and ``orchestrator status``
(once and ``--watch``) against its cluster, under traffic; Ctrl-C leaves nothing behind.

Its own Ray cluster, beside the session's: the environment has no RAY_* variables and its
own HOME (so its own Ray token and an empty gateway database: open mode on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

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


class Served:
    def __init__(self, proc: subprocess.Popen[str], env: dict[str, str], port: int, lines: list[str]) -> None:
        self.proc, self.env, self.port, self.lines = proc, env, port, lines

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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("serve-command")
    catalog = work / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(tiny_entry("tiny-e", "e", build_tiny_llama(work / "tiny-e", seed=5))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ORCH_"))}
    env |= {"HOME": str(work / "home"), "RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "1000"}
    port, metrics_port = free_port(), free_port()
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
    served = Served(proc, env, port, lines)
    try:
        yield served
    finally:
        if proc.poll() is None:  # a test failed before Ctrl-C: everything it started goes
            left = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for process in left:  # HAProxy, say, holds fixed ports the next run needs
                with contextlib.suppress(psutil.Error):
                    process.kill()


def test_serve_prints_its_metrics_port_which_serves_every_series(served: Served) -> None:
    url = served.line(r"Metrics \(Prometheus text\) at (\S+)").group(1)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="none", max_retries=0)
    resp = client.chat.completions.create(model="e", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="e", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
    )
    assert len(list(stream)) > 1  # a time to first token
    # The model's own route, through HAProxy straight to the model's replica.
    own = served.line(r"its own route, without the router: (\S+)").group(1)
    assert own == f"http://127.0.0.1:{served.port}/models/tiny-e/v1"
    route = openai.OpenAI(base_url=own, api_key="none", max_retries=0)
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


_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def test_status_once_and_watching_under_traffic(served: Served) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="none", max_retries=0)
    with steady_load(client, "e", streams=2) as load:
        time.sleep(5)  # a few streams, so the window sees tokens
        done = served.status("--json", "--window", "5")
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
    assert row["requests"]["waiting"] is not None and row["requests"]["running"] is not None
    assert row["kv_cache_usage"] is not None and 0 <= row["kv_cache_usage"] <= 1
    for frame in frames:
        (watched,) = frame["models"]
        assert watched["model"] == "tiny-e" and watched["tokens_per_second"] > 0


def test_ctrl_c_stops_everything_it_started(served: Served) -> None:
    started = psutil.Process(served.proc.pid).children(recursive=True)
    assert any("VLLM" in " ".join(p.cmdline()) or p.name().startswith("VLLM") for p in started if p.is_running())
    served.proc.send_signal(signal.SIGINT)
    assert served.proc.wait(timeout=180) == 0
    time.sleep(2)
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.name() for p in alive]
