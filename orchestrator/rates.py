"""Recent rates: amounts recorded per label set, as amounts per second over the last few seconds.

A process that counts something (tokens, errors, prefix-cache lookups) also keeps how much
it counted lately, so that one scrape of its gauge gives a rate (``orchestrator status``
reads them) where a counter needs two scrapes a window apart. Pure Python: the clock is
injected, and something outside (:mod:`orchestrator.serving.telemetry` in Ray) calls
:meth:`RecentRates.publish` periodically, so a rate falls back to 0 once nothing is recorded.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping

from orchestrator.metrics import Instrument, SeriesKey, series_key


class RecentRates:
    """Amounts added per label set, published to a gauge ``instrument`` as amount per second
    over the last ``window_s`` seconds (time from ``clock``, in ``slots`` slots of
    ``window_s / slots`` seconds each). Safe to use from several threads."""

    def __init__(
        self,
        instrument: Instrument,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        slots: int = 20,
    ) -> None:
        if not window_s > 0 or slots < 1:
            raise ValueError("window_s must be positive and slots at least 1")
        self._instrument = instrument
        self._slot_s = window_s / slots
        self._slots = slots
        self._clock = clock
        self._lock = threading.Lock()
        self._amounts: dict[SeriesKey, dict[int, float]] = {}

    def _slot(self, now: float) -> int:
        return math.floor(now / self._slot_s)

    def add(self, amount: float, tags: Mapping[str, str]) -> None:
        """Adds ``amount`` (ignored unless positive) to the label set ``tags`` now."""
        if not amount > 0:
            return
        key = series_key(tags)
        slot = self._slot(self._clock())
        with self._lock:
            amounts = self._amounts.setdefault(key, {})
            amounts[slot] = amounts.get(slot, 0.0) + amount

    def _rate(self, amounts: dict[int, float], now: float) -> float:
        """Drops the slots older than the window from ``amounts``; returns what is left, per
        second of the time it covers (the current slot's elapsed part included)."""
        current = self._slot(now)
        oldest = current - self._slots + 1
        for slot in [s for s in amounts if s < oldest]:
            del amounts[slot]
        covered = now - oldest * self._slot_s
        return sum(amounts.values()) / covered if covered > 0 else 0.0

    def publish(self) -> None:
        """Sets the gauge of every label set to its rate now. A label set whose rate is 0 is
        set to 0 and then forgotten, until an amount is added to it again."""
        now = self._clock()
        with self._lock:
            found = {key: self._rate(amounts, now) for key, amounts in self._amounts.items()}
            for key, rate in found.items():
                if rate == 0:
                    del self._amounts[key]
        for key, rate in found.items():
            self._instrument.record(rate, dict(key))
