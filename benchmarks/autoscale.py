"""Queue-depth autoscaling, watched: load, waiting requests and replicas over time.

    .venv/bin/python benchmarks/autoscale.py [--workers 4] [--max-load-s 600] [--max-replicas 3]

Starts ``ray start --head`` (metrics export on loopback, replicas reporting every second)
and ``serve deploy``s one tiny model whose engine runs 2 sequences at once, with
``min_replicas 1``, ``target_waiting_per_replica 1``, ``upscale_delay_s 2`` and
``downscale_delay_s 20``. After 10 s idle, ``--workers`` clients send long completions
(400 tokens, not streamed, so the clients leave the CPU to the engines) back to back until a
second replica has served for 20 s (or ``--max-load-s``); then the load stops and the script
waits for the model to return to one replica. Every second it reads the autoscaling policy's own gauges
from Ray's metrics export (waiting requests, running and target replicas) and prints a line.

Reaction time is measured from the first second more requests are in flight than the engine
runs at once (a queue has formed) to the first second a second replica is running (Serve
counts a replica as running once its engine has started and it takes requests). The last
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cluster import serve_cluster
from benchmarks.vs_vllm import free_port
from orchestrator.engine.weights import build_tiny_llama
from orchestrator.status.exposition import parse_samples

MODEL = "tiny-scale"


def policy_view(metrics_url: str) -> dict[str, float]:
    """The policy's gauges for the model: waiting, running requests, target/running replicas."""
    names = {
        "ray_orchestrator_model_waiting_requests": "waiting",
        "ray_orchestrator_model_running_requests": "running",
        "ray_orchestrator_model_target_replicas": "target",
        "ray_orchestrator_model_running_replicas": "replicas",
    }
    out: dict[str, float] = {}
    try:
        text = httpx.get(metrics_url, timeout=5).text
    except httpx.HTTPError:
        return out
    for sample in parse_samples(text):
        if sample.name in names and sample.labels.get("model") == MODEL:
            out[names[sample.name]] = sample.value
    return out


class Load:
    """``workers`` threads sending long completions back to back while ``on`` is set."""

    def __init__(self, url: str, workers: int) -> None:
        self.url = url
        self.on = threading.Event()
        self.stop = threading.Event()
        self.in_flight = 0
        self.done = 0
        self.errors = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]

    def _loop(self) -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
        with httpx.Client(timeout=300) as http:
            while not self.stop.is_set():
                if not self.on.wait(timeout=0.5):
                    continue
                with self._lock:
                    self.in_flight += 1
                try:
                    ok = http.post(self.url, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with self._lock:
                    self.in_flight -= 1
                    self.done += ok
                    self.errors += not ok

    def start(self) -> None:
        for t in self.threads:
            t.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-load-s", type=float, default=600)
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--settle-timeout-s", type=float, default=240)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="orch-autoscale-") as tmp:
        work = Path(tmp)
        entry = {
            "name": MODEL,
            "source": {"kind": "local", "path": str(build_tiny_llama(work / "tiny", seed=0))},
            "context_window": 512,
            "engine_args": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 2},
            "resources": {"device": "cpu", "cpus": 0.5},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": args.max_replicas,
                "target_waiting_per_replica": 1,
                "upscale_delay_s": 2,
                "downscale_delay_s": 20,
            },
            "overload": {"max_waiting_per_replica": 64},
        }
        (work / "catalog.yaml").write_text(yaml.safe_dump(entry))
        http, metrics = free_port(), free_port()
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": http},
            "applications": [
                {"name": "scale", "route_prefix": "/", "import_path": "orchestrator.serving:build_app",
                 "args": {"catalog": [str(work / "catalog.yaml")], "settings": {"open_access": True}}},
            ],
        }  # fmt: skip
        fast_reports = {
            "RAY_metrics_report_interval_ms": "1000",
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
        }
        with serve_cluster(work, config, extra_env=fast_reports, metrics_port=metrics):
            base = f"http://127.0.0.1:{http}"
            print("deploying ...", flush=True)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/health/ready", params={"model": MODEL}, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            result = watch(base + "/v1/completions", f"http://127.0.0.1:{metrics}/metrics", args)
    print(json.dumps(result))


def watch(url: str, metrics_url: str, args: argparse.Namespace) -> dict[str, Any]:
    load = Load(url, args.workers)
    load.start()
    start = time.monotonic()
    queue_seen: float | None = None
    scaled_at: float | None = None
    peak = 0
    settled_at: float | None = None
    load_end = 10 + args.max_load_s
    print(f"{'t(s)':>6}  {'load':>4}  {'waiting':>7}  {'running':>7}  {'replicas':>8}  {'target':>6}")
    while True:
        t = time.monotonic() - start
        if 10 <= t < load_end:
            load.on.set()
        else:
            load.on.clear()
        view = policy_view(metrics_url)
        waiting, replicas = view.get("waiting", 0.0), int(view.get("replicas", 0))
        peak = max(peak, replicas)
        if queue_seen is None and load.in_flight > 2:  # the engine runs 2: the rest wait
            queue_seen = t
        if scaled_at is None and replicas >= 2:
            scaled_at = t
        if scaled_at is not None and load_end > t + 20:
            load_end = t + 20  # the new replica served for 20 s: end the load
        print(
            f"{t:6.0f}  {load.in_flight:4d}  {waiting:7.1f}  {view.get('running', 0.0):7.1f}  "
            f"{replicas:8d}  {int(view.get('target', 0)):6d}",
            flush=True,
        )
        if t > load_end and load.in_flight == 0 and replicas == 1 and peak >= 2:
            settled_at = t
            break
        if t > load_end + args.settle_timeout_s:
            break
        time.sleep(1)
    load.stop.set()
    return {
        "workers": args.workers,
        "peak_replicas": peak,
        "reaction_s": None if queue_seen is None or scaled_at is None else round(scaled_at - queue_seen, 1),
        "load_s": round(load_end - 10, 1),
        "back_to_min_after_load_s": None if settled_at is None else round(settled_at - load_end, 1),
        "requests": load.done,
        "errors": load.errors,
    }


if __name__ == "__main__":
    main()
