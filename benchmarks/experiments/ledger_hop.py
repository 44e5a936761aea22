"""What one call to the ledger actor costs: as a Ray actor call, and over its Unix-socket
channel (orchestrator/serving/ledger_channel.py), at rest and while other processes keep
every core busy (as a vLLM engine core spinning and its worker computing do).

    .venv/bin/python benchmarks/experiments/ledger_hop.py [--calls 300] [--hogs 2]

Starts a local Ray on 127.0.0.1 and the real ledger actor (SQLite in a temporary folder),
creates a key, then from the driver times sequential ``authenticate`` calls (5 ms apart)
both ways, twice each, first at rest and then with ``--hogs`` busy-looping processes.
Prints p50/p90/p99 in milliseconds per way and load, and the actor-over-channel ratio of
the p50s, then the same as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.gateway.records import KeyLimits
from orchestrator.serving.gateway_server import LedgerActor
from orchestrator.serving.ledger_channel import Channel


def _hog() -> None:
    while True:
        pass


async def _timed(call: Callable[[], Awaitable[Any]], calls: int) -> dict[str, float]:
    for _ in range(20):
        await call()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.005)
    times.sort()
    return {f"p{q}": round(1000 * times[min(len(times) - 1, int(len(times) * q / 100))], 3) for q in (50, 90, 99)}


async def measure(calls: int, hogs: int, folder: str) -> dict[str, Any]:
    settings = {"database_url": f"sqlite:///{folder}/ledger.db", "usage_journal_dir": f"{folder}/journal"}
    actor = ray.remote(LedgerActor).options(num_cpus=0, max_concurrency=10_000).remote(settings)
    await actor.start.remote()
    created = await actor.call.remote("create_key", KeyLimits(name="bench"))
    _node, path = await actor.channel_address.remote()
    channel = await Channel.open(path)
    ways: dict[str, Callable[[], Awaitable[Any]]] = {
        "actor_call": lambda: actor.call.remote("authenticate", created.key),
        "channel": lambda: channel.call("authenticate", created.key),
    }
    out: dict[str, Any] = {}
    for load in ("at_rest", f"{hogs}_busy_processes"):
        procs = []
        if load != "at_rest":
            procs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(hogs)]
            for proc in procs:
                proc.start()
        try:
            figures: dict[str, Any] = {}
            for _round in range(2):
                for way, call in ways.items():
                    figures[way] = await _timed(call, calls)  # the second round (warm) is kept
            figures["actor_over_channel_p50"] = round(figures["actor_call"]["p50"] / figures["channel"]["p50"], 1)
        finally:
            for proc in procs:
                proc.kill()
        out[load] = figures
        for way in ways:
            f = figures[way]
            print(f"{load:20} {way:11} p50 {f['p50']:8.3f} ms  p90 {f['p90']:8.3f}  p99 {f['p99']:8.3f}", flush=True)
        print(f"{load:20} actor call / channel, p50: {figures['actor_over_channel_p50']}x", flush=True)
    channel.close()
    await actor.stop.remote()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--hogs", type=int, default=2, help="busy-looping processes for the loaded measurement")
    args = parser.parse_args()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="orch-ledger-hop-") as folder:
            print(json.dumps(asyncio.run(measure(args.calls, args.hogs, folder))))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
