"""Length-prefixed frames and the hello frame.

Theory of operation: a connection carries a sequence of frames, each a 4-byte big-endian
length followed by that many payload bytes. :class:`FrameDecoder` is sans-IO: feed it
whatever chunks the transport delivered and it returns the frames they complete; it refuses
a length above its maximum as soon as the 4 header bytes arrive (before buffering any of the
payload), and :meth:`FrameDecoder.eof` refuses a stream that ends inside a frame. The next
frame alone can be held to a smaller bound (:meth:`FrameDecoder.limit_next`,
``FrameStream.receive_frame(max_size=...)``): the hello is read with :data:`MAX_HELLO_SIZE`,
so a peer that has not yet said who it is can make us buffer at most one receive chunk. Every
problem is a :class:`FramingError` whose message names it, so a fuzzer can check that
arbitrary input only ever yields frames or that one exception.

:class:`FrameStream` runs the decoder over a trio stream. The first frame each side sends
is a :class:`Hello` ``{"v": 1, "server": id, "period": p}`` in canonical CBOR; the peer
manager checks it against the TLS certificate the same side presented.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

#: Default upper bound on one frame's payload.
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024
HEADER_SIZE = 4
HELLO_VERSION = 1
#: A hello is a tiny map; anything larger is refused before decoding.
MAX_HELLO_SIZE = 256
_RECEIVE_CHUNK = 65536


class FramingError(ValueError):
    """The byte stream does not split into acceptable frames; the message says why."""


class HelloError(ValueError):
    """The first frame is not a valid hello; the message says why."""


def encode_frame(payload: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The frame carrying ``payload``; FramingError if it exceeds ``max_frame_size``."""
    if len(payload) > max_frame_size:
        raise FramingError(f"frame of {len(payload)} bytes exceeds the limit of {max_frame_size}")
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


class FrameDecoder:
    """Sans-IO decoder: :meth:`feed` chunks, get complete frames, :meth:`eof` at the end."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 <= max_frame_size < 2 ** (8 * HEADER_SIZE):
            raise ValueError(f"max_frame_size must be in [0, 2**32), got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._failed: FramingError | None = None
        self._next_limit: tuple[int, str] | None = None

    def limit_next(self, limit: int, what: str = "frame") -> None:
        """Hold the next frame (only that one) to ``limit`` bytes; ``what`` names it in the error."""
        if not 0 <= limit <= self.max_frame_size:
            raise ValueError(f"limit must be in [0, {self.max_frame_size}], got {limit}")
        self._next_limit = (limit, what)

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data``; return the frames it completes (possibly none)."""
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        frames: list[bytes] = []
        buf = self._buffer
        start = 0
        while len(buf) - start >= HEADER_SIZE:
            length = int.from_bytes(buf[start : start + HEADER_SIZE], "big")
            limit, what = self._next_limit or (self.max_frame_size, "frame")
            if length > limit:
                self._failed = FramingError(f"{what} length {length} exceeds the limit of {limit} bytes")
                del buf[:]
                raise self._failed
            end = start + HEADER_SIZE + length
            if len(buf) < end:
                break
            with memoryview(buf) as view:  # one copy of the payload, not two
                frames.append(bytes(view[start + HEADER_SIZE : end]))
            self._next_limit = None
            start = end
        if start:
            del buf[:start]
        return frames

    def eof(self) -> None:
        """The stream ended: FramingError if it ended inside a frame."""
        if self._failed is not None:
            raise self._failed
        if self._buffer:
            if len(self._buffer) < HEADER_SIZE:
                what = f"inside a frame header ({len(self._buffer)} of {HEADER_SIZE} bytes)"
            else:
                length = int.from_bytes(self._buffer[:HEADER_SIZE], "big")
                got = len(self._buffer) - HEADER_SIZE
                what = f"inside a frame ({got} of {length} payload bytes)"
            raise FramingError(f"truncated at EOF: stream ended {what}")


class FrameStream:
    """Frames over a trio stream: :meth:`send_frame`, :meth:`receive_frame` (None at EOF)."""

    def __init__(self, stream: trio.abc.Stream, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.stream = stream
        self.max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size)
        self._ready: deque[bytes] = deque()
        self._eof = False

    async def send_frame(self, payload: bytes) -> None:
        await self.stream.send_all(encode_frame(payload, self.max_frame_size))

    async def send_frames(self, payloads: list[bytes]) -> None:
        """Several frames in one write (one system call, one TLS record when they fit)."""
        await self.stream.send_all(b"".join(encode_frame(p, self.max_frame_size) for p in payloads))

    async def receive_frame(self, max_size: int | None = None, what: str = "frame") -> bytes | None:
        """The next frame, or None on a clean EOF; FramingError on a bad stream.

        With ``max_size``, a longer frame is refused as soon as its header arrives (``what``
        names it in the error); the bound applies to this frame only.
        """
        if max_size is not None:
            if self._ready:  # already complete: it was held to the stream's bound only
                if len(self._ready[0]) > max_size:
                    raise FramingError(
                        f"{what} length {len(self._ready[0])} exceeds the limit of {max_size} bytes"
                    )
            else:
                self._decoder.limit_next(min(max_size, self.max_frame_size), what)
        while not self._ready:
            if self._eof:
                return None
            data = await self.stream.receive_some(_RECEIVE_CHUNK)
            if not data:
                self._eof = True
                self._decoder.eof()
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()


@dataclass(frozen=True)
class Hello:
    """The first frame on a connection: who the sender claims to be, and its period."""

    server: int
    period: int
    version: int = HELLO_VERSION

    def encode(self) -> bytes:
        return encoding.encode({"v": self.version, "server": self.server, "period": self.period})

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        """Parse a hello; HelloError naming the problem otherwise."""
        try:
            obj = encoding.decode(data, max_size=MAX_HELLO_SIZE, what="hello")
            f = encoding.expect_map(obj, {"v": int, "server": int, "period": int}, "hello")
        except DecodeError as exc:
            raise HelloError(str(exc)) from None
        if f["v"] != HELLO_VERSION:
            raise HelloError(f"hello: unsupported version {f['v']} (we speak {HELLO_VERSION})")
        if f["server"] < 1 or f["period"] < 0:
            raise HelloError(f"hello: invalid server {f['server']} or period {f['period']}")
        return cls(f["server"], f["period"], f["v"])
