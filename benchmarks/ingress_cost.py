"""What orchestrator-haproxy's rules cost HAProxy per request: its CPU time per chat
completion on /v1 with Serve's config alone, with the model routes, and with the model
routes and affinity, in front of stand-in replicas (no Ray, no engine).

    .venv/bin/python benchmarks/ingress_cost.py [--requests 3000] [--rounds 3]

For each body size (a short chat, a chat with an 8 KiB system prompt, one of 60 KiB) and
each config, sends ``--requests`` requests one after another through the bundled HAProxy
and reads the CPU time HAProxy's process used (user + system). Prints one line per case and,
last, a JSON object: microseconds of HAProxy CPU per request by body and config (the
median over ``--rounds``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from orchestrator.ingress import real_haproxy, rewrite
from tests.unit.test_ingress_routes import ROUTES, catalog_apps, free_port, render, stand_in

CONFIGS: dict[str, dict[str, str] | None] = {
    "serve": None,  # no ORCH_INGRESS_ROUTES: Serve's config, moved to loopback
    "routes": {"ORCH_INGRESS_AFFINITY": "0"},
    "routes+affinity": {},
}


def bodies() -> dict[str, dict[str, Any]]:
    def chat(system: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}]
        return {"model": "e", "messages": messages, "max_tokens": 8}

    return {"short": chat("You help."), "8KiB": chat("x " * 4096), "60KiB": chat("x " * 30_000)}


def cpu_per_request(work: Path, environ: dict[str, str] | None, body: dict[str, Any], requests: int) -> float:
    """Microseconds of HAProxy CPU per request."""
    router, replicas = stand_in("router"), [stand_in("replica-0"), stand_in("replica-1")]
    port = free_port()
    config = render(work, catalog_apps(router.server_port, [r.server_port for r in replicas]), port)
    cfg = work / "haproxy.cfg"
    routes = {"router": ROUTES.router, "models": dict(ROUTES.models)}
    given = {} if environ is None else {"ORCH_INGRESS_ROUTES": json.dumps(routes), **environ}
    cfg.write_text(rewrite(config, cfg, given))
    haproxy = subprocess.Popen([real_haproxy(), "-db", "-f", str(cfg)], stderr=subprocess.DEVNULL)
    content = json.dumps(body).encode()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(600):  # until it listens and has checked the replicas
                try:
                    if client.post("/v1/chat/completions", content=content).json()["server"].startswith("replica"):
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            process = psutil.Process(haproxy.pid)
            before = sum(process.cpu_times()[:2])
            for _ in range(requests):
                client.post("/v1/chat/completions", content=content).raise_for_status()
            used = sum(process.cpu_times()[:2]) - before
    finally:
        haproxy.kill()
        haproxy.wait()
        for server in (router, *replicas):
            server.shutdown()
            server.server_close()
    return 1e6 * used / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, dict[str, float]] = {}
    for size, body in bodies().items():
        for name, environ in CONFIGS.items():
            runs = []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as work:
                    runs.append(cpu_per_request(Path(work), environ, body, args.requests))
            result.setdefault(size, {})[name] = round(statistics.median(runs), 1)
            print(f"{size:>6} {name:>16}: {result[size][name]} us of HAProxy CPU per request {runs}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
