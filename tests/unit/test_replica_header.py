"""A model replica names itself in every HTTP response (x-orch-replica), streamed or not, so
that which replica answered can be seen from outside (orchestrator/ingress.py's affinity)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from orchestrator.serving.model_route import ReplicaHeader


def test_every_response_names_the_replica() -> None:
    app = FastAPI()

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def frames() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(frames(), media_type="text/event-stream")

    app.add_middleware(ReplicaHeader, replica="abc123")

    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get("/plain"), await client.get("/stream"), await client.get("/missing")]

    plain_resp, streamed, missing = asyncio.run(ask())
    assert plain_resp.json() == {"ok": "yes"} and streamed.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert [r.headers.get_list("x-orch-replica") for r in (plain_resp, streamed, missing)] == [["abc123"]] * 3
