"""The fence lets one ledger admit at a time: a second holder is refused while the first
lives, and a holder that is killed (SIGKILL, no clean-up) frees it, on both databases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sqlalchemy import create_engine

from orchestrator.gateway.fence import fence_for

# Takes the fence in a process of its own, says so, then waits to be killed.
_HOLDER = """
import sys, time
from sqlalchemy import create_engine
from orchestrator.gateway.fence import fence_for
fence = fence_for(create_engine(sys.argv[1]))
print("held" if fence.try_acquire() else "refused", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_frees_the_fence(db_url: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, db_url], stdout=subprocess.PIPE, text=True)
    engine = create_engine(db_url)
    fence = fence_for(engine)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not fence.try_acquire() and not fence.still_held()  # one holder at a time
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 30  # PostgreSQL notices the dropped session
        while not fence.try_acquire():
            assert time.monotonic() < deadline, "the killed holder's fence was never freed"
            time.sleep(0.2)
        assert fence.still_held()
        # Held now: another process is refused, and a release lets it in.
        again = subprocess.Popen([sys.executable, "-c", _HOLDER, db_url], stdout=subprocess.PIPE, text=True)
        assert again.stdout is not None and again.stdout.readline().strip() == "refused"
        again.kill()
        again.wait(timeout=30)
        fence.release()
        assert not fence.still_held()
    finally:
        if holder.poll() is None:
            holder.kill()
        fence.release()
        engine.dispose()
