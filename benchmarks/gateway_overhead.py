"""What the gateway adds per request: the same router with keys, limits and metering on
(SQLite ledger) against open mode (no gateway), same tiny model, one run.

    .venv/bin/python benchmarks/gateway_overhead.py [--sequential 300] [--requests 300] [--concurrency 16]

For each mode it starts ``orchestrator serve`` on a one-model catalog and measures
(1) latency of sequential non-streaming completions with one output token, where the
gateway's two calls (admit, settle) are the biggest part of what differs, and (2) a
streaming load (64 output tokens, ``--concurrency`` at a time). The key used has RPM/TPM
limits high enough never to refuse, so every check runs. The last line is JSON with
``added_p50_ms``, ``added_p99_ms`` and ``throughput_ratio``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.load import LoadResult, run_load
from benchmarks.vs_vllm import BIN, free_port, stop, tree_cpu_s, wait_ready
from orchestrator.engine.weights import build_tiny_llama

ADMIN_KEY = "benchmark-admin-key-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential_latency_ms(base_url: str, headers: dict[str, str], n: int) -> list[float]:
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 1, "temperature": 0}
    out = []
    with httpx.Client(timeout=60, headers=headers) as client:
        for i in range(n + 20):
            start = time.perf_counter()
            resp = client.post(base_url + "/v1/completions", json=body)
            elapsed = (time.perf_counter() - start) * 1000
            if resp.status_code != 200:
                raise RuntimeError(resp.text[:300])
            if i >= 20:  # warm-up
                out.append(elapsed)
    return out


def run_mode(name: str, catalog: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "ORCH_KV_CACHE_GB": "1", "ORCH_CACHE_DIR": str(work / f"cache-{name}")}
    headers: dict[str, str] = {}
    if name == "gateway":
        env.update(ORCH_ADMIN_KEY=ADMIN_KEY, ORCH_DATABASE_URL=f"sqlite:///{work / 'bench.db'}")
        create = ["keys", "create", "--rpm", "1000000", "--tpm", "1000000000", "--credits", "1000"]
        made = subprocess.run([str(BIN / "orchestrator"), *create], env=env, capture_output=True, text=True, check=True)
        headers["Authorization"] = "Bearer " + made.stdout.strip().splitlines()[-1]
    else:
        env["ORCH_OPEN_ACCESS"] = "true"
    cmd = [str(BIN / "orchestrator"), "serve", "--catalog", str(catalog), "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    with (work / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(base_url + "/health", proc)
            latencies = sequential_latency_ms(base_url, headers, args.sequential)
            prompt = [(7 * i) % 400 + 10 for i in range(64)]
            common: dict[str, Any] = {"prompt": prompt, "output_tokens": 64, "concurrency": args.concurrency}
            asyncio.run(run_load(base_url, "tiny", requests=args.concurrency, headers=headers, **common))
            before = tree_cpu_s(proc.pid)
            load: LoadResult = asyncio.run(
                run_load(base_url, "tiny", requests=args.requests, headers=headers, **common)
            )
            load.server_cpu_s = tree_cpu_s(proc.pid) - before
        finally:
            stop(proc)
    return {
        "latency_p50_ms": round(percentile(latencies, 0.5), 2),
        "latency_p99_ms": round(percentile(latencies, 0.99), 2),
        "stream": load.summary(),
        "_load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-gw-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "tiny", seed=0)
        catalog = work / "catalog.yaml"
        entry = {
            "name": "tiny",
            "source": {"kind": "local", "path": str(model)},
            "context_window": 1024,
            "engine_args": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 64},
            "pricing": {"input_per_million": "0.1", "output_per_million": "0.2"},
            "resources": {"device": "cpu", "cpus": 1},
        }
        catalog.write_text(yaml.safe_dump(entry))
        results = {}
        for name in ("open", "gateway"):
            print(f"== {name} ...", flush=True)
            results[name] = run_mode(name, catalog, work, args)
            print(json.dumps({k: v for k, v in results[name].items() if k != "_load"}), flush=True)
    o, g = results["open"], results["gateway"]
    print(f"\n{'':10}{'lat p50':>10}{'lat p99':>10}{'req/s':>8}{'TTFT p50':>10}{'CPU/req':>10}")
    for name, r in results.items():
        load = r["_load"]
        print(
            f"{name:10}{r['latency_p50_ms']:8.1f}ms{r['latency_p99_ms']:8.1f}ms{load.rps:8.2f}"
            f"{load.ttft_ms(0.5):8.1f}ms{load.cpu_ms_per_request:8.1f}ms"
        )
    final = {
        "open": {k: v for k, v in o.items() if k != "_load"},
        "gateway": {k: v for k, v in g.items() if k != "_load"},
        "added_p50_ms": round(g["latency_p50_ms"] - o["latency_p50_ms"], 2),
        "added_p99_ms": round(g["latency_p99_ms"] - o["latency_p99_ms"], 2),
        "throughput_ratio": round(g["_load"].tokens_per_s / o["_load"].tokens_per_s, 3),
        "server_cpu_added_ms_per_request": round(g["_load"].cpu_ms_per_request - o["_load"].cpu_ms_per_request, 1),
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
