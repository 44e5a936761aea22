"""Per-request metering on the router: token reservation at admission, usage, cost and
timings while the response passes, and settlement with the gateway when it ends."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from orchestrator.api.telemetry import Telemetry
from orchestrator.catalog import ModelSpec
from orchestrator.engine.frames import USAGE_TRAILER, is_usage_frame
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.base import RequestGateway
from orchestrator.gateway.pricing import request_cost
from orchestrator.gateway.records import Admission, UsageRecord
from orchestrator.protocol.openai import prompt_count

logger = logging.getLogger(__name__)

# Output tokens reserved when a request sets no max_tokens (settled to real use at the end).
DEFAULT_OUTPUT_RESERVATION = 256
_FINISH = re.compile(r'"finish_reason":"([a-z_]+)"')
# A chunk with content: a non-empty chat delta or completion text.
_CONTENT = re.compile(r'"(?:content|text)":"[^"]')
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned


# The worst-case prompt for a money hold: a byte-level tokenizer makes at most one token per
# byte of text (the JSON body has at least as many bytes), plus what a chat template adds.
TEMPLATE_TOKENS_PER_REQUEST = 64
TEMPLATE_TOKENS_PER_MESSAGE = 16


@dataclass(frozen=True)
class Reservation:
    """What a request holds while it runs, settled to its real use when it ends.

    ``tokens`` counts against the key's tokens per minute: the prompt estimated from the body
    size (one token per 4 bytes, plus 4 per message: an overestimate for English) plus the
    output budget of every choice of every prompt. ``cost`` is held against the key's
    balance and spend limits: the worst case, so concurrent requests can never overrun them
    (the prompt at one token per body byte plus template tokens, at most the context window
    per prompt; the output budget, or the whole context window when unset, for every
    choice of every prompt). ``best_of`` is refused unless 1 (vLLM ignores it), so it adds
    nothing."""

    tokens: int
    cost: Decimal


def reservation(
    body: dict[str, Any], body_bytes: int, spec: ModelSpec, output_budget: int | None, *, embedding: bool = False
) -> Reservation:
    """Returns the reservation of a request whose body had ``body_bytes`` bytes, validated by
    its protocol model (so ``n`` and ``messages`` hold what that model allows). An
    embeddings request (``embedding``, known by its route, never by a body field, which a
    generation body may carry undeclared) counts each ``input`` as a prompt and reserves no
    output (its budget is 0)."""
    messages = body.get("messages")
    count = len(messages) if isinstance(messages, list) else 1
    prompts = prompt_count(body.get("prompt"))
    if embedding:  # each input is a prompt with its own special tokens
        prompts = count = prompt_count(body["input"])
    choices = int(body.get("n") or 1)
    window = spec.context_window
    prompt = min(math.ceil(body_bytes / 4) + 4 * count, window * prompts)
    output = output_budget if output_budget is not None else min(DEFAULT_OUTPUT_RESERVATION, max(window - prompt, 1))
    worst_prompt = min(body_bytes + TEMPLATE_TOKENS_PER_REQUEST + TEMPLATE_TOKENS_PER_MESSAGE * count, window * prompts)
    worst_output = (output_budget if output_budget is not None else window) * choices * prompts
    return Reservation(
        tokens=prompt + output * choices * prompts,
        cost=request_cost(spec.pricing, worst_prompt, worst_output),
    )


class RequestMeter:
    """Watches one response and builds its usage record.

    Args:
        spec: the model (for prices).
        admission: who made the request.
        route: the API path (a metrics label).
        streamed: whether the response is a stream.
        first_token_batch: index of the batch with the first token (1 for chat, whose
            first batch is the role alone).
        clock: monotonic seconds; wall: epoch seconds (record time).
        started_at: when the request arrived, on ``clock`` (default: now).
    """

    def __init__(
        self,
        spec: ModelSpec,
        admission: Admission,
        *,
        route: str = "",
        streamed: bool,
        first_token_batch: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        started_at: float | None = None,
    ) -> None:
        self.spec = spec
        self.admission = admission
        self.route = route
        self.streamed = streamed
        self._clock = clock
        self._wall = wall
        self._start = clock() if started_at is None else started_at
        self._first: float | None = None
        self._batches = 0
        self._first_token_batch = first_token_batch
        self._usage: dict[str, Any] = {}
        # The latest running-usage trailer of a stream, as JSON: decoded only when read,
        # since a trailer comes with every token and only the last one counts.
        self._usage_json: str | None = None
        self.finish_reason: str | None = None
        # Inter-token latency as the client sees it: the wait before each chunk with
        # content after the first (0 for chunks that arrive in the same batch).
        self.gaps: list[float] = []
        self._last_content: float | None = None

    @property
    def usage(self) -> dict[str, Any]:
        """The usage seen so far (the final usage chunk's, once it has passed)."""
        if self._usage_json is not None:
            self._usage, self._usage_json = json.loads(self._usage_json), None
        return self._usage

    @usage.setter
    def usage(self, usage: dict[str, Any]) -> None:
        self._usage, self._usage_json = usage, None

    def _cost_into(self, usage: dict[str, Any]) -> None:
        self.usage = usage
        usage["cost"] = float(self.cost())

    def cost(self) -> Decimal:
        """The USD cost of the usage seen so far, from the model's prices."""
        return request_cost(
            self.spec.pricing, int(self.usage.get("prompt_tokens") or 0), int(self.usage.get("completion_tokens") or 0)
        )

    def on_response(self, body: dict[str, Any]) -> dict[str, Any]:
        """Reads a whole response's usage and finish reason; adds ``usage.cost``."""
        self._cost_into(body.setdefault("usage", {}))
        choices = body.get("choices") or [{}]
        self.finish_reason = choices[-1].get("finish_reason")
        return body

    def on_batch(self, batch: list[str]) -> list[str]:
        """Takes a batch of SSE frames on its way to the client: strips the usage trailer,
        notes the first token and the finish reason, adds ``cost`` to the usage chunk."""
        now = self._clock()
        if self._batches == self._first_token_batch:
            self._first = now
        self._batches += 1
        if batch and batch[-1].startswith(USAGE_TRAILER):
            self._usage_json = batch.pop()[len(USAGE_TRAILER) :]
        if not batch:
            return batch
        self._time_chunks(batch, now)
        last = batch[-1]
        if is_usage_frame(last):
            data = json.loads(last[6:])
            self._cost_into(data["usage"])
            batch[-1] = f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
        for frame in reversed(batch):
            found = _FINISH.search(frame)
            if found:
                self.finish_reason = found.group(1)
                break
        return batch

    def _time_chunks(self, batch: list[str], now: float) -> None:
        for frame in batch:
            if not _CONTENT.search(frame):
                continue
            if self._last_content is not None:
                self.gaps.append(now - self._last_content)
            self._last_content = now

    def record(self, status: int, *, cancelled: bool = False, error: OrchestratorError | None = None) -> UsageRecord:
        """Returns the usage record of the request as it ended."""
        end = self._clock()
        usage = self.usage
        completion = int(usage.get("completion_tokens") or 0)
        latency_s = end - self._start
        ttft_s = None if self._first is None else self._first - self._start
        gen_s = latency_s - (ttft_s or 0.0)
        return UsageRecord(
            request_id=self.admission.request_id,
            key_id=self.admission.key_id,
            workspace_id=self.admission.workspace_id,
            model=self.spec.name,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=completion,
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            reasoning_tokens=int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
            cost=self.cost(),
            ttft_ms=None if ttft_s is None else round(ttft_s * 1000, 3),
            latency_ms=round(latency_s * 1000, 3),
            tokens_per_s=round(completion / gen_s, 3) if completion and gen_s > 0 else None,
            finish_reason=self.finish_reason,
            streamed=self.streamed,
            cancelled=cancelled,
            status_code=status,
            error_code=None if error is None else error.code.value,
            created_at=datetime.fromtimestamp(self._wall(), UTC),
        )


class Settler:
    """Ends requests: records their metrics and hands their usage to the gateway. Each
    settlement runs as its own task, off the response's path and safe from the request's
    cancellation (client gone); the ledger holds lookups of admitted requests until they
    settle. :meth:`drain` awaits the ones still running (shutdown).

    While the gateway is unavailable (its replica is being replaced: 503
    ``service_unavailable``), a settlement is retried with backoff for ``retry_for_s``; the
    records waiting so form a spool of at most ``max_spooled`` (past it a record is logged
    and dropped rather than held). Retrying is safe: the gateway stores and debits a request
    id once, also across its restarts.

    Requests are admitted under :attr:`holder`, this router's id; :meth:`renew_holds` keeps
    telling the gateway that it is alive, so the holds of its running requests last as long
    as they run, and the gateway ends them soon after this router dies.
    """

    def __init__(
        self,
        gateway: RequestGateway,
        telemetry: Telemetry | None = None,
        *,
        retry_for_s: float = 300.0,
        first_retry_s: float = 0.5,
        max_spooled: int = 10_000,
    ) -> None:
        self.gateway = gateway
        self.telemetry = telemetry or Telemetry()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_for_s = retry_for_s
        self._first_retry_s = first_retry_s
        self._max_spooled = max_spooled
        self.spooled = 0  # settlements waiting for the gateway to come back
        self.holder = uuid.uuid4().hex

    async def renew_holds(self, every_s: float) -> None:
        """Renews this router's holds with the gateway every ``every_s`` seconds, forever
        (a failed renewal, such as while the gateway restarts, is retried next time)."""
        while True:
            try:
                await self.gateway.renew(self.holder)
            except Exception as exc:
                logger.warning("renewing this router's holds failed: %s", exc)
            await asyncio.sleep(every_s)

    async def _settle(self, admission: Admission, record: UsageRecord) -> None:
        deadline = time.monotonic() + self._retry_for_s
        delay = self._first_retry_s
        spooled = False
        try:
            while True:
                try:
                    await self.gateway.settle(admission, record)
                    return
                except OrchestratorError as exc:
                    retry = exc.code is ErrorCode.SERVICE_UNAVAILABLE and time.monotonic() + delay < deadline
                    if not retry or (not spooled and self.spooled >= self._max_spooled):
                        raise
                    if not spooled:
                        spooled, self.spooled = True, self.spooled + 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        except Exception:
            # Never raised to the client; logged with the record.
            logger.exception("settlement failed; unrecorded usage: %s", record.model_dump_json())
        finally:
            if spooled:
                self.spooled -= 1

    def finish(
        self,
        meter: RequestMeter,
        status: int,
        *,
        error: OrchestratorError | None = None,
        cancelled: bool = False,
        counted: bool = False,
    ) -> asyncio.Task[None]:
        """Ends an admitted request: its metrics now (unless ``counted``: its response was
        already counted as refused), its settlement in a task of its own."""
        record = meter.record(status, error=error, cancelled=cancelled)
        if not counted:
            self.telemetry.finished(meter.route, record, meter.gaps)
        # A fresh context: in a Ray actor the request's context says which Ray task this is,
        # and calls made under it are that request's children, which Ray cancels with it (a
        # client closing the connection right after the last chunk cancelled settlements).
        task = asyncio.get_running_loop().create_task(
            self._settle(meter.admission, record), context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
