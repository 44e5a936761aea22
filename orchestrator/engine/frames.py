"""Pure helpers that adapt vLLM's OpenAI output to the orchestrator's contract
(``gen-`` ids, the error taxonomy, a complete usage block). No vllm import."""

from __future__ import annotations

import json
import re
from typing import Any

from orchestrator.errors import ErrorCode, OrchestratorError

_DECODER = json.JSONDecoder()
_CONTEXT = re.compile(r"context length|max_model_len|maximum model length|too long", re.IGNORECASE)


_BY_STATUS = {
    404: ErrorCode.MODEL_NOT_FOUND,
    429: ErrorCode.PROVIDER_RATE_LIMIT,
    503: ErrorCode.PROVIDER_OVERLOADED,
    504: ErrorCode.PROVIDER_TIMEOUT,
}


# vLLM's advice about its own command line (`--tool-call-parser`, `--enable-auto-tool-choice`)
# means nothing to a client of this API.
_SERVER_FLAG = re.compile(r"--[a-z][a-z0-9]*(?:-[a-z0-9]+)+")


def map_engine_error(status: int, message: str, param: str | None = None) -> OrchestratorError:
    """Maps an error vLLM's serving layer reported to the stable taxonomy. A message that
    names one of vLLM's command-line flags is replaced: the client cannot act on it."""
    if status == 400 and _CONTEXT.search(message):
        code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
    elif status in _BY_STATUS:
        code = _BY_STATUS[status]
    elif 400 <= status < 500:
        code = ErrorCode.INVALID_REQUEST
    else:
        code = ErrorCode.PROVIDER_UNAVAILABLE
    if _SERVER_FLAG.search(message):
        message = "This model is not set up for this request (its catalog entry would need a change)."
    return OrchestratorError(code, message, param=param)


def error_from_frame(frame: str) -> OrchestratorError | None:
    """Returns the error an SSE frame carries, or None for an ordinary frame."""
    if not frame.startswith('data: {"error"'):
        return None
    try:
        err = json.loads(frame[6:])["error"]
        return map_engine_error(int(err.get("code") or 500), str(err.get("message", "")), err.get("param"))
    except (ValueError, KeyError, TypeError):
        return OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The engine failed while generating.")


def complete_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Fills the usage block so it always carries cached and reasoning token counts."""
    prompt_details = usage.get("prompt_tokens_details") or {}
    prompt_details.setdefault("cached_tokens", 0)
    usage["prompt_tokens_details"] = prompt_details
    completion_details = usage.get("completion_tokens_details") or {}
    completion_details.setdefault("reasoning_tokens", 0)
    usage["completion_tokens_details"] = completion_details
    return usage


def is_usage_frame(frame: str) -> bool:
    """True for the final usage chunk (empty choices, usage set)."""
    return '"choices":[]' in frame and '"usage":{' in frame


def patch_usage_frame(frame: str) -> str:
    """Returns the usage frame with a complete usage block."""
    data = json.loads(frame[6:])
    complete_usage(data["usage"])
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# A stream batch may end with this SSE comment carrying the usage so far (JSON), so the
# router can bill a stream that is cut short. The router strips it; clients never see it.
USAGE_TRAILER = ": usage "


def usage_trailer(usage_json: str) -> str:
    """Returns the trailer frame for a usage object given as JSON text."""
    return f"{USAGE_TRAILER}{usage_json}\n\n"


def split_usage(frame: str) -> tuple[str, str | None]:
    """Cuts the ``"usage"`` member out of a chunk frame. This runs once per token, so only
    the usage object is decoded (by the C decoder, to find where it ends), not the chunk.
    Returns the frame without it and the usage JSON text, or the frame unchanged and None."""
    start = frame.rfind(',"usage":{')
    if start < 0:
        return frame, None
    _, end = _DECODER.raw_decode(frame, start + 9)
    return frame[:start] + frame[end:], frame[start + 9 : end]


_CHOICE_INDEX = re.compile(r'"choices":\[\{"index":(\d+)')


class ChoiceUsage:
    """The running usage of a stream with several sequences: ``n`` > 1, or a completions
    request with a list of prompts.

    vLLM's per-chunk usage (``continuous_usage_stats``) counts the prompt and completion
    tokens of the sequence the chunk belongs to (choice ``index`` = prompt number * ``n`` +
    choice number), so the last chunk before a cut would bill one sequence only. This keeps
    each sequence's latest counts and gives the request's usage so far: every prompt once,
    the completion tokens of every choice.
    """

    def __init__(self, n: int = 1) -> None:
        self._n = max(n, 1)
        self._prompt: dict[int, int] = {}
        self._completion: dict[int, int] = {}

    def add(self, frame: str, usage_json: str) -> str:
        """Takes a chunk frame and the usage JSON cut out of it; returns the request's usage
        so far as JSON."""
        usage = json.loads(usage_json)
        found = _CHOICE_INDEX.search(frame)
        index = int(found[1]) if found else 0
        self._prompt[index // self._n] = int(usage.get("prompt_tokens") or 0)
        self._completion[index] = int(usage.get("completion_tokens") or 0)
        prompt, completion = sum(self._prompt.values()), sum(self._completion.values())
        usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return json.dumps(usage, separators=(",", ":"))
