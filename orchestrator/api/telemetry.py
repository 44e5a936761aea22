"""What the router records about each generation request (metrics declared in
:mod:`orchestrator.metrics`): every request once, when it ends or is refused."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.records import UsageRecord
from orchestrator.metrics import OK, UNKNOWN_MODEL, NullSink, RouterMetrics, Sink

# Why a request was refused, for the rejected-requests counter; other errors are only
# counted by code in the requests counter.
_REASONS: dict[str, str] = {
    ErrorCode.RATE_LIMIT_EXCEEDED.value: "rate_limited",
    ErrorCode.PROVIDER_OVERLOADED.value: "shed",
    ErrorCode.MODEL_UNAVAILABLE.value: "shed",
    ErrorCode.PROVIDER_TIMEOUT.value: "timeout",
    ErrorCode.INVALID_API_KEY.value: "rejected",
    ErrorCode.INSUFFICIENT_CREDITS.value: "rejected",
    ErrorCode.KEY_LIMIT_EXCEEDED.value: "rejected",
    ErrorCode.MODEL_NOT_ALLOWED.value: "rejected",
    ErrorCode.WORKSPACE_LOCKED.value: "rejected",
}


class Telemetry:
    """Records requests into the router's metrics.

    Args:
        sink: where metrics go (Ray's pipeline in Serve; nothing by default).
    """

    def __init__(self, sink: Sink | None = None) -> None:
        self.metrics = RouterMetrics(sink or NullSink())

    def _count(self, model: str, route: str, status: int, code: str) -> None:
        m = self.metrics
        m.requests.record(1, {"model": model, "route": route, "status": str(status), "code": code})
        if status >= 500:
            m.server_error_rate.record(1, {"model": model})
        reason = _REASONS.get(code)
        if reason is not None:
            m.rejected.record(1, {"model": model, "reason": reason, "code": code})

    def refused(self, route: str, model: str | None, error: OrchestratorError) -> None:
        """A request that never reached admission's end (bad input, unknown model, no key,
        limits): counted by code; nothing was generated or billed."""
        self._count(model or UNKNOWN_MODEL, route, error.status, error.code.value)

    def finished(self, route: str, record: UsageRecord, gaps: Sequence[float] = ()) -> None:
        """An admitted request as it ended (its usage record), with the inter-token gaps the
        client saw on a stream."""
        m = self.metrics
        model = record.model
        self._count(model, route, record.status_code, record.error_code or OK)
        tags = {"model": model, "route": route}
        m.duration.record(record.latency_ms / 1000.0, tags)
        if record.ttft_ms is not None:
            m.ttft.record(record.ttft_ms / 1000.0, tags)
        for gap in gaps:
            m.itl.record(gap, tags)
        model_tag = {"model": model}
        m.prompt_tokens.record(record.prompt_tokens, model_tag)
        m.completion_tokens.record(record.completion_tokens, model_tag)
        m.token_rate.record(record.completion_tokens, model_tag)
        if record.cost > 0:
            m.cost.record(float(record.cost), model_tag)
