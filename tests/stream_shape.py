"""The shape of an SSE stream as a client sees it, for comparing the fake engine's streams
with real vLLM's: every ``data:`` frame as its JSON structure (keys and value types, the
first element of each list), consecutive repeats collapsed, ``[DONE]`` kept.

``tests/golden/stream_shapes.json`` holds the shapes real vLLM produced through the router
(recorded by tests/integration/test_serving.py, which fails if they change); the unit
tests hold the fake engine's streams to the same shapes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).with_name("golden") / "stream_shapes.json"
# The requests whose streams are compared (the same body on the fake and on real vLLM).
# ignore_eos: the tiny models' random weights may end at once; 4 tokens give content frames.
REQUESTS: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "stream": True, "ignore_eos": True},
    "completion": {"prompt": "Say hi.", "max_tokens": 4, "stream": True, "ignore_eos": True},
}
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def shape(value: Any) -> Any:
    """Returns the structure of a JSON value: key order kept, types for leaves."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else "str"


def stream_shape(lines: Iterable[str]) -> list[Any]:
    """Returns the shapes of a stream's data frames, consecutive repeats collapsed."""
    out: list[Any] = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        item = "[DONE]" if line == "data: [DONE]" else shape(json.loads(line[6:]))
        if not out or out[-1] != item:
            out.append(item)
    return out


def golden() -> dict[str, list[Any]]:
    """Returns the recorded shapes by request name."""
    return dict(json.loads(GOLDEN.read_text()))
