"""Proactively secure links: messages between clients of one application at two servers (sans-IO).

Theory of operation
-------------------
Paper §5.4 ("proactively secure links"): a client of application ``app`` registered at server
i sends bytes to the client of the same application at server j. The bytes travel over the
servers' *period channels*: TLS whose keys the period keys of the current KeyTable certify and
which are re-keyed at every refresh (:mod:`appliance.net`), so a server key stolen in an
earlier period authenticates nothing now, and what was sent in an earlier period cannot be read
with a key stolen later. The node passes a frame to this service only if it came over such an
authenticated channel, and names the sender by that channel: a frame never says who sent it.

j checks that an application named ``app`` has a client registered there and that its inbox has
room, queues the message and answers ``ack``; otherwise ``nack`` with the reason. The sending
client learns "delivered" (the message is in j's inbox), or the reason it was not, or, when j
does not answer within :data:`ATTEMPT_TIMEOUT`, the node sends it again (same id) until the
client's deadline: a channel being re-keyed at a refresh loses frames, and the destination
takes a message it already queued only once (it remembers the last :data:`REMEMBERED` ids per
sender) and acknowledges it again.

=========  ====================================  =========================
frame      CBOR after the byte 0x01              sent
=========  ====================================  =========================
``msg``    {"k": "msg", id, app, data}           origin -> destination
``ack``    {"k": "ack", id}                      destination -> origin
``nack``   {"k": "nack", id, reason}             destination -> origin
=========  ====================================  =========================

Bounds (checked before anything is kept): a frame at most :data:`MAX_FRAME` bytes, data at most
:data:`MAX_DATA`, application names at most :data:`MAX_APP` characters, an inbox at most
``max_messages`` messages and ``max_bytes`` bytes per application (a full inbox answers
``nack``: the sender learns it at once, nothing is dropped silently), at most
:data:`MAX_OUTSTANDING` sends in flight. Nothing here reads a clock, a socket or a random
source: ``now`` and message ids are arguments.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

#: The first byte of every link frame (no CBOR map starts with it; the log's frames start with 0x00).
LINK_FRAME: Final = b"\x01"
MAX_DATA: Final = 64 * 1024
MAX_APP: Final = 64
MAX_FRAME: Final = MAX_DATA + 1024
ID_SIZE: Final = 16
INBOX_MESSAGES: Final = 256
INBOX_BYTES: Final = 4 * 1024 * 1024
MAX_OUTSTANDING: Final = 1024
#: How long one attempt waits for the destination's answer before the message is sent again.
ATTEMPT_TIMEOUT: Final = 2.0
#: Message ids remembered per sender, so that a message sent again is queued only once.
REMEMBERED: Final = 4096
MAX_REASON: Final = 200


def is_link_frame(data: bytes) -> bool:
    return data[:1] == LINK_FRAME


class LinkError(ValueError):
    """A send that cannot even start (bad destination, too large, too many in flight)."""


@dataclass(frozen=True)
class Delivered:
    """A message in an inbox: the server whose client sent it, the period it arrived in, the bytes."""

    sender: int
    period: int | None
    data: bytes


class Inboxes:
    """One bounded inbox per application, and the ids taken from each sender."""

    def __init__(self, *, max_messages: int = INBOX_MESSAGES, max_bytes: int = INBOX_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._boxes: dict[str, deque[Delivered]] = {}
        self._bytes: dict[str, int] = {}
        self._seen: dict[int, OrderedDict[bytes, None]] = {}

    def put(self, app: str, sender: int, msg_id: bytes, period: int | None, data: bytes) -> str | None:
        """Queue a message; None if queued (or queued before: a repeat), else why not."""
        seen = self._seen.setdefault(sender, OrderedDict())
        if msg_id in seen:
            return None
        box = self._boxes.setdefault(app, deque())
        held = self._bytes.get(app, 0)
        if len(box) >= self.max_messages or held + len(data) > self.max_bytes:
            return (
                f"the inbox of {app!r} is full ({len(box)} messages, {held} bytes): "
                "its client must receive first"
            )
        box.append(Delivered(sender, period, data))
        self._bytes[app] = held + len(data)
        seen[msg_id] = None
        while len(seen) > REMEMBERED:
            seen.popitem(last=False)
        return None

    def take(self, app: str, limit: int) -> list[Delivered]:
        """Up to ``limit`` messages of ``app``, oldest first (removed from the inbox)."""
        box = self._boxes.get(app)
        out: list[Delivered] = []
        while box and len(out) < limit:
            message = box.popleft()
            self._bytes[app] -= len(message.data)
            out.append(message)
        return out

    def count(self, app: str) -> int:
        return len(self._boxes.get(app, ()))


@dataclass
class _Send:
    to: int
    frame: bytes
    deadline: float
    attempt_deadline: float


class LinkService:
    """Server ``me``'s links among servers 1..n: :meth:`send`, :meth:`receive`, :meth:`tick`.

    ``has_client(app)`` says whether application ``app`` has a client registered at this server
    (the node asks its API). Settled sends are in :attr:`results`: id -> None (delivered) or the
    reason it was not. Frames to send are taken with :meth:`drain` as (to, frame).
    """

    def __init__(
        self, *, me: int, n: int, has_client: Callable[[str], bool], inboxes: Inboxes | None = None
    ) -> None:
        self.me = me
        self.n = n
        self.has_client = has_client
        self.inboxes = inboxes if inboxes is not None else Inboxes()
        self.results: dict[bytes, str | None] = {}
        #: Frames refused, with the reason and the sender (a peer's fault; never raised).
        self.rejected: list[tuple[int, str]] = []
        self._out: list[tuple[int, bytes]] = []
        self._sending: dict[bytes, _Send] = {}

    @property
    def pending(self) -> bool:
        return bool(self._sending)

    def drain(self) -> list[tuple[int, bytes]]:
        out, self._out = self._out, []
        return out

    def send(self, app: str, to: int, data: bytes, msg_id: bytes, now: float, timeout: float) -> None:
        """Send ``data`` to application ``app``'s client at server ``to``, trying until ``now + timeout``."""
        if to == self.me or not 1 <= to <= self.n:
            raise LinkError(f"server {to} is not another server of this network (1..{self.n}, not {self.me})")
        if not app or len(app) > MAX_APP:
            raise LinkError(f"the application name must have 1 to {MAX_APP} characters")
        if len(data) > MAX_DATA:
            raise LinkError(f"a message holds at most {MAX_DATA} bytes, not {len(data)}")
        if len(msg_id) != ID_SIZE or msg_id in self._sending:
            raise LinkError(f"a message id has {ID_SIZE} bytes and is not already in flight")
        if len(self._sending) >= MAX_OUTSTANDING:
            raise LinkError(f"{MAX_OUTSTANDING} messages are already waiting for an answer; retry later")
        frame = LINK_FRAME + encoding.encode({"k": "msg", "id": msg_id, "app": app, "data": data})
        self._sending[msg_id] = _Send(to, frame, now + timeout, now + ATTEMPT_TIMEOUT)
        self._out.append((to, frame))

    def receive(self, sender: int, data: bytes, period: int | None) -> None:
        """A frame from ``sender`` (as its authenticated channel names it), received in ``period``."""
        try:
            if not is_link_frame(data) or len(data) > MAX_FRAME:
                raise DecodeError(f"not a link frame of at most {MAX_FRAME} bytes")
            obj = encoding.decode(data[1:], max_size=MAX_FRAME, what="link frame")
            kind = obj.get("k") if isinstance(obj, dict) else None
            if kind == "msg":
                f = encoding.expect_map(
                    obj, {"k": str, "id": bytes, "app": str, "data": bytes}, "link message"
                )
                self._on_msg(sender, f["id"], f["app"], f["data"], period)
            elif kind == "ack":
                f = encoding.expect_map(obj, {"k": str, "id": bytes}, "link ack")
                self._settle(sender, f["id"], None)
            elif kind == "nack":
                f = encoding.expect_map(obj, {"k": str, "id": bytes, "reason": str}, "link nack")
                self._settle(sender, f["id"], f"server {sender}: {f['reason'][:MAX_REASON]}")
            else:
                raise DecodeError(f"link frame of unknown kind {str(kind)[:20]!r}")
        except DecodeError as exc:
            self.rejected.append((sender, str(exc)))

    def _on_msg(self, sender: int, msg_id: bytes, app: str, data: bytes, period: int | None) -> None:
        if len(msg_id) != ID_SIZE or not app or len(app) > MAX_APP or len(data) > MAX_DATA:
            raise DecodeError("link message: id, application name or data out of bounds")
        if not self.has_client(app):
            why: str | None = f"no client of {app!r} is registered at server {self.me}"
        else:
            why = self.inboxes.put(app, sender, msg_id, period, data)
        answer: dict[str, Any] = (
            {"k": "ack", "id": msg_id} if why is None else {"k": "nack", "id": msg_id, "reason": why}
        )
        self._out.append((sender, LINK_FRAME + encoding.encode(answer)))

    def _settle(self, sender: int, msg_id: bytes, result: str | None) -> None:
        sending = self._sending.get(msg_id)
        if sending is None or sending.to != sender:
            return  # late, repeated, or not ours: nothing to settle
        del self._sending[msg_id]
        self.results[msg_id] = result

    def tick(self, now: float) -> None:
        """Send again what got no answer in time; fail what reached its deadline."""
        for msg_id, sending in list(self._sending.items()):
            if now >= sending.deadline:
                del self._sending[msg_id]
                self.results[msg_id] = f"server {sending.to} did not answer before the deadline"
            elif now >= sending.attempt_deadline:
                sending.attempt_deadline = now + ATTEMPT_TIMEOUT
                self._out.append((sending.to, sending.frame))

    def next_wakeup(self) -> float | None:
        return min((min(s.deadline, s.attempt_deadline) for s in self._sending.values()), default=None)
