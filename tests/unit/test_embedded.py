"""`orchestrator serve` runs open only with neither an admin key nor any API key, and on a
non-loopback address only when asked to."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.embedded import ExposedOpenMode, _access_mode, internal_ports, is_loopback, port_clash
from orchestrator.gateway import admin
from orchestrator.gateway.records import KeyLimits
from orchestrator.gateway.store import SQLStore
from orchestrator.settings import Settings


def test_open_only_without_keys_and_admin_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    assert _access_mode(Settings(database_url=url)).open_access
    assert "OPEN MODE" in capsys.readouterr().out
    assert not _access_mode(Settings(database_url=url, admin_key="x" * 20)).open_access
    store = SQLStore(url)
    store.open()
    admin.create_key(store, KeyLimits(), workspace="default", pepper=b"", now=datetime.now(UTC))
    store.close()
    assert not _access_mode(Settings(database_url=url)).open_access
    assert "API keys required" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.com"])
def test_implicit_open_mode_beyond_loopback_is_refused(tmp_path: Path, host: str) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    with pytest.raises(ExposedOpenMode, match="--open"):
        _access_mode(Settings(database_url=url, host=host))
    assert _access_mode(Settings(database_url=url, host=host, open_access=True)).open_access
    assert not _access_mode(Settings(database_url=url, host=host, admin_key="x" * 20)).open_access


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
    ("[::1]", True), ("localhost", True), ("0.0.0.0", False), ("10.0.0.1", False), ("::", False)])  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_refuses_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ORCH_DATABASE_URL", f"sqlite:///{tmp_path / 'o.db'}")
    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    monkeypatch.delenv("ORCH_OPEN_ACCESS", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--catalog", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--open" in err and err.count("\n") == 1


_INTERNAL = [(range(8500, 8501), "the port of a proxy (P)"), (range(30000, 31001), "in a range, 30000-31000 (R)")]


@pytest.mark.parametrize(
    ("port", "metrics_port", "clash"),
    [
        (8000, None, None),
        (8000, 9000, None),
        (8500, None, "--port 8500 is the port of a proxy (P); choose another --port"),
        (30999, None, "--port 30999 is in a range, 30000-31000 (R); choose another --port"),
        (8000, 8500, "--metrics-port 8500 is the port of a proxy (P); choose another --metrics-port"),
        (9000, 9000, "--port and --metrics-port are both 9000; give them different ports"),
    ],
)
def test_a_port_clash_is_named_in_one_line(port: int, metrics_port: int | None, clash: str | None) -> None:
    assert port_clash({"--port": port, "--metrics-port": metrics_port}, _INTERNAL) == clash


def test_the_internal_ports_are_the_ones_ray_and_serve_open() -> None:
    def named(fast_ingress: bool) -> dict[str, set[int]]:
        return {what.split("(")[-1].rstrip(")"): set(span) for span, what in internal_ports(fast_ingress)}

    assert named(False) == {"the HTTP port of Ray's dashboard agent": {52365}}
    fast = named(True)
    assert fast["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == {8500}
    assert fast["RAY_SERVE_HAPROXY_STATS_PORT"] == {8404} and fast["RAY_SERVE_HAPROXY_METRICS_PORT"] == {9101}
    assert fast["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, _MAX_HTTP_PORT"] == set(range(30000, 31001))


def test_serve_refuses_a_clashing_port_before_starting_anything(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ORCH_"))}
    env["ORCH_DATABASE_URL"] = f"sqlite:///{tmp_path / 'o.db'}"
    args = ["serve", "--port", "8500", "--catalog", str(tmp_path / "missing.yaml")]
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --port 8500 is") and done.stderr.count("\n") == 1, done.stderr
    assert "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" in done.stderr and "catalog" not in done.stdout + done.stderr


def test_serve_publishes_nothing_while_serves_controller_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The snapshot writer `orchestrator serve` builds reads Serve's status with the call that
    raises (not RayCluster.deployments, which answers {} after a warning, and would publish an
    empty list as if fresh)."""
    import ray
    from ray import serve

    from orchestrator.embedded import _snapshot_writer

    def down() -> None:
        raise RuntimeError("the controller died\nstack")

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}])
    monkeypatch.setattr(serve, "status", down)
    writer = _snapshot_writer("127.0.0.1:6379")
    writer.write_if_due()
    assert not writer.path.exists()
    assert capsys.readouterr().err == ""  # no per-tick warning on stderr (one log record instead)
