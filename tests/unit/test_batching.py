from __future__ import annotations

from collections.abc import AsyncIterator

from orchestrator.engine.batching import batch_frames


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def frames(clock: StepClock, n: int, step: float) -> AsyncIterator[str]:
    for i in range(n):
        clock.now += step
        yield f"f{i}"


async def collect(source: AsyncIterator[list[str]]) -> list[list[str]]:
    return [b async for b in source]


async def test_first_frame_alone_then_batches_by_interval() -> None:
    clock = StepClock()
    out = await collect(batch_frames(frames(clock, 10, 0.02), 0.05, clock=clock))
    assert out[0] == ["f0"]
    assert [f for b in out for f in b] == [f"f{i}" for i in range(10)]
    # 20 ms per frame, 50 ms interval: batches of 3 frames after the first.
    assert [len(b) for b in out] == [1, 3, 3, 3]


async def test_zero_interval_sends_every_frame() -> None:
    clock = StepClock()
    out = await collect(batch_frames(frames(clock, 4, 0.01), 0.0, clock=clock))
    assert out == [["f0"], ["f1"], ["f2"], ["f3"]]


async def test_empty_source_yields_nothing() -> None:
    clock = StepClock()
    assert await collect(batch_frames(frames(clock, 0, 0.01), 0.05, clock=clock)) == []


async def test_eager_frames_sent_alone_before_batching() -> None:
    clock = StepClock()
    out = await collect(batch_frames(frames(clock, 5, 0.001), 0.05, eager=2, clock=clock))
    assert out[:2] == [["f0"], ["f1"]]
    assert [f for b in out for f in b] == [f"f{i}" for i in range(5)]


async def test_a_callable_interval_is_read_after_each_send() -> None:
    # 10 ms per frame; the interval is 0 until the fourth send, then 25 ms: every frame
    # alone at first, then batches of three.
    clock = StepClock()
    sends = 0

    def interval() -> float:
        nonlocal sends
        sends += 1
        return 0.0 if sends < 4 else 0.025

    out = await collect(batch_frames(frames(clock, 9, 0.01), interval, clock=clock))
    assert [len(b) for b in out] == [1, 1, 1, 1, 3, 2]
    assert [f for b in out for f in b] == [f"f{i}" for i in range(9)]
