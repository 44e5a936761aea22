"""A write-ahead journal of finished usage records, so a crash loses none of them.

Records are appended as JSON lines and handed to the operating system at once (a
``write``, no fsync): a killed process loses nothing it had journaled; only a power cut
could. A write that fails (a full disk) raises and leaves no part of its line behind, so
the caller can answer that the record was not recorded, and the journal stays readable.
Each flush to the database seals the current segment and starts a new one; a segment is
deleted once its records are committed. Segments another ledger left behind (a
crash) are replayed by the next ledger to hold the fence; the store's inserts are
idempotent by request id.
"""

from __future__ import annotations

import contextlib
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
        self._size = 0  # bytes of whole lines in the open segment
        self._torn = False  # a failed write may have left part of a line past _size

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
        segment = self.folder / f"segment-{self.owner}-{self._seq:09d}{_SUFFIX}"
        self._fd = os.open(segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment, self._size, self._torn = segment, 0, False

    def append(self, record: UsageRecord) -> None:
        """Journals one record.

        Raises:
            OSError: the write failed (a full disk): the record is not journaled, and the
            part of its line that reached the file, if any, is cut off again (here, or by
            the next append if that fails too).
        """
        if self._fd is None:
            raise RuntimeError("journal is not open")
        if self._torn:
            os.ftruncate(self._fd, self._size)
            self._torn = False
        line = record.model_dump_json().encode() + b"\n"
        try:
            written = 0
            while written < len(line):  # a short write happens as the disk fills up
                written += os.write(self._fd, line[written:])
        except OSError:
            self._torn = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
                self._torn = False
            raise
        self._size += len(line)

    def count(self) -> int:
        """Returns the segment files in the folder (this process's and any left behind)."""
        return sum(1 for _ in self.folder.glob("segment-*" + _SUFFIX))

    def seal(self) -> Path:
        """Closes the current segment and starts a new one. Returns the sealed segment.

        Raises:
            OSError: the new segment could not be created; the current one stays open.
        """
        if self._fd is None or self._segment is None:
            raise RuntimeError("journal is not open")
        sealed, fd = self._segment, self._fd
        self._start_segment()
        with contextlib.suppress(OSError):  # the descriptor is released even then; its lines were written
            os.close(fd)
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
