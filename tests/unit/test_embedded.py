"""`orchestrator serve` runs open only with neither an admin key nor any API key, and on a
non-loopback address only when asked to."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.embedded import ExposedOpenMode, _access_mode, is_loopback
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


def test_reap_ends_a_process_tree_whose_parent_is_gone() -> None:
    """What orchestrator serve does after ray.shutdown(): processes it started that outlived
    their parent (as vLLM's engine processes do when Ray kills a replica) are ended."""
    import subprocess
    import sys

    import psutil

    from orchestrator.embedded import reap

    # A child that starts a grandchild ignoring SIGTERM, then exits: the grandchild is orphaned.
    grandchild = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=sys.stdout)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    orphan_pid = int(child.stdout.readline())
    assert child.stdout.readline().strip() == "up"
    started = psutil.Process().children(recursive=True)
    assert orphan_pid in {p.pid for p in started}
    child.kill()
    child.wait()
    orphan = psutil.Process(orphan_pid)
    assert orphan.is_running()
    assert [p.pid for p in reap(started, grace_s=1)] == [orphan_pid]  # the child was already gone
    assert not psutil.pid_exists(orphan_pid) or orphan.status() == psutil.STATUS_ZOMBIE
