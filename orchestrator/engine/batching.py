"""Adaptive batching of stream frames for the trip through a deployment handle.

Each item crossing a Ray Serve handle costs a few hundred microseconds of CPU on both
sides, and on a two-core machine that CPU is taken from the engine. Sending the first
frame alone keeps time-to-first-token low; batching the rest cuts the per-token cost (see
docs/ARCHITECTURE.md for the measured effect). The interval may follow the load: the model
server makes it zero for a lone stream and longer as streams are added.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable


async def batch_frames(
    frames: AsyncIterator[str],
    interval_s: float | Callable[[], float],
    *,
    eager: int = 1,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[list[str]]:
    """Yields the first ``eager`` frames alone, then lists of frames gathered over ``interval_s``
    (a number, or a function read after each send for the next batch's interval).

    ``eager`` is 2 for chat, whose first frame only carries the role: the first token is
    in the second frame and must not wait for a batch.

    A batch is sent when a frame arrives after its deadline, and at the end, so no timer
    task is needed per request; while the engine is producing tokens (the only time
    frames arrive) the added delay is at most ``interval_s`` plus one token.
    An interval of 0 sends every frame alone.

    Comment frames (starting with ``:``, the usage trailer) are not sent on their own: the
    latest one rides at the end of the next batch, and only if it is new.
    """
    interval = interval_s if callable(interval_s) else lambda: interval_s
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
            deadline = clock() + interval()
            continue
        batch.append(item)
        now = clock()
        if now >= deadline:
            if trailer:
                batch.append(trailer)
                trailer = None
            yield batch
            batch = []
            deadline = now + interval()
    if batch:
        yield batch
