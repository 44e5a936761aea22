"""The engines' lifeline: a vLLM process that ``multiprocessing`` started ends when its parent does.

vLLM starts its engine core with ``multiprocessing`` spawn from the model replica's Ray
worker (and, with its multiprocessing executor, the engine core starts its workers the same
way). vLLM 0.32's engine core does not watch that parent: an engine whose replica's worker
was SIGKILLed, or died with its raylet, keeps its memory (GPU memory on a GPU node) for
good. Ray 2.60's raylet kills a dead worker's process group, but not when the raylet is gone
too, and not when that cleanup is switched off (``RAY_process_group_cleanup_enabled=0``).

:func:`arm` is a vLLM general plugin (entry point group ``vllm.general_plugins`` in
pyproject.toml): vLLM calls it in every process it starts (engine core, workers) and in the
process that builds the engine. In a process that ``multiprocessing`` started it starts a
daemon thread that polls ``os.getppid()``; once the parent is gone (the process was handed to
another parent), the process gets SIGTERM (vLLM's engine core then shuts its workers down)
and, if it still runs :data:`GRACE_S` later, SIGKILL. Elsewhere (the replica itself, whose
parent is the raylet) it does nothing.

A poll rather than ``PR_SET_PDEATHSIG``: Linux sends the parent-death signal when the parent
*thread* that started the child ends, and vLLM does not say which thread of the replica
builds the engine; a changed ``getppid()`` means only that the parent process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the lifeline looks at the parent."""

GRACE_S = 3.0
"""How long a process has to end after SIGTERM before it gets SIGKILL."""

_armed: list[threading.Thread] = []


def arm() -> bool:
    """vLLM's plugin hook: watches this process's parent if ``multiprocessing`` started it.

    Returns whether a watch runs (after this call or an earlier one)."""
    if _armed:
        return True
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return False
    _armed.append(watch(parent.pid))
    return True


def watch(
    parent_pid: int,
    *,
    on_gone: Callable[[], None] | None = None,
    getppid: Callable[[], int] = os.getppid,
    poll_s: float = POLL_S,
) -> threading.Thread:
    """Starts and returns a daemon thread that calls ``on_gone`` (default :func:`end_self`)
    once ``getppid()`` is no longer ``parent_pid``, at once if it already is not."""

    def run() -> None:
        while getppid() == parent_pid:
            time.sleep(poll_s)
        (on_gone or end_self)()

    thread = threading.Thread(target=run, name="orchestrator-lifeline", daemon=True)
    thread.start()
    return thread


def end_self(grace_s: float = GRACE_S) -> None:
    """Sends this process SIGTERM and, if it still runs ``grace_s`` later, SIGKILL."""
    logger.warning("parent process is gone: ending process %d (SIGTERM, SIGKILL after %.0f s)", os.getpid(), grace_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
