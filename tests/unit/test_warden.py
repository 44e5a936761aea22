"""``orchestrator serve``'s warden ends what the command started once the command is gone,
however it went: the processes in its tree, the ones handed to another parent after the
warden saw them, and the ones carrying its mark; and nothing else."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from orchestrator import warden

REPO = Path(__file__).resolve().parents[2]

# A stand-in for `orchestrator serve`: starts its warden, then
#   kept      a child that stays its child;
#   unmarked  a grandchild with an empty environment that ignores SIGTERM, orphaned once its
#             parent exits (after the warden recorded it: the test waits for that exit);
#   marked    a grandchild that ignores SIGTERM, orphaned at once (found by its mark).
_SERVE = """
import subprocess, sys, time
from orchestrator import warden
guard = warden.start()
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
def orphan(env, linger):
    return subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time\\n"
        f"p = subprocess.Popen([sys.executable, '-c', {stubborn!r}], env={env!r})\\n"
        "print(p.pid, flush=True)\\n"
        f"time.sleep({linger})\\n"], stdout=subprocess.PIPE, text=True)
kept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
unmarked = orphan({}, 3 * warden.POLL_S)
marked = orphan(None, 0)
grandchildren = [unmarked.stdout.readline().strip(), marked.stdout.readline().strip()]
print(guard.pid, kept.pid, unmarked.pid, *grandchildren, flush=True)
time.sleep(600)
"""


def _all_gone(processes: list[psutil.Process], deadline_s: float = 60.0) -> list[psutil.Process]:
    """Waits up to ``deadline_s`` for the processes to end; returns those still running."""
    deadline = time.monotonic() + deadline_s
    alive = processes
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return alive


def test_what_a_killed_command_left_is_ended_and_nothing_else() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    serve = subprocess.Popen([sys.executable, "-c", _SERVE], stdout=subprocess.PIPE, text=True, env=env)
    assert serve.stdout is not None
    pids = [int(pid) for pid in serve.stdout.readline().split()]
    guard, kept, unmarked_parent, unmarked, marked = (psutil.Process(pid) for pid in pids)
    left = [kept, unmarked, marked]
    try:
        assert warden.MARK_ENV not in unmarked.environ() and warden.MARK_ENV in marked.environ()
        deadline = time.monotonic() + 120
        while unmarked.ppid() == unmarked_parent.pid and time.monotonic() < deadline:
            time.sleep(0.1)  # until its parent exits: the warden saw it in the tree first
        assert unmarked.ppid() != unmarked_parent.pid
        serve.kill()
        serve.wait()
        assert not _all_gone([*left, guard]), "the warden left processes running"
        assert bystander.poll() is None  # not the command's: untouched
    finally:
        for process in [serve, bystander]:
            process.kill()
        for leftover in [*left, guard]:
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def test_the_warden_ends_when_the_command_exits_normally() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    script = "from orchestrator import warden; print(warden.start().pid, flush=True)"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    guard = int(done.stdout)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(guard).wait(timeout=60)
    assert not psutil.pid_exists(guard) or psutil.Process(guard).status() == psutil.STATUS_ZOMBIE


def test_reap_ends_a_process_tree_whose_parent_is_gone() -> None:
    """What orchestrator serve does after ray.shutdown(): processes it started that outlived
    their parent (as vLLM's engine processes do when Ray kills a replica) are ended."""
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
    assert [p.pid for p in warden.reap(started, grace_s=1)] == [orphan_pid]  # the child was already gone
    assert not psutil.pid_exists(orphan_pid) or orphan.status() == psutil.STATUS_ZOMBIE
