"""``tests.prometheus``: a real Prometheus scraping a static exporter started here.

Prometheus (Debian package ``prometheus``) is required: the test fails, not skips, without it,
since CI installs it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.prometheus import find_prometheus, query, rule_groups, running_prometheus, scrape_targets

EXPOSITION = b"# HELP up_test_metric A constant.\n# TYPE up_test_metric gauge\nup_test_metric 1\n"
RULES = {"groups": [{"name": "test", "rules": [{"alert": "TestMetricUp", "expr": "up_test_metric > 0"}]}]}
DEADLINE_S = 30.0


class _Exporter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(EXPOSITION)))
        self.end_headers()
        self.wfile.write(EXPOSITION)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def exporter() -> Iterator[str]:
    """``host:port`` of an HTTP server on 127.0.0.1 serving ``up_test_metric 1`` at /metrics."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_running_prometheus_scrapes_a_target_and_reports_errors(tmp_path: Path, exporter: str) -> None:
    try:
        find_prometheus()
    except FileNotFoundError as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(RULES))
    with running_prometheus(tmp_path / "prom", [exporter], scrape_interval_s=0.5, rules=rules) as url:
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + DEADLINE_S
        result = query(url, "up_test_metric")
        while not result and time.monotonic() < deadline:
            time.sleep(0.2)
            result = query(url, "up_test_metric")
        assert result, f"no sample within {DEADLINE_S:.0f}s; targets: {scrape_targets(url)}"
        assert result[0]["metric"]["job"] == "ray"
        assert result[0]["metric"]["instance"] == exporter
        assert float(result[0]["value"][1]) == 1.0

        with pytest.raises(AssertionError, match="bad_data"):
            query(url, "sum(up_test_metric")

        names = [rule["name"] for group in rule_groups(url) for rule in group["rules"]]
        assert names == ["TestMetricUp"]
    with pytest.raises(httpx.ConnectError):  # stopped on exit
        httpx.get(url + "/-/ready", timeout=2)
