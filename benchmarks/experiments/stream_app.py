"""CPU that the orchestrator's own code spends per streamed request in a model replica,
measured in one process, without Ray, vLLM's engine or the network, against a bare app that
streams the same frames as vLLM's own server does.

    .venv/bin/python benchmarks/experiments/stream_app.py [--requests 300] [--concurrency 32] [--rounds 3]

Both apps get the same chat request (64 output tokens) over a direct ASGI call, and both
stream the same frames, shaped as vLLM's serving layer makes them with per-chunk usage
(a role frame, one frame per token, the usage chunk):

* ``bare``: a FastAPI route that validates the body into vLLM's ``ChatCompletionRequest``
  and returns Starlette's ``StreamingResponse`` over the frames, as vLLM's server does;
* ``ours``: the model route's app (``create_app`` over ``ReplicaBackend`` and a
  ``ModelServer``, open mode) over the real ``VLLMEngine`` with only its call into vLLM's
  serving layer replaced by the frames, so every layer of ours a frame passes is measured:
  the engine's frame rewriting and usage trailer, the model server, the SSE driver, the
  metering and the response.

The frames cost the same in both, so the difference is what our path adds. Prints the
process CPU milliseconds per request of each app per round and the difference per request
and per frame, then one JSON line with the medians. Machine noise moves both apps alike;
only the same round's difference is compared.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.api import create_app
from orchestrator.catalog import Catalog, ModelSpec
from orchestrator.engine.base import Kind
from orchestrator.engine.vllm_engine import VLLMEngine
from orchestrator.serving.model_route import ReplicaBackend
from orchestrator.serving.model_server import ModelServer
from orchestrator.settings import Settings

TOKENS = 64
PATH = "/v1/chat/completions"
BODY = json.dumps(
    {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi " * 60}],
        "max_tokens": TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()


def vllm_frames(request_id: str) -> list[str]:
    """The frames vLLM's chat serving yields for one request with per-chunk usage."""
    head = f'"id":"chatcmpl-{request_id}","object":"chat.completion.chunk","created":1700000000,"model":"tiny"'
    role = '{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
    usage = '"usage":{{"prompt_tokens":64,"total_tokens":{},"completion_tokens":{}}}'
    frames = [f'data: {{{head},"choices":[{role}],{usage.format(64, 0)}}}\n\n']
    for i in range(TOKENS):
        finish = '"stop"' if i == TOKENS - 1 else "null"
        delta = f'"delta":{{"content":" tok{i}"}}'
        choice = f'{{"index":0,{delta},"logprobs":null,"finish_reason":{finish},"token_ids":null}}'
        frames.append(f'data: {{{head},"choices":[{choice}],{usage.format(65 + i, i + 1)}}}\n\n')
    frames.append(f'data: {{{head},"choices":[],{usage.format(64 + TOKENS, TOKENS)}}}\n\n')
    frames.append("data: [DONE]\n\n")
    return frames


async def stream_frames(request_id: str) -> AsyncIterator[str]:
    """Yields the frames, giving the loop a turn between them as an engine's output does."""
    for frame in vllm_frames(request_id):
        yield frame
        await asyncio.sleep(0)


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.post(PATH)
    async def chat(request: Request) -> StreamingResponse:
        ChatCompletionRequest.model_validate(await request.json())
        return StreamingResponse(stream_frames("bare"), media_type="text/event-stream")

    return app


class FramesEngine(VLLMEngine):
    """The real engine adapter with vLLM's serving layer replaced by fixed frames (never
    started: nothing on the stream path needs vLLM's engine but the call replaced here)."""

    async def _call(self, kind: Kind, request: Any) -> Any:
        return stream_frames(request.request_id)


def our_app() -> FastAPI:
    spec = ModelSpec.model_validate({"name": "tiny", "source": {"kind": "tiny_random"}, "context_window": 1024})
    server = ModelServer(spec.model_dump(mode="json"), Settings().model_dump(mode="json"), engine_factory=FramesEngine)
    return create_app(
        Catalog([server.spec]), ReplicaBackend(server), server.settings, admin_routes=False, echo_request_id=False
    )


async def one_request(app: FastAPI) -> int:
    """Sends one request straight into the ASGI app; returns the body messages sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn gives it
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    received = False
    messages = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal messages
        if message["type"] == "http.response.body":
            messages += 1

    await app(scope, receive, send)
    return messages


async def cpu_per_request(app: FastAPI, requests: int, concurrency: int) -> tuple[float, int]:
    """Returns process CPU ms per request under ``concurrency`` streams, and the body
    messages of one request."""
    gate = asyncio.Semaphore(concurrency)

    async def limited() -> int:
        async with gate:
            return await one_request(app)

    async with app.router.lifespan_context(app):
        await asyncio.gather(*[limited() for _ in range(20)])  # warm-up
        gc.collect()  # not the garbage of an earlier round
        start = time.process_time()
        sent = await asyncio.gather(*[limited() for _ in range(requests)])
        used = time.process_time() - start
    return used / requests * 1000, sent[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    frames = len(vllm_frames("x")) - 1  # [DONE] is not a frame of content
    bare_ms: list[float] = []
    ours_ms: list[float] = []
    for n in range(1, args.rounds + 1):
        bare, bare_sent = await cpu_per_request(bare_app(), args.requests, args.concurrency)
        ours, ours_sent = await cpu_per_request(our_app(), args.requests, args.concurrency)
        bare_ms.append(bare)
        ours_ms.append(ours)
        added = ours - bare
        print(
            f"round {n}: bare {bare:.2f} ms/request ({bare_sent} sends), ours {ours:.2f} ms/request "
            f"({ours_sent} sends): added {added:.2f} ms/request, {added / frames * 1000:.1f} us/frame",
            flush=True,
        )
    bare, ours = statistics.median(bare_ms), statistics.median(ours_ms)
    print(
        json.dumps(
            {
                "bare_cpu_ms_per_request": round(bare, 3),
                "ours_cpu_ms_per_request": round(ours, 3),
                "added_ms_per_request": round(ours - bare, 3),
                "added_us_per_frame": round((ours - bare) / frames * 1000, 1),
                "ratio": round(ours / bare, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
