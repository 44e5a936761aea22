"""A throwaway Prometheus server for tests: scrape given targets on 127.0.0.1, stop on exit.

``running_prometheus`` writes a ``prometheus.yml`` (one job ``ray``, optional rule file) into a
folder, starts ``prometheus`` with its TSDB in that folder, and yields the server's base URL once
``/-/ready`` answers. ``query``, ``query_range``, ``rule_groups`` and ``scrape_targets`` call its HTTP API.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.postgres import free_port

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
DEFAULT_BINARY = Path("/usr/bin/prometheus")


def find_prometheus() -> str:
    """Path of the ``prometheus`` server binary (PATH, then /usr/bin); FileNotFoundError when missing."""
    found = shutil.which("prometheus")
    if found:
        return found
    if DEFAULT_BINARY.is_file():
        return str(DEFAULT_BINARY)
    raise FileNotFoundError(
        "prometheus not found on PATH or at /usr/bin/prometheus: install it "
        "(Debian/Ubuntu: apt-get install prometheus); CI installs it, so the tests fail rather than skip"
    )


def _duration(seconds: float) -> str:
    """A Prometheus duration (``1500ms``) for a number of seconds."""
    return f"{max(1, round(seconds * 1000))}ms"


def write_config(path: Path, targets: list[str], scrape_interval_s: float, rules: Path | None = None) -> None:
    """Writes a prometheus.yml scraping ``targets`` (``host:port``) at ``/metrics`` as job ``ray``."""
    interval = _duration(scrape_interval_s)
    config: dict[str, Any] = {
        # The scrape timeout may not exceed the interval (Prometheus refuses such a config).
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "ray", "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}],
    }
    if rules is not None:
        config["rule_files"] = [str(Path(rules).resolve())]
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _log_tail(log: Path, lines: int = 40) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_prometheus(
    folder: Path, targets: list[str], scrape_interval_s: float = 1.0, rules: Path | None = None
) -> Iterator[str]:
    """Starts Prometheus scraping ``targets`` and yields its base URL ``http://127.0.0.1:<port>``.

    ``targets`` are ``host:port`` strings (``127.0.0.1:8080``), scraped at ``/metrics`` as job ``ray`` every
    ``scrape_interval_s`` seconds; ``rules`` is a rule file to load. The config (``prometheus.yml``), TSDB
    (``data``) and log (``prometheus.log``) live in ``folder``. The server listens on 127.0.0.1 only and is
    stopped on exit, also on error (SIGTERM, then SIGKILL after 10 s).

    Raises FileNotFoundError when prometheus is not installed, RuntimeError when it does not become ready
    within 60 s (with the tail of its log).
    """
    binary = find_prometheus()
    folder.mkdir(parents=True, exist_ok=True)
    config, log = folder / "prometheus.yml", folder / "prometheus.log"
    write_config(config, targets, scrape_interval_s, rules)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{_log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + "/-/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {READY_TIMEOUT_S:.0f}s:\n{_log_tail(log)}")
            time.sleep(0.2)
        yield base_url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


def _api(base_url: str, path: str, params: dict[str, Any] | None = None) -> Any:
    """Calls Prometheus' HTTP API and returns ``data``; AssertionError with its error on a failure."""
    resp = httpx.get(base_url + path, params=params, timeout=30)
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"GET {path} {params}: HTTP {resp.status_code}: {resp.text[:2000]}") from None
    if body.get("status") != "success":
        raise AssertionError(
            f"GET {path} {params}: HTTP {resp.status_code} {body.get('errorType')}: {body.get('error')}"
        )
    return body["data"]


def query(base_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Runs an instant query (now, or at the Unix time ``at``) and returns ``data.result``.

    Raises AssertionError with Prometheus' error type and text when the query fails (``bad_data`` for an
    expression that does not parse).
    """
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    return list(_api(base_url, "/api/v1/query", params)["result"])


def query_range(base_url: str, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict[str, Any]]:
    """Runs a range query over Unix times [start, end] and returns ``data.result`` (series with ``values``).

    Raises AssertionError like :func:`query`.
    """
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
    return list(_api(base_url, "/api/v1/query_range", params)["result"])


def rule_groups(base_url: str) -> list[dict[str, Any]]:
    """The rule groups Prometheus loaded (``/api/v1/rules``), each with its ``rules``."""
    return list(_api(base_url, "/api/v1/rules")["groups"])


def scrape_targets(base_url: str) -> list[dict[str, Any]]:
    """The active scrape targets with their health and last error (``/api/v1/targets``)."""
    return list(_api(base_url, "/api/v1/targets")["activeTargets"])
