"""What the gateway adds per request: the same router with keys, limits and metering on
against open mode (no gateway), in one Ray cluster, requests interleaved between the two.

    .venv/bin/python benchmarks/gateway_overhead.py [--sequential 400] [--requests 400] [--concurrency 16]

Starts ``ray start --head`` and ``serve deploy``s two apps with the same one-model catalog:
``/open`` (``open_access``) and ``/gw`` (admin key, SQLite ledger, a key with RPM/TPM
limits and credits high enough never to refuse, so every check runs). Then:

1. sequential non-streaming completions with one output token, alternating between the
   apps, so drift on this shared machine hits both alike: the latency difference is what
   the gateway's two calls (admit, settle) and the metering add;
2. streaming load (64 output tokens, ``--concurrency`` at a time) in alternating blocks;
3. the ledger alone, in-process (admit + settle on SQLite), to show its own CPU cost.

Checks that the gateway really ran (401 without a key, every request recorded). The last
line is JSON with ``added_p50_ms``, ``added_p99_ms`` and ``throughput_ratio``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cluster import serve_cluster
from benchmarks.load import LoadResult, percentile, run_load, unrefused_key
from benchmarks.vs_vllm import free_port
from orchestrator.engine.weights import build_tiny_llama

ADMIN_KEY = "benchmark-admin-key-" + secrets.token_hex(8)


def summary(load: LoadResult) -> dict[str, Any]:
    data = load.summary()
    data.pop("server_cpu_ms_per_request")  # not separable per app in one cluster
    return data


def wait_ready(urls: list[str], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(httpx.get(u + "/health", timeout=5).status_code == 200 for u in urls):
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise TimeoutError(urls)


def sequential(urls: dict[str, str], headers: dict[str, dict[str, str]], n: int) -> dict[str, list[float]]:
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 1, "temperature": 0}
    out: dict[str, list[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=60) as client:
        for i in range(n + 20):
            for name, url in urls.items():
                start = time.perf_counter()
                resp = client.post(url + "/v1/completions", json=body, headers=headers[name])
                elapsed = (time.perf_counter() - start) * 1000
                if resp.status_code != 200:
                    raise RuntimeError(resp.text[:300])
                if i >= 20:  # warm-up
                    out[name].append(elapsed)
    return out


def streaming(urls: dict[str, str], headers: dict[str, dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    prompt = [(7 * i) % 400 + 10 for i in range(64)]
    common: dict[str, Any] = {"prompt": prompt, "output_tokens": 64, "concurrency": args.concurrency}
    totals = {name: LoadResult(requests=0, errors=0, wall_s=0.0, output_tokens=0) for name in urls}
    blocks = 4
    for block in range(blocks + 1):
        for name, url in urls.items():
            count = args.concurrency if block == 0 else args.requests // blocks
            result = asyncio.run(run_load(url, "tiny", requests=count, headers=headers[name], **common))
            if block == 0:
                continue  # warm-up
            t = totals[name]
            t.requests += result.requests
            t.errors += result.errors
            t.wall_s += result.wall_s
            t.output_tokens += result.output_tokens
            t.ttft_s.extend(result.ttft_s)
    return totals


async def ledger_alone(work: Path, n: int) -> float:
    """Returns microseconds of admit + settle per request for the in-process ledger."""
    from orchestrator.gateway.journal import UsageJournal
    from orchestrator.gateway.ledger import Ledger
    from orchestrator.gateway.records import KeyLimits, UsageRecord
    from orchestrator.gateway.store import SQLStore

    ledger = Ledger(SQLStore(f"sqlite:///{work / 'alone.db'}"), UsageJournal(work / "alone-journal"))
    await ledger.start()
    key = (await ledger.create_key(KeyLimits(rpm=10**9, tpm=10**12, credits=Decimal(10**6)))).key
    start = time.perf_counter()
    for i in range(n):
        admission = await ledger.admit(key, ["tiny"], 100, f"r{i}")
        record = UsageRecord(
            request_id=f"r{i}", key_id=admission.key_id, model="tiny", prompt_tokens=10, completion_tokens=5,
            cost=Decimal("0.000002"), latency_ms=1.0, created_at=datetime.now(UTC),
        )  # fmt: skip
        await ledger.settle(admission, record)
    elapsed = time.perf_counter() - start
    await ledger.stop()
    return 1e6 * elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=400)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ray-env", action="append", default=[], help="KEY=VALUE for `ray start`'s environment")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-gw-bench-") as tmp:
        work = Path(tmp)
        catalog = work / "catalog.yaml"
        entry = {
            "name": "tiny",
            "source": {"kind": "local", "path": str(build_tiny_llama(work / "tiny", seed=0))},
            "context_window": 1024,
            "engine_args": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 64},
            "pricing": {"input_per_million": "0.1", "output_per_million": "0.2"},
            "resources": {"device": "cpu", "cpus": 1},
        }
        catalog.write_text(yaml.safe_dump(entry))
        db = f"sqlite:///{work / 'gw.db'}"
        http = free_port()
        app = {"import_path": "orchestrator.serving:build_app"}
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": http},
            "applications": [
                {**app, "name": "open", "route_prefix": "/open",
                 "args": {"catalog": [str(catalog)], "settings": {"open_access": True}}},
                {**app, "name": "gw", "route_prefix": "/gw",
                 "args": {"catalog": [str(catalog)], "settings": {"database_url": db, "allow_sqlite": True}}},
            ],
        }  # fmt: skip
        extra_env = {
            "ORCH_KV_CACHE_GB": "1",
            "ORCH_ADMIN_KEY": ADMIN_KEY,  # the gw app's routers read it from their environment
            **dict(pair.split("=", 1) for pair in args.ray_env),
        }
        with serve_cluster(work, config, extra_env=extra_env):
            base = f"http://127.0.0.1:{http}"
            urls = {"open": base + "/open", "gateway": base + "/gw"}
            print("deploying two apps (open, gateway) ...", flush=True)
            wait_ready(list(urls.values()))
            headers = {"open": {}, "gateway": unrefused_key(urls["gateway"], ADMIN_KEY)}
            print("sequential, 1 output token, interleaved ...", flush=True)
            latencies = sequential(urls, headers, args.sequential)
            print(f"streaming, 64 output tokens, {args.concurrency} concurrent, interleaved blocks ...", flush=True)
            loads = streaming(urls, headers, args)
            time.sleep(1)
            usage = httpx.get(
                urls["gateway"] + "/admin/usage",
                params={"group_by": "key"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ).json()["data"]
            recorded = usage[0]["requests"] if usage else 0
        alone_us = asyncio.run(ledger_alone(work, 5000))

    print(f"\n{'':10}{'lat p50':>10}{'lat p99':>10}{'req/s':>8}{'TTFT p50':>10}{'errors':>8}")
    for name in urls:
        load = loads[name]
        print(
            f"{name:10}{percentile(latencies[name], 0.5):8.2f}ms{percentile(latencies[name], 0.99):8.2f}ms"
            f"{load.rps:8.2f}{load.ttft_ms(0.5):8.1f}ms{load.errors:8d}"
        )
    expected = args.sequential + 20 + args.concurrency + args.requests
    print(f"gateway recorded {recorded} usage records (expected {expected}); ledger alone: {alone_us:.0f} us/request")
    final = {
        "open": {"latency_p50_ms": round(percentile(latencies["open"], 0.5), 2), "stream": summary(loads["open"])},
        "gateway": {
            "latency_p50_ms": round(percentile(latencies["gateway"], 0.5), 2),
            "stream": summary(loads["gateway"]),
        },
        "added_p50_ms": round(percentile(latencies["gateway"], 0.5) - percentile(latencies["open"], 0.5), 2),
        "added_p99_ms": round(percentile(latencies["gateway"], 0.99) - percentile(latencies["open"], 0.99), 2),
        "throughput_ratio": round(loads["gateway"].tokens_per_s / loads["open"].tokens_per_s, 3),
        "ledger_alone_us_per_request": round(alone_us, 1),
        "records_written": recorded,
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
