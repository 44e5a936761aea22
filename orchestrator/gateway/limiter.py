"""Per-key requests-per-minute and tokens-per-minute limits, with reservations.

At admission a request reserves one request and ``prompt + max output`` tokens in the
key's current window; when it ends the reservation settles to what was really used.
Windows are fixed, ``window_s`` long, starting at a key's first request after the previous
window ended, so ``reset`` is exact and "N of N+k requests pass" holds. A request that no
window could ever let through (it reserves more tokens than the limit) is refused with 400
``request_too_large_for_limit`` rather than 429, which clients retry. This class is the
rule only: to be exact across router replicas it must run in one shared place (the
store actor), never in each replica.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.errors import ErrorCode, OrchestratorError


@dataclass
class _Window:
    start: float
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class LimitDecision:
    """The outcome of an admission, with what the rate-limit headers report."""

    allowed: bool
    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_s: float
    window_start: float

    def headers(self) -> dict[str, str]:
        """Returns the ``x-ratelimit-*`` headers (and ``Retry-After`` when refused)."""
        out: dict[str, str] = {}
        reset = f"{max(self.reset_s, 0.0):.3f}s"
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = reset
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = reset
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.reset_s)))
        return out


def concurrency_headers(limit: int, running: int) -> dict[str, str]:
    """Returns the ``x-ratelimit-*-concurrency`` headers of a key allowed ``limit`` requests
    at once with ``running`` running (this one included when it was admitted)."""
    return {
        "x-ratelimit-limit-concurrency": str(limit),
        "x-ratelimit-remaining-concurrency": str(max(0, limit - running)),
    }


def refuse_unreachable(rpm: int | None, tpm: int | None, tokens: int) -> None:
    """Raises 400 ``request_too_large_for_limit``, naming the limit and its value, for a
    request that a key with these limits could never admit, however long it waited."""
    if rpm is not None and rpm < 1:
        raise OrchestratorError(
            ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT,
            f"This API key's requests-per-minute limit (rpm) is {rpm}: it admits no request.",
        )
    if tpm is not None and tokens > tpm:
        raise OrchestratorError(
            ErrorCode.REQUEST_TOO_LARGE_FOR_LIMIT,
            f"This request reserves {tokens} tokens (its prompt, estimated, plus max_tokens for every choice), "
            f"more than this API key's tokens-per-minute limit (tpm) of {tpm}: it could never pass. "
            "Lower max_tokens or n, or shorten the prompt.",
        )


class RateLimiter:
    """Fixed-window RPM/TPM limiter keyed by API key id.

    Args:
        clock: monotonic seconds (injected, so tests control time).
        window_s: window length (60 for per-minute limits).
    """

    def __init__(self, clock: Callable[[], float], window_s: float = 60.0) -> None:
        self._clock = clock
        self._window_s = window_s
        self._windows: dict[str, _Window] = {}

    def _window(self, key_id: str, now: float) -> _Window:
        window = self._windows.get(key_id)
        if window is None or now >= window.start + self._window_s:
            window = _Window(start=now)
            self._windows[key_id] = window
        return window

    def admit(self, key_id: str, rpm: int | None, tpm: int | None, tokens: int) -> LimitDecision:
        """Reserves one request and ``tokens`` tokens if both limits allow it.

        Returns:
            The decision: refused while the window has no room left (a retry after
            ``reset_s`` can pass).

        Raises:
            OrchestratorError: 400 ``request_too_large_for_limit`` when no window could ever
            let the request through (``tokens`` above ``tpm``, or ``rpm`` below 1); nothing
            is reserved.
        """
        refuse_unreachable(rpm, tpm, tokens)
        now = self._clock()
        window = self._window(key_id, now)
        allowed = (rpm is None or window.requests + 1 <= rpm) and (tpm is None or window.tokens + tokens <= tpm)
        if allowed:
            window.requests += 1
            window.tokens += tokens
        return LimitDecision(
            allowed=allowed,
            limit_requests=rpm,
            remaining_requests=None if rpm is None else max(0, rpm - window.requests),
            limit_tokens=tpm,
            remaining_tokens=None if tpm is None else max(0, tpm - window.tokens),
            reset_s=window.start + self._window_s - now,
            window_start=window.start,
        )

    def settle(self, key_id: str, window_start: float, reserved: int, used: int) -> None:
        """Replaces a reservation by the tokens really used (same window only: a window
        that has rolled over has already been forgotten)."""
        window = self._windows.get(key_id)
        if window is not None and window.start == window_start:
            window.tokens = max(0, window.tokens - reserved + used)

    def export(self) -> list[tuple[str, float, int, int]]:
        """Returns the windows still open as (key id, start, requests, tokens), start on
        this limiter's clock, for the next ledger to :meth:`restore`."""
        now = self._clock()
        return [(k, w.start, w.requests, w.tokens) for k, w in self._windows.items() if now < w.start + self._window_s]

    def restore(self, windows: list[tuple[str, float, int, int]]) -> None:
        """Takes over windows another limiter exported (their start converted to this
        limiter's clock), so a handover neither forgets nor doubles what was admitted."""
        now = self._clock()
        for key_id, start, requests, tokens in windows:
            if now < start + self._window_s:
                self._windows[key_id] = _Window(start=start, requests=requests, tokens=tokens)
