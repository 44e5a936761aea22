"""``orchestrator serve``'s warden: what the command started ends when the command does, however it ends.

``orchestrator serve`` starts this small process (``python -m orchestrator.warden PID MARK``)
before it starts Ray, with a pipe as its standard input that only the command holds. Ray's
GCS and raylet share the command's fate already (Ray sets their parent-death signal), but
what they start does not: killed with SIGKILL (as an out-of-memory killer does), the command
left Ray's dashboard and runtime-env agents, HAProxy and vLLM engines running, HAProxy still
bound to the API port.

The warden records the command's descendants every :data:`POLL_S` seconds. When its input
reaches end of file (the command is gone: it exited, or was killed) it ends every recorded
process still running, with every process whose environment carries the command's mark
(:data:`MARK_ENV`, which the command sets for everything it starts, so a process started
after the last record or handed to another parent is found too), and their children:
SIGTERM, then SIGKILL for any still running :data:`GRACE_S` later. It lives in a session of
its own, so a Ctrl-C in the terminal reaches only the command, and imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence

import psutil

MARK_ENV = "ORCHESTRATOR_SERVE_TREE"
"""The environment variable ``orchestrator serve`` marks its processes with."""

POLL_S = 1.0
"""How often the warden records the command's descendants."""

GRACE_S = 3.0
"""How long leftovers have between SIGTERM and SIGKILL."""


def start() -> subprocess.Popen[bytes]:
    """Marks this process's environment (inherited by everything it starts from now on) and
    starts its warden. Returns the warden, whose standard input this process must keep open:
    the warden acts when it closes."""
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    os.environ[MARK_ENV] = mark
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.warden", str(os.getpid()), mark],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )


class Ward:
    """The processes one command started: its descendants as last recorded, and the ones
    carrying its mark."""

    def __init__(self, pid: int, mark: str) -> None:
        self.pid, self.mark = pid, mark
        self.seen: dict[int, psutil.Process] = {}

    def record(self) -> None:
        """Adds the command's current descendants to :attr:`seen` (kept after they leave its tree)."""
        with contextlib.suppress(psutil.Error):
            for process in psutil.Process(self.pid).children(recursive=True):
                self.seen.setdefault(process.pid, process)

    def marked(self) -> list[psutil.Process]:
        """Returns this user's running processes whose environment carries the mark."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get(MARK_ENV) == self.mark:
                    found.append(process)
        return found

    def leftovers(self) -> list[psutil.Process]:
        """Returns the recorded and the marked processes still running, with their
        descendants, except this process."""
        found: dict[int, psutil.Process] = {}
        for process in [*self.seen.values(), *self.marked()]:
            with contextlib.suppress(psutil.Error):
                if process.is_running():
                    found.setdefault(process.pid, process)
                    for child in process.children(recursive=True):
                        found.setdefault(child.pid, child)
        found.pop(os.getpid(), None)
        return list(found.values())


def reap(processes: Iterable[psutil.Process], grace_s: float = 10.0) -> list[psutil.Process]:
    """Terminates the processes still alive, kills those that outlast ``grace_s``, and
    returns the ones that were still alive."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace_s)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=grace_s)
    return alive


def _ended(fd: int, timeout_s: float) -> bool:
    """Waits up to ``timeout_s`` for end of file on ``fd``; returns whether it came."""
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable) and os.read(fd, 4096) == b""


def main(argv: Sequence[str] | None = None) -> int:
    """Watches the command ``PID`` (argv: PID MARK) until its pipe closes, then ends what it
    left. Returns 0."""
    pid, mark = (sys.argv[1:] if argv is None else argv)[:2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ward = Ward(int(pid), mark)
    fd = sys.stdin.fileno()
    while True:
        ward.record()
        if _ended(fd, POLL_S) or os.getppid() != ward.pid:
            break
    ended = reap(ward.leftovers(), grace_s=GRACE_S)
    if ended:
        names = ", ".join(sorted({_name(p) for p in ended}))
        print(f"orchestrator serve ended; its warden stopped {len(ended)} processes it left: {names}", file=sys.stderr)
    return 0


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return str(process.pid)


if __name__ == "__main__":
    sys.exit(main())
