"""An engine process that ``multiprocessing`` started ends when its parent is gone, however the
parent died; vLLM loads the lifeline as a general plugin."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from orchestrator.engine import lifeline

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int, deadline_s: float = 60.0) -> bool:
    """Waits up to ``deadline_s`` for ``pid`` to end (or be a zombie); returns whether it did."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_the_watch_acts_once_the_parent_changes() -> None:
    parents = iter([10, 10, 10, 1])
    gone = threading.Event()
    thread = lifeline.watch(10, on_gone=gone.set, getppid=lambda: next(parents), poll_s=0.001)
    thread.join(timeout=30)
    assert gone.is_set() and not thread.is_alive()


def test_the_watch_acts_at_once_when_the_parent_is_already_gone() -> None:
    gone = threading.Event()
    lifeline.watch(10, on_gone=gone.set, getppid=lambda: 1).join(timeout=30)
    assert gone.is_set()


def test_a_process_that_multiprocessing_did_not_start_is_not_watched() -> None:
    assert lifeline.arm() is False  # pytest's own process
    assert not [t for t in threading.enumerate() if t.name == "orchestrator-lifeline"]


@pytest.mark.parametrize(("ignore_sigterm", "code"), [(False, -signal.SIGTERM), (True, -signal.SIGKILL)])
def test_ending_itself_escalates_to_sigkill(ignore_sigterm: bool, code: int) -> None:
    script = (
        "import signal\n"
        f"if {ignore_sigterm}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "from orchestrator.engine.lifeline import end_self\n"
        "end_self(grace_s=0.2)\n"
        "raise SystemExit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == code, done.stderr


# A replica stand-in: starts an engine stand-in with multiprocessing spawn (as vLLM starts its
# engine core from a Ray worker), which arms the lifeline as vLLM's plugin loader would.
_ENGINE = """
import time
from orchestrator.engine.lifeline import arm

def run(armed):
    armed.put(arm())
    time.sleep(600)
"""
_REPLICA = """
import multiprocessing, sys, time
sys.path.insert(0, sys.argv[1])
import engine_standin

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    armed = context.Queue()
    child = context.Process(target=engine_standin.run, args=(armed,))
    child.start()
    print(child.pid, armed.get(timeout=120), flush=True)
    time.sleep(600)
"""


def test_an_engine_ends_when_its_replica_is_killed(tmp_path: Path) -> None:
    (tmp_path / "engine_standin.py").write_text(_ENGINE)
    replica = subprocess.Popen(
        [sys.executable, "-c", _REPLICA, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
    )
    assert replica.stdout is not None
    pid, armed = replica.stdout.readline().split()
    engine = psutil.Process(int(pid))
    try:
        assert armed == "True" and engine.ppid() == replica.pid
        replica.kill()  # as SIGKILL (or the OOM killer) ends a Ray worker: no cleanup runs
        replica.wait()
        assert _gone(engine.pid), f"engine {engine.pid} outlived its replica"
    finally:
        replica.kill()
        with contextlib.suppress(psutil.Error):
            engine.kill()


def test_vllm_loads_the_lifeline_as_a_general_plugin() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    plugins = project["project"]["entry-points"]["vllm.general_plugins"]
    module, _, name = plugins["orchestrator_lifeline"].partition(":")
    assert getattr(importlib.import_module(module), name) is lifeline.arm
