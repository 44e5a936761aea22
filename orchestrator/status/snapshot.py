"""What ``orchestrator serve`` publishes for ``orchestrator status``: its cluster's nodes and
Serve's deployments, in a file, so that the command reads them without joining Ray.

``orchestrator serve`` is a Ray driver already; every :data:`WRITE_INTERVAL_S` it writes what
:class:`orchestrator.serving.cluster.RayCluster` would read (``ray.nodes()`` and
``serve.status()``) to ``<directory>/<host>_<port>.json``, named by its cluster's address, and
removes the file when it stops. While the cluster cannot be read (Serve's controller does not
answer) it writes nothing, so the last good file ages. :class:`PublishedCluster` reads such a
file when it is fresh (written in the last :data:`FRESH_S` seconds by a process that is still
alive); otherwise the command joins the cluster as before.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Key = tuple[str, str]

WRITE_INTERVAL_S = 2.0
FRESH_S = 10.0
_NODE_FIELDS = ("Alive", "NodeManagerAddress", "MetricsExportPort")  # what the command reads of ray.nodes()


def default_directory() -> Path:
    """Returns where snapshots are kept: ``~/.cache/orchestrator/clusters``."""
    return Path.home() / ".cache" / "orchestrator" / "clusters"


def snapshot_path(directory: Path, address: str) -> Path:
    """Returns the snapshot file of the cluster at ``address`` (``host:port``)."""
    return directory / (address.replace(":", "_").replace("/", "_").strip("[]") + ".json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class SnapshotWriter:
    """Writes the snapshot of the cluster at ``address``: ``nodes()`` and ``deployments()``
    (as :class:`~orchestrator.serving.cluster.RayCluster` gives them; either raises
    ``ConnectionError`` when the cluster cannot be read), stamped with ``clock()`` (seconds
    since the epoch) and this process's id. The constructor does no I/O."""

    def __init__(
        self,
        directory: Path,
        address: str,
        nodes: Callable[[], Sequence[Mapping[str, Any]]],
        deployments: Callable[[], Mapping[Key, Mapping[str, Any]]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = snapshot_path(directory, address)
        self._address = address
        self._nodes = nodes
        self._deployments = deployments
        self._clock = clock
        self._tried = -float("inf")
        self._unreadable = False

    def write(self) -> None:
        """Writes the snapshot now (atomically: readers see the old file or the new one).

        Raises:
            ConnectionError: the cluster cannot be read; nothing is written.
        """
        body = {
            "address": self._address,
            "pid": os.getpid(),
            "written_at": self._clock(),
            "nodes": [{field: node.get(field) for field in _NODE_FIELDS} for node in self._nodes()],
            "deployments": [
                {"application": app, "deployment": name, **info} for (app, name), info in self._deployments().items()
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps(body, default=str), encoding="utf-8")
        os.replace(partial, self.path)

    def write_if_due(self) -> None:
        """Writes the snapshot when the last try was :data:`WRITE_INTERVAL_S` or more ago. When
        the cluster cannot be read, writes nothing (the last snapshot ages until readers ignore
        it) and logs a warning, once until a snapshot is written again."""
        if self._clock() - self._tried < WRITE_INTERVAL_S:
            return
        self._tried = self._clock()
        try:
            self.write()
        except ConnectionError as exc:
            if not self._unreadable:
                logger.warning(
                    "not publishing the cluster's status for orchestrator status while it cannot be read (%s); "
                    "the command joins Ray once the last snapshot is %g s old",
                    exc,
                    FRESH_S,
                )
            self._unreadable = True
            return
        if self._unreadable:
            logger.info("publishing the cluster's status for orchestrator status again")
        self._unreadable = False

    def remove(self) -> None:
        """Removes the snapshot, if written."""
        self.path.unlink(missing_ok=True)


def read_snapshot(
    path: Path, clock: Callable[[], float] = time.time, alive: Callable[[int], bool] = _alive
) -> dict[str, Any] | None:
    """Returns the snapshot at ``path`` when it is fresh (written less than :data:`FRESH_S`
    ago by a process that is alive), else None (also when missing or unreadable)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        fresh = clock() - float(body["written_at"]) < FRESH_S and alive(int(body["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return body if fresh and isinstance(body.get("nodes"), list) else None


def find_snapshot(directory: Path, address: str, clock: Callable[[], float] = time.time) -> Path | None:
    """Returns the fresh snapshot of the cluster at ``address``; for ``auto``, the only fresh
    snapshot in ``directory`` (None when there are several: which one ``auto`` means is Ray's
    to say)."""
    if address != "auto":
        path = snapshot_path(directory, address)
        return path if read_snapshot(path, clock) is not None else None
    found = [path for path in sorted(directory.glob("*.json")) if read_snapshot(path, clock) is not None]
    return found[0] if len(found) == 1 else None


class PublishedCluster:
    """A cluster as :class:`orchestrator.status.command.Cluster` needs it, read from the
    snapshot at ``path`` (see :class:`SnapshotWriter`)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock

    def _read(self) -> dict[str, Any]:
        body = read_snapshot(self._path, self._clock)
        if body is None:
            raise ConnectionError(f"orchestrator serve no longer publishes its cluster's status ({self._path})")
        return body

    def connect(self, address: str) -> None:
        """Checks that the snapshot is still fresh.

        Raises:
            ConnectionError: it is not.
        """
        self._read()

    def close(self) -> None:
        pass

    def nodes(self) -> list[dict[str, Any]]:
        """Returns the nodes the snapshot lists (as ``ray.nodes()`` gave them).

        Raises:
            ConnectionError: the snapshot is no longer fresh.
        """
        return list(self._read()["nodes"])

    def deployments(self) -> dict[Key, dict[str, Any]]:
        """Returns Serve's deployments as the snapshot has them; empty, after a warning on
        stderr, when it is no longer fresh."""
        try:
            entries = self._read()["deployments"]
            return {
                (entry["application"], entry["deployment"]): {
                    key: value for key, value in entry.items() if key not in ("application", "deployment")
                }
                for entry in entries
            }
        except (ConnectionError, KeyError, TypeError) as exc:
            print(f"warning: Serve status unavailable ({exc})".splitlines()[0], file=sys.stderr)
            return {}
