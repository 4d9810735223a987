"""A simulated PServer: the protocol core built from a simulated setup."""

from __future__ import annotations

from collections.abc import Callable

from appliance.protocols._core import Outgoing
from appliance.protocols.core import ServerCore
from appliance.protocols.refresh import CodeCheckRequest
from appliance.protocols.state import Constants
from appliance.sim.setup import ServerSetup


class SimServer(ServerCore):
    """A ServerCore whose data lives in memory (what it would persist is ``public``/``private``)."""

    def __init__(
        self,
        setup: ServerSetup,
        clock: Constants,
        rand: Callable[[int], bytes],
        *,
        first_period: int = 1,
        forget_at_retire: bool = True,
    ) -> None:
        # Like the node, a simulated server loses the messages it held at each retirement.
        super().__init__(
            setup.me,
            setup.vstart,
            setup.public,
            setup.private,
            clock,
            rand,
            first_period=first_period,
            forget_at_retire=forget_at_retire,
            ann_key=setup.ann_key,
        )
        #: Virtual seconds a code check takes: its result is an event that long after the request.
        self.code_seconds = 0.0
        #: Code checks under way, as the node runs them off its loop: (when the result is in,
        #: the request, the result).
        self.code_results: list[tuple[float, CodeCheckRequest, str | None]] = []

    def tick(self, now: float) -> list[Outgoing]:
        due = [r for r in self.code_results if r[0] <= now]
        if due:
            self.code_results = [r for r in self.code_results if r[0] > now]
            for _at, request, problem in due:
                self.code_checked(request, problem, now)
        out = super().tick(now)
        asked = self.take_code_request()
        if asked is not None and self.code is not None:
            problem = self.code.check(asked.m, list(asked.chains))
            self.code_results.append((now + self.code_seconds, asked, problem))
        return out

    def next_wakeup(self, now: float) -> float | None:
        wake = super().next_wakeup(now)
        if self.code_results:
            first = min(at for at, _request, _problem in self.code_results)
            wake = first if wake is None else min(wake, first)
        return wake
