"""A small deterministic fake engine and an in-process backend for fast unit tests.

The fake produces SSE frames shaped exactly like real vLLM's through the orchestrator's
engine (checked against tests/golden/stream_shapes.json, which the integration tests record
from real vLLM), with failure knobs; integration tests use real vLLM instead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from orchestrator.api.backend import GeneratorStream, Kind, ModelHealth
from orchestrator.api.sse import frame
from orchestrator.catalog import ModelSpec
from orchestrator.engine.base import EngineLoad
from orchestrator.engine.batching import batch_frames
from orchestrator.engine.frames import usage_trailer
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.protocol.tokens import TokensOp


@dataclass
class FakeEngine:
    """Answers with ``words`` (one per token); knobs make it fail or stall."""

    words: list[str] = field(default_factory=lambda: ["hello", "from", "the", "fake"])
    token_delay_s: float = 0.0
    first_delay_s: float = 0.0
    fail_before_first: OrchestratorError | None = None
    fail_after: int | None = None
    running: int = 0
    capacity: int = 4
    prompts: list[Any] = field(default_factory=list)  # every request's messages (or prompt), in order
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every request's body as the engine got it
    vocabulary: list[str] = field(default_factory=list)  # the words tokens() has seen, by id
    adapters: dict[str, str] = field(default_factory=dict)  # loaded LoRA adapters: name -> path
    adapter_log: list[str] = field(default_factory=list)  # "load NAME" / "unload NAME", in order

    async def load_adapter(self, name: str, path: str) -> None:
        self.adapter_log.append(f"load {name}")
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.adapter_log.append(f"unload {name}")
        self.adapters.pop(name, None)

    def load(self) -> EngineLoad:
        """Like vLLM: up to ``capacity`` requests run, the rest wait."""
        return EngineLoad(
            waiting=max(self.running - self.capacity, 0),
            running=min(self.running, self.capacity),
            capacity=self.capacity,
        )

    async def tokens(self, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        """A word tokenizer over ``words``' vocabulary: a token is a word's index in
        ``vocabulary`` (words it has not seen are added); ids past it are refused like vLLM's
        engine refuses them."""
        if op == "detokenize":
            unknown = [t for t in body["tokens"] if t >= len(self.vocabulary)]
            if unknown:
                raise OrchestratorError(ErrorCode.INVALID_REQUEST, f"Token id {unknown[0]} is unknown.", param="tokens")
            return {"prompt": " ".join(self.vocabulary[t] for t in body["tokens"])}
        text = body.get("prompt")
        if text is None:
            text = " ".join(f"<{m['role']}> {m.get('content') or ''}" for m in body["messages"])
        for word in text.split():
            if word not in self.vocabulary:
                self.vocabulary.append(word)
        ids = [self.vocabulary.index(word) for word in text.split()]
        strs = text.split() if body.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": strs}

    def _usage(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = len(json.dumps(body.get("messages") or body.get("prompt")).split())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": len(self.words),
            "total_tokens": prompt + len(self.words),
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    async def complete(self, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        self.prompts.append(body.get("messages") or body.get("prompt") or body.get("input"))
        self.bodies.append(body)
        if self.fail_before_first:
            raise self.fail_before_first
        if kind == "embedding":
            return embeddings(body, request_id)
        text = " ".join(self.words)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if kind != "completion"
            else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        return {
            "id": f"gen-{request_id}",
            "object": "chat.completion" if kind != "completion" else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "usage": self._usage(body),
        }

    async def stream(self, kind: Kind, body: dict[str, Any], request_id: str) -> AsyncIterator[str]:
        """Yields SSE frames framed exactly as vLLM's serving layer frames them through the
        orchestrator's engine (tests/golden/stream_shapes.json holds real vLLM's shapes): for
        chat a role frame, then one frame per word, the last with its finish reason; for
        completions one frame per word; then the usage chunk. Before each frame, the running
        usage trailer the engine adds."""
        self.prompts.append(body.get("messages") or body.get("prompt"))
        self.bodies.append(body)
        if self.fail_before_first:
            raise self.fail_before_first
        self.running += 1
        chat = kind != "completion"
        base = {
            "id": f"gen-{request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
        }
        try:
            await asyncio.sleep(self.first_delay_s)
            usage = self._usage(body)
            # Like the vLLM engine: a running-usage trailer before each frame it describes.
            yield usage_trailer(json.dumps({**usage, "completion_tokens": 0}))
            if chat:
                role = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield frame({**base, "choices": [role], "prompt_token_ids": None, "prompt_text": None})
            for i, word in enumerate(self.words):
                if self.fail_after is not None and i >= self.fail_after:
                    raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "engine died")
                await asyncio.sleep(self.token_delay_s)
                last = i == len(self.words) - 1
                choice: dict[str, Any] = {"index": 0}
                choice |= {"delta": {"content": word + " "}} if chat else {"text": word + " "}
                choice |= {"logprobs": None, "finish_reason": "stop" if last else None}
                if last or not chat:
                    choice["stop_reason"] = None
                if not chat:
                    choice["prompt_token_ids"] = None
                choice["token_ids"] = None
                yield usage_trailer(json.dumps({**usage, "completion_tokens": i + 1}))
                yield frame({**base, "choices": [choice]})
            final = self._usage(body)
            if chat:
                final["prompt_tokens_details"]["created_cache_tokens"] = 0
            yield frame({**base, "choices": [], "usage": final, "system_fingerprint": "fake-engine"})
        finally:
            self.running -= 1


def embeddings(body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """vLLM's embeddings answer for ``body``, with made-up vectors: for input ``i`` (a
    string of n words, or n token ids), ``[n, i, 1.0]``; a token per word or id."""
    given = body["input"]
    inputs = given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
    sizes = [len(item.split()) if isinstance(item, str) else len(item) for item in inputs]
    data = []
    for index, size in enumerate(sizes):
        vector = [float(size), float(index), 1.0]
        if body.get("encoding_format") == "base64":
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        else:
            encoded = vector
        data.append({"index": index, "object": "embedding", "embedding": encoded})
    usage = {"prompt_tokens": sum(sizes), "total_tokens": sum(sizes), "completion_tokens": 0}
    return {
        "id": f"gen-{request_id}",
        "object": "list",
        "created": 0,
        "model": body["model"],
        "data": data,
        "usage": usage,
    }


class LocalBackend:
    """Runs fake engines in-process, batching frames like a ModelServer does."""

    def __init__(self, engines: dict[str, FakeEngine], batch_s: float = 0.0) -> None:
        self.engines = engines
        self.batch_s = batch_s

    async def complete(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        return await self.engines[spec.base_name].complete(kind, body, request_id)

    def stream(self, spec: ModelSpec, kind: Kind, body: dict[str, Any], request_id: str) -> GeneratorStream:
        return GeneratorStream(batch_frames(self.engines[spec.base_name].stream(kind, body, request_id), self.batch_s))

    async def count_tokens(self, spec: ModelSpec, body: dict[str, Any]) -> int:
        return int(self.engines[spec.base_name]._usage(body)["prompt_tokens"])

    async def tokens(self, spec: ModelSpec, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        return await self.engines[spec.base_name].tokens(op, body)

    def health(self) -> dict[str, ModelHealth]:
        return {name: ModelHealth(ready=True, state="serving", replicas=1) for name in self.engines}


class RemoteMethod:
    """Stands in for a Ray actor's method or a deployment handle: ``.remote(*args)`` returns
    what ``fn(*args)`` returns (an awaitable), and ``.options(...)`` is itself."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def options(self, **_: object) -> RemoteMethod:
        return self

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def lru_cache(load: Any, capacity: int) -> Any:
    """Stands in for Ray Serve's multiplexing (``serve.multiplexed``) outside a replica: the
    same contract, a bounded LRU that awaits an evicted object's ``__del__``."""
    held: dict[str, Any] = {}

    async def get(name: str) -> Any:
        if name in held:
            held[name] = held.pop(name)  # most recently used last
            return held[name]
        if len(held) >= capacity:
            evicted = held.pop(next(iter(held)))
            await evicted.__del__()
        held[name] = await load(name)
        return held[name]

    return get
