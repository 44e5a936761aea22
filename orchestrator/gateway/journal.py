"""A write-ahead journal of finished usage records, so a crash loses none of them.

Records are appended as JSON lines and handed to the operating system at once (one
``write``, no fsync): a killed process loses nothing it had journaled; only a power cut
could. Each flush to the database seals the current segment and starts a new one; a
segment is deleted once its records are committed. On start, segments left behind by a
crash are replayed; the store's inserts are idempotent by request id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from orchestrator.gateway.records import UsageRecord

_SUFFIX = ".jsonl"


class UsageJournal:
    """Segmented append-only journal in ``folder``. No I/O until :meth:`open`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._segment: Path | None = None
        self._seq = 0

    def open(self) -> list[Path]:
        """Creates the folder and a fresh segment. Returns the segments left by processes
        that are gone (oldest first), to be replayed and then :meth:`discard`-ed. Segments
        of a live process are its own business: during a redeploy the old ledger still
        runs and flushes them itself."""
        self.folder.mkdir(parents=True, exist_ok=True)
        segments = sorted(self.folder.glob("segment-*" + _SUFFIX), key=lambda p: p.stat().st_mtime_ns)
        # This process's own leftovers are an earlier ledger's here (a restarted one).
        owners = {p: _parts(p) for p in segments}
        leftovers = [p for p in segments if owners[p][0] == os.getpid() or not _alive(owners[p][0])]
        self._seq = max((seq for _, seq in owners.values()), default=0)
        self._start_segment()
        return leftovers

    def _start_segment(self) -> None:
        self._seq += 1
        self._segment = self.folder / f"segment-{os.getpid()}-{self._seq:09d}{_SUFFIX}"
        self._fd = os.open(self._segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, record: UsageRecord) -> None:
        """Journals one record (a single write system call, so lines never interleave)."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        os.write(self._fd, record.model_dump_json().encode() + b"\n")

    def count(self) -> int:
        """Returns the segment files in the folder (this process's and any left behind)."""
        return sum(1 for _ in self.folder.glob("segment-*" + _SUFFIX))

    def seal(self) -> Path:
        """Closes the current segment and starts a new one. Returns the sealed segment."""
        if self._fd is None or self._segment is None:
            raise RuntimeError("journal is not open")
        sealed = self._segment
        os.close(self._fd)
        self._start_segment()
        return sealed

    def close(self) -> Path | None:
        """Closes the journal; returns the last segment (delete it once flushed)."""
        if self._fd is None:
            return None
        os.close(self._fd)
        self._fd = None
        return self._segment

    @staticmethod
    def read(segment: Path) -> Iterator[UsageRecord]:
        """Yields the records of a segment; a torn last line (crash mid-write) is skipped."""
        with segment.open("rb") as handle:
            for line in handle:
                if line.endswith(b"\n"):
                    yield UsageRecord.model_validate_json(line)

    @staticmethod
    def discard(segment: Path) -> None:
        segment.unlink(missing_ok=True)


def _parts(path: Path) -> tuple[int, int]:
    """Returns the (process id, sequence number) of a ``segment-<pid>-<seq>`` file."""
    try:
        _, pid, seq = path.stem.split("-")
        return int(pid), int(seq)
    except ValueError:
        return 0, 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
