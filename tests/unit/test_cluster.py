"""``serving/cluster.py``: Serve's status as plain data, and finding a cluster's address fast.

The Ray internals it uses (``orchestrator.ray_internals``) and Ray's node address are replaced
where a test plays a cluster; the TCP probe is injected. That Ray still provides those internals:
tests/unit/test_ray_internals.py."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from orchestrator import ray_internals
from orchestrator.serving.cluster import (
    ClusterUnreachable,
    RayCluster,
    deployments_from_serve_status,
    host_and_port,
    is_loopback,
    reachable,
)


def test_deployments_from_serve_status_gives_plain_strings() -> None:
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    deployment = SimpleNamespace(
        status=DeploymentStatus.UPSCALING, replica_states={ReplicaState.RUNNING: 1, "STARTING": 2}, message="scaling"
    )
    serve_status = SimpleNamespace(applications={"llm": SimpleNamespace(deployments={"model-x": deployment})})
    assert deployments_from_serve_status(serve_status) == {
        ("llm", "model-x"): {
            "status": "UPSCALING",
            "replica_states": {"RUNNING": 1, "STARTING": 2},
            "message": "scaling",
        }
    }


def test_reachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert reachable("127.0.0.1", port, timeout_s=1.0)
    assert not reachable("127.0.0.1", port, timeout_s=1.0)


def test_loopback_only_cluster_is_reached_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """``orchestrator serve``'s Ray listens on 127.0.0.1 only; Ray would dial the public address."""
    import ray.util

    through_loopback: list[bool] = []
    monkeypatch.setattr(ray_internals, "connect_through_loopback", lambda: through_loopback.append(True))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda address=None: "192.0.2.7")
    dialed: list[str] = []

    def loopback_only(host: str, port: int) -> bool:
        dialed.append(f"{host}:{port}")
        return host == "127.0.0.1"

    assert RayCluster(probe=loopback_only).bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert dialed == ["192.0.2.7:6379", "127.0.0.1:6379"]
    assert through_loopback == [True]


def test_cluster_on_public_address_is_left_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.util

    through_loopback: list[bool] = []
    monkeypatch.setattr(ray_internals, "connect_through_loopback", lambda: through_loopback.append(True))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda address=None: "192.0.2.7")
    cluster = RayCluster(probe=lambda host, port: True)
    assert cluster.bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379"
    assert cluster.bootstrap_address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert cluster.bootstrap_address("ray://head:10001") == "ray://head:10001"
    assert through_loopback == []


def test_unreachable_or_missing_cluster_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = RayCluster(probe=lambda host, port: False)
    with pytest.raises(
        ClusterUnreachable, match=r"^cannot reach a Ray cluster at 10.0.0.1:6379: nothing answers there$"
    ):
        cluster.bootstrap_address("10.0.0.1:6379")
    monkeypatch.setattr(ray_internals, "ray_address_from_environment", lambda address: "127.0.0.1:6379")
    with pytest.raises(ClusterUnreachable, match=r"^cannot reach a Ray cluster at 'auto' \(127.0.0.1:6379\): nothing"):
        cluster.bootstrap_address("auto")

    def none_running(address: str) -> str:
        raise ConnectionError("Could not find any running Ray instance. Please specify ...")

    monkeypatch.setattr(ray_internals, "ray_address_from_environment", none_running)
    with pytest.raises(ClusterUnreachable, match=r"^cannot reach a Ray cluster at 'auto': Could not find any running"):
        cluster.bootstrap_address("auto")


def test_unreachable_is_the_connection_error_the_status_command_converts() -> None:
    """``orchestrator.status`` must not import Ray, so it catches the built-in type."""
    assert issubclass(ClusterUnreachable, ConnectionError)


@pytest.mark.parametrize("address", ["auto", "10.0.0.1:6379"])
def test_a_cluster_found_or_given_gets_token_auth_like_ray_init(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    """ray.init enables token auth from ~/.ray/auth_token only for address="auto"; connect
    passes an address (found, or given as orchestrator serve prints it), so it does that step
    itself before connecting (orchestrator serve's cluster uses token auth)."""
    import ray

    calls: list[str] = []
    monkeypatch.setattr(ray_internals, "use_token_auth_if_available", lambda: calls.append("token-auth") or True)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(f"init {kwargs['address']}"))
    cluster = RayCluster(probe=lambda host, port: True)
    monkeypatch.setattr(cluster, "bootstrap_address", lambda given: "127.0.0.1:6379")
    cluster.connect(address)
    assert calls == ["token-auth", "init 127.0.0.1:6379"]


@pytest.mark.parametrize(
    ("address", "parsed"),
    [("127.0.0.1:6379", ("127.0.0.1", 6379)), ("head:6379", ("head", 6379)), ("[::1]:6379", ("::1", 6379)),
     ("head", None), ("head:port", None), ("head:70000", None), (":6379", None)],
)  # fmt: skip
def test_host_and_port(address: str, parsed: tuple[str, int] | None) -> None:
    assert host_and_port(address) == parsed


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.0.1", True), ("::1", True), ("LOCALHOST", True),
     ("10.0.0.1", False), ("head", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_status_unavailable_raises_or_warns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve_deployments raises (the snapshot writer keeps its last snapshot); deployments, as
    orchestrator status uses it, warns on stderr and shows no rows."""
    from ray import serve

    def down() -> None:
        raise RuntimeError("the controller died\nstack")

    monkeypatch.setattr(serve, "status", down)
    first_line = "Serve status unavailable (RuntimeError: the controller died"  # of the exception's text
    with pytest.raises(ClusterUnreachable) as unreachable:
        RayCluster().serve_deployments()
    assert str(unreachable.value) == first_line
    assert RayCluster().deployments() == {}
    assert capsys.readouterr().err == f"warning: {first_line}\n"
