"""Adaptive batching of stream frames for the trip through a deployment handle.

Each item crossing a Ray Serve handle costs a few hundred microseconds of CPU on both
sides, and on a two-core machine that CPU is taken from the engine. Sending the first
frame alone keeps time-to-first-token low; batching the rest every ``interval_s`` cuts the
per-token cost (see docs/ARCHITECTURE.md for the measured effect).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable


async def batch_frames(
    frames: AsyncIterator[str],
    interval_s: float,
    *,
    eager: int = 1,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[list[str]]:
    """Yields the first ``eager`` frames alone, then lists of frames gathered over ``interval_s``.

    ``eager`` is 2 for chat, whose first frame only carries the role: the first token is
    in the second frame and must not wait for a batch.

    A batch is sent when a frame arrives after its deadline, and at the end, so no timer
    task is needed per request; while the engine is producing tokens (the only time
    frames arrive) the added delay is at most ``interval_s`` plus one token.
    ``interval_s == 0`` sends every frame alone.

    Comment frames (starting with ``:``, the usage trailer) are not sent on their own: the
    latest one rides at the end of the next batch, and only if it is new.
    """
    batch: list[str] = []
    deadline = 0.0
    trailer: str | None = None
    async for item in frames:
        if item.startswith(":"):
            trailer = item
            continue
        if eager > 0:
            eager -= 1
            yield [item, trailer] if trailer else [item]
            trailer = None
            deadline = clock() + interval_s
            continue
        batch.append(item)
        now = clock()
        if now >= deadline:
            if trailer:
                batch.append(trailer)
                trailer = None
            yield batch
            batch = []
            deadline = now + interval_s
    if batch:
        yield batch
