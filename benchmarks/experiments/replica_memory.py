"""What a model replica keeps per request: the real ``VLLMEngine`` and ``ModelServer`` of the
tiny random-weight Llama in one process, without Ray, under the soak's kinds of request.

    .venv/bin/python benchmarks/experiments/replica_memory.py [--warmup 500] [--requests 3000]
        [--concurrency 4] [--tracemalloc 0] [--phases plain,dropped]

Requests are sent as the router's handle calls them: ``ModelServer.complete`` and
``ModelServer.stream`` (batched), chat and completion, streamed and not. A dropped stream is
cancelled after its first batch the way Serve cancels the replica's task when the router's
handle call is cancelled (the task consuming the generator is cancelled).

After a warm-up, each phase sends ``--requests`` requests: ``plain`` none dropped, any other
one in three a dropped stream (the soak drops one stream in five of what reaches the
model). After each phase it prints: the resident memory (and again after ``malloc_trim``,
which returns glibc's free heap pages: growth that goes away there is fragmentation, not
live objects), the engine's unfinished requests, live objects of the suspect types (gc), and
with ``--tracemalloc N`` the N largest growths of traced memory since the warm-up, by
traceback. Ends with one JSON line of the figures.

With ``--serve-log`` the replica's logger is first set up by Serve's own
``configure_component_logger`` (a ``MemoryHandler`` in front of the replica's log file, as in
a Serve replica) and every request is followed by an access-log record on it, as Serve's
replica writes one; the figures then include the records held in that handler's buffer. The
phase ``unmended`` runs with the handler as vLLM's logging setup leaves it (the engine is
started without ``ModelServer``'s mending); the phase ``mended`` first puts the targets back
as ``ModelServer.start`` does. E.g. ``--serve-log --phases unmended,mended`` shows the
growth without the fix and its end with it, in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import logging.handlers
import os
import random
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.engine.weights import build_tiny_llama
from orchestrator.serving.log_buffers import LogBufferTargets
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings

USER_TURNS = ["Tell me a story about a cat.", "What is the capital of France?", "Count to five.", "Say hello."]
# Types whose live count should not grow with the requests served.
SUSPECTS = (
    "RequestState",
    "RequestOutputCollector",
    "RequestOutput",
    "CompletionOutput",
    "Task",
    "Future",
    "async_generator",
    "coroutine",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ChoiceUsage",
    "SamplingParams",
    "Event",
    "frame",
    "cell",
)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def malloc_trim() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def live_objects() -> dict[str, int]:
    gc.collect()
    counts = Counter(type(obj).__name__ for obj in gc.get_objects())
    return {name: counts[name] for name in SUSPECTS}


SERVE_LOGGER = logging.getLogger("ray.serve")


def serve_log_handler() -> logging.handlers.MemoryHandler | None:
    return next((h for h in SERVE_LOGGER.handlers if isinstance(h, logging.handlers.MemoryHandler)), None)


def configure_serve_log(logs_dir: Path) -> None:
    """Sets up the replica logger as Serve sets up a replica's (replica.py, ReplicaBase)."""
    from ray.serve._private.common import ServeComponentType
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    configure_component_logger(
        component_type=ServeComponentType.REPLICA,
        component_name="tiny",
        component_id="replica-memory",
        logging_config=LoggingConfig(logs_dir=str(logs_dir)),
        max_bytes=512 << 20,
        backup_count=1,
        buffer_size=1,
    )


def access_log(kind: str, request_id: str, started: float) -> None:
    """One record like the access-log record Serve's replica writes after each request."""
    if serve_log_handler() is not None:
        extra = {"serve_access_log": True, "route": kind, "request_id": request_id}
        SERVE_LOGGER.info("CALL %s OK %.1fms", kind, (time.monotonic() - started) * 1000, extra=extra)


def body(kind: str, rng: random.Random, stream: bool) -> dict[str, Any]:
    tokens = rng.randint(4, 24)
    if kind == "completion":
        return {"prompt": rng.choice(USER_TURNS), "max_tokens": tokens, "stream": stream}
    return {"messages": [{"role": "user", "content": rng.choice(USER_TURNS)}], "max_tokens": tokens, "stream": stream}


async def one(server: ModelServer, rng: random.Random, n: int, drop_share: float) -> str:
    """Sends one request; returns what it was."""
    kind = rng.choice(["chat", "chat", "completion"])
    request_id = f"r{n}-{rng.getrandbits(32):08x}"
    started = time.monotonic()
    try:
        return await one_kind(server, rng, kind, request_id, drop_share)
    finally:
        access_log(kind, request_id, started)


async def one_kind(server: ModelServer, rng: random.Random, kind: str, request_id: str, drop_share: float) -> str:
    roll = rng.random()
    if roll < drop_share:
        first = asyncio.Event()

        async def consume() -> None:
            async for _batch in server.stream(kind, body(kind, rng, True), request_id):  # type: ignore[arg-type]
                first.set()

        task = asyncio.create_task(consume())
        waiter = asyncio.create_task(first.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        task.cancel()  # as Serve cancels the replica's task when the handle call is cancelled
        await asyncio.gather(task, waiter, return_exceptions=True)
        return "dropped"
    if roll < drop_share + (1 - drop_share) / 2:
        async for _batch in server.stream(kind, body(kind, rng, True), request_id):  # type: ignore[arg-type]
            pass
        return f"{kind}_stream"
    await server.complete(kind, body(kind, rng, False), request_id)  # type: ignore[arg-type]
    return kind


async def run(server: ModelServer, requests: int, concurrency: int, drop_share: float, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    sent: Counter[str] = Counter()
    counter = iter(range(requests))

    async def worker() -> None:
        for n in counter:
            sent[await one(server, rng, n, drop_share)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent


def figures(server: ModelServer, label: str, base: dict[str, Any] | None) -> dict[str, Any]:
    objects = live_objects()
    before_trim = rss()
    malloc_trim()
    after_trim = rss()
    out = {
        "phase": label,
        "rss_mib": round(before_trim / 2**20, 1),
        "rss_trimmed_mib": round(after_trim / 2**20, 1),
        "unfinished": server.num_unfinished_requests(),
        "in_flight": server.in_flight,
        "objects": objects,
    }
    handler = serve_log_handler()
    if handler is not None:
        out["serve_log_buffered"] = len(handler.buffer)
    if tracemalloc.is_tracing():
        out["traced_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
    delta = ""
    if base is not None:
        trimmed = out["rss_trimmed_mib"] - base["rss_trimmed_mib"]
        delta = f" (+{out['rss_mib'] - base['rss_mib']:.1f}, trimmed +{trimmed:.1f})"
        grown = {k: v - base["objects"][k] for k, v in objects.items() if v != base["objects"][k]}
        out["objects_grown"] = grown
    print(
        f"{label:<10} rss {out['rss_mib']:.1f} MiB, after malloc_trim {out['rss_trimmed_mib']:.1f} MiB{delta}; "
        f"unfinished {out['unfinished']}, in flight {out['in_flight']}; "
        f"objects grown since warm-up {out.get('objects_grown', {})}"
        + (f"; Serve log records buffered {out['serve_log_buffered']}" if "serve_log_buffered" in out else "")
        + (f"; traced {out['traced_mib']} MiB" if "traced_mib" in out else ""),
        flush=True,
    )
    return out


def print_top(start: tracemalloc.Snapshot, top: int) -> None:
    now = tracemalloc.take_snapshot()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = now.filter_traces(filters).compare_to(start.filter_traces(filters), "traceback")
    for stat in stats[:top]:
        print(f"  +{stat.size_diff / 1024:.1f} KiB in {stat.count_diff:+d} blocks:")
        for line in stat.traceback.format(limit=8):
            print("    " + line)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--phases", default="plain,dropped")
    parser.add_argument("--tracemalloc", type=int, default=0, help="show this many top growths (0: not traced)")
    parser.add_argument("--frames", type=int, default=12, help="traceback depth traced")
    parser.add_argument("--serve-log", action="store_true", help="a Serve replica's logger, an access log per request")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="replica-memory-") as tmp:
        path = build_tiny_llama(Path(tmp) / "tiny")
        spec = {
            "name": "tiny",
            "source": {"kind": "local", "path": str(path)},
            "context_window": 512,
            "engine_args": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 16},
            "resources": {"device": "cpu", "cpus": 1},
        }
        if args.serve_log:
            configure_serve_log(Path(tmp) / "logs")
        server = ModelServer(spec, Settings(cache_dir=Path(tmp) / "cache").model_dump(mode="json"))
        mend = LogBufferTargets.restore
        if "unmended" in args.phases.split(","):
            LogBufferTargets.restore = lambda self: 0  # type: ignore[method-assign]
        try:
            await server.start()
        finally:
            LogBufferTargets.restore = mend  # type: ignore[method-assign]
        try:
            results = await phases(server, args)
        finally:
            await server.shutdown()
    print(json.dumps(results))


async def phases(server: ModelServer, args: argparse.Namespace) -> list[dict[str, Any]]:
    start = time.monotonic()
    await run(server, args.warmup, args.concurrency, 1 / 3, seed=1)
    if args.tracemalloc:
        tracemalloc.start(args.frames)
    base = figures(server, "warm", None)
    snapshot = tracemalloc.take_snapshot() if args.tracemalloc else None
    results = [base]
    for n, phase in enumerate(args.phases.split(","), start=2):
        if phase == "mended":
            print(f"           mended {server._log_targets.restore()} log handler(s), as ModelServer.start does")
        drop_share = 0.0 if phase == "plain" else 1 / 3
        sent = await run(server, args.requests, args.concurrency, drop_share, seed=n)
        await asyncio.sleep(1)  # the engine's last aborts and outputs
        results.append({**figures(server, phase, base), "sent": dict(sent)})
        print(f"           sent {dict(sent)} at {time.monotonic() - start:.0f} s", flush=True)
        if snapshot is not None:
            print_top(snapshot, args.tracemalloc)
    return results


if __name__ == "__main__":
    asyncio.run(main())
