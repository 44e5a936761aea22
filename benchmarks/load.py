"""A streaming load generator for OpenAI-compatible servers (httpx, asyncio)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadResult:
    """Figures from one load run."""

    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    # Inter-token latency as vLLM's benchmark measures it: the gap between one chunk with
    # content and the next, within a stream (a chunk carrying several tokens is one gap).
    itl_s: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    shed: int = 0  # answered 529 provider_overloaded (not counted in ``errors``)
    # Server-side means from the orchestrator's metrics export (set by vs_vllm.py), e.g. its
    # time to first token from arrival at the replica: where the client's TTFT goes.
    server_ms: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_ms_per_request(self) -> float:
        """Server CPU (all its processes) per completed request, if measured."""
        return 1000 * self.server_cpu_s / max(1, self.requests)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def ttft_ms(self, q: float) -> float:
        return 1000 * percentile(self.ttft_s, q)

    def itl_ms(self, q: float) -> float:
        return 1000 * percentile(self.itl_s, q)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "req_per_s": round(self.rps, 2),
            "output_tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_ms": round(self.ttft_ms(0.5), 1),
            "ttft_p99_ms": round(self.ttft_ms(0.99), 1),
            "ttft_mean_ms": round(1000 * statistics.fmean(self.ttft_s), 1) if self.ttft_s else None,
            "itl_p50_ms": round(self.itl_ms(0.5), 2),
            "itl_p99_ms": round(self.itl_ms(0.99), 2),
            "server_cpu_ms_per_request": round(self.cpu_ms_per_request, 1),
            "shed": self.shed,
            **{name: round(ms, 2) for name, ms in self.server_ms.items()},
        }


class Shed(Exception):
    """The server answered 529: it sheds load; ``retry_after_s`` is its Retry-After."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"529, retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank); NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, int, list[float]]:
    start = time.perf_counter()
    ttft = None
    last = start
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code == 529:
            await resp.aread()
            raise Shed(float(resp.headers.get("retry-after", "1")))
        if resp.status_code != 200:
            await resp.aread()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        buffer = ""
        async for text in resp.aiter_text():
            # Split on the SSE event separator only: generated text may hold Unicode line
            # separators that a line-based reader would split inside a JSON string.
            buffer += text
            *events, buffer = buffer.split("\n\n")
            for event in events:
                if not event.startswith("data: ") or event == "data: [DONE]":
                    continue
                data = json.loads(event[6:])
                if "error" in data:
                    raise RuntimeError(str(data["error"]))
                if data.get("choices") and data["choices"][0].get("text"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                if data.get("usage") and not data.get("choices"):
                    tokens = data["usage"]["completion_tokens"]
    if ttft is None:
        raise RuntimeError("no content")
    return ttft, tokens, gaps


def unrefused_key(base_url: str, admin_key: str) -> dict[str, str]:
    """Creates, through the admin API, a key whose RPM, TPM and credit limits are checked on
    every request and never reached; checks that the gateway refuses a request without a
    key. Returns the headers that send the new key."""
    resp = httpx.post(
        base_url + "/admin/keys",
        json={"rpm": 10**9, "tpm": 10**9, "credits": "1000000"},
        headers={"Authorization": f"Bearer {admin_key}"},
        timeout=30,
    )
    resp.raise_for_status()
    keyless = httpx.post(base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
    assert keyless.status_code == 401, "the gateway must refuse a request without a key"
    return {"Authorization": f"Bearer {resp.json()['key']}"}


async def run_load(
    base_url: str,
    model: str,
    *,
    prompt: list[int],
    output_tokens: int,
    requests: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Sends ``requests`` streaming completions, ``concurrency`` at a time. A request shed
    with 529 is counted in ``shed``, and its client waits its Retry-After before the next."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "min_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = base_url + "/v1/completions"
    result = LoadResult(requests=0, errors=0, wall_s=0.0, output_tokens=0)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                try:
                    ttft, tokens, gaps = await _one(client, url, body, headers or {})
                except Shed as shed:
                    result.shed += 1
                    await asyncio.sleep(shed.retry_after_s)
                    continue
                except Exception as exc:  # count and keep going: a benchmark reports errors
                    result.errors += 1
                    if result.errors <= 3:
                        print(f"  error: {exc}", flush=True)
                    continue
                result.requests += 1
                result.output_tokens += tokens
                result.ttft_s.append(ttft)
                result.itl_s.extend(gaps)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result
