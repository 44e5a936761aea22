"""A write-ahead journal of finished usage records, so a crash loses none of them.

Records are appended as JSON lines and handed to the operating system at once (one
``write``, no fsync): a killed process loses nothing it had journaled; only a power cut
could. Each flush to the database seals the current segment and starts a new one; a
segment is deleted once its records are committed. Segments another ledger left behind (a
crash) are replayed by the next ledger to hold the fence; the store's inserts are
idempotent by request id.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from orchestrator.gateway.records import UsageRecord

_SUFFIX = ".jsonl"


class UsageJournal:
    """Segmented append-only journal in ``folder``, its segments named by ``owner`` (a
    ledger's unique id: ``segment-<owner>-<seq>.jsonl``). No I/O until :meth:`open`.

    Which segments are leftovers is the fence's call (gateway/fence.py), not this class's:
    the ledger holding the fence replays every segment that is not its own, because the
    previous holder flushes and deletes its segments before it lets go of the fence, or
    is dead.
    """

    def __init__(self, folder: Path, owner: str | None = None) -> None:
        self.folder = folder
        self.owner = owner or uuid.uuid4().hex
        self._fd: int | None = None
        self._segment: Path | None = None
        self._seq = 0

    def open(self) -> None:
        """Creates the folder and this journal's first segment."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_segment()

    def leftovers(self) -> list[Path]:
        """Returns the segments of other owners, oldest first, to be replayed and then
        :meth:`discard`-ed."""
        segments = [p for p in self.folder.glob("segment-*" + _SUFFIX) if _owner(p) != self.owner]
        return sorted(segments, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def _start_segment(self) -> None:
        self._seq += 1
        self._segment = self.folder / f"segment-{self.owner}-{self._seq:09d}{_SUFFIX}"
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


def _owner(path: Path) -> str:
    """Returns the owner of a ``segment-<owner>-<seq>`` file."""
    parts = path.stem.split("-")
    return "-".join(parts[1:-1]) if len(parts) >= 3 else ""
