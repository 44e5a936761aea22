"""What one call costs from a Serve replica: through a Serve deployment handle, against a
plain Ray actor call. The figure behind routers calling the ledger actor directly.

    .venv/bin/python benchmarks/experiments/handle_hop.py [--calls 500]

Starts a local Ray with Serve on 127.0.0.1, deploys a caller, a trivial async deployment
and a trivial async actor, and from inside the caller times sequential awaited calls of
each. Prints milliseconds per call and their ratio, twice (the second run is warm).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.vs_vllm import free_port


class Echo:
    async def call(self, x: int) -> int:
        return x


class Caller:
    def __init__(self, deployment: Any, actor: Any) -> None:
        self.deployment = deployment.options(method_name="call")
        self.actor = actor

    async def run(self, calls: int) -> dict[str, float]:
        out = {}
        for name, call in (("serve_handle_ms", self.deployment.remote), ("ray_actor_ms", self.actor.call.remote)):
            for _ in range(50):  # warm-up
                await call(1)
            start = time.perf_counter()
            for _ in range(calls):
                await call(1)
            out[name] = round((time.perf_counter() - start) / calls * 1000, 3)
        out["ratio"] = round(out["serve_handle_ms"] / out["ray_actor_ms"], 2)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        actor = ray.remote(Echo).remote()  # type: ignore[attr-defined]
        app = serve.deployment(Caller).bind(serve.deployment(Echo).bind(), actor)
        caller = serve.run(app, name="hop", route_prefix=None)
        for _ in range(2):
            print(json.dumps(caller.run.remote(args.calls).result()), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
