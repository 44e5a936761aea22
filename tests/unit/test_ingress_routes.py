"""orchestrator-haproxy's model routes: a POST to a generation route of the router's /v1 whose
JSON body names a catalog model takes the path of that model's own route, so that Serve's
own rules send it to the model's application. Checked on configs rendered by Serve's own
code (its HAProxy manager's renderer), validated by the bundled HAProxy, and run by it in
front of stand-in servers that answer with their name and the path they were asked for."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.catalog import Catalog
from orchestrator.ingress import (
    GENERATION_PATHS,
    ModelRoutes,
    main,
    model_route_rules,
    real_haproxy,
    rewrite,
    with_model_routes,
)
from orchestrator.layout import ingress_routes, model_route

ROUTES = ModelRoutes(
    "/",
    {"tiny-e": "/models/tiny-e", "e": "/models/tiny-e", "test-org/tiny-e": "/models/tiny-e", "zero": "/models/zero"},
)
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(tmp_path: Path, apps: dict[str, tuple[str, list[int]]], port: int = 8000) -> str:
    """The config Serve's HAProxy manager writes for ``apps`` (name: route prefix and replica
    ports), each backend with the head's Serve proxy as its fallback, as Serve renders it."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=port),
        socket_path=str(tmp_path / "run" / "admin.sock"),
        server_state_base=str(tmp_path / "run"),
        server_state_file=str(tmp_path / "run" / "server-state"),
        metrics_socket_path=str(tmp_path / "run" / "metrics.sock"),
        stats_port=free_port(),
        metrics_port=free_port(),
    )
    fallback = ServerConfig(name="SERVE_PROXY_ACTOR-head", host="127.0.0.1", port=free_port())
    backends = {
        f"http-{app}": BackendConfig(
            name=f"http-{app}",
            path_prefix=prefix,
            app_name=app,
            servers=[
                ServerConfig(name=f"SERVE_REPLICA__{app}-{i}", host="127.0.0.1", port=p) for i, p in enumerate(ports)
            ],
            fallback_server=fallback,
        )
        for app, (prefix, ports) in apps.items()
    }
    api = HAProxyApi(cfg, backends, config_file_path=str(tmp_path / "haproxy.cfg"))
    api.set_backend_configs(backends)
    api._generate_config_file_internal()
    return (tmp_path / "haproxy.cfg").read_text()


def catalog_apps(router: int, model: list[int], prefix: str = "/") -> dict[str, tuple[str, list[int]]]:
    """The router's, one model's with ``model`` replicas and a model's with none."""
    under = prefix.rstrip("/")
    return {
        "orchestrator": (prefix, [router]),
        "orchestrator-model-tiny-e": (f"{under}/models/tiny-e", model),
        "orchestrator-model-zero": (f"{under}/models/zero", []),
    }


def test_rules_come_before_serves_backend_rules_and_name_only_models_with_replicas(tmp_path: Path) -> None:
    config = with_model_routes(render(tmp_path, catalog_apps(9001, [9002, 9003])), ROUTES, "/m.map")
    rules = [line.strip() for line in config.splitlines() if "orch_" in line]
    assert config.index("acl orch_generation") < config.index("# Per-backend path ACLs")
    assert config.index("set-path") < config.index("http-request set-var-fmt(txn.serve_app)")
    assert [r for r in rules if r.startswith("http-request set-path")] == [
        "http-request set-path /models/tiny-e%[path,bytes(0)] "
        "if { var(txn.orch_route) -m str /models/tiny-e } orch_up_0"
    ]
    # Its two replicas; the fallback (a backup server, Serve's proxy) does not count.
    assert [r for r in rules if r.startswith("acl orch_up_0")] == [
        f"acl orch_up_0 srv_is_up(http-orchestrator-model-tiny-e/SERVE_REPLICA__orchestrator-model-tiny-e-{i})"
        for i in (0, 1)
    ]


def test_without_a_model_replica_the_config_is_unchanged(tmp_path: Path) -> None:
    config = render(tmp_path, catalog_apps(9001, []))
    assert model_route_rules(config, ROUTES, "/m.map") == ""
    assert with_model_routes(config, ROUTES, "/m.map") == config


def test_under_a_router_prefix_the_prefix_is_replaced(tmp_path: Path) -> None:
    routes = ModelRoutes("/api", {"e": "/api/models/tiny-e"})
    config = with_model_routes(render(tmp_path, catalog_apps(9001, [9002], "/api")), routes, "/m.map")
    assert "acl orch_generation path /api/v1/chat/completions /api/v1/completions" in config
    assert "http-request set-path /api/models/tiny-e%[path,bytes(4)]" in config


def test_haproxy_accepts_the_rewritten_config(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    environ = {"ORCH_INGRESS_ROUTES": json.dumps(ROUTES_JSON)}
    config = rewrite(render(tmp_path, catalog_apps(9001, [9002])), cfg, environ)
    cfg.write_text(config)
    assert "orch_generation" in config
    checked = subprocess.run([real_haproxy(), "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


ROUTES_JSON = {"router": ROUTES.router, "models": dict(ROUTES.models)}


def test_the_map_holds_every_name_haproxy_can_read_back() -> None:
    routes = ModelRoutes("/", {"b": "/models/b", "a:1": "/models/a-1", "with space": "/models/x", "#c": "/models/c"})
    assert routes.map_file() == "a:1 /models/a-1\nb /models/b\n"


@pytest.mark.parametrize("given", ["[]", '{"router": "/"}', '{"router": "/", "models": {"a": 1}}', "{"])
def test_unreadable_routes_are_refused(given: str) -> None:
    with pytest.raises(ValueError):
        ModelRoutes.from_json(given)


def test_the_wrapper_refuses_to_start_haproxy_with_unreadable_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend f\n  bind 127.0.0.1:80\n")
    monkeypatch.setenv("ORCH_INGRESS_ROUTES", "{not json")
    assert main(["-f", str(cfg)], binary="/bin/false-not-run") == 2
    assert "orchestrator-haproxy" in capsys.readouterr().err


def test_loopback_stays_unless_turned_off(tmp_path: Path) -> None:
    config = render(tmp_path, catalog_apps(9001, [9002]))
    assert "bind *:" in rewrite(config, tmp_path / "h.cfg", {"ORCH_INGRESS_LOOPBACK": "0"})
    assert "bind *:" not in rewrite(config, tmp_path / "h.cfg", {})


def test_the_generation_paths_are_the_apps_post_routes_whose_body_names_a_model(catalog: Catalog) -> None:
    from orchestrator.api import create_app
    from orchestrator.settings import Settings
    from tests.fakes import FakeEngine, LocalBackend

    app = create_app(catalog, LocalBackend({"tiny-a": FakeEngine()}), Settings(admin_key="k" * 32))
    schema = app.openapi()
    posts = set()
    for path, methods in schema["paths"].items():
        body = methods.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {})
        ref = body.get("schema", {}).get("$ref", "")
        if "model" in schema["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {}).get("properties", {}):
            posts.add(path)
    assert posts == set(GENERATION_PATHS)


def test_ingress_routes_name_every_models_every_name(catalog: Catalog) -> None:
    routes = ingress_routes(catalog.specs, "/api")
    assert routes["router"] == "/api"
    assert routes["models"] == {name: model_route(s, "/api") for s in catalog.specs for name in s.names}
    assert set(routes["models"]) == {"tiny-a", "a", "org/tiny-a", "tiny-b", "b", "org/tiny-b"}
    assert ModelRoutes.from_json(json.dumps(routes)).models["b"] == "/api/models/tiny-b"


# --- the real HAProxy in front of stand-in servers ---------------------------------------


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # HAProxy's idle keep-alive connections end with HAProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # HAProxy's health checks close their connections before the answer is read


def stand_in(name: str, healthy: bool | list[bool] = True) -> ThreadingHTTPServer:
    """A server that answers every request with its name, the path asked and the body's
    length (and ``/-/healthz``, Serve's health check, with 200 or 503; ``healthy`` as a
    one-item list can be changed while it runs); a POST with ``x-hold: <seconds>`` is
    answered that much later."""
    health = healthy if isinstance(healthy, list) else [healthy]

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as the replicas' uvicorn: HAProxy ends each stream (and its count of the
        # server's connections, which bounded load reads) with its response.
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

        def do_GET(self) -> None:
            if self.path == "/-/healthz":
                self._send(200 if health[0] else 503, b"success" if health[0] else b"down")
            else:
                self._answer(b"")

        def do_DELETE(self) -> None:
            self._answer(b"")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            time.sleep(float(self.headers.get("x-hold", 0)))
            self._answer(body)

        def _answer(self, body: bytes) -> None:
            self._send(200, json.dumps({"server": name, "path": self.path, "length": len(body)}).encode())

        def _send(self, status: int, out: bytes) -> None:
            self.send_response(status)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = _Quiet(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


_STAND_IN_CHILD = """
import sys, time
from tests.unit.test_ingress_routes import stand_in
print(stand_in(sys.argv[1]).server_port, flush=True)
time.sleep(3600)
"""


def stand_in_process(name: str) -> tuple[subprocess.Popen[str], int]:
    """A healthy :func:`stand_in` in a child process, which a test can SIGKILL as Ray kills a
    replica's worker (every socket of it closes at once), and its port."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _STAND_IN_CHILD, name], stdout=subprocess.PIPE, text=True, cwd=root)
    assert child.stdout is not None
    return child, int(child.stdout.readline())


@dataclass
class Ingress:
    client: httpx.Client
    under: str  # the router's route prefix, "" for "/"
    children: list[subprocess.Popen[str]] = field(default_factory=list)  # the killable replicas

    def where(self, method: str, path: str, body: Any = None, content: bytes | None = None) -> tuple[str, str, int]:
        """Which server answered a request to ``path`` under the router's prefix, the path it
        was asked and the length of the body it got."""
        if body is not None:
            content = json.dumps(body).encode()
        resp = self.client.request(method, self.under + path, content=content)
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        return answer["server"], answer["path"], answer["length"]


def run_ingress(
    tmp_path: Path,
    prefix: str,
    model_healthy: bool = True,
    health: list[list[bool]] | None = None,
    environ: dict[str, str] | None = None,
    killable: int = 0,
    serve_config: Callable[[str], str] = lambda config: config,
) -> Iterator[Ingress]:
    """HAProxy with Serve's config for the router (under ``prefix``), a model with two
    replicas (or one for each of ``health``, the replicas' changeable health) and a model
    with none, rewritten by the wrapper with their names (and ``environ``), in front of
    stand-ins; with ``killable``, that many healthy replicas, each in a child process
    (:attr:`Ingress.children`). ``serve_config`` may change Serve's config before the wrapper
    reads it."""
    router = stand_in("router")
    health = health or [[model_healthy], [model_healthy]]
    replicas = [] if killable else [stand_in(f"replica-{i}", healthy) for i, healthy in enumerate(health)]
    children = [stand_in_process(f"replica-{i}") for i in range(killable)]
    ports = [p for _, p in children] or [r.server_port for r in replicas]
    port = free_port()
    under = prefix.rstrip("/")
    apps = catalog_apps(router.server_port, ports, prefix)
    routes = {"router": prefix, "models": {name: under + route for name, route in ROUTES.models.items()}}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        rewrite(
            serve_config(render(tmp_path, apps, port)),
            cfg,
            {"ORCH_INGRESS_ROUTES": json.dumps(routes), **(environ or {})},
        )
    )
    haproxy = subprocess.Popen([real_haproxy(), "-db", "-f", str(cfg)], stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until HAProxy listens
            try:
                client.get("/-/routes")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield Ingress(client, under, [child for child, _ in children])
    finally:
        client.close()
        haproxy.kill()
        haproxy.wait(timeout=30)
        for child, _ in children:
            child.kill()
            child.wait(timeout=30)
        for server in (router, *replicas):
            server.shutdown()
            server.server_close()


@pytest.fixture(params=["/", "/api"])
def ingress(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ingress]:
    yield from run_ingress(tmp_path, request.param)


def test_a_known_name_goes_to_its_models_replicas(ingress: Ingress) -> None:
    seen = set()
    for name in ("tiny-e", "e", "test-org/tiny-e"):
        for path in GENERATION_PATHS:
            body = {**CHAT, "model": name}
            server, asked, length = ingress.where("POST", path, body)
            assert server.startswith("replica-"), (name, path)
            assert (asked, length) == (f"{ingress.under}/models/tiny-e{path}", len(json.dumps(body)))
            seen.add(server)
    assert seen == {"replica-0", "replica-1"}  # Serve's balancing among them stays


def test_the_query_string_stays(ingress: Ingress) -> None:
    asked = ingress.where("POST", "/v1/completions?x=1", {"model": "e"})[1]
    assert asked == f"{ingress.under}/models/tiny-e/v1/completions?x=1"


ELSEWHERE: list[tuple[str, str, Any, bytes | None]] = [
    ("POST", "/v1/chat/completions", {**CHAT, "model": "nope"}, None),  # not a catalog name
    ("POST", "/v1/chat/completions", {**CHAT, "model": "E"}, None),  # names match exactly
    ("POST", "/v1/chat/completions", {**CHAT, "model": "zero"}, None),  # its model has no replica
    ("POST", "/v1/chat/completions", CHAT, None),  # no model
    ("POST", "/v1/chat/completions", {"messages": [{"model": "e"}]}, None),  # not the top level's
    ("POST", "/v1/completions", {"model": 5}, None),
    ("POST", "/v1/completions", None, b"not json"),
    ("POST", "/v1/models", {"model": "e"}, None),  # not a route whose body names a model
    ("POST", "/models/tiny-e/v1/completions", {"model": "e"}, None),  # a model's own route already
    ("GET", "/v1/models", None, None),
    ("GET", "/v1/responses/resp_1", None, None),
    ("DELETE", "/v1/responses/resp_1", None, None),
]


def test_everything_else_goes_where_it_went(ingress: Ingress) -> None:
    for method, path, body, content in ELSEWHERE:
        server, asked, _ = ingress.where(method, path, body, content)
        expected = "router" if not path.startswith("/models/") else server
        assert (server, asked) == (expected, ingress.under + path), (method, path, body)


def test_a_model_named_past_the_buffer_goes_to_the_router_whole(ingress: Ingress) -> None:
    early = {"model": "e", "prompt": "x" * 200_000}  # in the buffer's first bytes: read
    late = {"prompt": "x" * 200_000, "model": "e"}  # past HAProxy's buffer: not read
    server, asked, length = ingress.where("POST", "/v1/completions", early)
    assert server.startswith("replica-") and (asked, length) == (
        f"{ingress.under}/models/tiny-e/v1/completions",
        len(json.dumps(early)),
    )
    assert ingress.where("POST", "/v1/completions", late) == (
        "router",
        f"{ingress.under}/v1/completions",
        len(json.dumps(late)),
    )


def test_a_model_whose_replicas_are_down_is_served_through_the_router(tmp_path: Path) -> None:
    # Down by Serve's own health check, the model's backend would answer from its fallback
    # (the Serve proxy); the rule needs a replica up instead.
    for ingress in run_ingress(tmp_path, "/", model_healthy=False):
        deadline = time.monotonic() + 60
        server = ""
        while time.monotonic() < deadline:  # until HAProxy's checks mark both replicas down
            server = ingress.where("POST", "/v1/completions", {"model": "e"})[0]
            if server == "router":
                break
            time.sleep(0.1)
        assert server == "router"
        assert ingress.where("POST", "/v1/messages", {"model": "tiny-e"})[:2] == ("router", "/v1/messages")


def test_the_routes_can_come_from_a_file_and_a_missing_one_leaves_serves_routing(tmp_path: Path) -> None:
    config = render(tmp_path, catalog_apps(9001, [9002]))
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(ROUTES_JSON))
    rewritten = rewrite(config, tmp_path / "h.cfg", {"ORCH_INGRESS_ROUTES_FILE": str(routes)})
    assert "set-path /models/tiny-e" in rewritten
    assert (tmp_path / "h.cfg.models.map").read_text() == ROUTES.map_file()
    missing = {"ORCH_INGRESS_ROUTES_FILE": str(tmp_path / "none.json")}
    assert rewrite(config, tmp_path / "h.cfg", missing) == rewrite(config, tmp_path / "h.cfg", {})
