"""The key-holder: the only process of a server that ever holds a share or a period private key.

Theory of operation
-------------------
``pst serve`` is the *network-facing* process: TLS to the other servers, the local API
socket, signals. Before anything else (single-threaded, before trio starts, holding no
secret) it forks the *zygote* (:func:`start_zygote`) and talks to it over a control
socket. The zygote makes itself undumpable with no core files
(:mod:`appliance.node.hardening`) and never reads a secret.
For every period it forks a **key-holder child** with a fresh socket pair, and hands one
end to the network-facing process (SCM_RIGHTS over the control socket).

The child locks its memory (mlockall; locks are not inherited through fork), loads the
state directory and runs the protocol core (:class:`~appliance.node.server.PServer`) on
its own trio loop. Its transport is the link to the network-facing process
(:class:`LinkTransport`): outgoing protocol messages, and the period's TLS identity, which
is a *channel key* issued by the period key (:func:`~appliance.net.channel_identity`), so
the period key itself never leaves the child. Protocol messages it receives, and the API's
requests (sign, GetTime, GetRandom, refresh requests), come back the same way.

When the child has persisted its period's refresh outcome and handed over the new channel
identity, it *retires*: it exits, and the previous period's shares and period keys die
with its address space (they were never written anywhere but the private state file,
which the refresh replaced and erased). The next child, which loads only the new period's
data, was forked ahead of time: a third of the way into the period (at most 5 s after the
current child started, so not during the refresh a start may join) the zygote forks a
*standby* that locks its memory and then blocks on a pipe, holding no secret and reading
nothing. When the current child has retired, the zygote hands the standby's link to
``pst serve`` and writes to the pipe; only then does the standby run scenario F's code check
and load the new period's state. So the refresh pays neither for a fork nor for locking
memory (about 0.1 s each time, more with 2 cores shared by many servers), and a fork
costs milliseconds where starting Python afresh costs half a second of CPU every period.

The link carries length-prefixed canonical CBOR frames (:mod:`appliance.net._framing`):

==========  ===============  ==================================================
direction   ``op``           fields
==========  ===============  ==================================================
child ->    ``hello``        ``pid``, ``hardening`` (what :func:`harden` achieved)
child ->    ``identity``     ``period``, ``keys`` {id: V_i}, ``cert``, ``key`` (or no period)
child ->    ``send``         ``to``, ``data``: a protocol message for a peer
child ->    ``reply``        ``id``, ``ok``, ``value`` or ``error``
child ->    ``retire``       the child exits after this frame
-> child    ``deliver``      ``from``, ``data``: a protocol message from a peer
-> child    ``call``         ``id``, ``method``, ``args``
==========  ===============  ==================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from appliance.boot.backends import open_rom
from appliance.boot.check import append_alert, code_mismatches, constants_for_code_check, recheck_code
from appliance.boot.manifest import ManifestError, environment
from appliance.boot.rom import ReadRom, Rom, RomError
from appliance.boot.watch import CodeWatch, WatchUnavailable
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.host.config import NodeConfig, Privsep
from appliance.net import ChannelIdentity, channel_identity
from appliance.net._framing import DEFAULT_MAX_FRAME_SIZE, FrameStream
from appliance.node._approvals import keyholder_methods, use_registration_clients
from appliance.node.hardening import Hardening, harden
from appliance.node.privsep import PrivsepError, allow_memory_lock, drop
from appliance.node.server import Deliver, PServer, Transport, period_keys
from appliance.node.store import StateDir
from appliance.protocols._core import AlertKind
from appliance.protocols.refresh import current_table
from appliance.protocols.signing import SigningRefused
from appliance.protocols.state import APP_KEY_SECRETS, CA_SECRET, LOG_SECRET, SCERT, TSA_SECRET

log = logging.getLogger("pst.keyholder")

#: Exit codes of a key-holder child (and of the zygote when it gives up).
EXIT_RETIRED = 0
EXIT_CONFIG = 2
EXIT_CRASHED = 3
EXIT_PARENT_GONE = 4
#: The installed code no longer matches the manifest of C (scenario F): the server stops.
EXIT_CODE_CHANGED = 5
#: A standby child the zygote let go without starting it (it read nothing).
EXIT_STANDBY_UNUSED = 6
#: How long a freshly started server waits for its connections before joining a refresh.
WARMUP = 1.0
#: A link frame is a protocol message plus a little: the network's frame bound is plenty.
MAX_LINK_FRAME = DEFAULT_MAX_FRAME_SIZE + 64 * 1024
#: Crash loop guard: more than this many abnormal child exits in ``_CRASH_WINDOW`` seconds
#: makes the zygote give up (the network-facing process then stops with an error).
_CRASHES = 5
_CRASH_WINDOW = 30.0
#: The zygote forks the next period's child this long after the current one started (at
#: most a third of the period), after the refresh that a server's start may join.
_STANDBY_DELAY = 5.0


class LinkError(Exception):
    """A frame on the key-holder link is malformed; the message says which and why."""


def encode_msg(op: str, **fields: Any) -> bytes:
    return encoding.encode({"op": op, **fields})


def decode_msg(data: bytes, side: str) -> dict[str, Any]:
    try:
        obj = encoding.decode(data, max_size=MAX_LINK_FRAME, what=f"key-holder link ({side})")
    except DecodeError as exc:
        raise LinkError(str(exc)) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise LinkError(f"key-holder link ({side}): a frame must be a map with an 'op'")
    return obj


def identity_fields(period: int | None, keys: Mapping[int, bytes], ident: ChannelIdentity | None) -> Any:
    if period is None or ident is None:
        return {"period": None}
    return {"period": period, "keys": dict(keys), "cert": ident.cert_pem, "key": ident.key_pem}


# -- The child: PServer on a link --------------------------------------------------------------


class LinkTransport:
    """The child's :class:`~appliance.node.server.Transport`: everything goes to the parent."""

    def __init__(self, me: int, outbox: trio.MemorySendChannel[bytes]) -> None:
        self.me = me
        self.outbox = outbox

    def _put(self, frame: bytes) -> None:
        try:
            self.outbox.send_nowait(frame)
        except trio.WouldBlock:
            log.warning("key-holder: link to the network-facing process is full; a frame was dropped")

    def send(self, to: int, data: bytes) -> None:
        self._put(encode_msg("send", to=to, data=data))

    def identity(self, period: int | None, keys: Mapping[int, bytes], seed: bytes | None) -> None:
        ident = channel_identity(self.me, period, seed) if period is not None and seed is not None else None
        self._put(encode_msg("identity", **identity_fields(period, keys, ident)))

    async def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None:
        self.identity(period, keys, seed)


class _Child:
    def __init__(
        self,
        config: NodeConfig,
        stream: trio.SocketStream,
        hardening: Hardening,
        pid: int,
        first: bool,
        rom: Rom | None = None,
    ) -> None:
        self.config = config
        self.frames = FrameStream(stream, MAX_LINK_FRAME)
        self.hardening = hardening
        self.outbox, self.out_receive = trio.open_memory_channel[bytes](100_000)
        self.deliver: Deliver | None = None
        self.server = PServer(
            config,
            self._transport,
            status_extra={"keyholder": {"pid": os.getpid(), **hardening.to_json()}},
            status_pid=pid,
            # Only when pst serve starts: a child that follows a retired one joins the next period.
            warmup=min(WARMUP, config.constants.period_length / 4) if first else 0.0,
            rom=rom,
        )
        self.server.retire_after_refresh = True
        if config.log is not None:
            self._guard_log(config)
        if config.tsa is not None and config.tsa.threshold:
            self._guard_timestamps(config)
        if TSA_SECRET in config.constants.secrets and not (
            config.tsa is not None and config.tsa.threshold and config.tsa.secret == TSA_SECRET
        ):
            from appliance.apps.tsa.threshold import NoTimestamps

            self.server.add_payload_check(TSA_SECRET, NoTimestamps())
        self._guard_app_keys(config)
        ca_methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        if CA_SECRET in config.constants.secrets:
            from appliance.node.ca import CaAuthority

            authority = CaAuthority(config, self.server)  # registers the sign/ca check
            ca_methods = {
                "ca_root": authority.ca_root,
                "ca_issue": authority.ca_issue,
                "ca_prepare": authority.ca_prepare,
                "ca_sign": authority.ca_sign,
            }
        self._drained = trio.Event()
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "sign": self._sign,
            "time_vector": self._time_vector,
            "random": self._random,
            "request_refresh": self._request_refresh,
            "sign_upgrade": self._sign_upgrade,
            "ping": self._ping,
            "sign_checkpoint": self._sign_checkpoint,
            "sign_dss": self._sign_dss,
            "dss_public_key": self._dss_public_key,
            "sign_app_dss": self._sign_app_dss,
            "app_dss_public_key": self._app_dss_public_key,
            "log_key": self._log_key,
            "store_key": self._store_key,
            "store_share": self._store_share,
            **keyholder_methods(self.server),  # distributed applications (paper §5.1)
            **ca_methods,  # the group's certificate authority (appliance.node.ca)
        }

    async def _transport(
        self, config: NodeConfig, server: PServer, nursery: trio.Nursery, deliver: Deliver
    ) -> Transport:
        self.deliver = deliver
        transport = LinkTransport(config.server_id, self.outbox)
        loaded = server.store.load()
        keys = period_keys(loaded.public)
        table = current_table(loaded.public)
        private = loaded.private
        if table is None or private is None or private.period != table.period or config.server_id not in keys:
            transport.identity(None, {}, None)
        else:
            transport.identity(table.period, keys, private.signing_seed)
        return transport

    parent_gone = False

    async def run(self) -> int:
        await self.frames.send_frame(encode_msg("hello", pid=os.getpid(), hardening=self.hardening.to_json()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            await nursery.start(self.server.run)
            use_registration_clients(self.server)
            nursery.start_soon(self._reader, nursery)
            await self.server.retired.wait()
            if not self.parent_gone:
                self.outbox.send_nowait(encode_msg("retire"))
                await self.outbox.aclose()
                with trio.move_on_after(5):
                    await self._drained.wait()
            nursery.cancel_scope.cancel()
        return EXIT_PARENT_GONE if self.parent_gone else EXIT_RETIRED

    async def _writer(self) -> None:
        async for frame in self.out_receive:
            batch = [frame]
            while len(batch) < 256:
                try:
                    batch.append(self.out_receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await self.frames.send_frames(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.parent_gone = True
                self.server.retired.set()
                return
        self._drained.set()

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self.frames.receive_frame()
            except trio.BrokenResourceError:  # reset: it closed its end with our frames unread
                data = None
            if data is None:  # the network-facing process is gone: nothing left to serve
                log.info("key-holder: link closed by the network-facing process")
                self.parent_gone = True
                self.server.retired.set()
                return
            try:
                msg = decode_msg(data, "to the key-holder")
                if msg["op"] == "deliver":
                    sender, payload = msg.get("from"), msg.get("data")
                    if not isinstance(sender, int) or not isinstance(payload, bytes):
                        raise LinkError("deliver: 'from' must be an int and 'data' bytes")
                    if self.deliver is not None:
                        self.deliver(sender, payload)
                elif msg["op"] == "call":
                    nursery.start_soon(self._call, msg)
                else:
                    raise LinkError(f"unknown op {msg['op']!r}")
            except LinkError as exc:
                log.warning("key-holder: frame from the network-facing process refused: %s", exc)

    async def _call(self, msg: dict[str, Any]) -> None:
        rid, method, args = msg.get("id"), msg.get("method"), msg.get("args")
        if not isinstance(rid, int) or not isinstance(method, str) or not isinstance(args, dict):
            log.warning("key-holder: malformed call refused")
            return
        handler = self.methods.get(method)
        try:
            if handler is None:
                raise LinkError(f"unknown method {method!r}")
            value = await handler(args)
            reply = encode_msg("reply", id=rid, ok=True, value=value)
        except (SigningRefused, LinkError, ValueError, TypeError) as exc:
            code = exc.code if isinstance(exc, SigningRefused) else None  # what the caller acts on
            extra = {} if code is None else {"code": code[:100]}
            reply = encode_msg("reply", id=rid, ok=False, error=str(exc)[:300], kind="refused", **extra)
        except trio.TooSlowError:
            reply = encode_msg("reply", id=rid, ok=False, error="timed out", kind="timeout")
        except Exception as exc:  # a bug here must not kill the key-holder (the call would be re-sent)
            log.exception("key-holder: %s failed", method)
            reply = encode_msg("reply", id=rid, ok=False, error=f"internal error: {type(exc).__name__}")
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self.outbox.send_nowait(reply)  # when retiring, the parent retries on the next child

    @staticmethod
    def _timeout(args: dict[str, Any], default: float) -> float:
        ms = args.get("timeout_ms")
        return ms / 1000 if isinstance(ms, int) and 0 < ms <= 600_000 else default

    async def _sign(self, args: dict[str, Any]) -> bytes:
        app, sha512 = args.get("app"), args.get("sha512")
        if not isinstance(app, str) or not isinstance(sha512, bytes):
            raise TypeError("sign: 'app' must be a string and 'sha512' bytes")
        return await self.server.sign_app(app, sha512, timeout=self._timeout(args, 10.0))

    async def _sign_dss(self, args: dict[str, Any]) -> bytes:
        secret, message = args.get("secret"), args.get("message")
        if not isinstance(secret, str) or not isinstance(message, bytes):
            raise TypeError("sign_dss: 'secret' must be a string and 'message' bytes")
        return await self.server.sign_dss(secret, message, timeout=self._timeout(args, 10.0))

    async def _sign_app_dss(self, args: dict[str, Any]) -> bytes:
        group, app, uid, key, message = (args.get(k) for k in ("group", "app", "uid", "key", "message"))
        if not (
            isinstance(group, str)
            and isinstance(app, str)
            and isinstance(uid, bytes)
            and isinstance(key, str)
            and isinstance(message, bytes)
        ):
            raise TypeError("sign_app_dss: 'group', 'app', 'key' must be strings, 'uid' and 'message' bytes")
        return await self.server.sign_app_dss(
            group, app, uid, key, message, timeout=self._timeout(args, 10.0)
        )

    async def _app_dss_public_key(self, args: dict[str, Any]) -> bytes | None:
        group, app, key = args.get("group"), args.get("app"), args.get("key")
        if not (isinstance(group, str) and isinstance(app, str) and isinstance(key, str)):
            raise TypeError("app_dss_public_key: 'group', 'app' and 'key' must be strings")
        return self.server.app_dss_public_key(group, app, key)

    def _guard_app_keys(self, config: NodeConfig) -> None:
        """The application keys' secrets of C sign only requests for a key the store holds and
        the named client owns (appliance.apps.dsskeys); the store node writes the registry."""
        from appliance.apps.dsskeys.model import KEY_REGISTRY, AppKeyCheck, RegistryFile

        registry = RegistryFile(StateDir(config.state_dir).serve_dir / "store" / KEY_REGISTRY)
        for group, secret in APP_KEY_SECRETS.items():
            if config.constants.secrets.get(secret) == group:
                self.server.add_payload_check(secret, AppKeyCheck(group, registry.lookup))

    async def _dss_public_key(self, args: dict[str, Any]) -> bytes | None:
        secret = args.get("secret")
        if not isinstance(secret, str):
            raise TypeError("dss_public_key: 'secret' must be a string")
        return self.server.dss_public_key(secret)

    def _guard_log(self, config: NodeConfig) -> None:
        """The log's checkpoint guard on our shares of the log key (and on the group key, for
        anything that reads as a checkpoint): the log is the one the network-facing process
        appends to; the last checkpoint we signed is kept in our own public/log-guard."""
        from appliance.apps.log.guard import CheckpointGuard, SharedTileLog
        from appliance.apps.log.tiles import PosixStorage

        settings = config.log
        assert settings is not None
        shared = SharedTileLog(PosixStorage(settings.directory), settings.origin)
        record = PosixStorage(StateDir(config.state_dir).public_dir / "log-guard")
        if LOG_SECRET in config.constants.secrets:
            self.server.add_payload_check(LOG_SECRET, CheckpointGuard(shared, record, claim_all=True))
        self.server.add_payload_check(SCERT, CheckpointGuard(shared, record))

    def _guard_timestamps(self, config: NodeConfig) -> None:
        """[tsa] mode = "threshold": our shares of the TSA secret sign only timestamp tokens our
        own check accepts (genTime within the stated accuracy of our clock, our policy, the
        serial of the server that asked, a certificate the group issued under our [ca] policy's
        ``tsa`` profile, chaining to the group root; appliance.apps.tsa.threshold)."""
        import datetime as dt

        from appliance.apps.ca.policy import IssuedCheck
        from appliance.apps.tsa.rfc3161 import Accuracy
        from appliance.apps.tsa.threshold import TimestampCheck
        from appliance.node.ca import policy_of

        tsa = config.tsa
        assert tsa is not None
        server = self.server

        def ca_public() -> bytes | None:  # the group root's key: the network's ca key
            core = server.core
            sharing = core.public.sharings.get(CA_SECRET) if core is not None else None
            return sharing.public_key if sharing is not None else None

        policy = policy_of(config)  # (threshold mode needs [ca] tsa_names: config.py)
        issued = IssuedCheck(config.constants, ca_public, policy.profile("tsa"), policy.grace)

        def clock() -> dt.datetime:
            return dt.datetime.fromtimestamp(server.clock(), dt.UTC)

        check = TimestampCheck(
            policy=tsa.policy,
            accuracy=Accuracy(tsa.accuracy_ms // 1000, tsa.accuracy_ms % 1000),
            clock=clock,
            public_key=lambda: server.dss_public_key(tsa.secret),
            issued=issued,
        )
        server.add_payload_check(tsa.secret, check)

    async def _sign_checkpoint(self, args: dict[str, Any]) -> bytes:
        from appliance.apps.log.checkpoint import Checkpoint

        text = args.get("text")
        if not isinstance(text, str):
            raise TypeError("sign_checkpoint: 'text' must be a string")
        secret = LOG_SECRET if LOG_SECRET in self.config.constants.secrets else SCERT
        return await self.server.sign_checkpoint(
            Checkpoint.parse(text), secret=secret, timeout=self._timeout(args, 10.0)
        )

    async def _log_key(self, args: dict[str, Any]) -> bytes | None:
        """The public key that signs the log's checkpoints (the log key, else the group key)."""
        core = self.server.core
        if core is None:
            return None
        for secret in (LOG_SECRET, SCERT):
            sharing = core.public.sharings.get(secret)
            if secret in self.config.constants.secrets and sharing is not None:
                key: bytes = sharing.public_key
                return key
        return None

    def _store_sharing(self) -> tuple[Any, Any, int]:
        """(group, public sharing, period) of the store key now: StoreUnavailable-like refusal
        (ValueError) when C has none or this server holds no share of it."""
        from appliance.apps.store.service import STORE_SECRET

        core = self.server.core
        if core is None or STORE_SECRET not in self.config.constants.secrets:
            raise ValueError("the network has no store key (pst cluster init --store)")
        sharing = core.public.sharings.get(STORE_SECRET)
        table = core.public.key_table
        if sharing is None or table is None:
            raise ValueError("this server holds no state of the store key now")
        return core.clock.group(STORE_SECRET), sharing, table.period

    async def _store_key(self, args: dict[str, Any]) -> dict[str, Any]:
        """The store key's group, threshold and public sharing (its Feldman commitment; the
        constant term is the public key the clients seal to), and the period."""
        group, sharing, period = self._store_sharing()
        core = self.server.core
        m = core.public.m if core is not None else None
        return {
            "group": group.name,
            "n": sharing.n,
            "t": sharing.t,
            "period": period,
            "commitment": sharing.commitment.encode(group),
            # the group public key, which signs every KeyTable: a quorum's certificate is
            # checked against it (appliance.apps.store.model.check_quorum)
            "vcert": m.vcert if m is not None else b"",
            # this period's KeyTable with the group key's signature: the store's period mark
            "table": core.public.key_table.encode()
            if core is not None and core.public.key_table is not None and core.public.key_table.signature
            else b"",
        }

    async def _store_share(self, args: dict[str, Any]) -> dict[str, Any]:
        """Our decryption share of each KEM ciphertext, sealed to the reader's X25519 key.

        The network-facing process ran the store's rule first (appliance.apps.store.service:
        authorize_read against its state and clock); here each ciphertext is checked against
        its label again (TDH2's check), and only sealed shares leave this process."""
        from appliance.apps.store.service import STORE_SECRET
        from appliance.crypto import tdh2
        from appliance.crypto.keyshare import KeyShare
        from appliance.crypto.secret import SecretScalar, system_scalar_source

        parts, reader = args.get("parts"), args.get("reader")
        if not isinstance(parts, list) or not isinstance(reader, bytes) or not 1 <= len(parts) <= 256:
            raise TypeError("store_share: 'parts' must be a list of [kem, label] and 'reader' bytes")
        group, sharing, period = self._store_sharing()
        core = self.server.core
        assert core is not None
        share = core.private.shares.get(STORE_SECRET) if core.private is not None else None
        if share is None or share.wiped or core.private is None or core.private.period != period:
            raise ValueError("this server holds no share of the store key this period (recovering)")
        key = KeyShare(self.config.server_id, SecretScalar(share.value, group.order), sharing)
        if not key.check(group):
            raise ValueError("this server's share of the store key does not match its commitment")
        rand = system_scalar_source(group.order)
        sealed = []
        for item in parts:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, bytes) for x in item)):
                raise TypeError("store_share: each part is [kem, label]")
            kem = tdh2.Ciphertext.decode(group, item[0])
            try:
                dshare = tdh2.decryption_share(group, key, kem, rand, item[1])
            except tdh2.InvalidCiphertext as exc:
                raise ValueError(f"store_share: {exc}") from None
            sealed.append(tdh2.share_for_reader(group, dshare, reader))
        return {"period": period, "commitment": sharing.commitment.encode(group), "shares": sealed}

    async def _ping(self, args: dict[str, Any]) -> bool:
        """The network-facing process checks that our loop still runs (a stalled one is an alert)."""
        return True

    async def _sign_upgrade(self, args: dict[str, Any]) -> bytes:
        return await self.server.sign_upgrade(timeout=self._timeout(args, 15.0))

    async def _time_vector(self, args: dict[str, Any]) -> dict[int, int | None]:
        vector = await self.server.time_vector(timeout=self._timeout(args, 2.0))
        return {i: None if t is None else round(t * 1_000_000) for i, t in vector.items()}

    async def _random(self, args: dict[str, Any]) -> list[bytes]:
        nonce = args.get("nonce")
        if not isinstance(nonce, bytes):
            raise TypeError("random: 'nonce' must be bytes")
        value, message = await self.server.random(nonce, timeout=self._timeout(args, 5.0))
        return [value, message]

    async def _request_refresh(self, args: dict[str, Any]) -> bool:
        period, start_ms = args.get("period"), args.get("start_ms")
        if not isinstance(period, int) or not isinstance(start_ms, int):
            raise TypeError("request_refresh: 'period' and 'start_ms' must be ints")
        return self.server.request_refresh(period, start_ms / 1000)


def child_main(
    config: NodeConfig,
    sock: socket.socket,
    server_pid: int,
    first: bool,
    rom: Rom | None = None,
    go: int | None = None,
) -> int:
    """One key-holder child. A *standby* (``go`` is a pipe's read end) hardens and waits.

    The zygote forks the next period's child while the current one still runs, so that
    locking its memory is done before it is needed; the standby reads no secret and runs
    nothing until the zygote writes to ``go`` (when the current child retired). Then, and
    for every child but the first, the code check of scenario F runs, before any secret is
    read.
    """
    hardening = harden(lock=True, die_with_parent_process=True)
    ahead: _CheckedAhead | None = None
    if go is not None:
        if not first:
            ahead = _check_ahead(config)
        try:
            started = os.read(go, 1) == _GO
        finally:
            os.close(go)
        if not started:  # the zygote is gone or let us go unused: nothing was ever read
            return EXIT_STANDBY_UNUSED
    if os.getppid() == 1:  # the zygote died before we could ask to die with it
        return EXIT_CRASHED
    if not first and not _code_unchanged(config, ahead):  # pst serve checked it at boot
        return EXIT_CODE_CHANGED
    sock.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    child = _Child(config, stream, hardening, server_pid, first, rom)
    return trio.run(child.run)


@dataclass
class _CheckedAhead:
    """A standby's code check, made with the environment watched from before it began."""

    watch: CodeWatch
    code_digest: bytes  # of the C it checked against


def _check_ahead(config: NodeConfig) -> _CheckedAhead | None:
    """Watch the environment, then check it (appliance.boot.watch): None if it cannot be watched
    here, or did not pass (the check when we are let go then says why, with its alert)."""
    if sys.pycache_prefix is not None and os.path.isdir(sys.pycache_prefix):
        return None  # bytecode caches outside the environment would be read: not watched
    try:
        watch = CodeWatch.over(environment())
    except (WatchUnavailable, ManifestError, OSError) as exc:
        log.info("code check at the refresh: the environment cannot be watched (%s)", exc)
        return None
    c = constants_for_code_check(config)
    if not c.code_digest or code_mismatches(c, config.state_dir):
        watch.close()
        return None
    return _CheckedAhead(watch, c.code_digest)


def _code_unchanged(config: NodeConfig, ahead: _CheckedAhead | None = None) -> bool:
    """Scenario F at every refresh: the installed code against the manifest of C.

    Each key-holder child checks before it reads a secret; a mismatch raises a code-mismatch
    alert naming the files and stops the server (it needs a new C approved by the network).
    A standby that checked ahead with the environment watched (:func:`_check_ahead`) only
    reads its watch: nothing changed since, and the same C, mean the same result.
    """
    started = time.process_time()
    if ahead is not None:
        unchanged = not ahead.watch.changed()
        ahead.watch.close()
        if unchanged and constants_for_code_check(config).code_digest == ahead.code_digest:
            log.info(
                "code unchanged since its check ahead (%d directories watched): %.3f s of CPU",
                ahead.watch.watched,
                time.process_time() - started,
            )
            return True
    mismatches = recheck_code(config)
    log.info("code check before the period's secrets: %.3f s of CPU", time.process_time() - started)
    if not mismatches:
        return True
    names = ", ".join(str(m) for m in mismatches[:5]) + (" ..." if len(mismatches) > 5 else "")
    log.error("the installed code differs from the manifest in C: %s; stopping", names)
    store = StateDir(config.state_dir)
    table = store.load().public.key_table
    append_alert(
        store.public_dir,
        AlertKind.CODE_MISMATCH,
        config.server_id,
        table.period if table is not None else 0,
        f"refresh refused: the installed code differs from the manifest in C: {names}",
        time.time(),
    )
    return False


# -- The zygote ----------------------------------------------------------------------------------


def zygote_main(
    config: NodeConfig, control: socket.socket, server_pid: int, privsep: Privsep | None = None
) -> int:
    """Fork one key-holder child per period, hand its link to ``pst serve``, repeat.

    Under [privsep] the zygote starts as root: it reads Vstart (the ROM device may be root's
    only), lets itself lock memory, and drops to the key-holder's account for good before
    anything else (:mod:`appliance.node.privsep`).
    """
    rom: Rom | None = None
    if privsep is not None:
        try:
            rom = ReadRom(open_rom(config))
        except RomError as exc:
            log.error("key-holder: %s", exc)
            return EXIT_CONFIG
        unlimited = allow_memory_lock()
        try:
            drop(privsep.keyholder, umask=0o022, keep_memory_lock=not unlimited)
        except PrivsepError as exc:
            log.error("key-holder: %s", exc)
            return EXIT_CONFIG
    # Forked from pst serve's main thread before trio started: the parent-death signal is
    # safe here (it fires when the forking *thread* ends). The child sets its own.
    harden(lock=False, die_with_parent_process=True)
    # systemd signals the whole control group on stop: the zygote and the child leave when
    # pst serve closes their sockets, so that pst serve sees an orderly end.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != server_pid:
        return EXIT_PARENT_GONE
    crashes: list[float] = []
    standby: _Standby | None = None
    try:
        current = _fork_child(config, control, server_pid, rom, first=True)
        while True:
            try:  # the link goes to pst serve before the child may start
                socket.send_fds(control, [b"child %d" % current.pid], [current.link.fileno()])
            except OSError:  # pst serve is gone
                os.kill(current.pid, signal.SIGKILL)
                os.waitpid(current.pid, 0)
                return 0
            finally:
                current.link.close()
            current.start()
            # The next period's child hardens while this one serves, but not while the refresh
            # that may follow a start runs: its memory locking would take CPU from it.
            code = _wait_child(current.pid, _standby_delay(config))
            if code is None:
                standby = _fork_child(config, control, server_pid, rom, first=False)
                code = _wait_child(current.pid, None)
                assert code is not None
            if standby is None:  # it ended before its standby was due
                standby = _fork_child(config, control, server_pid, rom, first=False)
            current = standby  # the next child, not started yet: dismissed if we stop here
            if code == EXIT_RETIRED:
                standby = None
                continue
            if code in (EXIT_CONFIG, EXIT_PARENT_GONE, EXIT_CODE_CHANGED):
                return code
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < _CRASH_WINDOW] + [now]
            log.error("key-holder child ended abnormally (exit %d); starting a new one", code)
            if len(crashes) > _CRASHES:
                log.error("key-holder crashed %d times in %.0f s: giving up", len(crashes), _CRASH_WINDOW)
                return EXIT_CRASHED
            standby = None
            time.sleep(0.2 * len(crashes))
    finally:
        if standby is not None:
            standby.dismiss()


_GO = b"g"


def _standby_delay(config: NodeConfig) -> float:
    return min(_STANDBY_DELAY, config.constants.period_length / 3)


def _wait_child(pid: int, timeout: float | None) -> int | None:
    """The child's exit code, or None if it still runs after ``timeout`` seconds."""
    if timeout is not None:
        fd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if not ready:
            return None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class _Standby:
    """A forked key-holder child waiting for its turn: its pid, the link for pst serve, and its go pipe."""

    def __init__(self, pid: int, link: socket.socket, go: int) -> None:
        self.pid, self.link, self._go = pid, link, go

    def start(self) -> None:
        """Let it run (a child that already died shows in its exit status)."""
        with contextlib.suppress(OSError):
            os.write(self._go, _GO)
        with contextlib.suppress(OSError):
            os.close(self._go)

    def dismiss(self) -> None:
        """Let it end unused (it read nothing) and reap it."""
        with contextlib.suppress(OSError):
            os.close(self._go)
        with contextlib.suppress(OSError):
            self.link.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _fork_child(
    config: NodeConfig, control: socket.socket, server_pid: int, rom: Rom | None, *, first: bool
) -> _Standby:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    go_read, go_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = EXIT_CRASHED
        try:
            control.close()
            theirs.close()
            os.close(go_write)
            code = child_main(config, mine, server_pid, first, rom, go=go_read)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    mine.close()
    os.close(go_read)
    return _Standby(pid, theirs, go_write)


def start_zygote(config: NodeConfig, privsep: Privsep | None = None) -> tuple[int, socket.socket]:
    """Fork the zygote now, while ``pst serve`` is single-threaded and holds no secret.

    Returns the zygote's pid and our end of the control socket. Forking (rather than
    starting Python afresh) shares the already imported code and costs milliseconds.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = EXIT_CRASHED
        try:
            ours.close()
            code = zygote_main(config, theirs, parent, privsep)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    theirs.close()
    return pid, ours
