"""A RELP server session as a sans-IO state machine.

Theory of operation
-------------------
RELP (rsyslog's Reliable Event Logging Protocol, librelp ``doc/relp.html``) carries syslog
messages over TCP with an application-level acknowledgement, so that a sender knows which
messages the receiver has taken and resends the others after a reconnect. Every frame is ::

    TXNR SP COMMAND SP DATALEN [SP DATA] LF

with TXNR and DATALEN 1 to 9 digits and COMMAND 1 to 32 letters; DATA is exactly DATALEN
octets, present only when DATALEN is not 0, and the trailing LF catches framing errors. The
client numbers its commands 1, 2, 3, ... (after 999,999,999 comes 1) and the server answers each
with ``TXNR rsp DATALEN CODE SP TEXT [LF DATA]``, *in the order the commands came*; TXNR 0 is for
the server's own hints (``serverclose``). A session is ``open`` (the client's offers, which must
include ``relp_version`` and offer the ``syslog`` command), any number of ``syslog`` (one
message each), then ``close``. The client keeps up to a window of unanswered commands (128 by
default in librelp) and resends them on a new session if the connection breaks.

This module owns the session's state machine and nothing else: no sockets, no clock, no
storage (the h11 pattern). The caller feeds bytes (:meth:`RelpServer.receive_data`), pulls
events (:meth:`RelpServer.next_event`), and sends what :meth:`RelpServer.data_to_send`
returns. States and what each command does in them:

=============  ===============================  ==================  ===========================
state          ``open``                         ``syslog``          ``close``
=============  ===============================  ==================  ===========================
AWAIT_OPEN     answer the offers -> OPEN        error               answer ``rsp 0`` -> CLOSING
OPEN           error (a second open)            :class:`Message`    answer ``rsp 0`` -> CLOSING
CLOSING        (nothing more is read)
FAILED         (nothing more is read)
=============  ===============================  ==================  ===========================

Any other command (``rsp``, ``serverclose``, ``starttls``, unknown ones), a frame that breaks
the grammar, a transaction number out of sequence or data longer than ``max_frame_data``
(librelp's default, 128 KiB) is the peer's error: the session answers ``500`` and the reason
(on the frame's TXNR when it could be read), then ``0 serverclose 0``, and goes to FAILED.

**Shutting down.** :meth:`RelpServer.server_close` ends the session from our side: the
messages acknowledged so far keep their ``200 OK``, the ones not acknowledged are never
answered (the client sends them again on its next session), and ``0 serverclose 0`` follows
the last response, as librelp's server does when it stops.

**Acknowledgement after durability.** A ``syslog`` command is answered ``200 OK`` only when
the caller calls :meth:`RelpServer.acknowledge` for its TXNR, which it does once the entry is
durable. Acknowledgements must come in the order the messages came (anything else is our
own error, :class:`LocalProtocolError`), and a response is released by :meth:`data_to_send`
only when every response before it is, so the client never sees ``200`` for a message before
the ones it sent earlier are durable. ``open``, ``close`` and error responses queue behind the
unacknowledged messages too. When ``window`` messages are unacknowledged,
:meth:`next_event` returns :data:`PAUSED` instead of reading further: the caller then reads
no more from the network until acknowledgements come (backpressure over TCP).

A message longer than ``max_message_size`` keeps that many octets and says how long it was
(:attr:`Message.size`), as over plain TCP.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import Final

from appliance.apps.log.syslog import MAX_MESSAGE_SIZE

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_FRAME_DATA",
    "NEED_DATA",
    "PAUSED",
    "CloseRequested",
    "ConnectionEnded",
    "Event",
    "LocalProtocolError",
    "Message",
    "Opened",
    "ProtocolError",
    "RelpServer",
    "State",
]

#: librelp's defaults: the client's window of unanswered commands, the largest DATA.
DEFAULT_WINDOW: Final = 128
MAX_FRAME_DATA: Final = 128 * 1024
MAX_TXNR: Final = 999_999_999
RELP_VERSION: Final = 0
SOFTWARE: Final = "pst-appliance"
MAX_OFFERS: Final = 32
_MAX_HEADER: Final = 9 + 1 + 32 + 1 + 9 + 1


class LocalProtocolError(Exception):
    """We misused the state machine (acknowledged out of order, fed data after the end)."""


class State(enum.Enum):
    AWAIT_OPEN = "await-open"
    OPEN = "open"
    CLOSING = "closing"  # the client sent close
    FAILED = "failed"  # the client broke the protocol
    SERVER_CLOSED = "server-closed"  # we ended the session (serverclose: we are shutting down)
    ENDED = "ended"  # the connection ended (EOF)


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    PAUSED = "paused"


#: :meth:`RelpServer.next_event`: feed more bytes first.
NEED_DATA: Final = _Sentinel.NEED_DATA
#: :meth:`RelpServer.next_event`: the window is full; acknowledge before reading on.
PAUSED: Final = _Sentinel.PAUSED


@dataclass(frozen=True)
class Opened:
    """The client opened the session (answered already); its offers, name -> values."""

    txnr: int
    offers: dict[str, list[str]]


@dataclass(frozen=True)
class Message:
    """A ``syslog`` command: one message (cut at the limit; ``size`` is its DATALEN)."""

    txnr: int
    data: bytes
    size: int


@dataclass(frozen=True)
class CloseRequested:
    """The client closed the session: send what is left, then close the connection."""

    txnr: int


@dataclass(frozen=True)
class ProtocolError:
    """The client broke the protocol: a 500 naming ``reason`` is queued, then the connection closes."""

    reason: str


@dataclass(frozen=True)
class ConnectionEnded:
    """The client closed its side; ``clean`` is False if it stopped inside a frame."""

    clean: bool


Event = Opened | Message | CloseRequested | ProtocolError | ConnectionEnded


class _FrameError(Exception):
    def __init__(self, reason: str, txnr: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.txnr = txnr


_HEADER = re.compile(rb"([0-9]{1,9}) ([A-Za-z]{1,32}) ([0-9]{1,9})([ \n])")
_HEADER_PREFIX = re.compile(rb"[0-9]{0,9}(?: (?:[A-Za-z]{0,32}(?: [0-9]{0,9})?)?)?")
_TXNR = re.compile(rb"([0-9]{1,9}) ")
_COMMAND = re.compile(rb"[A-Za-z]{1,32} ")


def _response(txnr: int, data: bytes) -> bytes:
    if not data:
        return b"%d rsp 0\n" % txnr
    return b"%d rsp %d %s\n" % (txnr, len(data), data)


def next_txnr(txnr: int) -> int:
    return 1 if txnr >= MAX_TXNR else txnr + 1


def parse_offers(data: bytes) -> dict[str, list[str]]:
    """``name=value,value`` lines (a name alone has no values); at most :data:`MAX_OFFERS`."""
    offers: dict[str, list[str]] = {}
    for line in data.decode("utf-8", "replace").split("\n")[:MAX_OFFERS]:
        name, _, values = line.partition("=")
        if name:
            offers[name] = [v for v in values.split(",") if v]
    return offers


class RelpServer:
    """The server side of one RELP session (see the module docstring)."""

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_frame_data: int = MAX_FRAME_DATA,
    ) -> None:
        if window < 1 or not 1 <= max_message_size <= MAX_MESSAGE_SIZE or max_frame_data < 1:
            raise ValueError("window, max_message_size and max_frame_data must be positive")
        self.window = window
        self.max_message_size = max_message_size
        self.max_frame_data = max_frame_data
        self.state = State.AWAIT_OPEN
        self._buffer = bytearray()
        self._eof = False
        self._expected = 1
        # Responses in command order; None until the message is acknowledged.
        self._out: deque[list[bytes | None]] = deque()
        self._unacked: deque[tuple[int, list[bytes | None]]] = deque()

    # --- Input ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        if self._eof:
            raise LocalProtocolError("receive_data() after the end of the stream")
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def pending(self) -> int:
        """Messages received and not yet acknowledged."""
        return len(self._unacked)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_event(self) -> Event | _Sentinel:
        """The next event, or :data:`NEED_DATA`, or :data:`PAUSED` while the window is full."""
        if self.state not in (State.AWAIT_OPEN, State.OPEN):
            raise LocalProtocolError(f"the session is {self.state.value}: no more events")
        if self.pending >= self.window:
            return PAUSED
        try:
            frame = self._parse_frame()
        except _FrameError as exc:
            return self._fail(exc.reason, exc.txnr)
        if frame is None:
            if self._eof:
                self.state = State.ENDED
                return ConnectionEnded(clean=not self._buffer)
            return NEED_DATA
        txnr, command, data, datalen = frame
        if txnr != self._expected:
            return self._fail(f"transaction number {txnr}, expected {self._expected}", txnr)
        self._expected = next_txnr(txnr)
        return self._dispatch(txnr, command, data, datalen)

    def _parse_frame(self) -> tuple[int, str, bytes, int] | None:
        buf = self._buffer
        m = _HEADER.match(buf)
        if m is None:
            head = bytes(buf[:_MAX_HEADER])
            if len(buf) < _MAX_HEADER and _HEADER_PREFIX.fullmatch(head):
                return None
            t = _TXNR.match(head)
            txnr = int(t.group(1)) if t else None
            if t is None:
                raise _FrameError(
                    f"a frame starts with a 1 to 9 digit TXNR and a space, not {head[:12]!r}", None
                )
            if not _COMMAND.match(head, t.end()):
                raise _FrameError("the command is not 1 to 32 letters followed by a space", txnr)
            raise _FrameError("the data length is not 1 to 9 digits followed by a space or LF", txnr)
        txnr, command, datalen = int(m.group(1)), m.group(2).decode("ascii"), int(m.group(3))
        if datalen == 0:
            if m.group(4) != b"\n":
                raise _FrameError("a frame with DATALEN 0 ends with LF right after it", txnr)
            del buf[: m.end()]
            return txnr, command, b"", 0
        if m.group(4) != b" ":
            raise _FrameError(f"DATALEN {datalen} but no data", txnr)
        if datalen > self.max_frame_data:
            raise _FrameError(
                f"frame data of {datalen} octets exceeds the limit of {self.max_frame_data}", txnr
            )
        end = m.end() + datalen
        if len(buf) <= end:
            return None
        if buf[end] != 0x0A:
            raise _FrameError(f"no LF after the frame's {datalen} octets of data", txnr)
        keep = datalen if command != "syslog" else min(datalen, self.max_message_size)
        data = bytes(buf[m.end() : m.end() + keep])
        del buf[: end + 1]
        return txnr, command, data, datalen

    def _dispatch(self, txnr: int, command: str, data: bytes, datalen: int) -> Event:
        if command == "syslog" and self.state is State.OPEN:
            slot: list[bytes | None] = [None]
            self._out.append(slot)
            self._unacked.append((txnr, slot))
            return Message(txnr, data, datalen)
        if command == "open" and self.state is State.AWAIT_OPEN:
            offers = parse_offers(data)
            version = offers.get("relp_version", [])
            if len(version) != 1 or not version[0].isdigit():
                return self._fail("the open command offers no numeric relp_version", txnr)
            if "syslog" not in offers.get("commands", []):
                return self._fail("the client does not offer the syslog command", txnr)
            answer = (
                f"200 OK\nrelp_version={min(int(version[0]), RELP_VERSION)}\n"
                f"relp_software={SOFTWARE}\ncommands=syslog"
            )
            self._out.append([_response(txnr, answer.encode("ascii"))])
            self.state = State.OPEN
            return Opened(txnr, offers)
        if command == "close":
            self._out.append([_response(txnr, b"")])
            self.state = State.CLOSING
            return CloseRequested(txnr)
        if command == "syslog":
            return self._fail("syslog before open", txnr)
        if command == "open":
            return self._fail("a second open in one session", txnr)
        return self._fail(f"command {command!r} is not supported", txnr)

    def _fail(self, reason: str, txnr: int | None) -> ProtocolError:
        reason = reason[:200]
        if txnr is not None:
            self._out.append([_response(txnr, b"500 " + reason.encode("ascii", "replace"))])
        self._out.append([b"0 serverclose 0\n"])
        self.state = State.FAILED
        self._buffer.clear()
        return ProtocolError(reason)

    def server_close(self) -> None:
        """End the session from our side: ``0 serverclose 0`` after the responses already due.

        Messages not acknowledged by now are never answered (the client resends them); a
        session that is already over is left as it is.
        """
        if self.state not in (State.AWAIT_OPEN, State.OPEN):
            return
        unanswered = {id(slot) for _, slot in self._unacked}
        self._out = deque(slot for slot in self._out if id(slot) not in unanswered)
        self._unacked.clear()
        self._out.append([b"0 serverclose 0\n"])
        self.state = State.SERVER_CLOSED
        self._buffer.clear()

    # --- Output ---

    def acknowledge(self, txnr: int) -> None:
        """The message ``txnr`` is durable: answer it ``200 OK`` (in order, oldest first)."""
        if not self._unacked:
            raise LocalProtocolError(f"acknowledge({txnr}): no message is waiting")
        oldest, slot = self._unacked[0]
        if txnr != oldest:
            raise LocalProtocolError(f"acknowledge({txnr}): the oldest unacknowledged message is {oldest}")
        self._unacked.popleft()
        slot[0] = _response(txnr, b"200 OK")

    def data_to_send(self) -> bytes:
        """The responses that may go out now (each one once), in command order."""
        out = []
        while self._out and self._out[0][0] is not None:
            out.append(self._out.popleft()[0])
        return b"".join(x for x in out if x is not None)

    @property
    def done(self) -> bool:
        """Closing or failed, and every response handed out: close the connection."""
        return self.state in (State.CLOSING, State.FAILED, State.ENDED, State.SERVER_CLOSED) and not self._out
