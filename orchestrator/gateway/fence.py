"""The fence: at most one ledger admits requests against a database at a time.

Limits and balances are exact because one ledger decides (see ledger.py). During a
redeploy, or if Serve replaces the gateway while the old one still runs, two ledgers
exist for a while; the fence makes the new one wait until the old one has flushed, handed
over its rate-limit windows and let go. It lives in the database the ledgers share:

* PostgreSQL: a session advisory lock on a connection the ledger keeps open. The server
  drops it when that session ends, so a ledger that dies (its process, its node, its
  network) frees the fence without anyone's help.
* SQLite (one machine): an exclusive ``flock`` on a file beside the database, which the
  kernel drops when the process dies.

The methods may block (database or file I/O); the ledger calls them on its database thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

# pg_advisory_lock's key: any fixed 64-bit number the deployment does not use otherwise.
ADVISORY_KEY = 0x6F7263686C6467  # "orchldg"


class Fence(Protocol):
    """A lock that one ledger holds while it admits requests."""

    def try_acquire(self) -> bool:
        """Takes the fence if it is free; returns whether this ledger holds it now."""
        ...

    def still_held(self) -> bool:
        """Returns whether the fence is still this ledger's (False once its hold was lost)."""
        ...

    def release(self) -> None:
        """Lets go of the fence (nothing happens if it is not held)."""
        ...


class AdvisoryLockFence:
    """A PostgreSQL session advisory lock on a connection of its own."""

    def __init__(self, engine: Engine, key: int = ADVISORY_KEY) -> None:
        self._engine = engine
        self._key = key
        self._conn: Any = None

    def try_acquire(self) -> bool:
        if self.still_held():
            return True
        self._drop()
        conn = self._engine.connect()
        try:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar())
            conn.commit()
        except Exception:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
        except Exception:
            # The session is gone, and the server dropped its lock with it.
            self._drop()
            return False
        return True

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                self._conn.commit()
            finally:
                self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close too
                self._conn.invalidate()  # never back to the pool: the session holds the lock
                self._conn.close()
            self._conn = None


class FileFence:
    """An exclusive ``flock`` on ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def fence_for(engine: Engine) -> Fence:
    """Returns the fence for the database behind ``engine``: an advisory lock on PostgreSQL,
    a lock file beside a SQLite file (``<database>.ledger-lock``)."""
    url = make_url(str(engine.url))
    if url.get_backend_name() == "postgresql":
        return AdvisoryLockFence(engine)
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database and database != ":memory:":
        return FileFence(Path(database).expanduser().with_name(Path(database).name + ".ledger-lock"))
    raise ValueError(f"no fence for a {url.get_backend_name()} database")
