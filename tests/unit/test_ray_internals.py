"""What ``orchestrator/ray_internals.py`` relies on in the installed Ray: each test names the use
and fails with a message saying what changed, so that a Ray upgrade breaks here first. And no
other module reaches into Ray's internals."""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator import ray_internals

_PACKAGE = Path(ray_internals.__file__).parent


def _parameters(function: Any) -> set[str]:
    return set(inspect.signature(inspect.unwrap(function)).parameters)


def test_init_options_are_hidden_options_ray_init_still_takes() -> None:
    import ray

    source = inspect.getsource(inspect.unwrap(ray.init))
    for key in ray_internals.init_options(node_ip_address="127.0.0.1", metrics_export_port=None):
        assert f'kwargs.pop("{key}"' in source, (
            f"ray_internals.init_options: ray.init no longer takes the hidden option {key}; "
            "orchestrator serve passes it to start its node on 127.0.0.1 with the metrics port asked for"
        )


def test_deploy_config_calls_exist_with_the_parameters_passed() -> None:
    from ray.serve._private import api
    from ray.serve._private.client import ServeControllerClient

    use = "ray_internals.deploy_config (orchestrator serve deploys its config with it)"
    assert hasattr(api, "serve_start"), f"{use}: ray.serve._private.api.serve_start is gone"
    assert {"http_options", "proxy_location"} <= _parameters(api.serve_start), (
        f"{use}: serve_start no longer takes http_options and proxy_location"
    )
    returned = inspect.signature(api.serve_start).return_annotation
    assert "ServeControllerClient" in str(returned), f"{use}: serve_start now returns {returned}"
    assert "config" in _parameters(ServeControllerClient.deploy_apps), f"{use}: deploy_apps no longer takes config"


def test_deployment_handle_flag_exists() -> None:
    from ray import serve

    assert {"app_name", "_check_exists"} <= _parameters(serve.get_deployment_handle), (
        "ray_internals.deployment_handle (the router's and gateway's handles to applications still "
        "being built): serve.get_deployment_handle no longer takes _check_exists"
    )


def test_dashboard_agent_port_is_a_port() -> None:
    port = ray_internals.dashboard_agent_port()
    assert 0 < port < 65536, f"ray_internals.dashboard_agent_port: Ray's default is now {port}"


def test_each_internal_variable_still_moves_the_constant_named() -> None:
    """Sets every variable of INTERNAL_VARIABLES in a fresh interpreter (Ray reads them when its
    constants modules are first imported) and reads the constant each should move."""
    probes: dict[str, tuple[str, Any]] = {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": ("0", False),
        "RAY_SERVE_HAPROXY_BINARY_PATH": ("/probe/haproxy", "/probe/haproxy"),
        "RAY_SERVE_HAPROXY_LOG_TARGET": ("/probe/log", "/probe/log"),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": ("18500", 18500),
        "RAY_SERVE_HAPROXY_STATS_PORT": ("18404", 18404),
        "RAY_SERVE_HAPROXY_METRICS_PORT": ("19101", 19101),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": ("65536", 65536),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": ("20000", 20000),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": ("21000", 21000),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": ("0", False),
    }
    assert set(probes) == set(ray_internals.INTERNAL_VARIABLES), "every internal variable needs a probe here"
    read = (
        "import importlib, json, sys\n"
        "table = json.loads(sys.argv[1])\n"
        "print(json.dumps({n: getattr(importlib.import_module(m), a, '<missing>') for n, (m, a) in table.items()}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({name: value for name, (value, _) in probes.items()})
    table = json.dumps(ray_internals.INTERNAL_VARIABLES)
    out = subprocess.run([sys.executable, "-c", read, table], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for name, (value, expected) in probes.items():
        module, attribute = ray_internals.INTERNAL_VARIABLES[name]
        assert seen[name] == expected, (
            f"{name}={value} no longer sets {module}.{attribute} (it reads {seen[name]!r}): "
            "orchestrator serve sets or names this variable (see ray_internals.INTERNAL_VARIABLES)"
        )


def test_serve_constant_reads_serves_constants_only() -> None:
    from ray.serve._private import constants

    assert ray_internals.serve_constant("RAY_SERVE_HAPROXY_STATS_PORT") == constants.RAY_SERVE_HAPROXY_STATS_PORT
    with pytest.raises(KeyError):
        ray_internals.serve_constant("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def test_ray_address_from_environment_resolves_as_ray_init_does(monkeypatch: pytest.MonkeyPatch) -> None:
    use = "ray_internals.ray_address_from_environment (orchestrator status finds the cluster with it)"
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.1:6379")
    assert ray_internals.ray_address_from_environment("auto") == "192.0.2.1:6379", f"{use}: RAY_ADDRESS is ignored"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_internals.ray_address_from_environment("192.0.2.2:6379") == "192.0.2.2:6379", (
        f"{use}: an explicit address is no longer returned as it is"
    )


def test_connect_through_loopback_makes_ray_use_127_0_0_1(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray._private import ray_constants

    assert not ray.is_initialized()
    use = "ray_internals.connect_through_loopback (orchestrator status on orchestrator serve's cluster)"
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", (
        f"{use}: Ray's variable is now {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR}"
    )
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    ray_internals.connect_through_loopback()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert ray.util.get_node_ip_address() == "127.0.0.1", f"{use}: Ray no longer takes the node address from it"


@pytest.mark.parametrize(("mode", "on"), [("token", True), ("disabled", False)])
def test_token_auth_follows_an_explicit_mode(monkeypatch: pytest.MonkeyPatch, mode: str, on: bool) -> None:
    from ray._private.authentication import authentication_token_setup as setup

    use = "ray_internals.use_token_auth_if_available (orchestrator status on a token-auth cluster)"
    assert "warn_if_disabled" in _parameters(setup.maybe_enable_token_auth_if_token_available), (
        f"{use}: maybe_enable_token_auth_if_token_available no longer takes warn_if_disabled"
    )
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    assert ray_internals.use_token_auth_if_available() is on, f"{use}: RAY_AUTH_MODE={mode} is not honoured"


def test_replicas_still_bind_their_grpc_server_through_the_wrapped_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve._private import replica

    use = "ray_internals.wrap_replica_grpc_bind (replicas' gRPC servers on loopback)"
    assert 'add_port_to_grpc_server(self._server, "[::]:0")' in Path(replica.__file__).read_text(), (
        f"{use}: Serve's replica no longer binds its gRPC server with add_port_to_grpc_server(..., '[::]:0')"
    )
    seen: list[str] = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: seen.append(address) or 7)
    assert ray_internals.wrap_replica_grpc_bind(lambda address: "rewritten:" + address)
    assert ray_internals.wrap_replica_grpc_bind(lambda address: "again:" + address)  # wraps once
    assert replica.add_port_to_grpc_server(None, "[::]:0") == 7 and seen == ["rewritten:[::]:0"]


def test_a_missing_bind_name_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve._private import replica

    monkeypatch.delattr(replica, "add_port_to_grpc_server")
    assert ray_internals.wrap_replica_grpc_bind(str) is False


_PRIVATE_MODULE = re.compile(r"^ray(?:\.\w+)*\._\w+")
_PRIVATE_OPTIONS = {"_check_exists", "_node_ip_address", "_metrics_export_port"}


def _private_ray_uses(tree: ast.AST) -> list[int]:
    """Returns the lines that import a private Ray module or name, or pass one of Ray's hidden options."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ray":
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute | ast.keyword | ast.Constant):
            text = node.arg if isinstance(node, ast.keyword) else getattr(node, "value", None)
            if isinstance(node, ast.Attribute):
                text = ast.unparse(node)
            names = [text] if isinstance(text, str) else []
            if text in _PRIVATE_OPTIONS:
                lines.append(node.lineno)
        else:
            continue
        if any(_PRIVATE_MODULE.match(name) for name in names):
            lines.append(node.lineno)
    return lines


def test_only_ray_internals_reaches_into_ray() -> None:
    offenders = [
        f"{path.relative_to(_PACKAGE.parent)}:{line}"
        for path in sorted(_PACKAGE.rglob("*.py"))
        if path.name != "ray_internals.py"
        for line in _private_ray_uses(ast.parse(path.read_text()))
    ]
    assert not offenders, "private Ray interfaces outside orchestrator/ray_internals.py: " + ", ".join(offenders)


def test_the_scan_finds_each_kind_of_private_use() -> None:
    source = """
from ray._private import services
import ray.serve._private.api
from ray.serve import _private
ray._private.worker.global_worker
serve.get_deployment_handle("d", app_name="a", _check_exists=False)
options = {"_node_ip_address": "127.0.0.1"}
from ray.serve.handle import DeploymentHandle
ray.util.get_node_ip_address()
"""
    assert sorted(set(_private_ray_uses(ast.parse(source)))) == [2, 3, 4, 5, 6, 7]


def test_every_ray_variable_named_is_listed() -> None:
    named = {
        match
        for path in _PACKAGE.rglob("*.py")
        for match in re.findall(r"\bRAY_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    listed = set(ray_internals.INTERNAL_VARIABLES) | ray_internals.DOCUMENTED_VARIABLES
    assert named <= listed, f"Ray variables named in orchestrator/ but not in ray_internals: {sorted(named - listed)}"
