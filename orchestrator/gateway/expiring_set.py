"""A bounded set whose members expire: what the gateway remembers for a short time about
many callers (keys found unknown, tokens seen valid) without growing with them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class ExpiringSet:
    """Members expire ``ttl_s`` after they were (last) added, by ``monotonic``; past
    ``max_size`` members the oldest added goes first. Not thread-safe: use it from one thread
    (the event loop)."""

    def __init__(self, ttl_s: float, max_size: int, monotonic: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._monotonic = monotonic
        self._until: OrderedDict[Hashable, float] = OrderedDict()  # member -> when it expires

    def add(self, member: Hashable) -> None:
        self._until.pop(member, None)
        self._until[member] = self._monotonic() + self.ttl_s
        while len(self._until) > self.max_size:
            self._until.popitem(last=False)

    def __contains__(self, member: object) -> bool:
        until = self._until.get(member)  # type: ignore[call-overload]
        if until is None:
            return False
        if self._monotonic() < until:
            return True
        del self._until[member]  # type: ignore[arg-type]
        return False

    def discard(self, member: Hashable) -> None:
        self._until.pop(member, None)

    def clear(self) -> None:
        self._until.clear()

    def __len__(self) -> int:
        return len(self._until)
