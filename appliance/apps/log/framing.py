"""Syslog framing: messages out of a TCP byte stream (RFC 6587) or a UDP datagram (RFC 5426).

Theory of operation
-------------------
Over TCP (and TLS, RFC 5425) a sender frames each message in one of two ways:

* **octet counting**: ``MSG-LEN SP MSG``, the length in decimal (a nonzero digit first);
* **non-transparent** (LF) framing: ``MSG LF``; a message cannot contain an LF.

Receivers tell them apart by the first byte of each frame, as rsyslog's imtcp does: a digit
starts an octet count, anything else (normally ``<``) an LF-framed message. So one connection
may mix both. :class:`StreamDeframer` is that state machine, sans-IO: :meth:`~StreamDeframer.feed`
it the chunks the transport delivered and it returns the complete messages as :class:`Frame` s;
:meth:`~StreamDeframer.eof` returns what the stream ended inside.

It never fails and never drops a byte of a message. What rsyslog calls framing errors it
handles as rsyslog does, by reading the frame as LF-framed instead: a count of more than 9
digits, or digits not followed by a space, become the start of an LF-framed message (counted
in :attr:`StreamDeframer.framing_errors`). A message longer than ``max_message_size`` keeps its
first ``max_message_size`` octets; the rest of it is read and discarded, and its
:attr:`Frame.size` says how long it was (the entry is flagged *truncated*). A stream that ends
inside a message yields what was received of it: an octet-counted frame then has a ``size``
above its length (truncated), an LF-framed one is complete as it stands (rsyslog does the same).
Empty LF-framed messages (blank lines, an LF after an octet-counted frame) carry nothing and
are skipped.

The deframer holds at most one message (``max_message_size`` octets) and an octet count, however
the sender behaves.

Over UDP each datagram is one message (:func:`datagram_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.apps.log.syslog import MAX_MESSAGE_SIZE

__all__ = ["MAX_COUNT_DIGITS", "Frame", "StreamDeframer", "datagram_frame"]

#: An octet count has at most 9 digits (as RELP's DATALEN); more is a framing error.
MAX_COUNT_DIGITS = 9
_DIGITS = b"0123456789"


@dataclass(frozen=True, slots=True)
class Frame:
    """One message's bytes (at most the limit) and how many octets the sender sent for it."""

    data: bytes
    size: int

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


def datagram_frame(datagram: bytes, max_message_size: int = MAX_MESSAGE_SIZE) -> Frame | None:
    """The message a UDP datagram carries (RFC 5426: exactly one); ``None`` for an empty one."""
    if not datagram:
        return None
    return Frame(bytes(datagram[:max_message_size]), len(datagram))


# States of the deframer.
_START = 0  # at the start of a frame
_COUNT = 1  # inside an octet count
_COUNTED = 2  # inside an octet-counted message
_LF = 3  # inside an LF-framed message


class StreamDeframer:
    """RFC 6587 deframing of one TCP connection, octet counting or LF framing per frame."""

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        if not 1 <= max_message_size <= MAX_MESSAGE_SIZE:
            raise ValueError(f"max_message_size must be 1 to {MAX_MESSAGE_SIZE}, not {max_message_size}")
        self.max_message_size = max_message_size
        #: Frames read as LF-framed because their octet count was malformed.
        self.framing_errors = 0
        #: Messages longer than the limit (cut to it).
        self.truncated = 0
        self._state = _START
        self._data = bytearray()  # the current message's bytes kept so far (or the count's digits)
        self._size = 0  # octets of the current message seen so far (kept or not)
        self._remaining = 0  # octets still to come of an octet-counted message
        self._ended = False

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress."""
        return len(self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add a chunk of the stream; return the messages it completes, in order."""
        if self._ended:
            raise ValueError("feed() after eof()")
        data = bytes(data)
        frames: list[Frame] = []
        pos, n = 0, len(data)
        limit = self.max_message_size
        while pos < n:
            state = self._state
            if state == _START:
                if data[pos] in _DIGITS and data[pos] != 0x30:
                    # The common case in one step: a whole octet-counted message in this chunk
                    # (what the state machine below would give, without a round per digit).
                    space = data.find(b" ", pos + 1, pos + MAX_COUNT_DIGITS + 1)
                    if space > 0 and data[pos:space].isdigit():
                        count = int(data[pos:space])
                        end = space + 1 + count
                        if end <= n and count <= limit:
                            frames.append(Frame(data[space + 1 : end], count))
                            pos = end
                            continue
                    self._state = _COUNT
                else:
                    self._state = _LF
                continue
            if state == _COUNT:
                pos = self._read_count(data, pos)
                continue
            if state == _COUNTED:
                take = min(self._remaining, n - pos)
                room = limit - len(self._data)
                if room > 0:
                    self._data += data[pos : pos + min(take, room)]
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    frames.append(self._finish())
                continue
            # _LF: up to the next LF.
            end = data.find(b"\n", pos)
            stop = n if end < 0 else end
            room = limit - len(self._data)
            if room > 0:
                self._data += data[pos : min(stop, pos + room)]
            self._size += stop - pos
            pos = stop
            if end >= 0:
                pos += 1
                if self._size:
                    frames.append(self._finish())
                else:
                    self._state = _START
        return frames

    def _read_count(self, data: bytes, pos: int) -> int:
        """Read digits of an octet count; at the space, start the message."""
        n = len(data)
        while pos < n and data[pos] in _DIGITS and len(self._data) < MAX_COUNT_DIGITS:
            self._data.append(data[pos])
            pos += 1
        if pos == n:
            return pos
        if data[pos] == 0x20:
            self._remaining = self._size = int(self._data)
            self._data = bytearray()
            self._state = _COUNTED
            return pos + 1
        # Too many digits, or something other than a space after them: rsyslog reads the frame
        # as LF-framed, the digits included.
        self.framing_errors += 1
        self._size = len(self._data)
        del self._data[self.max_message_size :]
        self._state = _LF
        return pos

    def _finish(self) -> Frame:
        frame = Frame(bytes(self._data), max(self._size, len(self._data)))
        if frame.truncated:
            self.truncated += 1
        self._data = bytearray()
        self._size = 0
        self._remaining = 0
        self._state = _START
        return frame

    def eof(self) -> list[Frame]:
        """The stream ended: the message it ended inside, if any (see the module docstring)."""
        self._ended = True
        if self._state == _COUNTED:
            # Received less than announced: what came, flagged by the announced size.
            return [self._finish()]
        if self._state == _COUNT:
            self.framing_errors += 1
            self._size = len(self._data)
            del self._data[self.max_message_size :]
        if self._state in (_COUNT, _LF) and self._size:
            return [self._finish()]
        self._state = _START
        return []
