"""PeerNetwork: frame delivery between the n servers, authenticated one period at a time.

Theory of operation. Every server listens on its port and dials every other server, so each
ordered pair (i, j) normally has its own connection, opened by i and used for i's frames to
j; no tie-breaking is ever needed. A connection is *authenticated* once

1. the TLS 1.3 handshake succeeded with both sides' period certificates (the trust anchors
   are the period's KeyTable keys, see :mod:`appliance.net._tls`),
2. the dialer sent its hello, the acceptor checked that the dialer's certificate key is the
   table key of the server the hello claims, and answered with its own hello,
3. the dialer checked the answer the same way (and that it came from the server it dialed).

Any failure closes the connection and is logged with a reason naming the peer (its claimed
id, or its address when it never got that far); refusals of a peer's identity or framing
are also kept in :attr:`PeerNetwork.rejections`.

Unauthenticated connections. A server that missed a refresh (it was down, or lost its data)
holds a stale period key or none, while the others moved on to the new period's keys; with
authenticated connections only it could never rejoin. The protocols do not need the
transport for their security: every protocol message is signed at the application layer
with period keys from a KeyTable certified by the group key, PushM data verifies itself, and
private data is sealed to the recipient's encryption key (:mod:`appliance.protocols.refresh`).
So the transport also carries frames over *unauthenticated* connections, and says so:

* A network created without keys (``keys=None, seed=None``: *recovering*) dials every peer
  with :func:`~appliance.net._tls.anonymous_client_context` (TLS 1.3, no certificate
  presented, the server's not verified) and listens with a throwaway certificate.
* A normal network whose authenticated dial to peer j fails for a reason of authentication
  (j's certificate does not verify or is not j's table key, j is in another period, or j
  closed the connection right after the handshake, which is how TLS 1.3 shows a dialer that
  its own certificate was refused) retries j at once anonymously, logging the reason at
  WARNING once per change of reason. Every later reconnect (after the usual backoff) tries
  the authenticated way first again; an anonymous outgoing connection is also closed and
  re-dialed as soon as j opens an authenticated connection to us (or at once, when j's
  authenticated connection came while we dialed), and no anonymous dial follows a failed one
  while j holds an authenticated connection to us (it carries our frames; the keys are tried
  again after the backoff). A rekey on either side
  closes every connection, so keys that match again are noticed at once.
* Period changes are routine, and logged so. The servers re-key a few milliseconds apart, so
  for a moment two of them hold different periods' keys: the one ahead falls back when it
  dials the one behind, refuses its aborted handshakes, and the one behind drops frames to
  the one ahead. While a period change is under way (``transition_grace`` seconds after our
  own rekey, or while the ``transition`` callback says so: ``pst serve`` passes the first
  seconds after each period boundary, when the refresh runs) these are logged at INFO; at
  any other time at WARNING. A fallback still under way after the change is logged at
  WARNING on its next attempt.
* The acceptor requests a client certificate with ``CERT_OPTIONAL``: a certificate that is
  presented must verify as before (or the handshake fails), but a client presenting none is
  admitted *unauthenticated* after its hello, which names the server it claims to be (its
  period is not checked), **only if the connection comes from that server's configured
  address**: its source IP must be the IP of the claimed id's entry in ``addresses`` (a host
  name is resolved, again after a minute; the port is the dialer's ephemeral one and is not
  compared, so servers sharing one IP, as on loopback, cannot be told apart by it). A claim
  from any other IP is refused with a rejection record naming the source and the claimed
  id. Its frames are delivered with that claimed id. So that peers see us at our configured
  address, we dial from the IP we listen on when that is a specific IP (not a wildcard or a
  name); a server whose connections reach its peers from another IP (a NAT that rewrites
  them, a second interface) can still connect authenticated, but not unauthenticated.

DoS bounds and rules: an unauthenticated connection never replaces an authenticated incoming
connection of the same claimed id (it is refused with a rejection record), at most one
unauthenticated incoming connection per claimed id is kept (a newer one replaces the older),
at most ``max_unauthenticated`` (default n) exist at once, and an authenticated incoming
connection closes the unauthenticated one of its id. Every frame is bounded by
``max_frame_size``, and the hello, read before anyone is known, by
:data:`~appliance.net._framing.MAX_HELLO_SIZE` (256 bytes): a longer one is refused from its
length header, before it is buffered or decoded, and the connection closed with a rejection
record. Handshakes in progress (TCP accepted, TLS and hello not done; each closed after
``handshake_timeout``) take slots: at most ``max_pending_handshakes`` (64) at once, at most
``max_handshakes_per_source`` (4) from one source IP (times the number of peers configured
at that IP, for servers sharing a host), and the peers' configured IPs keep
``min(max_pending_handshakes // 2, max_handshakes_per_source * (n - 1))`` of the slots for
themselves, which connections from any other IP cannot take. A connection beyond these is
closed at once. So idle TCP connections from elsewhere, from any number of addresses, cannot
keep a peer from connecting (ones from a peer's own IP can: that needs the peer's host or its
path, which the threat model gives the adversary anyway). Refused incoming connections are
logged at WARNING at most once per source IP and ``refusal_log_interval`` (10 s), with the
number not logged since that source's last line (the others at DEBUG);
:attr:`PeerNetwork.rejections` keeps every refusal after the TLS handshake began, but not the
connections refused a slot, which a flood would churn.
What an attacker gains from an unauthenticated connection, from a peer's IP, is what it has
anyway on the network: it may inject frames under that peer's id (the protocols verify the
signatures and drop them), read the frames sent to that id while we cannot dial the peer
ourselves (sealed or public anyway; see "Routing") and, by taking the one slot of an id,
disturb delivery to a server that is itself only reachable unauthenticated.
:meth:`PeerNetwork.is_authenticated`, :meth:`PeerNetwork.connections` and
:class:`ConnectionInfo` tell which connections are authenticated.

Routing. :meth:`PeerNetwork.send` puts the frame in the peer's bounded queue; it is drained
over the first of these that is open:

1. our outgoing connection to the peer, when it is authenticated;
2. the peer's authenticated incoming connection to us (it proved the peer's key as well as
   ours would; connections carry frames both ways and each side reads frames on the
   connections it opened too);
3. our unauthenticated outgoing connection (it reaches the peer's configured address);
4. the peer's unauthenticated incoming connection, and only while our own dial to the peer
   is ``DOWN`` (its last attempt failed): all that proves is the source IP, so it is the
   route only when nothing else exists. While our dial is still in progress (``CONNECTING``,
   e.g. right after a rekey) frames wait in the queue for it instead.

Frames are dropped with a logged reason when no route exists and the last attempt failed, or
the queue is full (the protocols tolerate the loss of faulty servers' messages). When the
route changes, frames in flight on the old connection may arrive after later ones sent on the
new one. Received frames go to the ``on_frame`` callback, or else to
:attr:`PeerNetwork.incoming` as ``(peer_id, payload)``; delivery is awaited, so a slow
consumer slows the senders down through TCP instead of growing memory.

:meth:`PeerNetwork.rekey` installs the next period's credentials (a recovering network thus
becomes a normal one), forgets the previous ones, closes every connection (all were made
with the old keys) and lets the dial loops reconnect at once with the new certificates.
Every task runs in a nursery the object owns inside :meth:`PeerNetwork.run`
(``async with PeerNetwork(...) as net`` starts it in a nursery of its own);
:meth:`PeerNetwork.aclose` cancels it and waits for the end.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import random
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.net._framing import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_HELLO_SIZE,
    FrameStream,
    FramingError,
    Hello,
    HelloError,
)
from appliance.net._tls import (
    ChannelIdentity,
    Credential,
    PeerCertificateError,
    anonymous_client_context,
    anonymous_server_context,
    check_peer,
    issued_by,
    period_contexts,
    server_name,
)

log = logging.getLogger("appliance.net")

#: ``send(EVERYONE, data)`` goes to every other server (as in appliance.protocols._core).
EVERYONE = 0
#: Frames already queued for a peer go out together, up to these bounds (fewer writes under load).
_MAX_BATCH_FRAMES = 64
_MAX_BATCH_BYTES = 256 * 1024

FrameHandler = Callable[[int, bytes], Awaitable[None]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: A peer configured by host name is resolved again after this long (a failed lookup sooner).
_RESOLVE_TTL = 60.0
_RESOLVE_RETRY = 5.0

_UPGRADING = "closed to retry with authentication"


class PeerState(enum.Enum):
    """The state of our outgoing connection to a peer."""

    CONNECTING = "connecting"  # first attempt of this period under way: frames are queued
    UP = "up"  # authenticated connection open: frames are queued and sent
    ANONYMOUS = "anonymous"  # unauthenticated connection open (fallback, or we are recovering)
    DOWN = "down"  # last attempt failed: frames are dropped unless the peer is connected to us


@dataclass(frozen=True)
class Rejection:
    """A refused connection: remote address, the server it claimed or was dialed as, why."""

    address: str
    server: int | None
    reason: str
    direction: str  # "incoming" or "outgoing"


@dataclass(frozen=True)
class ConnectionInfo:
    """What an open connection negotiated.

    ``period`` is the period both sides proved when ``authenticated``; otherwise the period
    the peer claimed in its hello (unverified; 0 from a recovering server).
    """

    server: int
    period: int
    tls_version: str
    cipher: str
    authenticated: bool = True
    direction: str = "outgoing"  # "outgoing" (we dialed) or "incoming"


class _Rejected(Exception):
    def __init__(self, server: int | None, reason: str, *, authentication: bool = False) -> None:
        super().__init__(reason)
        self.server = server
        self.reason = reason
        #: The failure is one of authentication: a dialer may retry without it.
        self.authentication = authentication


@dataclass(eq=False)
class _Credentials:
    """One period's TLS contexts and key table (the seed itself is not kept)."""

    period: int
    keys: dict[int, bytes]
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    #: Peer certificates (DER) that :func:`check_peer` accepted for a server id this period:
    #: each later handshake with the same certificate skips the parse and the signature check.
    checked: set[tuple[bytes, int]] = field(default_factory=set)

    def check_peer(self, cert_der: bytes | None, server: int) -> None:
        """:func:`check_peer` against this period's table, remembering what passed."""
        if cert_der is not None and (cert_der, server) in self.checked:
            return
        check_peer(cert_der, server, self.period, self.keys)
        if cert_der is not None and len(self.checked) < 4 * len(self.keys):  # bounded
            self.checked.add((cert_der, server))

    @classmethod
    def build(cls, me: int, period: int, keys: Mapping[int, bytes], seed: Credential) -> _Credentials:
        if period < 0:
            raise ValueError(f"period must be non-negative, got {period}")
        table = {int(i): bytes(k) for i, k in keys.items()}
        for i, k in table.items():
            if len(k) != 32:
                raise ValueError(f"server {i}: an Ed25519 public key has 32 bytes, got {len(k)}")
        if isinstance(seed, ChannelIdentity):
            cert = x509.load_pem_x509_certificate(seed.cert_pem)
            if seed.period != period or not issued_by(cert, table.get(me, b"")):
                raise ValueError(
                    f"server {me}: our channel certificate is not issued by our key of period {period}"
                )
        else:
            if len(seed) != 32:
                raise ValueError("the period signing seed must have 32 bytes")
            own = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
            if table.get(me) != own:
                raise ValueError(
                    f"server {me}: our seed's public key is not our entry of period {period}'s table"
                )
        return cls(period, table, *period_contexts(me, period, seed, table))


@dataclass(eq=False)
class _Conn:
    server: int | None
    direction: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    authenticated: bool = False
    info: ConnectionInfo | None = None
    #: Set while the connection's writer waits for a frame; cancelled when it stops being the route.
    route_scope: trio.CancelScope | None = None
    upgrading: bool = False


@dataclass(eq=False)
class _Peer:
    server: int
    host: str
    port: int
    queue_size: int
    state: PeerState = PeerState.CONNECTING
    last_error: str = "not connected yet"
    out: _Conn | None = None
    dropped: int = 0
    drop_warned: bool = False
    drop_noted: bool = False  # a drop was logged at INFO during a period change
    fallback_reason: str | None = None  # why we last fell back to an anonymous dial (logged)
    fallback_warned: bool = False  # ... and that reason was logged at WARNING
    reached: bool = False  # a connection (either way) has carried our frames to it once
    #: The IP addresses of the configured host (a literal: itself, for good; a name: resolved).
    ips: frozenset[IPAddress] = frozenset()
    ips_expire: float = -math.inf

    def __post_init__(self) -> None:
        self.queue_in, self.queue_out = trio.open_memory_channel[bytes](self.queue_size)
        literal = _ip(self.host)
        if literal is not None:
            self.ips, self.ips_expire = frozenset({literal}), math.inf

    def describe_address(self) -> str:
        """The configured host, with what it resolved to when it is a name."""
        if self.ips_expire == math.inf:
            return self.host
        resolved = ", ".join(sorted(str(ip) for ip in self.ips)) or "unresolved"
        return f"{self.host} ({resolved})"

    def flush(self) -> int:
        n = 0
        while True:
            try:
                self.queue_out.receive_nowait()
            except trio.WouldBlock:
                return n
            n += 1


class _HandshakeSlots:
    """Bounds on handshakes in progress (TCP accepted, TLS and hello not yet done).

    At most ``total`` at once; at most ``per_source`` from one source IP, times the number of
    configured peers at that IP (servers sharing one host, as on loopback); and at most
    ``total - reserved`` from IPs where no peer is configured, so that a flood from elsewhere
    leaves ``reserved`` slots to the peers' addresses.
    """

    def __init__(self, total: int, per_source: int, reserved: int) -> None:
        if total < 1 or per_source < 1 or not 0 <= reserved <= total:
            raise ValueError(
                f"bad handshake limits: total {total}, per source {per_source}, reserved {reserved}"
            )
        self.total = total
        self.per_source = per_source
        self.reserved = reserved
        self.pending = 0
        self.strangers = 0  # in progress from IPs where no peer is configured
        self._by_source: dict[IPAddress | None, int] = {}

    def take(self, source: IPAddress | None, peers_there: int) -> str | None:
        """Claim a slot for a connection from ``source``; the reason when there is none."""
        limit = self.per_source * max(1, peers_there)
        if self._by_source.get(source, 0) >= limit:
            return f"too many handshakes in progress from {source or 'an unknown address'} (at most {limit})"
        if self.pending >= self.total:
            return f"too many handshakes in progress (at most {self.total})"
        if not peers_there and self.strangers >= self.total - self.reserved:
            return (
                f"too many handshakes in progress from addresses of no configured peer (at most "
                f"{self.total - self.reserved}; {self.reserved} kept for the peers' addresses)"
            )
        self.pending += 1
        if not peers_there:
            self.strangers += 1
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return None

    def release(self, source: IPAddress | None, peers_there: int) -> None:
        """Give back the slot :meth:`take` gave for ``source`` (same ``peers_there``)."""
        self.pending -= 1
        if not peers_there:
            self.strangers -= 1
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]


class _RefusalLog:
    """At most one log line per source per ``interval`` seconds for refused connections.

    Sans-IO: :meth:`admit` is told the time. The refusals in between are counted, and the
    count goes with the source's next line. At most ``max_sources`` sources are tracked: when
    a new one comes and all are within their window, it shares one entry with every other
    source beyond the bound (``"other sources"``), so an attacker with many addresses gets
    one line per interval too. A source forgotten after its window loses its count.
    """

    OTHERS = "other sources"

    def __init__(self, interval: float, max_sources: int = 1024) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._entries: dict[str, tuple[float, int]] = {}  # source -> (window end, refusals not logged)

    def admit(self, source: str, now: float) -> tuple[str, int] | None:
        """None: do not log this refusal. Otherwise log it, for the source named, with the
        number of its refusals that were not logged since its last line."""
        entry = self._entries.get(source)
        if entry is None and len(self._entries) >= self.max_sources:
            self._entries = {k: e for k, e in self._entries.items() if now < e[0]}
            if len(self._entries) >= self.max_sources:
                source = self.OTHERS
                entry = self._entries.get(source)
        if entry is not None and now < entry[0]:
            self._entries[source] = (entry[0], entry[1] + 1)
            return None
        suppressed = 0 if entry is None else entry[1]
        self._entries[source] = (now + self.interval, 0)
        return source, suppressed


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


def _ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None if it is no literal."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _source_ip(stream: trio.SocketStream) -> IPAddress | None:
    try:
        host = stream.socket.getpeername()[0]
    except OSError:
        return None
    return _ip(str(host))


def _address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "<unknown address>"
    return f"{host}:{port}"


def _info(
    stream: trio.SSLStream[trio.SocketStream], server: int, period: int, authenticated: bool, direction: str
) -> ConnectionInfo:
    cipher = str((stream.cipher() or ("?",))[0])
    return ConnectionInfo(server, period, str(stream.version()), cipher, authenticated, direction)


_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)


class PeerNetwork:
    """Encrypted frame delivery between server ``me`` and its peers, authenticated when it can be.

    ``addresses`` maps every server id (ours included) to (host, port): where we dial a peer,
    and the IP its unauthenticated connections must come from; ours is where we listen, and
    the IP we dial from when it is a specific one. ``keys`` maps server ids to their period
    Ed25519 public keys (the KeyTable's ``verify_key``); ``seed`` is our period signing seed.
    Without ``period``, ``keys`` and ``seed`` (all None) the network is *recovering*: every
    connection is unauthenticated until :meth:`rekey`. Use ``async with PeerNetwork(...) as
    net``, or ``await nursery.start(net.run)`` and later :meth:`aclose`.
    """

    def __init__(
        self,
        me: int,
        addresses: Mapping[int, tuple[str, int]],
        period: int | None = None,
        keys: Mapping[int, bytes] | None = None,
        seed: Credential | None = None,
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
        max_handshakes_per_source: int = 4,
        max_unauthenticated: int | None = None,
        refusal_log_interval: float = 10.0,
        transition: Callable[[], bool] | None = None,
        transition_grace: float = 10.0,
        startup_grace: float = 10.0,
    ) -> None:
        if me not in addresses:
            raise ValueError(f"server {me} has no address")
        if me == EVERYONE or any(i < 1 for i in addresses):
            raise ValueError("server ids must be positive")
        given = (period is not None, keys is not None, seed is not None)
        if any(given) and not all(given):
            raise ValueError("give period, keys and seed together, or none of them (recovering)")
        self.me = me
        self.max_frame_size = max_frame_size
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_pending_handshakes = max_pending_handshakes
        self.max_handshakes_per_source = max_handshakes_per_source
        #: At most this many unauthenticated incoming connections at once (default: n).
        self.max_unauthenticated = len(addresses) if max_unauthenticated is None else max_unauthenticated
        self._host, self._port = addresses[me]
        own = _ip(self._host)
        #: We dial from the IP we listen on (when it is one), so peers see us at our address.
        self._bind_ip = None if own is None or own.is_unspecified else str(own)
        self._peers = {
            i: _Peer(i, host, port, queue_size) for i, (host, port) in sorted(addresses.items()) if i != me
        }
        self._creds: _Credentials | None = None
        self._anonymous_server_ctx: ssl.SSLContext | None = None
        if period is not None and keys is not None and seed is not None:
            self._creds = _Credentials.build(me, period, keys, seed)
        else:
            self._anonymous_server_ctx = anonymous_server_context(me)
        self._anonymous_client_ctx = anonymous_client_context()
        self._on_frame = on_frame
        self._incoming_send, self.incoming = trio.open_memory_channel[tuple[int, bytes]](incoming_buffer)
        #: The last refused connections (most recent last), for alerts and tests.
        self.rejections: deque[Rejection] = deque(maxlen=256)
        self.listen_port: int | None = None
        self._conns: set[_Conn] = set()
        #: TLS handshakes begun (TCP connected), by ``"{direction} {outcome}"``: direction
        #: ``outgoing`` or ``incoming``, outcome ``authenticated``, ``unauthenticated`` (the
        #: connection came up so) or ``failed`` (TLS, hello or admission refused, or timed out).
        self.handshakes: Counter[str] = Counter()
        self._handshakes_logged: Counter[str] = Counter()  # as of the last rekey's log line
        self._incoming_by_peer: dict[int, _Conn] = {}  # authenticated incoming connections
        self._unauthenticated_by_peer: dict[int, _Conn] = {}  # unauthenticated incoming ones
        # The peers' addresses keep enough slots for each peer to hold its limit at once, up
        # to half of them: a peer dials once at a time, so even half is ample.
        reserved = min(max_pending_handshakes // 2, max_handshakes_per_source * len(self._peers))
        self._slots = _HandshakeSlots(max_pending_handshakes, max_handshakes_per_source, reserved)
        #: Refused incoming connections are logged once per source IP and this many seconds.
        self._refusal_log = _RefusalLog(refusal_log_interval)
        #: Failures of authentication are routine this long after our rekey, and while
        #: ``transition()`` is true (see "Period changes" above).
        self._transition = transition
        self.transition_grace = transition_grace
        #: Frames to a peer never reached yet are queued (not dropped) this long after
        #: :meth:`run`: servers started together dial each other before all of them listen.
        self.startup_grace = startup_grace
        self._started_at = math.inf
        self._rekeyed_at: float | None = None
        self._rekeyed = trio.Event()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._closed = False
        self._stopped = trio.Event()
        self._context: AbstractAsyncContextManager[PeerNetwork]

    # -- public API -------------------------------------------------------------------------

    @property
    def period(self) -> int | None:
        """Our period, or None while recovering."""
        return None if self._creds is None else self._creds.period

    @property
    def recovering(self) -> bool:
        """True until the first :meth:`rekey` of a network created without keys."""
        return self._creds is None

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

    def reachable_peers(self) -> frozenset[int]:
        """Peers with which we hold some connection (authenticated or not), either way."""
        return frozenset(i for i, p in self._peers.items() if self._route(p) is not None)

    def unauthenticated_peers(self) -> frozenset[int]:
        """Peers with which we hold at least one unauthenticated connection, either way."""
        return frozenset(i for i in self._peers if any(not c.authenticated for c in self._open_conns(i)))

    def is_authenticated(self, server: int) -> bool:
        """True if we hold a connection with ``server`` and every one we hold is authenticated.

        Frames from ``server`` arrive with its claimed id over whichever connection is open;
        when this is False, some may come from a connection that did not prove that id.
        """
        self._peer(server)
        conns = self._open_conns(server)
        return bool(conns) and all(c.authenticated for c in conns)

    def connection_info(self, server: int) -> ConnectionInfo | None:
        """Our outgoing connection to ``server`` (authenticated or not), if it is open."""
        out = self._peer(server).out
        return None if out is None else out.info

    def connections(self, server: int) -> tuple[ConnectionInfo, ...]:
        """Every open connection with ``server``: ours to it first, then its to us."""
        self._peer(server)
        return tuple(c.info for c in self._open_conns(server) if c.info is not None)

    def dropped(self, server: int) -> int:
        """How many frames to ``server`` were dropped so far."""
        return self._peer(server).dropped

    async def wait_connected(self, servers: Iterable[int] | None = None, *, incoming: bool = True) -> None:
        """Wait for authenticated outgoing (and, if ``incoming``, incoming) connections with ``servers``."""
        want = frozenset(self._peers if servers is None else servers)
        while not (want <= self.connected_peers() and (not incoming or want <= self.incoming_peers())):
            await self._changed.wait()

    async def wait_reachable(self, servers: Iterable[int] | None = None) -> None:
        """Wait until frames to each of ``servers`` have a connection to go over (any kind)."""
        want = frozenset(self._peers if servers is None else servers)
        while not want <= self.reachable_peers():
            await self._changed.wait()

    def send(self, to: int, data: bytes) -> None:
        """Queue ``data`` for server ``to`` (EVERYONE: every peer); never blocks.

        Frames to an unreachable peer, or beyond its queue's capacity, are dropped with a
        logged reason (a peer not reached yet in the first ``startup_grace`` seconds is not
        unreachable: its frames wait in its queue). Sending more than ``max_frame_size``
        bytes is our bug: ValueError.
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

    def rekey(self, period: int, keys: Mapping[int, bytes], seed: Credential) -> None:
        """Switch to ``period``'s keys; close every connection made with the previous ones.

        A recovering network accepts any period >= 0 and becomes a normal one.
        """
        if self._creds is not None and period <= self._creds.period:
            raise ValueError(f"rekey to period {period}: we are already in period {self._creds.period}")
        was_recovering = self._creds is None
        self._creds = _Credentials.build(self.me, period, keys, seed)  # old contexts dropped
        self._rekeyed_at = time.monotonic()
        self._anonymous_server_ctx = None
        closing = len(self._conns)
        for conn in list(self._conns):
            conn.scope.cancel()
        self._incoming_by_peer.clear()
        self._unauthenticated_by_peer.clear()
        for peer in self._peers.values():
            if peer.server in self._creds.keys:
                peer.state = PeerState.CONNECTING
            peer.out = None
            peer.fallback_reason = None
            peer.fallback_warned = False
        rekeyed, self._rekeyed = self._rekeyed, trio.Event()
        rekeyed.set()
        self._notify()
        since = self.handshakes - self._handshakes_logged
        self._handshakes_logged = Counter(self.handshakes)
        log.info(
            "server %d: now in period %d (%d keys)%s; closing %d connections of the previous period; "
            "%d TLS handshakes since the previous rekey (%s)",
            self.me,
            period,
            len(self._creds.keys),
            ", no longer recovering" if was_recovering else "",
            closing,
            since.total(),
            ", ".join(f"{kind} {count}" for kind, count in sorted(since.items())) or "none",
        )

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and dial until :meth:`aclose`; ``nursery.start`` returns the listening port."""
        if self._running or self._closed:
            raise RuntimeError("a PeerNetwork runs once")
        self._running = True
        self._started_at = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                listeners = await trio.open_tcp_listeners(self._port, host=self._host)
                self.listen_port = int(listeners[0].socket.getsockname()[1])
                await nursery.start(trio.serve_listeners, self._handle_incoming, listeners)
                for peer in self._peers.values():
                    nursery.start_soon(self._dial_loop, peer)
                nursery.start_soon(self._resolve_names)
                log.info(
                    "server %d: listening on %s:%d%s",
                    self.me,
                    self._host,
                    self.listen_port,
                    " (recovering: no period keys, unauthenticated connections only)"
                    if self._creds is None
                    else "",
                )
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

    def _open_conns(self, server: int) -> list[_Conn]:
        found = (
            self._peers[server].out,
            self._incoming_by_peer.get(server),
            self._unauthenticated_by_peer.get(server),
        )
        return [c for c in found if c is not None]

    def _route(self, peer: _Peer) -> _Conn | None:
        """The connection frames to ``peer`` go over (see "Routing" in the module docstring), if any."""
        out = peer.out
        if out is not None and out.authenticated:
            return out
        incoming = self._incoming_by_peer.get(peer.server)
        if incoming is not None:
            return incoming
        if out is not None:
            return out
        if peer.state is PeerState.DOWN:  # nothing else: the claimed id's unauthenticated connection
            return self._unauthenticated_by_peer.get(peer.server)
        return None

    def _notify(self) -> None:
        """Connections changed: wake the waiters and the writers that are no longer the route."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for peer in self._peers.values():
            peer.reached = peer.reached or self._route(peer) is not None
        for conn in self._conns:
            scope, server = conn.route_scope, conn.server
            if scope is not None and server is not None and self._route(self._peers[server]) is not conn:
                scope.cancel()

    def _hello_period(self) -> int:
        return 0 if self._creds is None else self._creds.period

    def _enqueue(self, peer: _Peer, data: bytes) -> None:
        if self._closed:
            self._drop(peer, "the network is closed")
        elif self._unreachable(peer):
            self._drop(peer, f"unreachable ({peer.last_error})")
        else:
            try:
                peer.queue_in.send_nowait(data)
            except trio.WouldBlock:
                self._drop(peer, f"its send queue is full ({peer.queue_size} frames)")

    def _routine(self) -> bool:
        """Is a period change under way? Failures of authentication are then expected."""
        if self._rekeyed_at is not None and time.monotonic() - self._rekeyed_at < self.transition_grace:
            return True
        return self._transition is not None and self._transition()

    def _drop(self, peer: _Peer, reason: str) -> None:
        peer.dropped += 1
        routine = self._routine()
        if peer.drop_warned or (routine and peer.drop_noted):
            level = logging.DEBUG
        elif routine:
            level, peer.drop_noted = logging.INFO, True
            reason += " (a period change is under way)"
        else:
            level, peer.drop_warned = logging.WARNING, True
        log.log(level, "server %d: dropped a frame to server %d: %s", self.me, peer.server, reason)

    def _unreachable(self, peer: _Peer) -> bool:
        """Frames to ``peer`` are dropped: no route, and not a peer still starting with us."""
        if peer.state is not PeerState.DOWN or self._route(peer) is not None:
            return False
        return peer.reached or time.monotonic() - self._started_at >= self.startup_grace

    def _flush_if_unreachable(self, peer: _Peer) -> None:
        if self._unreachable(peer):
            flushed = peer.flush()
            if flushed:
                peer.dropped += flushed
                log.info(
                    "server %d: server %d unreachable: %s (%d queued frames dropped)",
                    self.me,
                    peer.server,
                    peer.last_error,
                    flushed,
                )

    def _set_state(self, peer: _Peer, state: PeerState, reason: str = "") -> None:
        if state is PeerState.DOWN:
            if peer.state is not PeerState.DOWN:
                if self._route(peer) is None:
                    log.info("server %d: server %d unreachable: %s", self.me, peer.server, reason)
                else:
                    log.info(
                        "server %d: no connection to server %d (%s); its connection to us carries our frames",
                        self.me,
                        peer.server,
                        reason,
                    )
            peer.last_error = reason
            peer.state = state
            self._flush_if_unreachable(peer)
        elif state in (PeerState.UP, PeerState.ANONYMOUS):
            peer.drop_warned = peer.drop_noted = False
        if peer.state is not state:
            peer.state = state
        self._notify()

    def _reject(self, direction: str, address: str, server: int | None, reason: str) -> None:
        self.rejections.append(Rejection(address, server, reason, direction))
        who = f"server {server} at {address}" if server is not None else address
        if direction == "incoming":
            self._log_refused(address, who, reason)
        else:  # our own dials: paced by the backoff
            level = logging.INFO if self._routine() else logging.WARNING
            log.log(level, "server %d: connection to %s rejected: %s", self.me, who, reason)

    def _log_refused(self, address: str, who: str, reason: str) -> None:
        """Log a refused incoming connection: one line per source IP and interval, the rest at DEBUG."""
        source = address.rsplit(":", 1)[0] if ":" in address else address  # "host:port"
        admitted = self._refusal_log.admit(source, trio.current_time())
        if admitted is None:
            log.debug("server %d: rejected connection from %s: %s", self.me, who, reason)
            return
        key, suppressed = admitted
        more = (
            f" ({suppressed} more from {key} since its last line, not logged at this level)"
            if suppressed
            else ""
        )
        level = logging.INFO if self._routine() else logging.WARNING
        log.log(level, "server %d: rejected connection from %s: %s%s", self.me, who, reason, more)

    def _fall_back(self, peer: _Peer, address: str, reason: str, rejected: bool) -> None:
        """Our authenticated dial to ``peer`` failed to authenticate: say so before going anonymous."""
        routine = self._routine()
        if peer.fallback_reason != reason:
            peer.fallback_reason, peer.fallback_warned = reason, False
            level = logging.INFO if routine else logging.WARNING
        elif routine or peer.fallback_warned:
            level = logging.DEBUG
        else:  # first seen during a period change, and still the case after it
            level = logging.WARNING
        peer.fallback_warned = peer.fallback_warned or level == logging.WARNING
        if rejected:
            self.rejections.append(Rejection(address, peer.server, reason, "outgoing"))
        log.log(
            level,
            "server %d: connection to server %d at %s not authenticated: %s; "
            "retrying without authentication%s",
            self.me,
            peer.server,
            address,
            reason,
            " (a period change is under way)" if level == logging.INFO else "",
        )

    async def _deliver(self, server: int, data: bytes) -> None:
        if self._on_frame is not None:
            await self._on_frame(server, data)
        else:
            with suppress(trio.ClosedResourceError):
                await self._incoming_send.send((server, data))

    async def _serve_conn(self, conn: _Conn, frames: FrameStream, address: str) -> str:
        """Deliver the frames ``conn`` brings and send our queued frames over it while it is
        the peer's route; return why the connection ended."""
        assert conn.server is not None
        server = conn.server
        peer = self._peers[server]
        ended: list[str] = []
        async with trio.open_nursery() as nursery:

            async def writer() -> None:
                try:
                    while True:
                        changed = self._changed
                        if self._route(peer) is not conn:
                            await changed.wait()
                            continue
                        with trio.CancelScope() as route_scope:
                            conn.route_scope = route_scope
                            data = await peer.queue_out.receive()
                        conn.route_scope = None
                        if route_scope.cancelled_caught:
                            continue
                        batch = [data]
                        size = len(data)
                        while len(batch) < _MAX_BATCH_FRAMES and size < _MAX_BATCH_BYTES:
                            try:
                                more = peer.queue_out.receive_nowait()
                            except trio.WouldBlock:
                                break
                            batch.append(more)
                            size += len(more)
                        with trio.move_on_after(self.send_timeout) as timeout:
                            await frames.send_frames(batch)
                        if timeout.cancelled_caught:
                            peer.dropped += 1
                            ended.append(f"sending stalled for {self.send_timeout}s")
                            break
                except (*_TRANSPORT_ERRORS, FramingError) as exc:
                    ended.append(_describe(exc))
                finally:
                    conn.route_scope = None
                nursery.cancel_scope.cancel()

            async def reader() -> None:
                try:
                    while True:
                        frame = await frames.receive_frame()
                        if frame is None:
                            ended.append("closed by the peer")
                            break
                        await self._deliver(server, frame)
                except FramingError as exc:
                    self._reject(conn.direction, address, server, f"closing the connection: {exc}")
                    ended.append(str(exc))
                except _TRANSPORT_ERRORS as exc:
                    ended.append(_describe(exc))
                nursery.cancel_scope.cancel()

            nursery.start_soon(writer)
            nursery.start_soon(reader)
        return ended[0] if ended else "closed"

    # dialing ------------------------------------------------------------------------------

    async def _dial_loop(self, peer: _Peer) -> None:
        backoff = self.backoff_min
        while True:
            creds, rekeyed = self._creds, self._rekeyed
            if creds is not None and peer.server not in creds.keys:
                self._set_state(peer, PeerState.DOWN, f"no key in period {creds.period}'s table")
                await rekeyed.wait()
                continue
            was_up, reason, retry = await self._connect(peer, creds)
            if retry and self._creds is creds and peer.server not in self._incoming_by_peer:
                # (A peer that holds an authenticated connection to us is in our period: its
                # connection carries our frames, and we try again with the keys after the backoff.)
                was_up, reason, _ = await self._connect(peer, None)
            if self._creds is not creds:  # rekeyed: reconnect at once with the new keys
                backoff = self.backoff_min
                continue
            if reason == _UPGRADING:  # the peer authenticated to us: so may we, at once
                backoff = self.backoff_min
                self._set_state(peer, PeerState.CONNECTING)
                continue
            self._set_state(peer, PeerState.DOWN, reason)
            if was_up:
                backoff = self.backoff_min
            with trio.move_on_after(backoff * random.uniform(0.5, 1.0)):
                await rekeyed.wait()
            backoff = self.backoff_min if rekeyed.is_set() else min(2 * backoff, self.backoff_max)

    async def _connect(self, peer: _Peer, creds: _Credentials | None) -> tuple[bool, str, bool]:
        """One connection to ``peer``, authenticated with ``creds`` or else anonymous.

        Returns whether it got up, why it ended, and whether an authenticated attempt failed
        for a reason of authentication (so that an anonymous one may follow).
        """
        conn = _Conn(peer.server, "outgoing")
        self._conns.add(conn)
        address = f"{peer.host}:{peer.port}"
        ctx = self._anonymous_client_ctx if creds is None else creds.client_ctx
        stream: trio.SSLStream[trio.SocketStream] | None = None
        handshaken = False
        outcome = "failed"
        try:
            with conn.scope:
                try:
                    with trio.fail_after(self.handshake_timeout):
                        tcp = await trio.open_tcp_stream(peer.host, peer.port, local_address=self._bind_ip)
                        stream = trio.SSLStream(tcp, ctx, server_hostname=server_name(peer.server))
                        frames = FrameStream(stream, self.max_frame_size)
                        await stream.do_handshake()
                        handshaken = True
                        await frames.send_frame(Hello(self.me, self._hello_period()).encode())
                        first = await frames.receive_frame(MAX_HELLO_SIZE, "hello frame")
                        hello = self._check_answer(peer.server, creds, stream, first)
                except trio.TooSlowError:
                    return False, f"no TLS handshake and hello within {self.handshake_timeout}s", False
                except _Rejected as exc:
                    if creds is not None and exc.authentication:
                        self._fall_back(peer, address, exc.reason, rejected=True)
                        return False, exc.reason, True
                    self._reject("outgoing", address, peer.server, exc.reason)
                    return False, exc.reason, False
                except (*_TRANSPORT_ERRORS, FramingError) as exc:
                    reason = _describe(exc)
                    verify_failed = isinstance(exc.__cause__ or exc, ssl.SSLCertVerificationError)
                    if creds is None:
                        return False, reason, False
                    if verify_failed:
                        self._fall_back(peer, address, reason, rejected=True)
                        return False, reason, True
                    if handshaken and not isinstance(exc, FramingError):
                        # TLS 1.3: a server refusing our certificate shows it only now.
                        reason = f"{reason} after the TLS handshake (our certificate refused?)"
                        self._fall_back(peer, address, reason, rejected=False)
                        return False, reason, True
                    return False, reason, False
                authenticated = creds is not None
                outcome = "authenticated" if authenticated else "unauthenticated"
                if not authenticated and self._creds is not None and peer.server in self._incoming_by_peer:
                    # The peer authenticated to us while we dialed without keys: so may we, at once
                    # (else this connection would stay unauthenticated until the next reconnect).
                    return False, _UPGRADING, False
                conn.authenticated = authenticated
                conn.info = _info(stream, peer.server, hello.period, authenticated, "outgoing")
                peer.out = conn
                self._set_state(peer, PeerState.UP if authenticated else PeerState.ANONYMOUS)
                if authenticated:
                    if peer.fallback_reason is not None:
                        log.info("server %d: authenticated to server %d again", self.me, peer.server)
                    peer.fallback_reason, peer.fallback_warned = None, False
                log.info(
                    "server %d: connected to server %d (%s%s)",
                    self.me,
                    peer.server,
                    conn.info.tls_version,
                    "" if authenticated else ", unauthenticated",
                )
                return True, await self._serve_conn(conn, frames, address), False
            return False, _UPGRADING if conn.upgrading else "closed on rekey", False
        finally:
            self._conns.discard(conn)
            if peer.out is conn:
                peer.out = None
                self._notify()
            if stream is not None:
                self.handshakes[f"outgoing {outcome}"] += 1
                await trio.aclose_forcefully(stream)

    def _check_answer(
        self,
        server: int,
        creds: _Credentials | None,
        stream: trio.SSLStream[trio.SocketStream],
        first: bytes | None,
    ) -> Hello:
        authenticating = creds is not None
        if first is None:
            raise _Rejected(
                server, "closed the connection instead of answering our hello", authentication=authenticating
            )
        try:
            hello = Hello.decode(first)
        except HelloError as exc:
            raise _Rejected(server, str(exc)) from None
        if hello.server != server:
            raise _Rejected(server, f"answered as server {hello.server}")
        if creds is not None:
            if hello.period != creds.period:
                raise _Rejected(
                    server,
                    f"is in period {hello.period}, we are in period {creds.period}",
                    authentication=True,
                )
            try:
                creds.check_peer(stream.getpeercert(binary_form=True), server)
            except PeerCertificateError as exc:
                raise _Rejected(server, str(exc), authentication=True) from None
        if stream.version() != "TLSv1.3":
            raise _Rejected(server, f"negotiated {stream.version()}, not TLSv1.3")
        return hello

    # accepting ----------------------------------------------------------------------------

    async def _handle_incoming(self, tcp: trio.SocketStream) -> None:
        address = _address(tcp)
        source = _source_ip(tcp)
        peers_there = 0 if source is None else sum(source in p.ips for p in self._peers.values())
        refusal = self._slots.take(source, peers_there)
        if refusal is not None:
            self._log_refused(address, address, refusal)  # not in rejections: a flood would churn them
            await trio.aclose_forcefully(tcp)
            return
        held = True

        def release_slot() -> None:
            nonlocal held
            if held:
                held = False
                self._slots.release(source, peers_there)

        creds = self._creds
        ctx = creds.server_ctx if creds is not None else self._anonymous_server_ctx
        assert ctx is not None
        conn = _Conn(None, "incoming")
        self._conns.add(conn)
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        outcome = "failed"
        try:
            with conn.scope:
                try:
                    with trio.fail_after(self.handshake_timeout):
                        frames = FrameStream(stream, self.max_frame_size)
                        await stream.do_handshake()
                        cert = stream.getpeercert(binary_form=True) if creds is not None else None
                        first = await frames.receive_frame(MAX_HELLO_SIZE, "hello frame")
                        hello = self._check_hello(creds, stream, cert, first)
                        server, authenticated = hello.server, cert is not None
                        if not authenticated:
                            await self._resolve(self._peers[server])
                            self._admit_unauthenticated(server, source)
                        await frames.send_frame(Hello(self.me, self._hello_period()).encode())
                        if not authenticated:
                            self._admit_unauthenticated(server, source)  # again: others may have come
                except trio.TooSlowError:
                    self._reject("incoming", address, None, "no TLS handshake and hello in time")
                    return
                except _Rejected as exc:
                    self._reject("incoming", address, exc.server, exc.reason)
                    return
                except FramingError as exc:  # e.g. a hello longer than MAX_HELLO_SIZE: never decoded
                    self._reject("incoming", address, None, f"bad hello: {exc}")
                    return
                except _TRANSPORT_ERRORS as exc:
                    self._reject("incoming", address, None, f"before its hello: {_describe(exc)}")
                    return
                finally:
                    release_slot()
                outcome = "authenticated" if authenticated else "unauthenticated"
                conn.server = server
                conn.authenticated = authenticated
                conn.info = _info(stream, server, hello.period, authenticated, "incoming")
                self._register_incoming(conn)
                log.info(
                    "server %d: accepted server %d from %s%s",
                    self.me,
                    server,
                    address,
                    "" if authenticated else " (unauthenticated)",
                )
                reason = await self._serve_conn(conn, frames, address)
                log.info("server %d: connection from server %d ended: %s", self.me, server, reason)
        finally:
            release_slot()
            self._conns.discard(conn)
            if conn.server is not None:
                registry = self._incoming_by_peer if conn.authenticated else self._unauthenticated_by_peer
                if registry.get(conn.server) is conn:
                    del registry[conn.server]
                    self._notify()
                    self._flush_if_unreachable(self._peers[conn.server])
            self.handshakes[f"incoming {outcome}"] += 1
            await trio.aclose_forcefully(stream)

    async def _resolve(self, peer: _Peer) -> frozenset[IPAddress]:
        """The IP addresses of ``peer``'s configured host (a name is looked up again when stale)."""
        if trio.current_time() < peer.ips_expire:
            return peer.ips
        try:
            infos = await trio.socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning(
                "server %d: cannot resolve server %d's host %s: %s", self.me, peer.server, peer.host, exc
            )
            peer.ips, peer.ips_expire = frozenset(), trio.current_time() + _RESOLVE_RETRY
            return peer.ips
        found = (_ip(str(sockaddr[0])) for *_, sockaddr in infos)
        peer.ips = frozenset(ip for ip in found if ip is not None)
        peer.ips_expire = trio.current_time() + _RESOLVE_TTL
        return peer.ips

    async def _resolve_names(self) -> None:
        """Keep the addresses of peers configured by host name resolved (for the handshake slots)."""
        named = [p for p in self._peers.values() if p.ips_expire != math.inf]
        while named:
            for peer in named:
                await self._resolve(peer)
            await trio.sleep(_RESOLVE_RETRY if any(not p.ips for p in named) else _RESOLVE_TTL)

    def _admit_unauthenticated(self, server: int, source: IPAddress | None) -> None:
        """Refuse an unauthenticated connection claiming ``server`` if the rules say so.

        The first rule: it must come from the IP of ``server``'s configured address (the
        port is the dialer's ephemeral one, so it is not compared).
        """
        peer = self._peers[server]
        if source is None or source not in peer.ips:
            raise _Rejected(
                server,
                f"unauthenticated hello claiming server {server} from {source or 'an unknown address'}, "
                f"which is not server {server}'s configured address {peer.describe_address()}",
            )
        if server in self._incoming_by_peer:
            raise _Rejected(
                server, "unauthenticated, while the server holds an authenticated connection to us"
            )
        if (
            server not in self._unauthenticated_by_peer
            and len(self._unauthenticated_by_peer) >= self.max_unauthenticated
        ):
            raise _Rejected(
                server, f"too many unauthenticated connections (at most {self.max_unauthenticated})"
            )

    def _register_incoming(self, conn: _Conn) -> None:
        server = conn.server
        assert server is not None
        if conn.authenticated:
            previous = self._incoming_by_peer.get(server)
            self._incoming_by_peer[server] = conn
            unauthenticated = self._unauthenticated_by_peer.pop(server, None)
            if unauthenticated is not None:
                unauthenticated.scope.cancel()
                log.info(
                    "server %d: server %d authenticated: closing its unauthenticated connection",
                    self.me,
                    server,
                )
            out = self._peers[server].out
            if out is not None and not out.authenticated and self._creds is not None:
                out.upgrading = True  # it holds a key we trust: so should our connection to it
                out.scope.cancel()
        else:
            previous = self._unauthenticated_by_peer.get(server)
            self._unauthenticated_by_peer[server] = conn
        if previous is not None:
            previous.scope.cancel()
        self._notify()

    def _check_hello(
        self,
        creds: _Credentials | None,
        stream: trio.SSLStream[trio.SocketStream],
        cert: bytes | None,
        first: bytes | None,
    ) -> Hello:
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
        if cert is not None and creds is not None:  # authenticated: the certificate must be its key
            if hello.period != creds.period:
                raise _Rejected(server, f"is in period {hello.period}, we are in period {creds.period}")
            try:
                creds.check_peer(cert, server)
            except PeerCertificateError as exc:
                raise _Rejected(server, str(exc)) from None
        if stream.version() != "TLSv1.3":
            raise _Rejected(server, f"negotiated {stream.version()}, not TLSv1.3")
        return hello
