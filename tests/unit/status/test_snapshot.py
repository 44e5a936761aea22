"""What ``orchestrator serve`` publishes of its cluster, and the command reading it instead of
joining Ray (files in a temporary directory, an injected clock; no Ray)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from orchestrator.status import command
from orchestrator.status.command import status_command
from orchestrator.status.snapshot import (
    FRESH_S,
    WRITE_INTERVAL_S,
    PublishedCluster,
    SnapshotWriter,
    default_directory,
    find_snapshot,
    read_snapshot,
)
from tests.unit.status.test_command import NODES, parse
from tests.unit.status.texts import DEPLOYMENTS, HEAD, SMOL, WORKER, recent_texts

ADDRESS = "127.0.0.1:6379"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def writer(directory: Path, clock: Clock, address: str = ADDRESS) -> SnapshotWriter:
    return SnapshotWriter(directory, address, lambda: NODES, lambda: DEPLOYMENTS, clock)


def test_written_snapshot_reads_as_the_cluster(tmp_path: Path) -> None:
    clock = Clock()
    writer(tmp_path, clock).write()
    path = find_snapshot(tmp_path, ADDRESS, clock)
    assert path is not None
    cluster = PublishedCluster(path, clock)
    cluster.connect(ADDRESS)
    assert cluster.deployments() == DEPLOYMENTS
    assert [(n["Alive"], n["NodeManagerAddress"], n["MetricsExportPort"]) for n in cluster.nodes()] == [
        (True, HEAD, 8080),
        (True, WORKER, 8080),
        (False, "10.0.0.3", 8080),
    ]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


def test_stale_or_orphaned_snapshot_is_not_read(tmp_path: Path) -> None:
    clock = Clock()
    published = writer(tmp_path, clock)
    published.write()
    clock.now += FRESH_S
    assert find_snapshot(tmp_path, ADDRESS, clock) is None  # its writer stopped writing
    with pytest.raises(ConnectionError, match="no longer publishes"):
        PublishedCluster(published.path, clock).nodes()
    published.write()
    assert read_snapshot(published.path, clock) is not None
    assert read_snapshot(published.path, clock, alive=lambda pid: pid != os.getpid()) is None  # writer gone
    published.path.write_text("{not json")
    assert read_snapshot(published.path, clock) is None


def test_writes_when_due_and_removes(tmp_path: Path) -> None:
    clock = Clock()
    published = writer(tmp_path, clock)
    published.write_if_due()
    first = json.loads(published.path.read_text())["written_at"]
    clock.now += WRITE_INTERVAL_S / 2
    published.write_if_due()
    assert json.loads(published.path.read_text())["written_at"] == first
    clock.now += WRITE_INTERVAL_S / 2
    published.write_if_due()
    assert json.loads(published.path.read_text())["written_at"] == clock.now
    published.remove()
    assert not published.path.exists()
    published.remove()  # twice is fine


class Serve:
    """Serve's deployments, or ConnectionError while ``down``."""

    def __init__(self) -> None:
        self.down = False

    def __call__(self) -> dict[tuple[str, str], dict[str, object]]:
        if self.down:
            raise ConnectionError("Serve status unavailable (RayActorError: the controller died)")
        return DEPLOYMENTS


def test_an_unreadable_cluster_leaves_the_last_snapshot_to_age(tmp_path: Path) -> None:
    clock, serve = Clock(), Serve()
    published = SnapshotWriter(tmp_path, ADDRESS, lambda: NODES, serve, clock)
    published.write_if_due()
    before = published.path.read_text()
    serve.down = True
    for _ in range(int(FRESH_S // WRITE_INTERVAL_S)):
        clock.now += WRITE_INTERVAL_S
        published.write_if_due()
        assert published.path.read_text() == before  # the deployments it had, not an empty list
    assert find_snapshot(tmp_path, ADDRESS, clock) is None  # stale: status joins Ray instead
    serve.down = False
    clock.now += WRITE_INTERVAL_S
    published.write_if_due()
    assert PublishedCluster(published.path, clock).deployments() == DEPLOYMENTS


def test_an_unreadable_cluster_is_warned_about_once_per_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock, serve = Clock(), Serve()
    published = SnapshotWriter(tmp_path, ADDRESS, lambda: NODES, serve, clock)

    def ticks(count: int) -> list[str]:
        caplog.clear()
        for _ in range(count):
            published.write_if_due()
            clock.now += WRITE_INTERVAL_S
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    with caplog.at_level(logging.INFO, logger="orchestrator.status.snapshot"):
        assert ticks(2) == []
        serve.down = True
        warned = ticks(5)
        assert len(warned) == 1 and "the controller died" in warned[0]
        serve.down = False
        assert ticks(2) == []
        serve.down = True
        assert len(ticks(3)) == 1  # a new outage


def test_auto_means_the_only_fresh_snapshot(tmp_path: Path) -> None:
    clock = Clock()
    assert find_snapshot(tmp_path / "none", "auto", clock) is None
    one = writer(tmp_path, clock)
    one.write()
    assert find_snapshot(tmp_path, "auto", clock) == one.path
    assert find_snapshot(tmp_path, "127.0.0.1:7000", clock) is None
    writer(tmp_path, clock, "127.0.0.1:7000").write()
    assert find_snapshot(tmp_path, "auto", clock) is None  # two clusters: Ray's to choose


def test_command_reads_a_published_cluster_without_joining_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    SnapshotWriter(default_directory(), ADDRESS, lambda: NODES, lambda: DEPLOYMENTS).write()

    def no_ray(address: str) -> None:
        raise AssertionError("joined Ray")

    monkeypatch.setattr("orchestrator.serving.cluster.RayCluster.connect", lambda self, address: no_ray(address))
    texts = {HEAD: recent_texts()[0], WORKER: recent_texts()[1]}
    out, err = io.StringIO(), io.StringIO()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=texts[request.url.host]))
    with httpx.Client(transport=transport) as client:
        code = status_command(parse(["--json", "--address", ADDRESS]), http=client, out=out, err=err)
    assert (code, err.getvalue()) == (0, "")
    models = {m["model"]: m for m in json.loads(out.getvalue())["models"]}
    assert models[SMOL]["status"] == "HEALTHY" and models[SMOL]["tokens_per_second"] == 80.0


def test_without_a_snapshot_the_command_joins_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cluster = command._default_cluster(ADDRESS)
    assert type(cluster).__name__ == "RayCluster"


def test_serve_imports_no_more_for_publishing() -> None:
    """orchestrator serve imports the snapshot writer; it loads neither Ray nor httpx by that."""
    code = "import sys, orchestrator.status.snapshot; print(','.join(m for m in ('ray', 'httpx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
