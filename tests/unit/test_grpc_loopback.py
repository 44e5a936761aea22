"""The worker setup hook makes Serve replicas' gRPC servers listen on 127.0.0.1 instead of
every interface."""

from __future__ import annotations

import ipaddress
from concurrent import futures

import grpc
import psutil
import pytest

from orchestrator import grpc_loopback
from orchestrator.grpc_loopback import bind_replicas_to_loopback, loopback_address


@pytest.mark.parametrize(
    ("address", "bound"),
    [("[::]:0", "127.0.0.1:0"), ("0.0.0.0:9000", "127.0.0.1:9000"), (":7", "127.0.0.1:7"),
     ("127.0.0.1:5", "127.0.0.1:5"), ("[::1]:5", "[::1]:5"), ("10.0.0.5:5", "10.0.0.5:5")],
)  # fmt: skip
def test_wildcard_hosts_become_loopback(address: str, bound: str) -> None:
    assert loopback_address(address) == bound


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections("inet") if c.laddr.port == port and not c.raddr}


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # gRPC's sockets are IPv6
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def test_a_replica_binds_its_grpc_server_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve._private import replica

    # That Serve's replica still binds through this name: tests/unit/test_ray_internals.py.
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    assert bind_replicas_to_loopback() and bind_replicas_to_loopback()  # twice: wrapped once
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        port = replica.add_port_to_grpc_server(server, "[::]:0")
        addresses = _listening(port)
        assert port > 0 and addresses and all(_loopback(ip) for ip in addresses), addresses
    finally:
        server.stop(None)


def test_without_the_hook_the_server_listens_on_every_interface() -> None:
    from ray._common.tls_utils import add_port_to_grpc_server

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        port = add_port_to_grpc_server(server, "[::]:0")
        addresses = _listening(port)
        assert addresses and not any(_loopback(ip) for ip in addresses), addresses
    finally:
        server.stop(None)


def test_the_hook_is_named_by_its_import_path() -> None:
    module, _, name = grpc_loopback.SETUP_HOOK.rpartition(".")
    assert module == grpc_loopback.__name__ and getattr(grpc_loopback, name) is bind_replicas_to_loopback
