"""Holds: the admitted requests not yet settled, what each holds against its key (its place
among the key's running requests, its worst-case cost), and the routers that hold them.

Event-loop only (no lock): admissions, settlements, renewals and the reaper all run on the
ledger's event loop, and none of them awaits while it changes a hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from orchestrator.gateway.records import Admission


@dataclass
class Admitted:
    """An admitted request not yet settled: what it holds, and the event a lookup of its
    record waits on."""

    at: float  # monotonic
    key_id: str
    workspace_id: str
    model: str
    cost: Decimal  # its worst case, held against the key's balance and spend limits
    settled: asyncio.Event
    admission: Admission  # what the caller was answered (again, to a retried call)
    holder: str | None = None  # the router that admitted it, which renews its holds while alive


class Holds:
    """The admitted, unsettled requests in admission order; by key, their count and the sum
    of their held costs (kept beside them so that admission checks need no scan); and by
    router, when it was last heard from (monotonic seconds from ``monotonic``)."""

    def __init__(self, monotonic: Callable[[], float], ttl_s: float) -> None:
        self._monotonic = monotonic
        self.ttl_s = ttl_s
        self.admitted: dict[str, Admitted] = {}
        self.running: dict[str, int] = {}
        self.held_cost: dict[str, Decimal] = {}
        self.holders: dict[str, float] = {}  # router -> when it was last heard from (monotonic)

    def hold(self, admission: Admission, model: str, cost: Decimal, holder: str | None) -> None:
        """Holds an admitted request's place and ``cost`` against its key until
        :meth:`release`; ``holder`` (its router) counts as heard from now."""
        assert admission.key_id is not None and admission.workspace_id is not None
        key_id = admission.key_id
        at = self._monotonic()
        self.admitted[admission.request_id] = Admitted(
            at, key_id, admission.workspace_id, model, cost, asyncio.Event(), admission, holder
        )
        if holder is not None:
            self.holders[holder] = at
        self.running[key_id] = self.running.get(key_id, 0) + 1
        if cost:
            self.held_cost[key_id] = self.held_cost.get(key_id, Decimal(0)) + cost

    def release(self, request_id: str) -> Admitted | None:
        """Ends an admitted request's holds (its worst-case cost and its place among the key's
        running requests). Returns it (its ``settled`` event not yet set), or None for a
        request this ledger did not admit."""
        admitted = self.admitted.pop(request_id, None)
        if admitted is None:
            return None
        key_id, cost = admitted.key_id, admitted.cost
        if self.running[key_id] > 1:
            self.running[key_id] -= 1
        else:
            del self.running[key_id]
        if cost:
            left = self.held_cost[key_id] - cost
            if left:
                self.held_cost[key_id] = left
            else:
                del self.held_cost[key_id]
        return admitted

    def renew(self, holder: str) -> None:
        """Notes that the router ``holder`` is alive: its requests' holds last another
        ``ttl_s``."""
        self.holders[holder] = self._monotonic()

    def stale(self) -> list[tuple[str, Admitted]]:
        """Returns the admissions whose router was not heard from for ``ttl_s`` (without a
        router: since their admission), in admission order."""
        now = self._monotonic()

        def heard(admitted: Admitted) -> float:
            renewed = self.holders.get(admitted.holder) if admitted.holder is not None else None
            return admitted.at if renewed is None else max(admitted.at, renewed)

        return [(rid, admitted) for rid, admitted in self.admitted.items() if now - heard(admitted) > self.ttl_s]

    def forget_silent_holders(self) -> None:
        """Drops the routers that hold nothing and were not heard from for ``ttl_s``."""
        now = self._monotonic()
        holding = {admitted.holder for admitted in self.admitted.values()}
        self.holders = {h: seen for h, seen in self.holders.items() if h in holding or now - seen <= self.ttl_s}
