"""One real Ray cluster and three deployed apps for the whole integration session.

The apps are deployed the way operators deploy them: ``serve deploy`` of a Serve config file
onto a cluster started with ``ray start --head``. The main app (route ``/``) is laid out as
``orchestrator serve-config`` writes it, one Serve application per model
(orchestrator/layout.py); it serves two tiny models and the default catalog's SmolLM2, and,
at zero replicas until their tests wake them, a tiny vision model and the default catalog's
embedding model; it keeps its gateway in a real PostgreSQL server and runs two router replicas. The other two are
``orchestrator.serving:build_app`` with catalog args, the whole catalog in one application:
the second (route ``/sqlite``) serves one tiny model
with the embedded SQLite default; the third (route ``/ops``, open mode) holds the models
the operations tests scale, shed and starve (see :data:`OPS_MODELS`). Ray's metrics export
port serves every series as Prometheus text. Everything binds to 127.0.0.1 on free ports
and is torn down at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from orchestrator.catalog import load_catalog
from orchestrator.engine.weights import build_tiny_idefics3, build_tiny_llama
from orchestrator.layout import applications, model_app_name
from tests.adapters import build_tiny_lora
from tests.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOY_TIMEOUT_S = 900
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_num_seqs": 16,
    # 32 MiB of KV cache (32k tokens of the tiny model) instead of a whole GiB per engine: with
    # a GiB each, the session's five engines and a test's three more took this 24 GiB machine
    # to Ray's memory threshold, and Ray killed replicas.
    "kv_cache_memory_bytes": 32 * 2**20,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}


# Woken by its first request; gone 30 s after its last, so its engine holds no memory for long.
VISION_SCALING = {"min_replicas": 0, "max_replicas": 1, "scale_to_zero_delay_s": 30, "cold_start_timeout_s": 300}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ADMIN_KEY = "integration-admin-" + secrets.token_hex(8)


@dataclass
class Deployment:
    base_url: str
    gcs_address: str
    env: dict[str, str]
    database_url: str
    sqlite_url: str
    metrics_url: str = ""
    api_key: str = ""
    postgres: PostgresServer | None = None  # the main app's database server, when the tests run it
    config: dict[str, Any] = field(default_factory=dict)  # the Serve config deployed
    config_path: Path | None = None
    spare_adapter: Path | None = None  # a LoRA for tiny-a in no catalog (test_adapters.py adds it at run time)

    @property
    def sqlite_base_url(self) -> str:
        return self.base_url + "/sqlite"

    @property
    def ops_base_url(self) -> str:
        return self.base_url + "/ops"

    def serve_status(self) -> dict:  # type: ignore[type-arg]
        """Returns `serve status` as data."""
        return dict(yaml.safe_load(_run(self.env, str(BIN / "serve"), "status", timeout=60).stdout))

    def redeploy(self, config: dict[str, Any]) -> None:
        """Deploys ``config`` (a changed copy of :attr:`config`) with ``serve deploy``, as an
        operator updates a running cluster; returns once Serve accepted it."""
        assert self.config_path is not None
        self.config_path.write_text(yaml.safe_dump(config))
        address = self.env["RAY_DASHBOARD_ADDRESS"]
        deployed = _run(self.env, str(BIN / "serve"), "deploy", str(self.config_path), "--address", address)
        assert deployed.returncode == 0, deployed.stderr
        self.config = config

    def replica_actors(self, fragment: str) -> set[str]:
        """Names of the live Serve replica actors whose name contains ``fragment``
        (``orchestrator-gateway#gateway``: the main app's gateway replicas)."""
        done = _run(self.env, sys.executable, "-c", _REPLICAS, self.gcs_address, fragment)
        assert done.returncode == 0, done.stderr[-2000:]
        return set(done.stdout.split())

    def running_replicas(self, deployment: str, app: str = "orchestrator") -> int:
        """RUNNING replicas of a deployment of router application ``app``, in ``app`` itself
        or in the deployment's own application (orchestrator/layout.py)."""
        apps = self.serve_status()["applications"]
        where = app if deployment in apps[app]["deployments"] else model_app_name(app, deployment)
        states = apps[where]["deployments"][deployment]["replica_states"]
        return int(states.get("RUNNING", 0))

    def client(self, api_key: str | None = None, base_url: str | None = None, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=(base_url or self.base_url) + "/v1",
            api_key=api_key or self.api_key,
            max_retries=0,
            **kwargs,  # type: ignore[arg-type]
        )

    def admin(self, method: str, path: str, base_url: str | None = None, **kwargs: object) -> httpx.Response:
        """Calls the admin API with the admin key."""
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.request(method, (base_url or self.base_url) + path, headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    def cli(self, *args: str, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
        """Runs the ``orchestrator`` command against a gateway database."""
        env = {**self.env, "ORCH_DATABASE_URL": database_url or self.database_url}
        return _run(env, str(BIN / "orchestrator"), *args, timeout=120)

    def record(self, gen_id: str) -> dict[str, Any]:
        """A generation's usage record, read with the admin key (waits up to 30 s for it)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            resp = self.admin("GET", "/v1/generation", params={"id": gen_id})
            if resp.status_code == 200:
                return dict(resp.json()["data"])
            time.sleep(0.2)
        raise AssertionError(f"no record for {gen_id}")

    def new_key(self, base_url: str | None = None, **limits: object) -> str:
        """Creates a key through the admin API and returns it."""
        resp = self.admin("POST", "/admin/keys", base_url=base_url, json=limits)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])


def tiny_entry(name: str, alias: str, path: Path, **overrides: object) -> dict[str, object]:
    return {
        "name": name,
        "aliases": [alias],
        "backend_id": f"test-org/{name}",
        "source": {"kind": "local", "path": str(path)},
        "context_window": 512,
        "engine_args": ENGINE,
        "pricing": {"input_per_million": "1", "output_per_million": "2"},
        "resources": {"device": "cpu", "cpus": 0.5},
        **overrides,
    }


def tiny_a_adapters(base: Path, work: Path) -> list[dict[str, object]]:
    """tiny-a's LoRA adapters (test_adapters.py): `tiny-a-lora` (alias `a-lora`) at prices of
    its own, and `tiny-a-lora-2` at tiny-a's, which only the test loading it under load uses."""
    return [
        {
            "name": "tiny-a-lora",
            "aliases": ["a-lora"],
            "source": {"kind": "local", "path": str(build_tiny_lora(base, work / "tiny-a-lora", seed=1))},
            "pricing": {"input_per_million": "5", "output_per_million": "7"},
        },
        {
            "name": "tiny-a-lora-2",
            "source": {"kind": "local", "path": str(build_tiny_lora(base, work / "lora-2", seed=2))},
        },
    ]


# The operations app's models (route /ops, open mode, 2 s keep-alives):
#   tiny-scale   runs 2 sequences at once, 1..2 replicas, aims at 1 waiting per replica,
#                sheds past 4 waiting;
#   tiny-zero    scales to zero after 15 s idle, waits up to 180 s for a cold start;
#   tiny-nowhere needs a resource no node has, so it never gets a replica (6 s bound; its
#                pending replica is dropped after 60 s without requests).
OPS_MODELS = {
    "tiny-scale": {
        "engine_args": {**ENGINE, "max_num_seqs": 2},
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_waiting_per_replica": 1,
            "upscale_delay_s": 2,
            "downscale_delay_s": 15,
        },
        "overload": {"max_waiting_per_replica": 4},
    },
    "tiny-zero": {
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 1,
            "scale_to_zero_delay_s": 15,
            "cold_start_timeout_s": 180,
        }
    },
    "tiny-nowhere": {
        "resources": {"device": "cpu", "cpus": 0.5, "custom": {"nowhere": 1}},
        "autoscaling": {"min_replicas": 0, "max_replicas": 1, "cold_start_timeout_s": 6, "scale_to_zero_delay_s": 60},
    },
}


def _run(
    env: dict[str, str], *args: str, timeout: float = 180, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False, input=input)


def _wait_ready(base_url: str, proc_env: dict[str, str], models: list[str]) -> None:
    """Waits until every model in ``models`` is ready (readiness is per model)."""
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        status = _run(proc_env, str(BIN / "serve"), "status", timeout=60).stdout
        if "DEPLOY_FAILED" in status:
            raise RuntimeError(f"deploy failed:\n{status}")
        try:
            resp = httpx.get(base_url + "/health/ready", timeout=10)
            ready = {name for name, m in resp.json().get("models", {}).items() if m["ready"]}
            if set(models) <= ready:
                return
            last = resp.text
        except (httpx.HTTPError, ValueError) as exc:
            last = repr(exc)
        time.sleep(5)
    raise TimeoutError(f"app not ready after {DEPLOY_TIMEOUT_S}s: {last}\n{status}")


@pytest.fixture(scope="session")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer | None, postgres_url: str
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("cluster")
    catalog, small = work / "catalog.yaml", work / "small.yaml"
    tiny_a = build_tiny_llama(work / "tiny-a", seed=1)
    entries = [
        tiny_entry("tiny-a", "a", tiny_a, adapters=tiny_a_adapters(tiny_a, work)),
        # A short queue, so the shedding test can fill it: 16 running + 2 waiting per replica.
        tiny_entry("tiny-b", "b", build_tiny_llama(work / "tiny-b", seed=2), overload={"max_waiting_per_replica": 2}),
        # The vision model waits at zero replicas until test_images.py wakes it; it fetches
        # remote images from 127.0.0.1 only (not from `localhost`, the same listener).
        tiny_entry(
            "tiny-vision",
            "vision",
            build_tiny_idefics3(work / "tiny-vision", seed=0),
            capabilities={"vision": True},
            images={"max_per_request": 2, "allowed_domains": ["127.0.0.1"]},
            autoscaling=VISION_SCALING,
        ),
    ]
    catalog.write_text(yaml.safe_dump({"models": entries}))
    # tiny-c gives up on its engine after 10 s (the deadline test stops that engine).
    deadlines = {"request_timeout_s": 10, "stream_idle_timeout_s": 10}
    small.write_text(
        yaml.safe_dump(tiny_entry("tiny-c", "c", build_tiny_llama(work / "tiny-c", seed=3), overload=deadlines))
    )
    ops = work / "ops.yaml"
    ops_weights = build_tiny_llama(work / "tiny-ops", seed=4)
    ops_entries = [tiny_entry(name, name.removeprefix("tiny-"), ops_weights, **o) for name, o in OPS_MODELS.items()]
    ops.write_text(yaml.safe_dump({"models": ops_entries}))
    sqlite_url = f"sqlite:///{work / 'gateway.db'}"
    gcs_port, dash_port, http_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    # The admin key reaches the router and gateway as a file named in their environment (as
    # a mounted Kubernetes Secret would), never in the apps' args.
    admin_key_file = work / "admin-key"
    admin_key_file.write_text(ADMIN_KEY + "\n")
    gateway = {"usage_flush_ms": 100, "key_cache_seconds": 1}
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            # The main app is laid out as `orchestrator serve-config` writes it: the router,
            # the gateway and each model in an application of its own (orchestrator/layout.py).
            *applications(
                # The default catalog's embedding model starts at zero replicas (its test wakes it).
                load_catalog(
                    [
                        catalog,
                        REPO / "catalog" / "smollm2-135m-instruct.yaml",
                        REPO / "catalog" / "all-minilm-l6-v2.yaml",
                    ]
                ),
                {
                    "keepalive_seconds": 15,
                    "router_replicas": 2,
                    "database_url": postgres_url,
                    # A dead router's holds end 20 s after its last renewal (the router
                    # replica test waits for that); live routers renew every 5 s.
                    "admission_ttl_seconds": 20,
                    **gateway,
                },
            ),
            {
                "name": "sqlite",
                "route_prefix": "/sqlite",
                "import_path": "orchestrator.serving:build_app",
                "args": {
                    "catalog": [str(small)],
                    "settings": {"database_url": sqlite_url, "allow_sqlite": True, "keepalive_seconds": 2, **gateway},
                },
            },
            {
                "name": "ops",
                "route_prefix": "/ops",
                "import_path": "orchestrator.serving:build_app",
                "args": {"catalog": [str(ops)], "settings": {"open_access": True, "keepalive_seconds": 2}},
            },
        ],
    }
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{dash_port}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Token auth (Ray's default) with a token private to this test cluster.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # A one-machine cluster: Ray takes 127.0.0.1 as the node address, so its servers (the
        # metrics export among them) listen on loopback only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Metrics reach the export port within a second (default 10 s), for the Prometheus test.
        "RAY_metrics_report_interval_ms": "1000",
        # Replicas report their engine load every second (default 10 s), for the scaling tests.
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "ORCH_ADMIN_KEY_FILE": str(admin_key_file),
    }
    started = _run(
        env,
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=8",
        f"--metrics-export-port={metrics_port}",
        "--disable-usage-stats",
    )  # fmt: skip
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    try:
        deployed = _run(env, str(BIN / "serve"), "deploy", str(config_path), "--address", env["RAY_DASHBOARD_ADDRESS"])
        if deployed.returncode != 0:
            raise RuntimeError(f"serve deploy failed:\n{deployed.stdout}\n{deployed.stderr}")
        base_url = f"http://127.0.0.1:{http_port}"
        _wait_ready(base_url, env, ["tiny-a", "tiny-b", "smollm2-135m-instruct"])
        _wait_ready(base_url + "/sqlite", env, ["tiny-c"])
        _wait_ready(base_url + "/ops", env, ["tiny-scale", "tiny-zero", "tiny-nowhere"])
        deployed_app = Deployment(
            base_url=base_url,
            gcs_address=env["RAY_ADDRESS"],
            env=env,
            database_url=postgres_url,
            sqlite_url=sqlite_url,
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            postgres=postgres,
            config=config,
            config_path=config_path,
            spare_adapter=build_tiny_lora(tiny_a, work / "tiny-a-spare", seed=3),
        )
        deployed_app.api_key = deployed_app.new_key(name="integration")
        yield deployed_app
    finally:
        _run(env, str(BIN / "serve"), "shutdown", "-y", "--address", env["RAY_DASHBOARD_ADDRESS"], timeout=120)
        _run(env, str(BIN / "ray"), "stop", "--force", timeout=120)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def client(deployment: Deployment) -> openai.OpenAI:
    return deployment.client(timeout=120)


_KILLER = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
found = sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("SERVE_REPLICA") and sys.argv[2] in a["name"])
assert len(found) == int(sys.argv[3]), found
actor = ray.get_actor(found[0][0], namespace=found[0][1])
print("ready", flush=True)
sys.stdin.readline()
ray.kill(actor, no_restart=True)
print("killed", flush=True)
"""


def replica_killer(deployment: Deployment, replica: str, count: int = 1) -> subprocess.Popen[str]:
    """Starts a process attached to the cluster that kills one of the ``count`` Serve replicas
    whose actor name contains ``replica`` when it reads "kill" (and then prints "killed")."""
    killer = subprocess.Popen(
        [sys.executable, "-c", _KILLER, deployment.gcs_address, replica, str(count)],
        env=deployment.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert killer.stdout is not None and killer.stdout.readline().strip() == "ready"
    return killer


_REPLICAS = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
for actor in ray.util.list_named_actors(all_namespaces=True):
    if actor["name"].startswith("SERVE_REPLICA") and sys.argv[2] in actor["name"]:
        print(actor["name"])
"""

_PROBE = """
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], namespace="serve", logging_level="ERROR", log_to_driver=False)
handle = serve.get_deployment_handle(sys.argv[2], app_name=sys.argv[3])
print(handle.num_unfinished_requests.remote().result(timeout_s=60), flush=True)
for _ in sys.stdin:  # engine_probe: one answer per line asked
    print(handle.num_unfinished_requests.remote().result(timeout_s=60), flush=True)
"""


@dataclass
class Load:
    """What :func:`steady_load` saw: streams that ended with their usage chunk and
    ``[DONE]``, and the failures (any other outcome)."""

    completed: int = 0
    failures: list[str] = field(default_factory=list)


@contextmanager
def steady_load(client: openai.OpenAI, model: str, *, streams: int = 2, max_tokens: int = 16) -> Iterator[Load]:
    """Streams chat completions to ``model`` back to back from ``streams`` threads for as
    long as the block runs, then waits for the streams in flight to end."""
    load = Load()

    def one() -> None:
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Count to ten."}],
                max_tokens=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        usage = chunks[-1].usage if chunks else None
        if usage is None or usage.completion_tokens != max_tokens:
            raise AssertionError(f"stream ended without its usage chunk: {chunks[-1:]}")

    counting = threading.Lock()  # the threads count into one Load

    def once() -> None:
        try:
            one()
            with counting:
                load.completed += 1
        except Exception as exc:  # every failure is what the caller asserts on
            load.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"[:500])

    with repeating(once, threads=streams, join_timeout_s=120):
        yield load


@contextmanager
def repeating(work: Callable[[], None], *, threads: int, join_timeout_s: float) -> Iterator[None]:
    """Calls ``work`` over and over in each of ``threads`` threads while the block runs, then
    waits (up to ``join_timeout_s``) for the calls in flight."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    started = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for thread in started:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in started:
            thread.join(timeout=join_timeout_s)


@contextmanager
def open_stream(
    deployment: Deployment, body: dict[str, object], key: str | None = None, base_url: str | None = None
) -> Iterator[Iterator[str]]:
    """Starts a streaming chat request and yields its SSE lines; leaving the block closes
    the connection (a client disconnect when the stream has not ended)."""
    headers = {"Authorization": f"Bearer {key or deployment.api_key}"}
    url = (base_url or deployment.base_url) + "/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body, headers=headers) as resp:
        yield resp.iter_lines()


def engine_unfinished(deployment: Deployment, model_deployment: str) -> int:
    """Returns the requests waiting or running inside a main-app model's engine (asked through Ray)."""
    app = model_app_name("orchestrator", model_deployment)
    done = _run(deployment.env, sys.executable, "-c", _PROBE, deployment.gcs_address, model_deployment, app, input="")
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return int(done.stdout.strip().splitlines()[-1])


@contextmanager
def engine_probe(deployment: Deployment, model_deployment: str) -> Iterator[Callable[[], int]]:
    """Like :func:`engine_unfinished`, from a process connected to Ray before the block
    starts: each call answers in milliseconds, not the seconds a new process takes to join
    the cluster (a short request can end in that time)."""
    app = model_app_name("orchestrator", model_deployment)
    args = [sys.executable, "-c", _PROBE, deployment.gcs_address, model_deployment, app]
    proc = subprocess.Popen(args, env=deployment.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def unfinished() -> int:
        stdin.write("?\n")
        stdin.flush()
        return int(stdout.readline())

    try:
        int(stdout.readline())  # connected
        yield unfinished
    finally:
        stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def ask(client: openai.OpenAI, model: str) -> str:
    """One completion: "ok", or the error code and status the client got."""
    try:
        resp = client.completions.create(model=model, prompt="Hi", max_tokens=2)
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"{exc.status_code} {body.get('code') or exc.message}"
    except openai.APIError as exc:  # no HTTP answer at all (a timeout, a dropped connection)
        return f"{type(exc).__name__}: {exc}"
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    return "ok"


def answers_within(
    client: openai.OpenAI, model: str, want: str, timeout_s: float, seen: list[tuple[float, str]]
) -> float:
    """Asks ``model`` every 2 s until it answers ``want``; every answer goes to ``seen``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        answer = ask(client, model)
        seen.append((round(time.monotonic() - start, 1), answer))
        if answer == want:
            return time.monotonic() - start
        time.sleep(2)
    raise AssertionError(f"{model} did not answer {want!r} within {timeout_s:g} s: {seen}")
