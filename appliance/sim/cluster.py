"""A simulated PServer: the protocol core built from a simulated setup."""

from __future__ import annotations

from collections.abc import Callable

from appliance.protocols.core import ServerCore
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
