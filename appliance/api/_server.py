"""The local API server: a Unix socket, one task per client, frames in and out of :class:`ApiCore`.

Theory of operation
-------------------
:func:`serve_api` binds a Unix stream socket at ``path`` and serves until cancelled. The
socket is bound under a temporary name in the same directory, given mode 0660 (and the
``group`` if one is configured), and only then renamed onto ``path``, so no client ever
sees it with looser permissions. A missing parent directory is created with mode 0750. A
stale socket file left by a crashed server is replaced; a live one (something accepts
connections on it) or a non-socket file at ``path`` is refused. On the way out the socket
file is removed if it is still ours.

Each connection runs in its own task of the server's nursery. The kernel's
``SO_PEERCRED`` (pid, uid, gid of the peer when it connected) is read once and identifies
the caller for every request on that connection; there is no other authentication, as the
paper assumes the operating system separates local applications (§5).

Bytes are split into frames by :class:`~appliance.net.FrameDecoder` (4-byte big-endian
length prefix), bounded by ``max_frame_size``; each frame is one request and gets exactly
one response frame, in order. A frame whose announced length is too big answers
``too-large``; a frame that is not canonical CBOR or not a map answers ``bad-request``;
in both cases the connection is closed after that response. A request with bad fields
answers ``bad-request`` and the connection stays usable. A request that takes longer than
``request_timeout`` answers ``unavailable``. A connection that completes no frame within
``idle_timeout`` (partial frames do not count as activity) is closed.

Connection limits are per uid: a uid with ``max_connections_per_uid`` connections open gets a
``quota`` error on the next one, which names its uid and the limit, and is closed, while every
other uid is still served; the refusal is logged naming the uid and pid (at most once a minute
per uid, so a client in a loop cannot flood the log). ``max_connections`` bounds all
connections together (file descriptors), except that the operator's uids (root and ours) are
not counted against it, only against their own per-uid limit, so that the operator can always
connect to see and revoke registrations (``pst api registrations``).
No exception from one connection ever reaches the listener or other connections.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from appliance.api._certreg import ClientCA, UsedCertificates
from appliance.api._core import (
    BAD_REQUEST,
    NOT_PERMITTED,
    QUOTA,
    TOO_LARGE,
    UNAVAILABLE,
    ApiCore,
    Backend,
    CertificateBackend,
    Limits,
    LinkBackend,
    LogBackend,
    PeerCred,
    StoreBackend,
    encode_response,
    error_response,
)
from appliance.api._registrations import RegistrationStore
from appliance.net._framing import FrameDecoder, FramingError, encode_frame

log = logging.getLogger("pst.api")

DEFAULT_MAX_FRAME_SIZE = 128 * 1024
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_CONNECTIONS_PER_UID = 64
#: A uid refused for too many connections is logged at most this often.
REFUSAL_LOG_INTERVAL = 60.0
SOCKET_MODE = 0o660
DIRECTORY_MODE = 0o750
_UCRED = struct.Struct("3i")
_RECEIVE_CHUNK = 65536
#: sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SUN_PATH = 107


def overflow_uid() -> int:
    """The uid the kernel reports for a user that the reader's user namespace does not map."""
    try:
        return int(Path("/proc/sys/kernel/overflowuid").read_text().strip())
    except (OSError, ValueError):
        return 65534


def peer_cred(sock: trio.socket.SocketType) -> PeerCred:
    """The peer's (pid, uid, gid) from ``SO_PEERCRED`` (Linux ``struct ucred``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


async def _is_live(path: Path) -> bool:
    """Does something accept connections on the socket at ``path``?"""
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1.0):
            await probe.connect(str(path))
            return True
        return True  # it neither accepted nor refused: treat as live, do not steal it
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()


async def bind_unix(path: Path, *, group: int | None = None, backlog: int = 64) -> trio.socket.SocketType:
    """A listening Unix socket at ``path`` with mode 0660, replacing a stale socket file."""
    path = Path(path)
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        raise ValueError(f"socket path is longer than {_MAX_SUN_PATH} bytes: {path}")
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        os.chmod(parent, DIRECTORY_MODE)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        if await _is_live(path):
            raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")
        log.info("api: removing stale socket %s", path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) > _MAX_SUN_PATH:
        raise ValueError(f"socket path is too long to bind safely (max {_MAX_SUN_PATH - 16} bytes): {path}")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp.unlink(missing_ok=True)
        await sock.bind(str(tmp))
        try:
            os.chmod(tmp, SOCKET_MODE)
            if group is not None:
                os.chown(tmp, -1, group)
            sock.listen(backlog)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


class ApiServer:
    """Serves one :class:`ApiCore` on a listening Unix socket."""

    def __init__(
        self,
        core: ApiCore,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID,
    ) -> None:
        self.core = core
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_connections_per_uid = max_connections_per_uid
        #: Connections counted against ``max_connections`` (the operator's are not).
        self.connections = 0
        self.per_uid: dict[int, int] = {}
        self.unmapped_uid = overflow_uid()
        self._refusal_logged: dict[int, float] = {}

    async def _send(self, stream: trio.SocketStream, response: bytes) -> bool:
        """Send one response frame; False if the client is gone or does not read."""
        with trio.move_on_after(self.idle_timeout):
            try:
                await stream.send_all(encode_frame(response, 2**32 - 1))
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return False

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client until it leaves, misbehaves or idles; never raises."""
        try:
            await self._admit(stream)
        except Exception as exc:  # a bug must cost one connection, not the server
            log.error("api: connection failed (%s), a bug", type(exc).__name__, exc_info=True)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await stream.aclose()

    def _log_refusal(self, peer: PeerCred, why: str) -> None:
        now = trio.current_time()
        last = self._refusal_logged.get(peer.uid)
        if last is None or now - last >= REFUSAL_LOG_INTERVAL:
            if len(self._refusal_logged) > 4096:
                self._refusal_logged.clear()
            self._refusal_logged[peer.uid] = now
            log.warning("api: refused a connection of uid %d (pid %d): %s", peer.uid, peer.pid, why)

    async def _refuse(self, stream: trio.SocketStream, code: str, message: str) -> None:
        """Answer a connection we do not serve (counted for /metrics) with the reason."""
        self.core.count("connection", code)
        await self._send(stream, encode_response(error_response(None, code, message)))

    async def _admit(self, stream: trio.SocketStream) -> None:
        """Check who connects and the connection limits, then serve."""
        try:
            peer = peer_cred(stream.socket)
        except OSError as exc:
            log.warning("api: cannot read the peer's credentials (%s); closing", type(exc).__name__)
            return
        if peer.uid == self.unmapped_uid:
            # Every user our user namespace does not map arrives as this one uid (systemd's
            # PrivateUsers=yes maps only root and the service user): names, handles and quotas
            # would be shared by all of them, so nobody is served under it.
            log.warning("api: refused pid %d: its uid is not mapped in our user namespace", peer.pid)
            message = (
                f"your uid shows as {peer.uid} (unmapped) inside the server's user namespace, so the "
                "server cannot tell you from other users; run it without PrivateUsers=yes"
            )
            await self._refuse(stream, NOT_PERMITTED, message)
            return
        mine = self.per_uid.get(peer.uid, 0)
        counted = peer.uid not in self.core.operators
        if mine >= self.max_connections_per_uid:
            self._log_refusal(peer, f"it has {mine} connections open, the limit per uid")
            message = (
                f"uid {peer.uid} already has {mine} connections open, the limit per user: close the "
                "clients you no longer use (each PstClient holds one connection until close())"
            )
            await self._refuse(stream, QUOTA, message)
            return
        if counted and self.connections >= self.max_connections:
            self._log_refusal(peer, f"{self.connections} connections are open, the limit of the server")
            message = (
                f"the server has {self.connections} connections open, its limit; try again later, "
                "or ask the operator (the server's log names the uids that hold them)"
            )
            await self._refuse(stream, QUOTA, message)
            return
        self.per_uid[peer.uid] = mine + 1
        self.connections += counted
        try:
            await self._serve(stream, peer)
        finally:
            self.connections -= counted
            left = self.per_uid[peer.uid] - 1
            if left:
                self.per_uid[peer.uid] = left
            else:
                del self.per_uid[peer.uid]

    async def _serve(self, stream: trio.SocketStream, peer: PeerCred) -> None:
        decoder = FrameDecoder(self.max_frame_size)
        deadline = trio.current_time() + self.idle_timeout
        while True:
            data = b""
            with trio.move_on_at(deadline) as idle:
                try:
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if idle.cancelled_caught:
                log.info("api: closing idle connection of uid %d (pid %d)", peer.uid, peer.pid)
                return
            if not data:
                try:
                    decoder.eof()
                except FramingError as exc:
                    self.core.count("connection", BAD_REQUEST)
                    await self._send(stream, encode_response(error_response(None, BAD_REQUEST, str(exc))))
                return
            try:
                frames = decoder.feed(data)
            except FramingError as exc:
                self.core.count("connection", TOO_LARGE)
                await self._send(stream, encode_response(error_response(None, TOO_LARGE, str(exc))))
                return
            for frame in frames:
                deadline = trio.current_time() + self.idle_timeout
                response: bytes | None = None
                close = False
                with trio.move_on_after(self.request_timeout):
                    response, close = await self.core.handle_frame(frame, peer)
                if response is None:
                    self.core.count("unknown", UNAVAILABLE)  # the op is not known here
                    reply = error_response(None, UNAVAILABLE, "the request timed out")
                    response = encode_response(reply)
                if not await self._send(stream, response) or close:
                    return

    async def serve(self, sock: trio.socket.SocketType) -> None:
        """Accept connections on the listening ``sock`` until cancelled."""
        listener = trio.SocketListener(sock)
        await trio.serve_listeners(self.handle_connection, [listener])


async def _in_thread(fn: Callable[[], bytes]) -> bytes:
    """Run a CPU-heavy step (scrypt) in a worker thread, so other clients are served meanwhile."""
    return await trio.to_thread.run_sync(fn)


async def serve_api(
    path: str | os.PathLike[str],
    backend: Backend,
    *,
    state_dir: Path | None = None,
    limits: Limits | None = None,
    reserved: Mapping[str, int] | None = None,
    group: int | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID,
    log_backend: LogBackend | None = None,
    links: LinkBackend | None = None,
    data_store: StoreBackend | None = None,
    client_ca: ClientCA | None = None,
    server_id: int | None = None,
    certificates: CertificateBackend | None = None,
    task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the local API at ``path`` until cancelled; ``nursery.start`` returns the ApiServer.

    ``state_dir`` is the server's state directory: registrations are kept in it across
    restarts (``serve/api-registrations.cbor``); without it they live in memory only.
    ``reserved`` pins application names to uids (nobody else may register them);
    ``group`` is the gid given to the socket file (mode 0660) so that members of that group
    may connect. ``log_backend`` serves the log operations (the server's ``[log]``), ``links``
    the proactive links' ``send`` and ``receive``; ``client_ca`` (with ``server_id``) lets
    distributed applications register by certificate (the certificates used are kept in
    ``serve/used-client-certificates``); ``certificates`` issues applications' period
    certificates (the group's CA).
    """
    sock_path = Path(path)
    store = RegistrationStore.in_state_dir(state_dir) if state_dir is not None else None
    core = ApiCore(
        backend,
        limits=limits,
        reserved=reserved,
        store=store,
        offload=_in_thread,
        log_backend=log_backend,
        links=links,
        data_store=data_store,
        client_ca=client_ca,
        server_id=server_id,
        certificates=certificates,
        used_certificates=UsedCertificates(
            Path(state_dir) / "serve" / "used-client-certificates" if state_dir is not None else None
        ),
    )
    sock = await bind_unix(sock_path, group=group)
    bound = os.stat(sock_path)
    server = ApiServer(
        core,
        max_frame_size=max_frame_size,
        idle_timeout=idle_timeout,
        request_timeout=request_timeout,
        max_connections=max_connections,
        max_connections_per_uid=max_connections_per_uid,
    )
    log.info("api: listening on %s", sock_path)
    try:
        task_status.started(server)
        await server.serve(sock)
    finally:
        core.flush()
        sock.close()
        try:
            now = os.stat(sock_path)
            if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                sock_path.unlink()
        except OSError:
            pass
