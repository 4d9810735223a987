"""Syslog ingest: trio servers for UDP, TCP (plain or TLS) and RELP that append to the log.

Theory of operation
-------------------
Each server turns what arrives into entries (:func:`appliance.apps.log.syslog.receive`: the
raw bytes, the receive time, the transport, the peer, the parse result) and hands them to one
:class:`Batcher`, which groups the entries of every connection into batches of up to
``batch_entries`` entries or ``batch_delay`` seconds and appends each batch to a :class:`Sink`.
A sink's ``append(entries)`` returns only once the entries are durable; :class:`LocalSink` is
a :class:`~appliance.apps.log.tiles.TileLog` in a directory (replication to the other servers
comes later, behind the same interface). While one batch is being appended the next one
fills, so a slow disk costs latency, not throughput, until ``max_queued`` entries wait; then
the servers stop reading, which pushes back on TCP senders (UDP datagrams are then dropped by
the kernel, as for any UDP receiver).

* **UDP** (RFC 5426): one message per datagram (:func:`~appliance.apps.log.framing.datagram_frame`).
* **TCP** (RFC 6587) and **TLS** (RFC 5425, with an :class:`ssl.SSLContext` the caller gives):
  :class:`~appliance.apps.log.framing.StreamDeframer`, octet counting or LF framing per
  frame. Plain syslog over TCP has no acknowledgement: what the sender wrote is ours once the
  batch is durable, and a crash loses what was in flight, as with any syslog receiver.
* **RELP**: :class:`~appliance.apps.log.relp.RelpServer`. A reader task feeds the session and
  submits each message; a writer task waits, in order, until each message's batch is durable,
  acknowledges it and sends the responses. So ``200 OK`` means durable, and a message whose
  batch failed is never acknowledged (the connection is closed; the client resends it).

Limits (:class:`Limits`, all stated in docs/log.md): the message size (longer messages are cut
and flagged, never dropped), connections at a time, messages and bytes per second per
connection or, for UDP, per source address. Over the rate a stream is *throttled*: we read
more slowly and TCP's flow control slows the sender; nothing is lost. UDP cannot be slowed:
datagrams over a source's rate are dropped and counted, with a warning naming the source.
Every log line names the transport and the peer.

Servers run in the caller's nursery (``await nursery.start(server.serve_tcp, host, port)``
returns the bound port; ``sock=`` serves a socket bound earlier, e.g. port 514 bound as root
before privileges are dropped); the batcher too (``nursery.start(batcher.run)``). Cancelling the
nursery stops them; entries not yet in a finished append are then not stored (and, over RELP,
not acknowledged).

Stopping cleanly (``pst serve`` on SIGTERM): :meth:`IngestServer.close` stops accepting and
stops reading (only where a server *waits* for bytes, so everything already read is queued),
the RELP sessions acknowledge what becomes durable and then send ``serverclose``; the serve
tasks return once their connections are done; then :meth:`Batcher.close` appends what is
queued and returns.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from appliance.apps.log.errors import LogError
from appliance.apps.log.framing import Frame, StreamDeframer, datagram_frame
from appliance.apps.log.relp import (
    NEED_DATA,
    PAUSED,
    CloseRequested,
    ConnectionEnded,
    Message,
    Opened,
    ProtocolError,
    RelpServer,
)
from appliance.apps.log.syslog import MAX_MESSAGE_SIZE, receive
from appliance.apps.log.tiles import PosixStorage, TileLog

__all__ = [
    "Batch",
    "Batcher",
    "IngestServer",
    "IngestStats",
    "Limits",
    "LocalSink",
    "Sink",
    "SinkError",
    "bind_tcp",
    "bind_udp",
]

log = logging.getLogger("pst.log.ingest")

RECEIVE_CHUNK = 65536
#: The largest UDP payload (IPv4: 65,507; IPv6 without jumbograms: 65,527).
MAX_DATAGRAM = 65536
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
#: UDP sources whose rates are tracked at a time.
MAX_UDP_SOURCES = 4096


class Sink(Protocol):
    """Where batches of entries go; ``append`` returns the index of each entry, in order, once
    they are durable, and raises otherwise. (A local store gives consecutive indices; a
    replicated log may place the entries of one batch between other servers' entries.)"""

    async def append(self, entries: Sequence[bytes]) -> Sequence[int]: ...


class SinkError(LogError):
    """A batch was not made durable (the sink raised); its messages are not acknowledged."""


class LocalSink:
    """A :class:`TileLog` in ``directory``, appended in a worker thread so fsync never blocks trio.

    After a failed append the log is reopened for the next one (reopening tells what is durable).
    Reads (:meth:`read_entries`) take turns with appends, in a worker thread too.
    """

    def __init__(self, directory: Path, origin: str) -> None:
        self.directory = directory
        self.origin = origin
        self._log: TileLog | None = TileLog.open(PosixStorage(directory), origin)
        self._lock = trio.Lock()

    @property
    def log(self) -> TileLog:
        if self._log is None:
            self._log = TileLog.open(PosixStorage(self.directory), self.origin)
        return self._log

    @property
    def size(self) -> int:
        """The durable size (as of the last append or open)."""
        return self._log.size if self._log is not None else 0

    async def append(self, entries: Sequence[bytes]) -> Sequence[int]:
        async with self._lock:
            size = await trio.to_thread.run_sync(self._append, list(entries))
        return range(size - len(entries), size)

    def _append(self, entries: list[bytes]) -> int:
        tile_log = self.log
        try:
            return tile_log.append(entries)
        except BaseException:
            self._log = None
            raise

    async def read_entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)`` (ValueError beyond the durable size)."""
        async with self._lock:
            return await trio.to_thread.run_sync(lambda: self.log.read_entries(start, end))


@dataclass
class Limits:
    """What one server accepts; every limit is stated in docs/log.md."""

    #: Longer messages keep their first octets and are flagged truncated.
    max_message_size: int = MAX_MESSAGE_SIZE
    #: TCP, TLS and RELP connections at a time (per server); more are closed at once.
    max_connections: int = 1024
    #: Per connection, or per source address for UDP; over it, streams are slowed, datagrams dropped.
    messages_per_second: float = 100_000.0
    bytes_per_second: float = 64 * 1024 * 1024
    #: How much of a second's allowance may come at once.
    burst_seconds: float = 1.0
    #: A connection silent this long is closed.
    idle_timeout: float = 3600.0
    tls_handshake_timeout: float = 10.0
    #: RELP messages received and not yet acknowledged before we stop reading (per session). A
    #: RELP message is acknowledged once its slot is decided and applied, so a session carries at
    #: most this many per slot round trip: librelp's 128 held rsyslog to ~1,000/s per connection.
    #: The batcher's queue (``max_queued``) bounds what all sessions together hold.
    relp_window: int = 1024


@dataclass
class IngestStats:
    """Counters for the status page and /metrics."""

    entries: int = 0
    unparsed: int = 0
    truncated: int = 0
    framing_errors: int = 0
    relp_errors: int = 0
    udp_dropped: int = 0
    connections: int = 0
    refused_connections: int = 0
    throttled: int = 0


# --- Batching ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Batch:
    """Entries appended together; :meth:`durable` returns once they are, or raises SinkError."""

    entries: list[bytes] = field(default_factory=list)
    first: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    #: Each entry's index in the log (set when the batch is durable).
    indices: Sequence[int] = ()

    async def durable(self) -> None:
        await self.done.wait()
        if self.error is not None:
            raise SinkError(self.error)


class Batcher:
    """Gathers entries from every connection and appends them to the sink in batches."""

    def __init__(
        self, sink: Sink, *, batch_entries: int = 1024, batch_delay: float = 0.010, max_queued: int = 16384
    ) -> None:
        if batch_entries < 1 or batch_delay < 0 or max_queued < batch_entries:
            raise ValueError("batch_entries >= 1, batch_delay >= 0 and max_queued >= batch_entries")
        self.sink = sink
        self.batch_entries = batch_entries
        self.batch_delay = batch_delay
        self.max_queued = max_queued
        self.batches = 0
        self.appended = 0
        self.failures = 0
        self._current = Batch()
        self._arrived = trio.Event()
        self._full = trio.Event()
        self._swapped = trio.Event()
        self._closed = False
        self._hurry = False
        self._stopped = trio.Event()

    @property
    def queued(self) -> int:
        """Entries waiting for the next append."""
        return len(self._current.entries)

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, entries: Sequence[bytes]) -> Batch:
        """Queue entries (waiting while ``max_queued`` are queued); returns their batch.

        After :meth:`close`, raises :class:`SinkError` (nothing is queued)."""
        return (await self._queue(entries))[0]

    async def append(self, entries: Sequence[bytes]) -> list[int]:
        """Queue entries and wait until they are durable; the index of each. Raises
        :class:`SinkError` if their batch failed."""
        batch, offset = await self._queue(entries)
        await batch.durable()
        return list(batch.indices[offset : offset + len(entries)])

    async def _queue(self, entries: Sequence[bytes]) -> tuple[Batch, int]:
        while len(self._current.entries) >= self.max_queued and not self._closed:
            await self._swapped.wait()
        if self._closed:
            raise SinkError("the log is stopping: entries are no longer taken")
        batch = self._current
        if not batch.entries:
            batch.first = trio.current_time()
        offset = len(batch.entries)
        batch.entries.extend(entries)
        self._arrived.set()
        if len(batch.entries) >= self.batch_entries:
            self._full.set()
        return batch, offset

    def hurry(self) -> None:
        """Append from now on without waiting ``batch_delay`` (the servers are stopping and
        their connections wait for what they submitted)."""
        self._hurry = True
        self._full.set()

    async def close(self) -> None:
        """Take no more entries; return once every queued one is appended (or its batch failed)."""
        self._closed = self._hurry = True
        self._arrived.set()
        self._full.set()
        self._swapped.set()
        await self._stopped.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Append batches until cancelled, or until :meth:`close` and the queue is empty."""
        task_status.started()
        try:
            while True:
                if not self._current.entries:
                    if self._closed:
                        return
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                    continue
                batch = self._current
                if len(batch.entries) < self.batch_entries and not self._hurry:
                    self._full = trio.Event()
                    with trio.move_on_at(batch.first + self.batch_delay):
                        await self._full.wait()
                self._current = Batch()
                self._swapped.set()
                self._swapped = trio.Event()
                try:
                    indices = await self.sink.append(batch.entries)
                    if len(indices) != len(batch.entries):
                        raise SinkError(
                            f"the sink gave {len(indices)} indices for {len(batch.entries)} entries"
                        )
                    batch.indices = indices
                except Exception as exc:
                    self.failures += 1
                    batch.error = f"the log could not store {len(batch.entries)} entries: {exc}"
                    log.error("%s", batch.error)
                else:
                    self.batches += 1
                    self.appended += len(batch.entries)
                batch.done.set()
        finally:
            self._stopped.set()


# --- Rate limits -----------------------------------------------------------------------------------


class _Bucket:
    """A token bucket: ``rate`` per second, up to ``rate * burst`` at once."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * burst)
        self.tokens = self.capacity
        self.last = now

    def take(self, amount: float, now: float) -> float:
        """Spend ``amount``; the seconds to wait before the balance is back to zero (0 if none)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _RateLimit:
    def __init__(self, limits: Limits, now: float) -> None:
        self.messages = _Bucket(limits.messages_per_second, limits.burst_seconds, now)
        self.bytes = _Bucket(limits.bytes_per_second, limits.burst_seconds, now)

    def take(self, messages: int, octets: int, now: float) -> float:
        return max(self.messages.take(messages, now), self.bytes.take(octets, now))


# --- Servers ---------------------------------------------------------------------------------------


def format_peer(address: object) -> str:
    """``ip:port``, ``[ipv6]:port``; anything else as text."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)[:100]


def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket bound to ``host:port`` (before trio, e.g. as root for port 514)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with contextlib.suppress(OSError):  # a larger buffer only if the system allows it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on ``host:port`` (``SO_REUSEADDR``, as trio's listeners)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _now_us() -> int:
    return time.time_ns() // 1000


class IngestServer:
    """The syslog servers of one appliance server, feeding one :class:`Batcher`."""

    def __init__(
        self, batcher: Batcher, limits: Limits | None = None, *, clock: Callable[[], int] = _now_us
    ) -> None:
        self.batcher = batcher
        self.limits = limits or Limits()
        self.clock = clock
        self.stats = IngestStats()
        #: Set by :meth:`close`: no more accepting or reading.
        self.closing = False
        self._waits: set[trio.CancelScope] = set()

    def close(self) -> None:
        """Stop accepting connections and reading from every connection and UDP socket.

        Only the waits for the network are cancelled: what was read is queued all the same,
        RELP sessions acknowledge what becomes durable and end with ``serverclose``, and each
        serve task returns once its connections are done."""
        self.closing = True
        for scope in list(self._waits):
            scope.cancel()

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[trio.CancelScope]:
        """A wait for the network that :meth:`close` cancels (check ``closing`` afterwards)."""
        with trio.CancelScope() as scope:
            if self.closing:
                scope.cancel()
            self._waits.add(scope)
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    def _entries(self, frames: Sequence[Frame], transport: str, peer: str) -> list[bytes]:
        entries = []
        now = self.clock()
        for frame in frames:
            entry = receive(frame.data, received=now, transport=transport, peer=peer, size=frame.size)
            self.stats.unparsed += entry.unparsed
            self.stats.truncated += entry.truncated
            entries.append(entry.encode())
        self.stats.entries += len(entries)
        return entries

    # --- UDP ---

    async def serve_udp(
        self,
        host: str,
        port: int,
        *,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Syslog over UDP on ``host:port`` (or on ``sock``, bound already: see
        :func:`bind_udp`); ``task_status.started`` gets the bound port."""
        udp = trio.socket.from_stdlib_socket(sock if sock is not None else bind_udp(host, port))
        with udp:
            bound = udp.getsockname()[1]
            log.info("syslog udp listening on %s", format_peer((host, bound)))
            task_status.started(bound)
            sources: dict[str, _RateLimit] = {}
            warned: dict[str, float] = {}
            while True:
                with self._waiting():
                    data, address = await udp.recvfrom(MAX_DATAGRAM)
                if self.closing:
                    log.info("syslog udp %s: stopped", format_peer((host, bound)))
                    return
                frame = datagram_frame(data, self.limits.max_message_size)
                if frame is None:
                    continue
                now = trio.current_time()
                source = str(address[0])
                limit = sources.get(source)
                if limit is None:
                    if len(sources) >= MAX_UDP_SOURCES:  # forget them all rather than grow without bound
                        sources.clear()
                        warned.clear()
                    limit = sources[source] = _RateLimit(self.limits, now)
                if limit.take(1, len(data), now) > 0:
                    self.stats.udp_dropped += 1
                    if now - warned.get(source, -math.inf) >= 10.0:
                        warned[source] = now
                        log.warning(
                            "syslog udp %s: over %g messages or %g bytes per second, dropping datagrams",
                            source,
                            self.limits.messages_per_second,
                            self.limits.bytes_per_second,
                        )
                    continue
                await self.batcher.submit(self._entries([frame], "udp", format_peer(address)))

    # --- TCP, TLS, RELP ---

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Syslog over TCP (RFC 6587), or TLS (RFC 5425) with ``ssl_context``; on ``sock`` if
        given (listening already: see :func:`bind_tcp`)."""
        transport = "tls" if ssl_context else "tcp"
        await self._serve_stream(host, port, transport, ssl_context, self._syslog_stream, sock, task_status)

    async def serve_relp(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """RELP, plain or over TLS with ``ssl_context``; on ``sock`` if given."""
        transport = "relp-tls" if ssl_context else "relp"
        await self._serve_stream(host, port, transport, ssl_context, self._relp_stream, sock, task_status)

    async def _serve_stream(
        self,
        host: str,
        port: int,
        transport: str,
        ssl_context: ssl.SSLContext | None,
        handler: Callable[[trio.abc.Stream, str, str], Awaitable[None]],
        sock: socket.socket | None,
        task_status: trio.TaskStatus[int],
    ) -> None:
        if sock is not None:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        where = format_peer((host, bound))
        log.info("syslog %s listening on %s", transport, where)
        task_status.started(bound)
        try:
            async with trio.open_nursery() as connections:
                serve = functools.partial(
                    self._connection, transport=transport, ssl_context=ssl_context, handler=handler
                )
                for listener in listeners:
                    connections.start_soon(self._accept, listener, transport, serve, connections)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
        log.info("syslog %s %s: stopped", transport, where)

    async def _accept(
        self,
        listener: trio.SocketListener,
        transport: str,
        serve: Callable[[trio.SocketStream], Awaitable[None]],
        connections: trio.Nursery,
    ) -> None:
        """Accept until :meth:`close`; ``serve`` each connection in ``connections`` (which
        outlives this task)."""
        while not self.closing:
            stream: trio.SocketStream | None = None
            with self._waiting():
                try:
                    stream = await listener.accept()
                except OSError as exc:  # out of descriptors or memory: wait, as trio.serve_listeners
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                        raise
                    log.error("syslog %s: cannot accept a connection (%s), retrying in 0.1 s", transport, exc)
                    await trio.sleep(0.1)
            if stream is not None:
                connections.start_soon(serve, stream)

    async def _connection(
        self,
        stream: trio.SocketStream,
        transport: str,
        ssl_context: ssl.SSLContext | None,
        handler: Callable[[trio.abc.Stream, str, str], Awaitable[None]],
    ) -> None:
        try:
            peer = format_peer(stream.socket.getpeername())
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        if self.stats.connections >= self.limits.max_connections:
            self.stats.refused_connections += 1
            log.warning(
                "syslog %s %s: refused, %d connections already", transport, peer, self.stats.connections
            )
            await trio.aclose_forcefully(stream)
            return
        self.stats.connections += 1
        conn: trio.abc.Stream = stream
        try:
            if ssl_context is not None:
                tls = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
                conn = tls
                with self._waiting(), trio.move_on_after(self.limits.tls_handshake_timeout) as scope:
                    try:
                        await tls.do_handshake()
                    except trio.BrokenResourceError as exc:
                        log.warning(
                            "syslog %s %s: TLS handshake failed: %s", transport, peer, exc.__cause__ or exc
                        )
                        return
                if self.closing:
                    return
                if scope.cancelled_caught:
                    timeout = self.limits.tls_handshake_timeout
                    log.warning("syslog %s %s: no TLS handshake within %gs", transport, peer, timeout)
                    return
            await handler(conn, transport, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            log.info("syslog %s %s: connection lost (%s)", transport, peer, cause)
        finally:
            self.stats.connections -= 1
            await trio.aclose_forcefully(conn)

    async def _receive(self, stream: trio.abc.Stream, transport: str, peer: str) -> bytes | None:
        """The next chunk (``b""`` at the end), or None after ``idle_timeout`` of silence or
        once :meth:`close` was called."""
        with self._waiting(), trio.move_on_after(self.limits.idle_timeout):
            return bytes(await stream.receive_some(RECEIVE_CHUNK))
        if self.closing:
            log.info("syslog %s %s: closing, the server stops", transport, peer)
        else:
            log.info("syslog %s %s: idle for %gs, closing", transport, peer, self.limits.idle_timeout)
        return None

    async def _throttle(
        self, limit: _RateLimit, messages: int, octets: int, transport: str, peer: str
    ) -> None:
        wait = limit.take(messages, octets, trio.current_time())
        if wait > 0:
            self.stats.throttled += 1
            log.debug("syslog %s %s: over the rate limit, reading %.3fs later", transport, peer, wait)
            await trio.sleep(wait)

    async def _syslog_stream(self, stream: trio.abc.Stream, transport: str, peer: str) -> None:
        deframer = StreamDeframer(self.limits.max_message_size)
        limit = _RateLimit(self.limits, trio.current_time())
        log.info("syslog %s %s: connected", transport, peer)
        errors = 0
        while True:
            data = await self._receive(stream, transport, peer)
            if data is None:
                return
            frames = deframer.feed(data) if data else deframer.eof()
            if deframer.framing_errors > errors:
                self.stats.framing_errors += deframer.framing_errors - errors
                errors = deframer.framing_errors
                log.warning(
                    "syslog %s %s: a malformed octet count, read as an LF-framed message", transport, peer
                )
            await self._throttle(limit, len(frames), len(data), transport, peer)
            if frames:
                await self.batcher.submit(self._entries(frames, transport, peer))
            if not data:
                log.info("syslog %s %s: closed by the peer", transport, peer)
                return

    async def _relp_stream(self, stream: trio.abc.Stream, transport: str, peer: str) -> None:
        session = RelpServer(window=self.limits.relp_window, max_message_size=self.limits.max_message_size)
        work_send, work_receive = trio.open_memory_channel[tuple[Batch | None, int]](math.inf)
        acknowledged = trio.lowlevel.ParkingLot()

        async def flush() -> None:
            data = session.data_to_send()
            if data:
                await stream.send_all(data)

        async def end() -> None:
            if self.closing:  # the server stops: serverclose after the last acknowledgement
                session.server_close()
                log.info("syslog %s %s: sent serverclose, the server stops", transport, peer)
            await flush()

        async def writer() -> None:
            """Acknowledge each message once its batch is durable, in order; send the responses,
            several at once when several are ready."""
            async with work_receive:
                while True:
                    try:
                        batch, txnr = work_receive.receive_nowait()
                    except trio.WouldBlock:
                        await flush()
                        if session.done:
                            return
                        try:
                            batch, txnr = await work_receive.receive()
                        except trio.EndOfChannel:
                            await end()
                            return
                    except trio.EndOfChannel:
                        await end()
                        return
                    if batch is not None:
                        if not batch.done.is_set():
                            await flush()
                        await batch.durable()
                        session.acknowledge(txnr)
                        acknowledged.unpark_all()

        async def reader() -> None:
            """Feed the session; submit each message and queue its acknowledgement for the writer."""
            limit = _RateLimit(self.limits, trio.current_time())
            async with work_send:
                while True:
                    event = session.next_event()
                    if event is NEED_DATA:
                        data = await self._receive(stream, transport, peer)
                        if data is None:
                            return
                        session.receive_data(data)
                        await self._throttle(limit, 0, len(data), transport, peer)
                    elif event is PAUSED:
                        with self._waiting():
                            await acknowledged.park()
                        if self.closing:
                            return
                    elif isinstance(event, Message):
                        await self._throttle(limit, 1, 0, transport, peer)
                        entries = self._entries([Frame(event.data, event.size)], transport, peer)
                        await work_send.send((await self.batcher.submit(entries), event.txnr))
                    elif isinstance(event, Opened):
                        software = ",".join(event.offers.get("relp_software", [])[:2]) or "unknown software"
                        log.info("syslog %s %s: session opened by %s", transport, peer, software)
                        await work_send.send((None, 0))
                    elif isinstance(event, CloseRequested):
                        log.info("syslog %s %s: session closed by the peer", transport, peer)
                        await work_send.send((None, 0))
                        return
                    elif isinstance(event, ProtocolError):
                        self.stats.relp_errors += 1
                        log.warning("syslog %s %s: %s; answered 500, closing", transport, peer, event.reason)
                        await work_send.send((None, 0))
                        return
                    else:
                        assert isinstance(event, ConnectionEnded)
                        how = "" if event.clean else " inside a frame"
                        log.info("syslog %s %s: closed by the peer%s", transport, peer, how)
                        return

        async def guarded(task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
            # A lost connection or a failed append ends both tasks (and the connection), nothing more.
            try:
                await task()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("syslog %s %s: connection lost (%s)", transport, peer, exc.__cause__ or exc)
                scope.cancel()
            except SinkError as exc:
                log.error("syslog %s %s: closing without acknowledging: %s", transport, peer, exc)
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, writer, nursery.cancel_scope)
            await guarded(reader, nursery.cancel_scope)
