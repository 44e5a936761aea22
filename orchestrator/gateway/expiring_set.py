"""A bounded set whose members expire: what the gateway remembers for a short time about
many callers (keys found unknown, tokens seen valid) without growing with them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class ExpiringSet:
    """Members expire ``ttl_s`` after they were (last) added, by ``monotonic``, and are
    dropped at the next :meth:`add`; past ``max_size`` members the oldest added goes first.
    Not thread-safe: use it from one thread (the event loop)."""

    def __init__(self, ttl_s: float, max_size: int, monotonic: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._monotonic = monotonic
        self._until: OrderedDict[Hashable, float] = OrderedDict()  # member -> when it expires

    def add(self, member: Hashable) -> None:
        """Adds ``member`` (again), dropping the members expired by now and the oldest past
        ``max_size``: members are kept in the order they expire, so both go from the front."""
        now = self._monotonic()
        self._until.pop(member, None)
        self._until[member] = now + self.ttl_s
        while self._until and (len(self._until) > self.max_size or next(iter(self._until.values())) <= now):
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
