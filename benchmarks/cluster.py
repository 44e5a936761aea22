"""A throwaway one-machine Ray cluster with a Serve config deployed, for benchmarks."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from benchmarks.vs_vllm import BIN, free_port


def run(env: dict[str, str], *args: str) -> str:
    """Runs a command; returns its stdout or raises with its output."""
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@contextmanager
def serve_cluster(
    work: Path, config: dict[str, Any], *, extra_env: dict[str, str] | None = None, metrics_port: int | None = None
) -> Iterator[dict[str, str]]:
    """Starts ``ray start --head`` on 127.0.0.1 (token auth, a private token), ``serve
    deploy``s ``config``, yields the environment that reaches the cluster, and always shuts
    Serve and Ray down.

    Args:
        work: folder for the Serve config file.
        config: the Serve config (applications, http_options).
        extra_env: more variables for Ray's processes (e.g. Serve's ingress switches).
        metrics_port: Ray's metrics export port (Prometheus text), if wanted.
    """
    gcs, dash = free_port(), free_port()
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_ADDRESS": f"127.0.0.1:{gcs}",
        "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{dash}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        # One machine: Ray keeps 127.0.0.1 as the node address, so its servers listen on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    head = ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1"]
    if metrics_port:
        head.append(f"--metrics-export-port={metrics_port}")
    run(env, str(BIN / "ray"), "start", *head, f"--dashboard-port={dash}", "--num-cpus=8", "--disable-usage-stats")
    try:
        run(env, str(BIN / "serve"), "deploy", str(work / "serve.yaml"), "--address", env["RAY_DASHBOARD_ADDRESS"])
        yield env
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", env["RAY_DASHBOARD_ADDRESS"]],
                       env=env, capture_output=True, timeout=120, check=False)  # fmt: skip
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120, check=False)
