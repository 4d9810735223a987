"""PeerNetwork: authenticated frame delivery between the n servers, one period at a time.

Theory of operation. Every server listens on its port and dials every other server, so each
ordered pair (i, j) has its own connection, opened by i and used only for i's frames to j;
no tie-breaking is ever needed. A connection is usable once

1. the TLS 1.3 handshake succeeded with both sides' period certificates (the trust anchors
   are the period's KeyTable keys, see :mod:`appliance.net._tls`),
2. the dialer sent its hello, the acceptor checked that the dialer's certificate key is the
   table key of the server the hello claims, and answered with its own hello,
3. the dialer checked the answer the same way (and that it came from the server it dialed).

Any failure closes the connection and is logged with a reason naming the peer (its claimed
id, or its address when it never got that far); refusals of a peer's identity or framing
are also kept in :attr:`PeerNetwork.rejections`.

Sending never blocks: :meth:`PeerNetwork.send` puts the frame in the peer's bounded queue,
drained by that peer's dial loop, or drops it with a logged reason when the peer is
unreachable or its queue is full (the protocols tolerate the loss of faulty servers' messages).
Received frames go to the ``on_frame`` callback, or else to :attr:`PeerNetwork.incoming` as
``(peer_id, payload)``; delivery is awaited, so a slow consumer slows the senders down
through TCP instead of growing memory.

:meth:`PeerNetwork.rekey` installs the next period's credentials, forgets the previous ones,
closes every connection (all were authenticated with the old keys) and lets the dial loops
reconnect at once with the new certificates. Every task runs in a nursery the object owns
inside :meth:`PeerNetwork.run` (``async with PeerNetwork(...) as net`` starts it in a nursery of
its own); :meth:`PeerNetwork.aclose` cancels it and waits for the end.
"""

from __future__ import annotations

import enum
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.net._framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameStream,
    FramingError,
    Hello,
    HelloError,
)
from appliance.net._tls import PeerCertificateError, check_peer, client_context, server_context, server_name

log = logging.getLogger("appliance.net")

#: ``send(EVERYONE, data)`` goes to every other server (as in appliance.protocols._core).
EVERYONE = 0

FrameHandler = Callable[[int, bytes], Awaitable[None]]


class PeerState(enum.Enum):
    CONNECTING = "connecting"  # first attempt of this period under way: frames are queued
    UP = "up"  # authenticated connection open: frames are queued and sent
    DOWN = "down"  # last attempt failed: frames are dropped until a connection is up


@dataclass(frozen=True)
class Rejection:
    """A refused connection: remote address, the server it claimed or was dialed as, why."""

    address: str
    server: int | None
    reason: str
    direction: str  # "incoming" or "outgoing"


@dataclass(frozen=True)
class ConnectionInfo:
    """What an authenticated outgoing connection negotiated."""

    server: int
    period: int
    tls_version: str
    cipher: str


class _Rejected(Exception):
    def __init__(self, server: int | None, reason: str) -> None:
        super().__init__(reason)
        self.server = server
        self.reason = reason


@dataclass(eq=False)
class _Credentials:
    """One period's TLS contexts and key table (the seed itself is not kept)."""

    period: int
    keys: dict[int, bytes]
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext

    @classmethod
    def build(cls, me: int, period: int, keys: Mapping[int, bytes], seed: bytes) -> _Credentials:
        if period < 0:
            raise ValueError(f"period must be non-negative, got {period}")
        if len(seed) != 32:
            raise ValueError("the period signing seed must have 32 bytes")
        table = {int(i): bytes(k) for i, k in keys.items()}
        for i, k in table.items():
            if len(k) != 32:
                raise ValueError(f"server {i}: an Ed25519 public key has 32 bytes, got {len(k)}")
        own = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        if table.get(me) != own:
            raise ValueError(
                f"server {me}: our seed's public key is not our entry of period {period}'s table"
            )
        return cls(
            period,
            table,
            server_context(me, period, seed, table),
            client_context(me, period, seed, table),
        )


@dataclass(eq=False)
class _Conn:
    server: int | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(eq=False)
class _Peer:
    server: int
    host: str
    port: int
    queue_size: int
    state: PeerState = PeerState.CONNECTING
    last_error: str = "not connected yet"
    info: ConnectionInfo | None = None
    dropped: int = 0
    drop_warned: bool = False

    def __post_init__(self) -> None:
        self.queue_in, self.queue_out = trio.open_memory_channel[bytes](self.queue_size)

    def flush(self) -> int:
        n = 0
        while True:
            try:
                self.queue_out.receive_nowait()
            except trio.WouldBlock:
                return n
            n += 1


def _describe(exc: BaseException) -> str:
    """A short reason for a transport failure (the TLS error when there is one)."""
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, trio.BrokenResourceError):
        return "connection broken"
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "<unknown address>"
    return f"{host}:{port}"


_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


class PeerNetwork:
    """Authenticated, encrypted frame delivery between server ``me`` and its peers.

    ``addresses`` maps every server id (ours included) to (host, port); ``keys`` maps server
    ids to their period Ed25519 public keys (the KeyTable's ``verify_key``); ``seed`` is our
    period signing seed. Use ``async with PeerNetwork(...) as net``, or
    ``await nursery.start(net.run)`` and later :meth:`aclose`.
    """

    def __init__(
        self,
        me: int,
        addresses: Mapping[int, tuple[str, int]],
        period: int,
        keys: Mapping[int, bytes],
        seed: bytes,
        *,
        on_frame: FrameHandler | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        queue_size: int = 256,
        incoming_buffer: int = 1024,
        handshake_timeout: float = 5.0,
        send_timeout: float = 10.0,
        backoff_min: float = 0.05,
        backoff_max: float = 5.0,
        max_pending_handshakes: int = 64,
    ) -> None:
        if me not in addresses:
            raise ValueError(f"server {me} has no address")
        if me == EVERYONE or any(i < 1 for i in addresses):
            raise ValueError("server ids must be positive")
        self.me = me
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_pending_handshakes = max_pending_handshakes
        self._host, self._port = addresses[me]
        self._peers = {
            i: _Peer(i, host, port, queue_size) for i, (host, port) in sorted(addresses.items()) if i != me
        }
        self._creds = _Credentials.build(me, period, keys, seed)
        self._on_frame = on_frame
        self._incoming_send, self.incoming = trio.open_memory_channel[tuple[int, bytes]](incoming_buffer)
        #: The last refused connections (most recent last), for alerts and tests.
        self.rejections: deque[Rejection] = deque(maxlen=256)
        self.listen_port: int | None = None
        self._conns: set[_Conn] = set()
        self._incoming_by_peer: dict[int, _Conn] = {}
        self._pending = 0
        self._rekeyed = trio.Event()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._closed = False
        self._stopped = trio.Event()
        self._context: AbstractAsyncContextManager[PeerNetwork]

    # -- public API -------------------------------------------------------------------------

    @property
    def period(self) -> int:
        return self._creds.period

    @property
    def peers(self) -> tuple[int, ...]:
        return tuple(self._peers)

    def state(self, server: int) -> PeerState:
        return self._peer(server).state

    def connected_peers(self) -> frozenset[int]:
        """Peers to which we hold an authenticated outgoing connection."""
        return frozenset(i for i, p in self._peers.items() if p.state is PeerState.UP)

    def incoming_peers(self) -> frozenset[int]:
        """Peers that hold an authenticated connection to us."""
        return frozenset(self._incoming_by_peer)

    def connection_info(self, server: int) -> ConnectionInfo | None:
        peer = self._peer(server)
        return peer.info if peer.state is PeerState.UP else None

    def dropped(self, server: int) -> int:
        """How many frames to ``server`` were dropped so far."""
        return self._peer(server).dropped

    async def wait_connected(self, servers: Iterable[int] | None = None, *, incoming: bool = True) -> None:
        """Wait until we have outgoing (and, if ``incoming``, incoming) connections with ``servers``."""
        want = frozenset(self._peers if servers is None else servers)
        while not (want <= self.connected_peers() and (not incoming or want <= self.incoming_peers())):
            await self._changed.wait()

    def send(self, to: int, data: bytes) -> None:
        """Queue ``data`` for server ``to`` (EVERYONE: every peer); never blocks.

        Frames to an unreachable peer, or beyond its queue's capacity, are dropped with a
        logged reason. Sending more than ``max_frame_size`` bytes is our bug: ValueError.
        """
        if len(data) > self.max_frame_size:
            raise ValueError(f"frame of {len(data)} bytes exceeds the limit of {self.max_frame_size}")
        if to == EVERYONE:
            for peer in self._peers.values():
                self._enqueue(peer, data)
        elif to == self.me:
            raise ValueError(f"server {to} is ourselves")
        else:
            self._enqueue(self._peer(to), data)

    def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None:
        """Switch to ``period``'s keys; close every connection made with the previous ones."""
        if period <= self._creds.period:
            raise ValueError(f"rekey to period {period}: we are already in period {self._creds.period}")
        self._creds = _Credentials.build(self.me, period, keys, seed)  # old contexts dropped
        closing = len(self._conns)
        for conn in list(self._conns):
            conn.scope.cancel()
        for peer in self._peers.values():
            if peer.server in self._creds.keys:
                peer.state = PeerState.CONNECTING
            peer.info = None
        rekeyed, self._rekeyed = self._rekeyed, trio.Event()
        rekeyed.set()
        self._notify()
        log.info(
            "server %d: now in period %d (%d keys); closing %d connections of the previous period",
            self.me,
            period,
            len(self._creds.keys),
            closing,
        )

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and dial until :meth:`aclose`; ``nursery.start`` returns the listening port."""
        if self._running or self._closed:
            raise RuntimeError("a PeerNetwork runs once")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                listeners = await trio.open_tcp_listeners(self._port, host=self._host)
                self.listen_port = int(listeners[0].socket.getsockname()[1])
                await nursery.start(trio.serve_listeners, self._handle_incoming, listeners)
                for peer in self._peers.values():
                    nursery.start_soon(self._dial_loop, peer)
                log.info("server %d: listening on %s:%d", self.me, self._host, self.listen_port)
                task_status.started(self.listen_port)
        finally:
            self._nursery = None
            self._closed = True
            self._incoming_send.close()
            self._stopped.set()

    async def __aenter__(self) -> PeerNetwork:
        """``async with PeerNetwork(...) as net``: run in a nursery of our own until the block ends."""
        self._context = self._serving()
        return await self._context.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._context.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[PeerNetwork]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                await self.aclose()

    async def aclose(self) -> None:
        """Stop every task and close every connection; idempotent."""
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if self._running:
            await self._stopped.wait()
        self._incoming_send.close()

    # -- internals --------------------------------------------------------------------------

    def _peer(self, server: int) -> _Peer:
        try:
            return self._peers[server]
        except KeyError:
            raise ValueError(f"unknown server {server}") from None

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _enqueue(self, peer: _Peer, data: bytes) -> None:
        if self._closed:
            self._drop(peer, "the network is closed")
        elif peer.state is PeerState.DOWN:
            self._drop(peer, f"unreachable ({peer.last_error})")
        else:
            try:
                peer.queue_in.send_nowait(data)
            except trio.WouldBlock:
                self._drop(peer, f"its send queue is full ({peer.queue_size} frames)")

    def _drop(self, peer: _Peer, reason: str) -> None:
        peer.dropped += 1
        level = logging.DEBUG if peer.drop_warned else logging.WARNING
        peer.drop_warned = True
        log.log(level, "server %d: dropped a frame to server %d: %s", self.me, peer.server, reason)

    def _set_state(self, peer: _Peer, state: PeerState, reason: str = "") -> None:
        if state is PeerState.DOWN:
            flushed = peer.flush()
            peer.dropped += flushed
            if peer.state is not PeerState.DOWN or flushed:
                log.info(
                    "server %d: server %d unreachable: %s%s",
                    self.me,
                    peer.server,
                    reason,
                    f" ({flushed} queued frames dropped)" if flushed else "",
                )
            peer.last_error = reason
            peer.info = None
        elif state is PeerState.UP:
            peer.drop_warned = False
        if peer.state is not state:
            peer.state = state
            self._notify()

    def _reject(self, direction: str, address: str, server: int | None, reason: str) -> None:
        self.rejections.append(Rejection(address, server, reason, direction))
        who = f"server {server} at {address}" if server is not None else address
        if direction == "incoming":
            log.warning("server %d: rejected connection from %s: %s", self.me, who, reason)
        else:
            log.warning("server %d: connection to %s rejected: %s", self.me, who, reason)

    async def _deliver(self, server: int, data: bytes) -> None:
        if self._on_frame is not None:
            await self._on_frame(server, data)
        else:
            with suppress(trio.ClosedResourceError):
                await self._incoming_send.send((server, data))

    # dialing ------------------------------------------------------------------------------

    async def _dial_loop(self, peer: _Peer) -> None:
        backoff = self.backoff_min
        while True:
            creds, rekeyed = self._creds, self._rekeyed
            if peer.server not in creds.keys:
                self._set_state(peer, PeerState.DOWN, f"no key in period {creds.period}'s table")
                await rekeyed.wait()
                continue
            was_up, reason = await self._connect(peer, creds)
            if self._creds is not creds:  # rekeyed: reconnect at once with the new keys
                backoff = self.backoff_min
                continue
            self._set_state(peer, PeerState.DOWN, reason)
            if was_up:
                backoff = self.backoff_min
            with trio.move_on_after(backoff * random.uniform(0.5, 1.0)):
                await rekeyed.wait()
            backoff = self.backoff_min if rekeyed.is_set() else min(2 * backoff, self.backoff_max)

    async def _connect(self, peer: _Peer, creds: _Credentials) -> tuple[bool, str]:
        """One connection to ``peer``: (whether it got authenticated, why it ended)."""
        conn = _Conn(peer.server)
        self._conns.add(conn)
        address = f"{peer.host}:{peer.port}"
        stream: trio.SSLStream[trio.SocketStream] | None = None
        try:
            with conn.scope:
                try:
                    with trio.fail_after(self.handshake_timeout):
                        tcp = await trio.open_tcp_stream(peer.host, peer.port)
                        stream = trio.SSLStream(
                            tcp, creds.client_ctx, server_hostname=server_name(peer.server)
                        )
                        frames = FrameStream(stream, self.max_frame_size)
                        await stream.do_handshake()
                        await frames.send_frame(Hello(self.me, creds.period).encode())
                        first = await frames.receive_frame()
                        self._check_answer(peer.server, creds, stream, first)
                except trio.TooSlowError:
                    return False, f"no TLS handshake and hello within {self.handshake_timeout}s"
                except _Rejected as exc:
                    self._reject("outgoing", address, peer.server, exc.reason)
                    return False, exc.reason
                except (*_TRANSPORT_ERRORS, FramingError) as exc:
                    reason = _describe(exc)
                    if isinstance(exc.__cause__ or exc, ssl.SSLCertVerificationError):
                        self._reject("outgoing", address, peer.server, reason)
                    return False, reason
                peer.info = ConnectionInfo(
                    peer.server, creds.period, str(stream.version()), str((stream.cipher() or ("?",))[0])
                )
                self._set_state(peer, PeerState.UP)
                log.info(
                    "server %d: connected to server %d (%s)", self.me, peer.server, peer.info.tls_version
                )
                return True, await self._serve_outgoing(peer, frames)
            return False, "closed on rekey"
        finally:
            self._conns.discard(conn)
            if stream is not None:
                await trio.aclose_forcefully(stream)

    def _check_answer(
        self,
        server: int,
        creds: _Credentials,
        stream: trio.SSLStream[trio.SocketStream],
        first: bytes | None,
    ) -> None:
        if first is None:
            raise _Rejected(server, "closed the connection instead of answering our hello")
        try:
            hello = Hello.decode(first)
        except HelloError as exc:
            raise _Rejected(server, str(exc)) from None
        if hello.server != server:
            raise _Rejected(server, f"answered as server {hello.server}")
        if hello.period != creds.period:
            raise _Rejected(server, f"is in period {hello.period}, we are in period {creds.period}")
        try:
            check_peer(stream.getpeercert(binary_form=True), server, creds.period, creds.keys)
        except PeerCertificateError as exc:
            raise _Rejected(server, str(exc)) from None
        if stream.version() != "TLSv1.3":
            raise _Rejected(server, f"negotiated {stream.version()}, not TLSv1.3")

    async def _serve_outgoing(self, peer: _Peer, frames: FrameStream) -> str:
        """Send queued frames until the connection fails; return why it did."""
        ended: list[str] = []
        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                try:
                    while True:
                        data = await peer.queue_out.receive()
                        with trio.move_on_after(self.send_timeout) as timeout:
                            await frames.send_frame(data)
                        if timeout.cancelled_caught:
                            ended.append(f"sending stalled for {self.send_timeout}s")
                            break
                except (*_TRANSPORT_ERRORS, FramingError) as exc:
                    ended.append(_describe(exc))
                nursery.cancel_scope.cancel()

            async def watcher() -> None:
                # The acceptor never sends after its hello: data or EOF ends the connection.
                try:
                    frame = await frames.receive_frame()
                    ended.append(
                        "closed by the peer" if frame is None else "peer sent data on our connection"
                    )
                except (*_TRANSPORT_ERRORS, FramingError) as exc:
                    ended.append(_describe(exc))
                nursery.cancel_scope.cancel()

            nursery.start_soon(writer)
            nursery.start_soon(watcher)
        return ended[0] if ended else "closed"

    # accepting ----------------------------------------------------------------------------

    async def _handle_incoming(self, tcp: trio.SocketStream) -> None:
        address = _address(tcp)
        if self._pending >= self.max_pending_handshakes:
            log.warning("server %d: refused %s: too many handshakes in progress", self.me, address)
            await trio.aclose_forcefully(tcp)
            return
        creds = self._creds
        conn = _Conn(None)
        self._conns.add(conn)
        stream = trio.SSLStream(tcp, creds.server_ctx, server_side=True)
        try:
            with conn.scope:
                self._pending += 1
                try:
                    with trio.fail_after(self.handshake_timeout):
                        frames = FrameStream(stream, self.max_frame_size)
                        await stream.do_handshake()
                        server = self._check_hello(creds, stream, await frames.receive_frame())
                        await frames.send_frame(Hello(self.me, creds.period).encode())
                except trio.TooSlowError:
                    self._reject("incoming", address, None, "no TLS handshake and hello in time")
                    return
                except _Rejected as exc:
                    self._reject("incoming", address, exc.server, exc.reason)
                    return
                except (*_TRANSPORT_ERRORS, FramingError) as exc:
                    self._reject("incoming", address, None, f"before its hello: {_describe(exc)}")
                    return
                finally:
                    self._pending -= 1
                conn.server = server
                previous = self._incoming_by_peer.get(server)
                if previous is not None:
                    previous.scope.cancel()
                self._incoming_by_peer[server] = conn
                self._notify()
                log.info("server %d: accepted server %d from %s", self.me, server, address)
                await self._serve_incoming(server, address, frames)
        finally:
            self._conns.discard(conn)
            if conn.server is not None and self._incoming_by_peer.get(conn.server) is conn:
                del self._incoming_by_peer[conn.server]
                self._notify()
            await trio.aclose_forcefully(stream)

    def _check_hello(
        self, creds: _Credentials, stream: trio.SSLStream[trio.SocketStream], first: bytes | None
    ) -> int:
        if first is None:
            raise _Rejected(None, "closed the connection before its hello")
        try:
            hello = Hello.decode(first)
        except HelloError as exc:
            raise _Rejected(None, f"bad hello: {exc}") from None
        server = hello.server
        if server == self.me:
            raise _Rejected(server, "claims to be us")
        if server not in self._peers:
            raise _Rejected(server, "claims an unknown server id")
        if hello.period != creds.period:
            raise _Rejected(server, f"is in period {hello.period}, we are in period {creds.period}")
        try:
            check_peer(stream.getpeercert(binary_form=True), server, creds.period, creds.keys)
        except PeerCertificateError as exc:
            raise _Rejected(server, str(exc)) from None
        if stream.version() != "TLSv1.3":
            raise _Rejected(server, f"negotiated {stream.version()}, not TLSv1.3")
        return server

    async def _serve_incoming(self, server: int, address: str, frames: FrameStream) -> None:
        try:
            while True:
                frame = await frames.receive_frame()
                if frame is None:
                    log.info("server %d: server %d closed its connection", self.me, server)
                    return
                await self._deliver(server, frame)
        except FramingError as exc:
            self._reject("incoming", address, server, f"closing the connection: {exc}")
        except _TRANSPORT_ERRORS as exc:
            log.info("server %d: connection from server %d lost: %s", self.me, server, _describe(exc))
