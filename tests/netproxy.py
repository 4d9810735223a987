"""A fault-injecting TCP proxy: a WAN-like network between real `pst serve` processes.

This kernel has no netem, so the faults are made in user space. Each server's config has
``[server] listen`` (where ``pst serve`` listens) and the constants C list
``network.peers.N`` (where the others dial it). :func:`rewrite_cluster_listens` moves every
``listen`` of a local cluster to a fresh port, and a :class:`FaultProxy` then listens on the
peer addresses of C and forwards every accepted connection to the real server. The node
allows this: it listens on ``listen`` and dials the peers of C (``appliance.node.run``), the
boot check compares only ``[network]`` with the certified C, and TLS authenticates servers
by their period certificates, never by address. The proxy forwards raw bytes (TLS records)
and never looks inside.

What it models, per chunk (whatever one ``recv`` returned, up to 64 KiB):

* **Delay**: ``set_delay(mean_s, jitter_s)``: each chunk is delivered ``mean ± jitter``
  seconds (uniform) after it was read, but never before an earlier chunk of the same
  direction of the same connection: TCP never reorders, so a short delay waits behind a
  long one (head-of-line blocking). Both directions of a connection are delayed, each by
  the rule of its own direction. Bandwidth is not modelled (a chunk is written at once).
* **Loss**: TCP does not lose bytes silently; a lossy path ends in a broken connection.
  ``set_drop(rate)`` resets the whole connection (RST to both ends, chunks in flight are
  lost) with probability ``rate`` per chunk, so the servers must reconnect.
* **Partition**: ``partition(s)`` cuts (resets) every connection to and from server ``s`` and
  resets every new one at once until ``heal(s)``. A refused connection is accepted and
  then reset, so the dialer sees a reset right after connecting rather than ECONNREFUSED.
  ``partition(s, mode="blackhole")`` instead stalls: nothing moves to or from ``s`` (the
  proxy stops delivering, TCP backpressure fills up, new connections are held before
  the proxy dials the target) and everything resumes in order on ``heal(s)``, as TCP would
  after a short outage; the servers' own timeouts decide whether they give up first.
* ``reset_connections(s)``: one reset of every current connection (a transient failure).

Which server dialed? The proxy sees connections from 127.0.0.1 with an ephemeral port, and C
is identical on every server, so the address alone cannot tell the source. Faults are
therefore keyed by destination (the server whose peer address was dialed), and optionally
by source when an ``identify`` callback names the dialer: :func:`cluster_source_identifier`
finds the process owning the client socket (``/proc/net/tcp`` and ``/proc/<pid>/fd``, Linux
only, IPv4) and maps it to a server through the cluster's ``server.pid`` files. Rules take
``src``/``dst`` (None = any); a chunk flowing from a to b uses the most specific matching
rule: (a, b), then (any, b), then (a, any), then (any, any). Bytes flowing back on a
connection dialed from an unidentified source flow "to an unknown server" and match only
rules with ``dst=None``.

This matters for partitions: a server sends to peer j over its own connection to j, or
else over j's incoming connection to it (``appliance.net._peers``, "Routing"). So with
destination-only knowledge, ``partition(s)`` refuses connections to s, but s's connections
to the others are only cut when the source is identified; without ``identify`` a
"partitioned" server can still talk to everyone over connections it dials itself, and the
partition is a fiction (seen with 4 `pst serve` processes: a server partitioned by
destination only kept taking part in every refresh). Use ``identify`` for real clusters.

Other limits: the proxy is a second TCP hop, so the servers see the proxy's addresses as
their peers' (they never use them); a held ("blackhole") connection was already accepted,
so its dialer sees a connected socket that stays silent, not a SYN that times out; there
is no bandwidth limit, duplication or corruption (TLS would turn corruption into a reset).

Usage with a local cluster (``pst cluster init`` done, servers not yet started)::

    links = rewrite_cluster_listens(root)
    with FaultProxy(links, seed=1, identify=cluster_source_identifier(root)) as proxy:
        proxy.set_delay(0.03, 0.02)
        ...  # pst cluster up; proxy.partition(3); proxy.heal(3); proxy.stats()

Randomness comes from ``seed``: the decisions of one direction of one connection come from
``Random(seed, destination, index of the connection to that destination, direction)``.
The chunking of a byte stream and the interleaving of connections from different servers
depend on timing, so a run is reproducible only as far as the timing is.

The proxy runs its own trio event loop in a thread; its methods are thread-safe and may be
called from plain or trio tests (they block for the moment it takes the loop to apply them).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

import trio

Addr = tuple[str, int]
#: ``identify(client_address, proxy_address)`` -> the id of the server that dialed, or None.
#: Called in a worker thread for every accepted connection.
SourceIdentifier = Callable[[Addr, Addr], int | None]
PartitionMode = Literal["reset", "blackhole"]
Link = tuple[int | None, int | None]

T = TypeVar("T")

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 64


@dataclass
class LinkStats:
    """Counters of one link (src, dst); src or dst None: not identified."""

    #: Bytes and chunks delivered flowing src -> dst.
    bytes: int = 0
    chunks: int = 0
    #: Connections dialed src -> dst that reached the target.
    connections: int = 0
    #: Connections reset by ``set_drop``.
    dropped: int = 0
    #: Connections cut by ``partition`` or ``reset_connections``.
    cut: int = 0
    #: Connections reset at once because src or dst was partitioned.
    refused: int = 0
    #: Connections whose target could not be reached (they were reset).
    failed: int = 0

    def add(self, other: LinkStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class ProxyStats:
    """A snapshot: the counters per link (src, dst)."""

    links: dict[Link, LinkStats] = field(default_factory=dict)

    def _sum(self, keep: Callable[[Link], bool]) -> LinkStats:
        out = LinkStats()
        for link, st in self.links.items():
            if keep(link):
                out.add(st)
        return out

    @property
    def total(self) -> LinkStats:
        return self._sum(lambda _: True)

    def to(self, dst: int) -> LinkStats:
        """Everything on links towards ``dst`` (whatever the source)."""
        return self._sum(lambda link: link[1] == dst)

    def between(self, src: int | None, dst: int | None) -> LinkStats:
        return self.links.get((src, dst), LinkStats())


@dataclass(eq=False)
class _Conn:
    src: int | None
    dst: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reset: bool = False


def _close(stream: trio.SocketStream, *, rst: bool) -> None:
    """Close now; with ``rst`` the peer gets a TCP reset (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        if rst:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        stream.socket.close()


def _lookup(rules: Mapping[Link, T], frm: int | None, to: int | None, default: T) -> T:
    """The most specific rule for a chunk flowing frm -> to (None: unknown, matches only "any")."""
    for key in ((frm, to), (None, to), (frm, None), (None, None)):
        if key in rules:
            return rules[key]
    return default


class FaultProxy:
    """One listening port per server id, forwarding to that server's real address, with faults.

    ``links[i] = (listen_addr, target_addr)``: listen on ``listen_addr`` (port 0: any free
    port, see :attr:`addresses`) and forward every connection to ``target_addr``.
    """

    def __init__(
        self,
        links: Mapping[int, tuple[Addr, Addr]],
        seed: int = 0,
        *,
        identify: SourceIdentifier | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self._links: dict[int, tuple[Addr, Addr]] = {
            i: ((a[0], a[1]), (b[0], b[1])) for i, (a, b) in links.items()
        }
        self._seed = seed
        self._identify = identify
        self._connect_timeout = connect_timeout
        # State below is only touched in the proxy's thread (control methods go through _call).
        self._delay: dict[Link, tuple[float, float]] = {}
        self._drop: dict[Link, float] = {}
        self._partitioned: dict[int, PartitionMode] = {}
        self._changed = trio.Event()
        self._conns: set[_Conn] = set()
        self._stats: dict[Link, LinkStats] = {}
        self._accepted: dict[int, itertools.count[int]] = {i: itertools.count() for i in self._links}
        #: Where the proxy listens for each server id (ports resolved).
        self.addresses: dict[int, Addr] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._closed = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if self._token is None:
            self._thread.join()
            raise RuntimeError(f"fault proxy did not start: {self._error!r}") from self._error

    # --- control (any thread) -------------------------------------------------------------

    def set_delay(
        self, mean_s: float, jitter_s: float = 0.0, *, src: int | None = None, dst: int | None = None
    ) -> None:
        """Deliver each chunk flowing src -> dst ``mean_s ± jitter_s`` after it was read, in order."""
        if not 0 <= jitter_s <= mean_s:
            raise ValueError(f"need 0 <= jitter <= mean, got mean {mean_s}, jitter {jitter_s}")
        self._call(lambda: self._delay.__setitem__((src, dst), (mean_s, jitter_s)))

    def set_drop(self, rate: float, *, src: int | None = None, dst: int | None = None) -> None:
        """Reset a connection with probability ``rate`` for each chunk flowing src -> dst."""
        if not 0 <= rate <= 1:
            raise ValueError(f"drop rate must be in [0, 1], got {rate}")
        self._call(lambda: self._drop.__setitem__((src, dst), rate))

    def clear_faults(self) -> None:
        """No delay, no drops (partitions stay until healed)."""

        def clear() -> None:
            self._delay.clear()
            self._drop.clear()

        self._call(clear)

    def partition(self, server_id: int, *, mode: PartitionMode = "reset") -> int:
        """Cut ``server_id`` off until :meth:`heal`; returns how many connections were reset."""
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"mode must be 'reset' or 'blackhole', got {mode!r}")

        def apply() -> int:
            self._partitioned[server_id] = mode
            self._notify()
            return self._cut(lambda c: server_id in (c.src, c.dst)) if mode == "reset" else 0

        return self._call(apply)

    def heal(self, server_id: int) -> None:
        def apply() -> None:
            self._partitioned.pop(server_id, None)
            self._notify()

        self._call(apply)

    def heal_all(self) -> None:
        def apply() -> None:
            self._partitioned.clear()
            self._notify()

        self._call(apply)

    def reset_connections(self, server_id: int | None = None) -> int:
        """Reset every current connection (to or from ``server_id``); returns how many."""
        return self._call(lambda: self._cut(lambda c: server_id is None or server_id in (c.src, c.dst)))

    def connections(self) -> list[Link]:
        """The (src, dst) of every connection currently forwarded."""
        return self._call(lambda: [(c.src, c.dst) for c in self._conns])

    def stats(self) -> ProxyStats:
        def snap() -> ProxyStats:
            return ProxyStats({k: LinkStats(**vars(v)) for k, v in self._stats.items()})

        return self._call(snap)

    def close(self) -> None:
        """Stop listening and reset every connection; raises an error the proxy's loop hit."""
        if not self._closed:
            self._closed = True
            if self._token is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self._shutdown)
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"fault proxy failed: {self._error!r}") from self._error

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the proxy's loop and wait for it (works from any thread, trio or not)."""
        if self._closed or self._token is None:
            raise RuntimeError("fault proxy is closed")
        done = threading.Event()
        box: list[T] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                box.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        self._token.run_sync_soon(run)
        done.wait()
        if errors:
            raise errors[0]
        return box[0]

    # --- the loop (proxy thread) ----------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        try:
            trio.run(self._main, ready)
        except BaseException as exc:
            self._error = exc
        finally:
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        listeners: dict[int, list[trio.SocketListener]] = {}
        try:
            for i, (listen, _) in self._links.items():
                listeners[i] = await trio.open_tcp_listeners(listen[1], host=listen[0])
                host, port = listeners[i][0].socket.getsockname()[:2]
                self.addresses[i] = (host, port)
        except BaseException:
            for ls in listeners.values():
                for listener in ls:
                    await listener.aclose()
            raise
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            for i, ls in listeners.items():
                nursery.start_soon(trio.serve_listeners, functools.partial(self._handle, i), ls)
            self._token = trio.lowlevel.current_trio_token()
            ready.set()

    def _shutdown(self) -> None:
        for conn in self._conns:
            conn.reset = True
        if self._cancel is not None:
            self._cancel.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _stat(self, link: Link) -> LinkStats:
        return self._stats.setdefault(link, LinkStats())

    def _blocked(self, frm: int | None, to: int | None) -> bool:
        return any(s is not None and self._partitioned.get(s) == "blackhole" for s in (frm, to))

    async def _wait_unblocked(self, frm: int | None, to: int | None) -> None:
        while self._blocked(frm, to):
            await self._changed.wait()

    def _cut(self, which: Callable[[_Conn], bool]) -> int:
        victims = [c for c in self._conns if which(c) and not c.reset]
        for c in victims:
            self._stat((c.src, c.dst)).cut += 1
            self._reset(c)
        return len(victims)

    @staticmethod
    def _reset(conn: _Conn) -> None:
        conn.reset = True
        conn.scope.cancel()

    async def _handle(self, dst: int, client: trio.SocketStream) -> None:
        index = next(self._accepted[dst])
        src: int | None = None
        if self._identify is not None:
            try:
                peer = client.socket.getpeername()[:2]
                local = client.socket.getsockname()[:2]
                src = await trio.to_thread.run_sync(self._identify, (peer[0], peer[1]), (local[0], local[1]))
            except (OSError, ValueError):  # the dialer is gone already, or /proc said something odd
                src = None
        conn = _Conn(src, dst)
        server: trio.SocketStream | None = None
        self._conns.add(conn)
        try:
            with conn.scope:
                if self._partitioned.get(dst) == "reset" or (
                    src is not None and self._partitioned.get(src) == "reset"
                ):
                    self._stat((src, dst)).refused += 1
                    conn.reset = True
                    return
                await self._wait_unblocked(src, dst)
                try:
                    with trio.fail_after(self._connect_timeout):
                        server = await trio.open_tcp_stream(*self._links[dst][1])
                except (OSError, trio.TooSlowError):
                    self._stat((src, dst)).failed += 1
                    conn.reset = True
                    return
                self._stat((src, dst)).connections += 1
                async with trio.open_nursery() as nursery:
                    for frm, to, a, b, direction in (
                        (src, dst, client, server, 0),
                        (dst, src, server, client, 1),
                    ):
                        rng = random.Random(f"{self._seed}/{dst}/{index}/{direction}")
                        nursery.start_soon(self._pipe, conn, a, b, frm, to, rng)
        finally:
            self._conns.discard(conn)
            _close(client, rst=conn.reset)
            if server is not None:
                _close(server, rst=conn.reset)

    async def _pipe(
        self,
        conn: _Conn,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        frm: int | None,
        to: int | None,
        rng: random.Random,
    ) -> None:
        """One direction: read chunks, stamp each with its delivery time, deliver them in order."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](_QUEUE_CHUNKS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver, conn, receive, sink, frm, to)
            async with send:
                last = 0.0
                while True:
                    try:
                        data = await source.receive_some(_CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._reset(conn)  # a reset from one end is passed on to the other
                        return
                    if not data:
                        return  # EOF: _deliver passes it on after the chunks in flight
                    rate = _lookup(self._drop, frm, to, 0.0)
                    if rate > 0 and rng.random() < rate:
                        self._stat((conn.src, conn.dst)).dropped += 1
                        self._reset(conn)
                        return
                    mean, jitter = _lookup(self._delay, frm, to, (0.0, 0.0))
                    delay = mean + rng.uniform(-jitter, jitter) if jitter else mean
                    last = max(trio.current_time() + delay, last)
                    await send.send((last, data))

    async def _deliver(
        self,
        conn: _Conn,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        sink: trio.SocketStream,
        frm: int | None,
        to: int | None,
    ) -> None:
        async with receive:
            async for at, data in receive:
                await trio.sleep_until(at)
                await self._wait_unblocked(frm, to)
                try:
                    await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._reset(conn)
                    return
                st = self._stat((frm, to))
                st.bytes += len(data)
                st.chunks += 1
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sink.send_eof()


# --- local clusters (pst cluster init) ---------------------------------------------------


def _node_dirs(root: Path) -> list[Path]:
    nodes = sorted(root.glob("node-*"), key=lambda p: int(p.name.split("-")[1]))
    if not nodes:
        raise ValueError(f"{root} holds no cluster (pst cluster init)")
    return nodes


def free_ports(count: int, *, host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> list[int]:
    """``count`` distinct ports that can be bound now, below the kernel's ephemeral range.

    Below the ephemeral range, no outgoing connection takes the port between now and when
    the server binds it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    skip = set(avoid)
    out: list[int] = []
    candidates = list(range(10000, low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates:
        if port in skip:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        out.append(port)
        if len(out) == count:
            return out
    raise RuntimeError(f"no {count} free ports on {host}")


def rewrite_cluster_listens(root: Path, *, host: str = "127.0.0.1") -> dict[int, tuple[Addr, Addr]]:
    """Move each server's ``[server] listen`` to a fresh port; returns the links for a proxy.

    ``links[i] = (peer address of i in C, i's new listen address)``: give them to
    :class:`FaultProxy` before the servers start, and every connection between servers
    goes through the proxy. C (``[network]``) is not touched.
    """
    from appliance.host import config as node_config

    nodes = _node_dirs(root)
    configs = [node_config.load(node / "config.toml") for node in nodes]
    peer_ports = {port for cfg in configs for _, port in cfg.peers.values()}
    ports = free_ports(len(nodes), host=host, avoid=peer_ports)
    links: dict[int, tuple[Addr, Addr]] = {}
    for node, cfg, port in zip(nodes, configs, ports, strict=True):
        path = node / "config.toml"
        text = path.read_text(encoding="utf-8")
        server = re.search(r"(?ms)^\[server\]\s*$(.*?)(?=^\[)", text)
        if server is None:
            raise ValueError(f"{path}: no [server] section")
        body, count = re.subn(
            r'(?m)^listen\s*=\s*"[^"]*"', f'listen = "{host}:{port}"', server.group(1), count=1
        )
        if count != 1:
            raise ValueError(f"{path}: no listen in [server]")
        path.write_text(text[: server.start(1)] + body + text[server.end(1) :], encoding="utf-8")
        new = node_config.load(path)
        assert new.listen == (host, port) and new.constants == cfg.constants, path
        links[cfg.server_id] = (cfg.peers[cfg.server_id], (host, port))
    return links


def _socket_inode(client: Addr, proxy: Addr) -> int | None:
    """The inode of the IPv4 socket whose local address is ``client`` and remote is ``proxy``."""

    def hex_addr(addr: Addr) -> str:
        (packed,) = struct.unpack("=I", socket.inet_aton(addr[0]))
        return f"{packed:08X}:{addr[1]:04X}"

    local, remote = hex_addr(client), hex_addr(proxy)
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[1] == local and parts[2] == remote:
                return int(parts[9])
    return None


def _pid_owns(pid: int, link: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                return True
    return False


def proc_source_identifier(pids: Callable[[], Mapping[int, int]]) -> SourceIdentifier:
    """Names the dialer by the process owning the client socket; ``pids()`` maps id -> pid.

    ``pids`` is called for every connection, so restarted servers are found under their
    new pid. Linux only (``/proc``), IPv4, and only processes of our own user.
    """

    def identify(client: Addr, proxy: Addr) -> int | None:
        inode = _socket_inode(client, proxy)
        if inode is None:
            return None
        link = f"socket:[{inode}]"
        for server_id, pid in pids().items():
            if _pid_owns(pid, link):
                return server_id
        return None

    return identify


def cluster_source_identifier(root: Path) -> SourceIdentifier:
    """:func:`proc_source_identifier` for a local cluster: the pids of its ``server.pid`` files."""

    def pids() -> dict[int, int]:
        out: dict[int, int] = {}
        for node in root.glob("node-*"):
            with contextlib.suppress(OSError, ValueError):
                out[int(node.name.split("-")[1])] = int((node / "server.pid").read_text())
        return out

    return proc_source_identifier(pids)
