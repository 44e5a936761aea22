"""The benchmarks' streaming client (benchmarks/load.py): what it counts as the first token,
an inter-token gap and the output tokens, as vLLM's benchmark does (chunks with content)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from benchmarks.load import LoadResult, Shed, _one
from benchmarks.vs_vllm import figures


def sse_app(events: list[str], status: int = 200, headers: dict[str, str] | None = None) -> Callable[..., Any]:
    """An ASGI app that answers every request with these SSE events."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await receive()
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": extra})
        for event in events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def chunk(text: str | None, usage: int | None = None) -> str:
    data: dict[str, Any] = {"choices": [] if text is None else [{"index": 0, "text": text}]}
    if usage is not None:
        data["usage"] = {"completion_tokens": usage}
    return f"data: {json.dumps(data)}\n\n"


async def call(app: Callable[..., Any]) -> tuple[float, int, list[float]]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await _one(client, "http://t/v1/completions", {"stream": True}, {})


async def test_gaps_are_between_chunks_with_content_and_tokens_come_from_usage() -> None:
    # An empty chunk and a keep-alive count for nothing; three chunks with text give the
    # first token and two gaps; the usage chunk gives the token count (a chunk may hold
    # several tokens).
    events = [chunk(""), ": keep-alive\n\n", chunk("a"), chunk("b c"), chunk("d"), chunk(None, usage=5)]
    ttft, tokens, gaps = await call(sse_app([*events, "data: [DONE]\n\n"]))
    assert ttft > 0 and tokens == 5 and len(gaps) == 2


async def test_shed_error_event_and_empty_stream() -> None:
    with pytest.raises(Shed) as shed:
        await call(sse_app([], status=529, headers={"Retry-After": "2"}))
    assert shed.value.retry_after_s == 2
    with pytest.raises(RuntimeError, match="boom"):
        await call(sse_app([chunk("a"), 'data: {"error": {"message": "boom"}}\n\n']))
    with pytest.raises(RuntimeError, match="no content"):
        await call(sse_app([chunk(""), chunk(None, usage=0), "data: [DONE]\n\n"]))


def test_figures_are_ratios_against_direct_from_the_same_run() -> None:
    direct = LoadResult(requests=10, errors=0, wall_s=1.0, output_tokens=640, server_cpu_s=0.2)
    direct.ttft_s, direct.itl_s = [0.010] * 10, [0.004] * 100
    ours = LoadResult(requests=10, errors=0, wall_s=2.0, output_tokens=640, server_cpu_s=0.3)
    ours.ttft_s, ours.itl_s = [0.025] * 10, [0.006] * 100
    got = figures(ours, direct)
    assert got["throughput_ratio"] == 0.5 and got["ttft_p50_added_ms"] == 15.0
    assert got["ttft_p99_ratio"] == 2.5 and got["itl_p99_ratio"] == 1.5 and got["itl_p99_ms"] == 6.0
    assert got["cpu_per_request_ratio"] == 1.5
