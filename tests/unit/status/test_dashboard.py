"""The command read through Ray's dashboard over HTTP: parsing Serve's REST answer and the
Prometheus service discovery, the same rows as through Ray, and the one-line errors when the
dashboard cannot be read (a mock transport, or a fake dashboard on 127.0.0.1; no Ray)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.status.command import cluster_address, status_command
from orchestrator.status.dashboard import Dashboard, auth_token, deployments_from_details, nodes_from_targets
from tests.unit.status.test_command import NODES, FakeCluster, Run, parse
from tests.unit.status.texts import DEPLOYMENTS, HEAD, WORKER, head_text, worker_text

DASHBOARD = "http://127.0.0.1:8265"
RECORDED = Path(__file__).with_name("serve_applications.json")


def details(deployments: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, Any]:
    """Serve's ``ServeInstanceDetails`` (as ``/api/serve/applications/`` answers) holding
    ``deployments``, one replica entry per replica counted in their ``replica_states``."""
    apps: dict[str, Any] = {}
    for (app, name), info in deployments.items():
        replicas = [
            {"replica_id": f"{name}-{state}-{i}", "state": state, "node_ip": HEAD, "pid": 100 + i}
            for state, count in info["replica_states"].items()
            for i in range(count)
        ]
        entry = {"name": name, "status": info["status"], "message": "", "replicas": replicas}
        apps.setdefault(app, {"name": app, "status": "RUNNING", "deployments": {}})["deployments"][name] = entry
    return {"controller_info": {}, "proxy_location": "HeadOnly", "applications": apps}


SD = [{"labels": {"job": "ray"}, "targets": [f"{HEAD}:8080", f"{WORKER}:8080"]}]


def fake_dashboard(
    serve: Callable[[], httpx.Response] = lambda: httpx.Response(200, json=details(DEPLOYMENTS)),
    seen: list[httpx.Request] | None = None,
) -> Callable[[httpx.Request], httpx.Response]:
    """Answers as the dashboard at DASHBOARD and the two nodes' metrics exports do; the
    scrapes before the window get the ``before`` texts."""
    scrapes: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        path = request.url.path
        if request.url.port == 8265:
            if path == "/api/version":
                return httpx.Response(200, json={"version": "4", "ray_version": "2.60.0"})
            if path == "/api/prometheus/sd":
                return httpx.Response(200, json=SD)
            if path == "/api/serve/applications/":
                return serve()
            return httpx.Response(404)
        scrapes.append(request.url.host)
        before = scrapes.count(request.url.host) == 1
        return httpx.Response(
            200, text=head_text(before=before) if request.url.host == HEAD else worker_text(before=before)
        )

    return answer


def increases(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """A frame's rows with the rates turned back into the window's increases (the two runs'
    windows differ by how long each took; the frame gives each rounded, hence the tolerance)."""
    window, rows = frame["window_s"], []
    for row in frame["models"]:
        tokens, errors = row.pop("tokens_per_second"), row.pop("errors_per_minute")
        rows.append(
            row
            | {
                "tokens": pytest.approx(tokens * window, rel=0.1),
                "errors": pytest.approx(errors * window / 60, rel=0.1),
            }
        )
    return rows


def run_with(argv: list[str], cluster: Any, answer: Callable[[httpx.Request], httpx.Response]) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        code = status_command(parse(argv), cluster=cluster, http=client, out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())


def dashboard(answer: Callable[[httpx.Request], httpx.Response], token: str | None = None) -> Dashboard:
    return Dashboard(lambda: httpx.Client(transport=httpx.MockTransport(answer)), token)


def test_serve_details_become_deployments_as_ray_gives_them() -> None:
    found = deployments_from_details(details(DEPLOYMENTS))
    assert {key: {k: v for k, v in info.items() if k != "message"} for key, info in found.items()} == DEPLOYMENTS


def test_recorded_answers_of_a_real_dashboard() -> None:
    """What Ray 2.60's dashboard answered for two tiny models deployed with `serve deploy`."""
    found = deployments_from_details(json.loads(RECORDED.read_text()))
    assert set(found) == {("orchestrator", name) for name in ("router", "model-tiny-s", "model-tiny-t")}
    assert found[("orchestrator", "model-tiny-s")]["status"] == "HEALTHY"
    assert found[("orchestrator", "model-tiny-s")]["replica_states"] == {"RUNNING": 1}
    assert found[("orchestrator", "router")]["replica_states"] == {"RUNNING": 1}
    sd = [{"labels": {"job": "ray"}, "targets": ["127.0.0.1:48205", "127.0.0.1:44217", "127.0.0.1:44227"]}]
    assert [(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in nodes_from_targets(sd)] == [
        ("127.0.0.1", 48205),
        ("127.0.0.1", 44217),
        ("127.0.0.1", 44227),
    ]


def test_no_serve_running_gives_no_deployments() -> None:
    assert deployments_from_details({"applications": {}}) == {}
    assert deployments_from_details({"applications": {"a": {"deployments": {}}}}) == {}


def test_service_discovery_targets_become_alive_nodes() -> None:
    body = [{"labels": {"job": "ray"}, "targets": ["10.0.0.1:8080", "[fe80::1]:9090"]}, {"targets": []}]
    assert nodes_from_targets(body) == [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
        {"Alive": True, "NodeManagerAddress": "fe80::1", "MetricsExportPort": 9090},
    ]
    for bad in ({"error": "x"}, [{"targets": ["no-port"]}], [{"targets": ["h:x"]}]):
        with pytest.raises(ValueError):
            nodes_from_targets(bad)


def test_same_rows_through_the_dashboard_as_through_ray() -> None:
    through_ray = FakeCluster()
    assert [n for n in NODES if n["Alive"]] == nodes_from_targets(SD)  # the same two alive nodes
    ray_run = run_with(["--json", "--window", "0.01"], through_ray, fake_dashboard())
    seen: list[httpx.Request] = []
    rest_run = run_with(
        ["--json", "--window", "0.01", "--address", DASHBOARD], dashboard(fake_dashboard()), fake_dashboard(seen=seen)
    )
    assert ray_run.code == rest_run.code == 0, (ray_run.err, rest_run.err)
    ray_rows, rest_rows = increases(json.loads(ray_run.out)), increases(json.loads(rest_run.out))
    assert rest_rows == ray_rows and len(rest_rows) == 4
    assert rest_run.err == ""


def test_unreachable_dashboard_is_one_line_naming_it_and_exit_1() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out, err = io.StringIO(), io.StringIO()
    code = status_command(parse(["--address", f"http://127.0.0.1:{port}"]), out=out, err=err)
    assert code == 1 and out.getvalue() == ""
    assert err.getvalue().startswith(f"error: cannot reach Ray's dashboard at http://127.0.0.1:{port}: ")
    assert err.getvalue().count("\n") == 1


def test_dashboard_refusing_the_token_is_one_line_with_the_status() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text="Unauthorized: Missing authentication token\n")

    done = run_with(["--address", DASHBOARD], dashboard(answer), answer)
    assert done.code == 1
    assert done.err == (
        f"error: Ray's dashboard at {DASHBOARD} answered 401 to GET /api/version: "
        "Unauthorized: Missing authentication token\n"
    )


def test_dashboard_without_metrics_targets_is_one_line() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/prometheus/sd":
            return httpx.Response(200, json={"error": "service discovery error: content is not a list"})
        return httpx.Response(200, json={})

    done = run_with(["--address", DASHBOARD], dashboard(answer), answer)
    assert done.code == 1
    assert done.err == f"error: Ray's dashboard at {DASHBOARD} gave no metrics targets: not a list of target groups\n"


def test_serve_unavailable_mid_run_warns_and_shows_rows_without_status(capsys: pytest.CaptureFixture[str]) -> None:
    answer = fake_dashboard(serve=lambda: httpx.Response(503, text="Failed to get a response from the controller."))
    done = run_with(["--json", "--window", "0.01", "--address", DASHBOARD], dashboard(answer), answer)
    assert done.code == 0
    assert {m["status"] for m in json.loads(done.out)["models"]} == {None}
    assert capsys.readouterr().err == (
        f"warning: Serve status unavailable (Ray's dashboard at {DASHBOARD} answered 503 to GET "
        "/api/serve/applications/: Failed to get a response from the controller.)\n"
    )


def test_token_is_sent_as_bearer() -> None:
    seen: list[httpx.Request] = []
    answer = fake_dashboard(seen=seen)
    done = run_with(["--json", "--window", "0.01", "--address", DASHBOARD], dashboard(answer, "s3cret"), answer)
    assert done.code == 0
    to_dashboard = [r for r in seen if r.url.port == 8265]
    assert {r.url.path for r in to_dashboard} == {"/api/version", "/api/prometheus/sd", "/api/serve/applications/"}
    assert {r.headers.get("authorization") for r in to_dashboard} == {"Bearer s3cret"}


def test_token_found_as_ray_finds_it(tmp_path: Path) -> None:
    assert auth_token({"RAY_AUTH_TOKEN": " abc\n"}, tmp_path) == "abc"
    assert auth_token({}, tmp_path) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token({}, tmp_path) == "from-home"
    (tmp_path / "other").write_text("from-path")
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "other")}, tmp_path) == "from-path"


def test_address_order() -> None:
    env = {"RAY_DASHBOARD_ADDRESS": DASHBOARD, "RAY_ADDRESS": "10.0.0.1:6379"}
    assert cluster_address("h:6379", env) == "h:6379"
    assert cluster_address(None, env) == DASHBOARD
    assert cluster_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert cluster_address(None, {}) == "auto"


@pytest.fixture
def dashboard_server() -> Iterator[str]:
    """A fake dashboard on 127.0.0.1 whose service discovery names itself as the one node."""
    import http.server
    import threading

    scrapes: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            host, port = self.server.server_address[:2]
            bodies: dict[str, Any] = {
                "/api/version": {"ray_version": "2.60.0"},
                "/api/prometheus/sd": [{"labels": {"job": "ray"}, "targets": [f"{host}:{port}"]}],
                "/api/serve/applications/": details(DEPLOYMENTS),
            }
            if self.path == "/metrics":
                scrapes.append(self.path)
                body, kind = worker_text(before=len(scrapes) == 1).encode(), "text/plain"
            elif self.path in bodies:
                body, kind = json.dumps(bodies[self.path]).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_command_through_the_dashboard_never_imports_ray(dashboard_server: str) -> None:
    """The whole command, as `orchestrator status` runs it, with the address in RAY_DASHBOARD_ADDRESS."""
    code = (
        "import sys; from orchestrator.cli import main; "
        "code = main(['status', '--json', '--window', '0.01']); "
        "print('ray' in sys.modules, file=sys.stderr); sys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_DASHBOARD_ADDRESS": dashboard_server, "RAY_ADDRESS": "127.0.0.1:1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (0, "False\n")
    models = json.loads(done.stdout)["models"]
    assert {(m["application"], m["model"], m["status"]) for m in models} >= {("llm", "tiny-random", "UPSCALING")}
