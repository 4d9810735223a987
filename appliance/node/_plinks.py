"""Proactively secure links in the network-facing process (paper §5.4; the protocol is
:mod:`appliance.protocols.links`).

The frames travel over the period channels only: :meth:`ProactiveLinks.frame` is called for a
link frame that arrived on a channel the peer's period key authenticated, and frames go out only
to a peer whose channels are authenticated (otherwise the attempt waits and is sent again). The
inboxes live here, in the process that outlives the key-holder's children, so a refresh loses
nothing that was delivered. The API's operations ``send`` and ``receive`` call
:meth:`link_send` and :meth:`link_receive` (the :class:`~appliance.api.LinkBackend` protocol).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import trio

from appliance.api import BackendRefused, BackendUnavailable
from appliance.protocols.links import Inboxes, LinkError, LinkService

log = logging.getLogger("pst.server")


class ProactiveLinks:
    """Server ``me``'s side of the links; ``send(to, frame)`` and ``authenticated(to)`` are the network's."""

    def __init__(
        self,
        me: int,
        n: int,
        *,
        has_client: Callable[[str], bool],
        send: Callable[[int, bytes], None],
        authenticated: Callable[[int], bool],
        period: Callable[[], int | None],
    ) -> None:
        self.service = LinkService(me=me, n=n, has_client=has_client, inboxes=Inboxes())
        self._send = send
        self._authenticated = authenticated
        self._period = period
        self._wake = trio.Event()
        self._settled = trio.Event()
        self._arrived = trio.Event()
        #: Frames refused from peers so far (each is logged once).
        self.rejected = 0

    def _flush(self) -> None:
        for to, frame in self.service.drain():
            if self._authenticated(to):
                self._send(to, frame)
        for sender, why in self.service.rejected:
            self.rejected += 1
            log.warning("links: refused a frame from server %d: %s", sender, why)
        self.service.rejected.clear()
        if self.service.results:
            self._settled.set()
            self._settled = trio.Event()

    def frame(self, peer: int, data: bytes) -> None:
        """A link frame from ``peer``, which arrived over a channel its period key authenticated."""
        self.service.receive(peer, data, self._period())
        self._flush()
        self._arrived.set()
        self._arrived = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.service.tick(trio.current_time())
            self._flush()
            wake = self.service.next_wakeup()
            with trio.move_on_at(wake if wake is not None else trio.current_time() + 60.0):
                await self._wake.wait()
            self._wake = trio.Event()

    async def link_send(self, app: str, to: int, data: bytes, timeout: float) -> None:
        msg_id = os.urandom(16)
        try:
            self.service.send(app, to, data, msg_id, trio.current_time(), timeout)
        except LinkError as exc:
            raise BackendRefused(str(exc)) from None
        self._flush()
        self._wake.set()
        while msg_id not in self.service.results:
            await self._settled.wait()
        why = self.service.results.pop(msg_id)
        if why is None:
            return
        if why.endswith("did not answer before the deadline"):
            raise BackendUnavailable(why)
        raise BackendRefused(why)

    async def link_receive(
        self, app: str, limit: int, wait: float
    ) -> Sequence[tuple[int, int | None, bytes]]:
        with trio.move_on_after(wait):
            while not self.service.inboxes.count(app):
                await self._arrived.wait()
        return [(m.sender, m.period, m.data) for m in self.service.inboxes.take(app, limit)]
