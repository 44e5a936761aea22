"""What the model route's idle bound costs per streamed frame: ``IdleBoundStream`` (the
504 past ``overload.stream_idle_timeout_s``) against the plain ``GeneratorStream`` it wraps.

    .venv/bin/python benchmarks/experiments/idle_bound.py [--frames 100000] [--rounds 7]

Both read the same async generator of ``--frames`` one-frame batches, which yields to the
event loop before each frame as an engine's stream does (so timer handles are cleaned up
as they would be in a replica). Rounds alternate between the two; each round's process CPU
time is divided by the frames. Prints the best round of each in microseconds per frame and
their difference (what the bound adds), then the same as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.api.backend import GeneratorStream
from orchestrator.catalog import ModelSpec
from orchestrator.serving.model_route import IdleBoundStream

SPEC = ModelSpec.model_validate({"name": "tiny", "source": {"kind": "tiny_random"}, "context_window": 1024})


async def frames(n: int) -> AsyncGenerator[list[str]]:
    batch = ['data: {"choices":[{"delta":{"content":"x"}}]}\n\n']
    for _ in range(n):
        await asyncio.sleep(0)
        yield batch


async def per_frame_us(make: Callable[[AsyncGenerator[list[str]]], GeneratorStream], n: int) -> float:
    stream = make(frames(n))
    start = time.process_time()
    async for _ in stream:
        pass
    return (time.process_time() - start) / n * 1e6


async def measure(n: int, rounds: int) -> dict[str, float]:
    ways: dict[str, Callable[[AsyncGenerator[list[str]]], GeneratorStream]] = {
        "plain": GeneratorStream,
        "idle_bound": lambda source: IdleBoundStream(source, SPEC),
    }
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(rounds):
        for name, make in ways.items():
            best[name] = min(best[name], await per_frame_us(make, n))
    return {**best, "added": best["idle_bound"] - best["plain"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    found = asyncio.run(measure(args.frames, args.rounds))
    for name, us in found.items():
        print(f"{name:>10}: {us:.2f} us per frame")
    print(json.dumps({name: round(us, 3) for name, us in found.items()}))


if __name__ == "__main__":
    main()
