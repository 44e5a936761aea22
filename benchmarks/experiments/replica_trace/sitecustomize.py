"""Traces the memory of long-running Ray processes (Serve replicas) from the inside.

Put this folder on ``PYTHONPATH`` (Ray's workers inherit the environment of the process that
started Ray) with ``ORCH_TRACE_DIR`` set, e.g. for the soak:

    ORCH_TRACE_DIR=/tmp/trace PYTHONPATH=$PWD:$PWD/benchmarks/experiments/replica_trace \\
        .venv/bin/python benchmarks/soak.py --minutes 8 --warmup-minutes 2

Every Python process then starts a daemon thread that waits until its process title (Ray's
``ray::ServeReplica:...``) contains ``ORCH_TRACE_MATCH`` (default ``ServeReplica:orchestrator``),
waits ``ORCH_TRACE_WARM_S`` (120) more, starts ``tracemalloc`` and notes the live objects by
type, then every ``ORCH_TRACE_EVERY_S`` (60) appends to ``ORCH_TRACE_DIR/<title>-<pid>.txt``:
resident memory before and after ``malloc_trim``, traced memory, the largest growths of
traced memory by traceback, and the types whose live count grew most. Without
``ORCH_TRACE_DIR`` it does nothing.
"""

from __future__ import annotations

import os

if os.environ.get("ORCH_TRACE_DIR"):
    import threading

    def _title() -> str:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()

    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _types() -> dict[str, int]:
        import gc
        from collections import Counter

        gc.collect()
        return Counter(type(o).__qualname__ for o in gc.get_objects())

    def _trace() -> None:
        import ctypes
        import time
        import tracemalloc

        match = os.environ.get("ORCH_TRACE_MATCH", "ServeReplica:orchestrator")
        for _ in range(600):
            if match in _title():
                break
            time.sleep(2)
        else:
            return
        time.sleep(float(os.environ.get("ORCH_TRACE_WARM_S", "120")))
        frames = int(os.environ.get("ORCH_TRACE_FRAMES", "12"))
        tracemalloc.start(frames)
        title = _title().split(" ")[0].replace("/", "_").replace(":", "_")
        path = os.path.join(os.environ["ORCH_TRACE_DIR"], f"{title}-{os.getpid()}.txt")
        base_types = _types()
        base = tracemalloc.take_snapshot()
        base_rss = _rss()
        libc = ctypes.CDLL("libc.so.6")
        skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
        while True:
            time.sleep(float(os.environ.get("ORCH_TRACE_EVERY_S", "60")))
            rss = _rss()
            libc.malloc_trim(0)
            trimmed = _rss()
            snap = tracemalloc.take_snapshot().filter_traces(skip)
            stats = snap.compare_to(base.filter_traces(skip), "traceback")
            types = _types()
            grown = sorted(((types[k] - base_types.get(k, 0), k) for k in types), reverse=True)[:25]
            with open(path, "a") as out:
                out.write(
                    f"=== {time.strftime('%H:%M:%S')} rss {rss:.1f} MiB (+{rss - base_rss:.1f} since tracing), "
                    f"after malloc_trim {trimmed:.1f}; traced {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MiB\n"
                )
                out.write("types grown: " + ", ".join(f"{k} {n:+d}" for n, k in grown if n) + "\n")
                for stat in stats[:25]:
                    out.write(f"+{stat.size_diff / 1024:.1f} KiB {stat.count_diff:+d} blocks\n")
                    for line in stat.traceback.format(limit=frames):
                        out.write("    " + line + "\n")
            del snap, stats, types

    os.makedirs(os.environ["ORCH_TRACE_DIR"], exist_ok=True)
    threading.Thread(target=_trace, name="orch-trace", daemon=True).start()
