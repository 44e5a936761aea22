"""The failure throttle: client addresses that keep failing authentication are refused for a
while, before their requests reach the gateway's database."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from orchestrator.errors import ErrorCode, OrchestratorError


class FailureThrottle:
    """Counts failed authentications by client address in fixed windows of ``window_s``
    seconds (by ``monotonic``): once an address has ``max_failures`` in its window, its
    requests are refused until the window ends. At most ``max_addresses`` addresses are
    tracked (the least recently failed are dropped first). ``max_failures`` 0: never refuses.
    """

    def __init__(
        self, max_failures: int, window_s: float, monotonic: Callable[[], float], max_addresses: int = 100_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._monotonic = monotonic
        self._max_addresses = max_addresses
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address -> (start, failures)

    def refusal(self, address: str) -> OrchestratorError | None:
        """Returns the 429 ``authentication_throttled`` (with ``Retry-After``) that a request
        from ``address`` gets now, or None when it may go on."""
        window = self._windows.get(address)
        if self.max_failures <= 0 or window is None or window[1] < self.max_failures:
            return None
        left = window[0] + self.window_s - self._monotonic()
        if left <= 0:
            return None
        return OrchestratorError(
            ErrorCode.AUTHENTICATION_THROTTLED,
            f"Too many failed authentications from this address; retry after {math.ceil(left)} s.",
            headers={"Retry-After": str(math.ceil(left))},
        )

    def failed(self, address: str) -> None:
        """Counts a failed authentication from ``address``."""
        now = self._monotonic()
        start, failures = self._windows.pop(address, (now, 0))
        if now - start >= self.window_s:
            start, failures = now, 0
        self._windows[address] = (start, failures + 1)
        while len(self._windows) > self._max_addresses:
            self._windows.popitem(last=False)
