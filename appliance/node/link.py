"""The network-facing side of the key-holder link (see :mod:`appliance.node.keyholder`).

:class:`KeyHolderLink` starts the zygote, receives each key-holder child's end of the link,
relays protocol messages both ways, forwards the API's requests as calls, and hands the
period's channel identity to the network. It holds no share and no period private key:
only the channel key of the current period, which the period key certified.

While one child retires and the next starts (a few milliseconds), messages from peers are
queued and delivered to the next child; a call the retiring child did not answer is sent
again to the next one until its deadline (signing, GetTime and GetRandom may be repeated).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from appliance.boot.check import append_alert
from appliance.host.config import NodeConfig
from appliance.net import ChannelIdentity
from appliance.net._framing import FrameStream
from appliance.node.keyholder import MAX_LINK_FRAME, LinkError, decode_msg, encode_msg
from appliance.node.store import StateDir
from appliance.protocols._core import AlertKind
from appliance.protocols.signing import SigningRefused

log = logging.getLogger("pst.server")

#: How often the key-holder is asked whether its loop still runs, and how long it may take to answer
#: before that is an alert (a decoder or a computation that holds its loop stops every protocol).
PING_INTERVAL = 5.0
STALL_AFTER = 10.0

#: How many peer messages wait for the next key-holder child before the oldest are dropped.
MAX_QUEUED = 20_000
#: ... and at most this many bytes of them.
MAX_QUEUED_BYTES = 64 * 1024 * 1024

IdentityHandler = Callable[[int | None, Mapping[int, bytes], ChannelIdentity | None], Awaitable[None]]


class KeyHolderGone(Exception):
    """The zygote exited: the server cannot go on without its key-holder."""


@dataclass
class _Call:
    method: str
    args: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None
    restarted: bool = False


class KeyHolderLink:
    def __init__(
        self, config: NodeConfig, *, on_send: Callable[[int, bytes], None], on_identity: IdentityHandler
    ) -> None:
        self.config = config
        self.on_send = on_send
        self.on_identity = on_identity
        self.child_pid: int | None = None
        self.zygote_pid: int | None = None
        self.children = 0
        self.hardening: dict[str, Any] = {}
        #: Frames for the child: (call id or 0, frame). A frame stays here until it is written.
        self._queue: deque[tuple[int, bytes]] = deque()
        self._queued_bytes = 0
        self._wakeup = trio.Event()
        self._stream: FrameStream | None = None
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._identity_seen = trio.Event()
        self._session_done = trio.Event()
        self._session_done.set()
        self._period = -1
        #: When the key-holder stopped answering (None while it answers), for ``pst status``.
        self.stalled_since: float | None = None

    # Running ------------------------------------------------------------------------------

    async def run(
        self, zygote: int, control: socket.socket, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve each key-holder child the zygote hands us; raises KeyHolderGone when it ends."""
        self.zygote_pid = zygote
        control.setblocking(False)
        gone = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._children, control, nursery, gone)
                # Started once a child named its identity (the network needs it); children that
                # die before that are replaced by the zygote and served all the same.
                async with trio.open_nursery() as first:

                    async def until(event: trio.Event) -> None:
                        await event.wait()
                        first.cancel_scope.cancel()

                    first.start_soon(until, self._identity_seen)
                    first.start_soon(until, gone)
                if not gone.is_set():
                    task_status.started()
                    nursery.start_soon(self._watch)
                    await gone.wait()
                nursery.cancel_scope.cancel()
        finally:
            control.close()
            with trio.CancelScope(shield=True):
                code = await _reap(zygote, 5.0)
        raise KeyHolderGone(f"the key-holder zygote {zygote} exited ({code})")

    async def _watch(self) -> None:
        """Ask the key-holder now and then whether it still answers; a stall is an alert."""
        while True:
            await trio.sleep(PING_INTERVAL)
            asked = trio.current_time()
            try:
                await self.call("ping", STALL_AFTER)
            except (trio.TooSlowError, SigningRefused):
                if self.stalled_since is None:
                    self.stalled_since = asked
                    detail = (
                        f"key-holder child {self.child_pid} did not answer within {STALL_AFTER:g} s: "
                        "its loop is held (no protocol message, signature or refresh runs meanwhile)"
                    )
                    log.warning("%s", detail)
                    append_alert(  # pst serve's own file: public/ is the key-holder's (privsep)
                        StateDir(self.config.state_dir).serve_dir,
                        AlertKind.KEYHOLDER_STALLED,
                        self.config.server_id,
                        max(self._period, 0),
                        detail,
                        time.time(),
                    )
                continue
            if self.stalled_since is not None:
                log.info(
                    "key-holder child %s answers again after %.1f s",
                    self.child_pid,
                    trio.current_time() - self.stalled_since,
                )
                self.stalled_since = None

    async def _children(self, control: socket.socket, nursery: trio.Nursery, gone: trio.Event) -> None:
        """Receive each key-holder child's end of its link from the zygote, one after another."""
        try:
            while True:
                await trio.lowlevel.wait_readable(control)
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(control, 64, 1)
                except BlockingIOError:
                    continue
                if not msg:
                    return
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    log.error("key-holder zygote sent %r without a link; ignored", msg)
                    continue
                child = socket.socket(fileno=fds[0])
                child.setblocking(False)
                self.children += 1
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(child))
                await self._session_done.wait()
                nursery.start_soon(self._session, stream)
        finally:
            gone.set()

    async def _session(self, raw: trio.SocketStream) -> None:
        self._session_done = trio.Event()
        stream = FrameStream(raw, MAX_LINK_FRAME)
        try:
            async with trio.open_nursery() as nursery:
                self._stream = stream
                # Calls the previous child left unanswered go to this one.
                queued = {rid for rid, _ in self._queue if rid}
                for rid, call in self._calls.items():
                    if call.reply is None and rid not in queued:
                        frame = encode_msg("call", id=rid, method=call.method, args=call.args)
                        self._queue.appendleft((rid, frame))
                        self._queued_bytes += len(frame)
                self._wakeup.set()
                nursery.start_soon(self._writer, stream)
                await self._reader(stream)
                nursery.cancel_scope.cancel()
        finally:
            self._stream = None
            with trio.CancelScope(shield=True):
                await raw.aclose()
            for call in self._calls.values():
                if call.reply is None:
                    call.restarted = True
            self._session_done.set()

    async def _writer(self, stream: FrameStream) -> None:
        while True:
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(256, len(self._queue)))]
                self._queued_bytes -= sum(len(frame) for _rid, frame in taken)
                try:
                    await stream.send_frames([frame for _rid, frame in taken])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    for item in reversed(taken):  # for the next child
                        self._queue.appendleft(item)
                        self._queued_bytes += len(item[1])
                    return
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def _reader(self, stream: FrameStream) -> None:
        while True:
            try:
                data = await stream.receive_frame()
            except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as exc:
                log.warning("key-holder link broken: %s", exc)
                return
            if data is None:
                return
            try:
                await self._handle(decode_msg(data, "from the key-holder"))
            except LinkError as exc:
                log.warning("key-holder sent a bad frame: %s", exc)

    async def _handle(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "send":
            to, data = msg.get("to"), msg.get("data")
            if not isinstance(to, int) or not isinstance(data, bytes):
                raise LinkError("send: 'to' must be an int and 'data' bytes")
            self.on_send(to, data)
        elif op == "reply":
            rid = msg.get("id")
            call = self._calls.get(rid) if isinstance(rid, int) else None
            if call is not None and call.reply is None:
                call.reply = msg
                call.done.set()
        elif op == "identity":
            await self._identity(msg)
        elif op == "hello":
            pid, hardening = msg.get("pid"), msg.get("hardening")
            self.child_pid = pid if isinstance(pid, int) else None
            self.hardening = hardening if isinstance(hardening, dict) else {}
            log.info("key-holder child %s up (%s)", self.child_pid, self.hardening)
        elif op == "retire":
            log.info("key-holder child %s retires with its period's secrets", self.child_pid)
        else:
            raise LinkError(f"unknown op {op!r}")

    async def _identity(self, msg: dict[str, Any]) -> None:
        period = msg.get("period")
        if isinstance(period, int):
            self._period = period
        if period is None:
            await self.on_identity(None, {}, None)
        else:
            keys, cert, key = msg.get("keys"), msg.get("cert"), msg.get("key")
            if (
                not isinstance(period, int)
                or not isinstance(keys, dict)
                or not isinstance(cert, bytes)
                or not isinstance(key, bytes)
                or not all(isinstance(i, int) and isinstance(k, bytes) for i, k in keys.items())
            ):
                raise LinkError("identity: needs period, keys {int: bytes}, cert and key")
            await self.on_identity(period, keys, ChannelIdentity(period, cert, key))
        self._identity_seen.set()

    # What the network and the API use --------------------------------------------------------

    def deliver(self, sender: int, data: bytes) -> None:
        """A protocol message from peer ``sender``: to the current child, or queued for the next."""
        frame = encode_msg("deliver", **{"from": sender, "data": data})
        if len(frame) > MAX_LINK_FRAME:  # cannot happen for frames the network accepted; never crash
            log.warning("dropped a message from server %d: too large for the key-holder link", sender)
            return
        if len(self._queue) >= MAX_QUEUED or self._queued_bytes + len(frame) > MAX_QUEUED_BYTES:
            log.warning("key-holder link queue full: dropped a message from server %d", sender)
            return
        self._queue.append((0, frame))
        self._queued_bytes += len(frame)
        self._wakeup.set()

    async def call(self, method: str, timeout: float, **args: Any) -> Any:
        """Call ``method`` in the key-holder; retried on the next child if this one retires."""
        rid = next(self._ids)
        call = _Call(method, {"timeout_ms": max(1, round(timeout * 1000)), **args})
        self._calls[rid] = call
        frame = encode_msg("call", id=rid, method=method, args=call.args)
        self._queue.append((rid, frame))
        self._queued_bytes += len(frame)
        self._wakeup.set()
        try:
            with trio.fail_after(timeout + 1.0):
                await call.done.wait()
        finally:
            del self._calls[rid]
        reply = call.reply
        assert reply is not None
        if reply.get("ok") is True:
            return reply.get("value")
        error = reply.get("error")
        if reply.get("kind") == "timeout":
            raise trio.TooSlowError(str(error))
        code = reply.get("code")
        raise SigningRefused(
            str(error) if isinstance(error, str) else "refused by the key-holder",
            code=code if isinstance(code, str) else None,
        )

    # The PServer's API, through the link ------------------------------------------------------

    async def sign(self, app: str, sha512: bytes, *, timeout: float = 10.0) -> bytes:
        """An application signature: the key-holder builds the payload from the name and the
        message's SHA-512 digest."""
        value = await self.call("sign", timeout, app=app, sha512=sha512)
        if not isinstance(value, bytes):
            raise SigningRefused("the key-holder returned no signature")
        return value

    async def sign_checkpoint(self, text: str, *, timeout: float = 10.0) -> bytes:
        """The signed note of the log checkpoint ``text`` (every signer's guard checks it first)."""
        value = await self.call("sign_checkpoint", timeout, text=text)
        if not isinstance(value, bytes):
            raise SigningRefused("the key-holder returned no signed checkpoint")
        return value

    async def log_key(self, *, timeout: float = 5.0) -> bytes | None:
        """The public key of the log's checkpoints (None while the key-holder has no state)."""
        value = await self.call("log_key", timeout)
        return value if isinstance(value, bytes) else None

    async def sign_upgrade(self, *, timeout: float = 15.0) -> bytes:
        value = await self.call("sign_upgrade", timeout)
        if not isinstance(value, bytes):
            raise SigningRefused("the key-holder returned no upgrade certificate")
        return value

    async def sign_dss(self, secret: str, message: bytes, *, timeout: float = 10.0) -> bytes:
        """A threshold DSS signature (DER) by the DSS secret ``secret`` of C (key-holder's sign_dss)."""
        value = await self.call("sign_dss", timeout, secret=secret, message=message)
        if not isinstance(value, bytes):
            raise SigningRefused("the key-holder returned no DSS signature")
        return value

    async def dss_public_key(self, secret: str, *, timeout: float = 5.0) -> bytes | None:
        """The PEM public key of DSS secret ``secret`` (None if C has none of that name)."""
        value = await self.call("dss_public_key", timeout, secret=secret)
        return value if isinstance(value, bytes) else None

    async def sign_app_dss(
        self, group: str, app: str, uid: bytes, key: str, message: bytes, *, timeout: float = 10.0
    ) -> bytes:
        """A signature by an application's DSS key (key-holder's sign_app_dss; apps/dsskeys)."""
        value = await self.call(
            "sign_app_dss", timeout, group=group, app=app, uid=uid, key=key, message=message
        )
        if not isinstance(value, bytes):
            raise SigningRefused("the key-holder returned no DSS signature")
        return value

    async def app_dss_public_key(
        self, group: str, app: str, key: str, *, timeout: float = 5.0
    ) -> bytes | None:
        """The PEM public key of an application's DSS key (None: no such base secret in C)."""
        value = await self.call("app_dss_public_key", timeout, group=group, app=app, key=key)
        return value if isinstance(value, bytes) else None

    async def store_key(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """The store key's group, threshold, period and public sharing (key-holder's store_key)."""
        value = await self.call("store_key", timeout)
        if not isinstance(value, dict):
            raise SigningRefused("the key-holder returned no store key")
        return value

    async def store_share(
        self, parts: list[list[bytes]], reader: bytes, *, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Our decryption shares of ``parts`` ([KEM ciphertext, label] each), sealed to ``reader``."""
        value = await self.call("store_share", timeout, parts=parts, reader=reader)
        if not isinstance(value, dict):
            raise SigningRefused("the key-holder returned no decryption shares")
        return value

    async def time_vector(self, *, timeout: float = 2.0) -> dict[int, float | None]:
        value = await self.call("time_vector", timeout)
        if not isinstance(value, dict):
            raise SigningRefused("the key-holder returned no time vector")
        return {int(i): None if t is None else t / 1_000_000 for i, t in value.items()}

    async def random(self, nonce: bytes, *, timeout: float = 5.0) -> tuple[bytes, bytes]:
        value = await self.call("random", timeout, nonce=nonce)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, bytes) for v in value)):
            raise SigningRefused("the key-holder returned no random value")
        return value[0], value[1]

    async def request_refresh(self, period: int, start: float) -> bool:
        return bool(await self.call("request_refresh", 5.0, period=period, start_ms=round(start * 1000)))


async def _reap(pid: int, timeout: float) -> str:
    """Wait for the zygote to exit (it does once its link closes); kill it after ``timeout``."""
    deadline = trio.current_time() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "already reaped"
        if done:
            return f"exit code {os.waitstatus_to_exitcode(status)}"
        if trio.current_time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "killed after the timeout"
        await trio.sleep(0.05)
