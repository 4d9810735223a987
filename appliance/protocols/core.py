"""A server's protocol core: one refresh per period, its data handed over between periods.

Sans-IO like the protocols it drives: ``tick(now)``, ``receive(sender, data, now)`` and
``next_wakeup(now)``. The simulator drives it in virtual time and keeps its data in
memory; the trio PServer drives it on the wall clock and persists each outcome through
``on_outcome`` before the next period starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2

from appliance.protocols._core import Outgoing
from appliance.protocols.refresh import Outcome, PeriodRefresh, PrivateData, PublicData, Status
from appliance.protocols.state import Constants


class ServerCore:
    """Runs PeriodRefresh for every period from ``first_period``; holds the current data."""

    def __init__(
        self,
        me: int,
        vstart: bytes,
        public: PublicData,
        private: PrivateData | None,
        clock: Constants,
        rand: Callable[[int], bytes],
        *,
        first_period: int = 1,
        on_outcome: Callable[[int, Outcome], None] | None = None,
    ) -> None:
        self.me = me
        self.vstart = vstart
        self.public: PublicData = public
        self.private: PrivateData | None = private
        self.on_outcome = on_outcome
        self.clock = clock
        self.rand = rand
        self.engine: PeriodRefresh | None = None
        self.next_period = first_period
        self.outcomes: dict[int, Outcome] = {}
        self.rejected: list[str] = []
        self._early: list[tuple[int, bytes, float, int]] = []

    @property
    def status(self) -> Status:
        last = max(self.outcomes) if self.outcomes else None
        return self.outcomes[last].status if last is not None else Status.OPERATIONAL

    def _start(self, period: int, now: float) -> None:
        self.engine = PeriodRefresh(
            me=self.me,
            period=period,
            vstart=self.vstart,
            public=self.public,
            private=self.private,
            rand=self.rand,
        )
        self.next_period = period + 1
        early, self._early = self._early, []
        for sender, data, at, p in early:
            if p == period:
                self.engine.receive(sender, data, max(at, now))
            elif p > period:
                self._early.append((sender, data, at, p))

    def tick(self, now: float) -> list[Outgoing]:
        period = self.clock.period_at(now)
        if period >= self.next_period and (self.engine is None or self.engine.outcome is not None):
            self._start(period, now)
        if self.engine is None:
            return []
        out = self.engine.tick(now)
        if self.engine.outcome is not None and self.engine.period not in self.outcomes:
            self._persist(self.engine.outcome)
        return out

    def next_wakeup(self, now: float) -> float | None:
        if self.engine is not None and self.engine.outcome is None:
            wake = self.engine.next_wakeup(now)
            if wake is not None:
                return wake
        return self.clock.period_start(max(self.next_period, self.clock.period_at(now) + 1)) + 1e-6

    def _persist(self, outcome: Outcome) -> None:
        assert self.engine is not None
        self.outcomes[self.engine.period] = outcome
        self.rejected += [str(r) for r in self.engine.rejected]
        old = self.private
        if self.on_outcome is not None:
            self.on_outcome(self.engine.period, outcome)  # persist before anything is wiped
        self.public, self.private = outcome.public, outcome.private
        if old is not None and old is not outcome.private:
            old.wipe()

    def receive(self, sender: int, data: bytes, now: float) -> None:
        period = _period_of(data)
        if period is None:
            self.rejected.append(f"server {sender}: undecodable message")
            return
        if self.engine is not None and self.engine.period == period and self.engine.outcome is None:
            self.engine.receive(sender, data, now)
        elif period >= self.next_period and len(self._early) < 10_000:
            self._early.append((sender, data, now, period))


def _period_of(data: bytes) -> int | None:
    """Peek at a message's period to route it (the engine validates the message fully)."""
    try:
        obj: Any = cbor2.loads(data)
    except Exception:
        return None
    period = obj.get("period") if isinstance(obj, dict) else None
    return period if isinstance(period, int) and not isinstance(period, bool) else None
