"""The local API's sans-IO core: requests in, responses out, registrations and quotas in between.

Theory of operation
-------------------
Applications on the PServer's own machine talk to it over a Unix socket (paper §5). The
operating system tells us who is on the other end (``SO_PEERCRED``: uid and pid); this
module turns one decoded request plus those credentials into one response, and holds the
only state the API has: the registrations. It does no I/O itself; the node's services are
reached through the :class:`Backend` protocol, whose async methods the node implements.

Wire format: every request is a canonical CBOR map ``{"v": 1, "op": str, "id": int, ...}``
and every response ``{"v": 1, "id": id, "ok": bool, "result" | "error": ...}`` where an error
is ``{"code": str, "message": str}``. The codes are fixed (:data:`ERROR_CODES`); messages
name the offending field but never echo a handle, a message or a backend exception text.

Registration (§5.1, centralized application): ``register`` carries ``name`` (the
application's name, which the backend binds into everything it signs) and ``unique_id``
(the application's random identifier). The reply is a *handle*: 32 bytes from
``os.urandom``, bound to ``(name, unique_id, uid)``; every later request carries it. Only
SHA-256 of a handle is kept, so a dump of this process's registrations gives no usable
handle. Rules:

* a name belongs to the first uid that registers it, for the lifetime of the process or,
  with a store, of the state directory (for good if the operator pins it in ``reserved``):
  another uid is refused with ``not-permitted``, even after the owner unregistered, so
  that nobody can take over a released name and sign in its place;
* registering the same ``(name, unique_id, uid)`` again returns a fresh handle and
  revokes the old one (an application that restarted lost its handle);
* a handle presented by another uid than the one that registered it is ``not-permitted``.

Signing: ``sign(handle, message)`` (a message of at most 64 KiB) and ``sign_digest(handle,
sha512)`` (the message's 64-byte SHA-512 digest, for content of any size hashed by the client)
give the same signature: the group's Ed25519 signature on :func:`app_signing_payload`, the
canonical CBOR map ``{"dom": "pst/app-signed/v1", "app": name, "sha512": SHA-512(message)}``.

Registration (§5.1, distributed application): ``register_distributed`` carries ``name`` and
``password``. The server keeps only the password's *verifier* (scrypt, salted with the name:
:func:`~appliance.api._distributed.password_verifier`, computed off the event loop) and
returns a handle under the same rules as above (at most one distributed registration per
name and uid; registering again replaces the handle and the verifier). With that handle:

* ``request(protocol, payload)`` (protocol ``"sign"``): a group-key signature over
  :func:`~appliance.protocols.approvals.distributed_sign_payload` ``(name, payload)``, given
  only once a strict majority of the n servers' clients of ``name`` (with the same password)
  requested or approved it; ``refused`` names every server that refused and why, or says
  that no majority came in time;
* ``pending()``: the requests of the other servers' clients waiting for this client;
* ``approve(request_id)`` / ``deny(request_id)``; ``unknown-request`` if it is not waiting.

A distributed handle cannot ``sign`` (that would bypass the majority) and a centralized one
cannot ``request``. The exchange between servers is
:class:`~appliance.protocols.approvals.ApprovalService`; the node is reached through
:class:`DistributedBackend`.

Persistence: with a :class:`~appliance.api._registrations.RegistrationStore`, registrations
(handle digests, names, owner uids, verifiers, quota tokens) survive a restart: the store is
rewritten after every registration change and at most every ten seconds as quotas are
spent (and by :meth:`ApiCore.flush` on the way out). Name ownership then lasts as long as
the state directory.

Quotas (the paper's "quota on the number of services a specific client can request"):
at most ``max_registrations`` live registrations and ``max_names`` owned names per uid;
``sign``, ``random`` and ``request`` are rate-limited by a token bucket per registration (it
survives re-registration and restarts, so neither refills it); the other operations by a
token bucket per uid (``register_distributed`` costs four tokens: scrypt is expensive).
All exceeded limits answer ``quota``.

``sign`` hands the *registered* name and the message to :meth:`Backend.sign`; a client
never chooses a protocol context, so it can only get signatures that the backend
domain-separates as "application <name> signed this" (see :func:`app_signing_payload`).
Backend failures answer ``unavailable`` and are logged by exception type only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from appliance.api._distributed import password_verifier
from appliance.api._registrations import SAVE_INTERVAL, RegistrationStore, Saved, SavedRegistration
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

log = logging.getLogger("pst.api")

API_VERSION: Final = 1
#: Largest message ``sign`` accepts.
MAX_MESSAGE_SIZE: Final = 64 * 1024
#: Largest request frame; a sign request with a maximal message fits with room to spare.
MAX_REQUEST_SIZE: Final = 128 * 1024
HANDLE_SIZE: Final = 32
MAX_NAME_LENGTH: Final = 128
MAX_UNIQUE_ID_SIZE: Final = 64
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*")

BAD_REQUEST: Final = "bad-request"
UNKNOWN_HANDLE: Final = "unknown-handle"
QUOTA: Final = "quota"
TOO_LARGE: Final = "too-large"
NOT_PERMITTED: Final = "not-permitted"
UNAVAILABLE: Final = "unavailable"
REFUSED: Final = "refused"
UNKNOWN_REQUEST: Final = "unknown-request"
ERROR_CODES: Final = frozenset(
    {BAD_REQUEST, UNKNOWN_HANDLE, QUOTA, TOO_LARGE, NOT_PERMITTED, UNAVAILABLE, REFUSED, UNKNOWN_REQUEST}
)
MAX_PASSWORD_SIZE: Final = 1024
REQUEST_ID_SIZE: Final = 32
#: Protocols a distributed application may request.
DISTRIBUTED_PROTOCOLS: Final = frozenset({"sign"})

#: Domain of application signatures (see :func:`app_signing_payload`). It differs from
#: :data:`appliance.crypto.encoding.SIGNING_DOMAIN`, which the signing service reserves for
#: the protocols' own objects and refuses to sign on request.
APP_SIGN_DOMAIN: Final = "pst/app-signed/v1"
SHA512_SIZE: Final = 64


def app_signing_payload(app: str, message: bytes) -> bytes:
    """The bytes the group key signs when application ``app`` asks to sign ``message``.

    The payload :meth:`Backend.sign` should sign: the canonical CBOR map
    ``{"dom": "pst/app-signed/v1", "app": app, "sha512": SHA-512(message)}``. It binds the
    application's registered name, so a signature obtained through the API can never pass
    for another application's, nor for a protocol object (KeyTable, refresh, ...: those
    carry the protocols' domain). The message is hashed so that the payload stays small
    (the signing service sends it to t other servers and caps it at 64 KiB) whatever the
    message size. A verifier rebuilds this payload from the application name and the
    message and checks the Ed25519 signature with the group's public key; application
    signatures are not tied to a refresh period (the group key is the same in every one).
    """
    return app_digest_payload(app, hashlib.sha512(message).digest())


def app_digest_payload(app: str, sha512: bytes) -> bytes:
    """:func:`app_signing_payload` from the message's SHA-512 digest (a file of any size is hashed
    by the client as it is read; the signature is the same as on the whole message)."""
    if len(sha512) != SHA512_SIZE:
        raise ValueError(f"a SHA-512 digest is {SHA512_SIZE} bytes, not {len(sha512)}")
    return encoding.encode({"dom": APP_SIGN_DOMAIN, "app": app, "sha512": bytes(sha512)})


class Backend(Protocol):
    """What the API needs from the node. Exceptions raised here answer ``unavailable``."""

    async def sign(self, app: str, message: bytes) -> bytes:
        """A group-key signature over a payload binding ``app`` and ``message``."""
        ...

    async def sign_digest(self, app: str, sha512: bytes) -> bytes:
        """The same signature, from the message's SHA-512 digest (:func:`app_digest_payload`)."""
        ...

    async def get_time(self) -> Mapping[int, float | None]:
        """Every server's clock (Unix seconds) by server id; None where unknown (§5.3)."""
        ...

    async def status(self) -> Mapping[str, Any]:
        """The node's status: plain data (floats are sent as their ``repr`` strings)."""
        ...

    async def random(self, nonce: bytes) -> tuple[bytes, bytes]:
        """GetRandom: (64 unbiasable bytes, the input they answer) for the client's nonce."""
        ...


class BackendUnavailable(Exception):
    """A backend may raise this with a message that is safe to show the client."""


class BackendRefused(Exception):
    """A distributed request was refused (``refused``) or names no waiting request
    (``unknown-request``); the message is safe to show the client."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


@runtime_checkable
class DistributedBackend(Protocol):
    """What distributed applications need from the node (see :mod:`appliance.protocols.approvals`).

    Refusals raise :class:`BackendRefused`; a node that cannot serve now raises
    :class:`BackendUnavailable`. Any other exception answers ``unavailable``.
    """

    async def distributed_request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> bytes:
        """The group signature once a majority of the application's clients agreed."""
        ...

    async def distributed_pending(self, app: str, verifier: bytes) -> Sequence[Mapping[str, Any]]:
        """Requests waiting for this client: request_id, protocol, payload, servers, expires_in_ms."""
        ...

    async def distributed_decide(self, app: str, verifier: bytes, request_id: bytes, approve: bool) -> None:
        """This client approves (or denies) a waiting request."""
        ...


@dataclass(frozen=True)
class PeerCred:
    """The caller as the kernel reports it (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


class ApiError(Exception):
    """An error response: ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


def bad(field_name: str, problem: str) -> ApiError:
    return ApiError(BAD_REQUEST, f"field {field_name!r}: {problem}")


# Requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request that passed every syntactic check; ``args`` depends on ``op``."""

    id: int
    op: str
    args: Mapping[str, Any]


#: Extra fields (beyond v, op, id) of each operation, with their types.
OPS: Final[Mapping[str, Mapping[str, type]]] = {
    "register": {"name": str, "unique_id": bytes},
    "sign": {"handle": bytes, "message": bytes},
    "sign_digest": {"handle": bytes, "sha512": bytes},
    "unregister": {"handle": bytes},
    "get_time": {},
    "status": {},
    "random": {"handle": bytes, "nonce": bytes},
    "register_distributed": {"name": str, "password": bytes},
    "request": {"handle": bytes, "protocol": str, "payload": bytes},
    "pending": {"handle": bytes},
    "approve": {"handle": bytes, "request_id": bytes},
    "deny": {"handle": bytes, "request_id": bytes},
    "upgrade_sign": {},
}
MAX_NONCE_SIZE: Final = 64
_MAX_ID: Final = 2**63 - 1


def _type_name(value: object) -> str:
    return type(value).__name__


def request_id_of(obj: object) -> int | None:
    """The request's id if it has a usable one (to address an error response), else None."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _MAX_ID:
            return rid
    return None


def parse_request(obj: object) -> Request:
    """Check a decoded request; :class:`ApiError` (never anything else) naming the problem."""
    if not isinstance(obj, dict):
        raise ApiError(BAD_REQUEST, f"request: expected a map, got {_type_name(obj)}")
    for key, typ in (("v", int), ("id", int), ("op", str)):
        if key not in obj:
            raise bad(key, "missing")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, typ):
            raise bad(key, f"expected {typ.__name__}, got {_type_name(value)}")
    if obj["v"] != API_VERSION:
        raise bad("v", f"unsupported version (this server speaks {API_VERSION})")
    if not 0 <= obj["id"] <= _MAX_ID:
        raise bad("id", "must be in [0, 2**63)")
    op = obj["op"]
    fields = OPS.get(op)
    if fields is None:
        raise bad("op", f"unknown operation (one of {', '.join(sorted(OPS))})")
    extra = sorted(str(k) for k in obj if k not in fields and k not in ("v", "id", "op"))
    if extra:
        raise bad(extra[0][:40], f"unexpected in {op}")
    args: dict[str, Any] = {}
    for key, want in fields.items():
        if key not in obj:
            raise bad(key, f"missing in {op}")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, want):
            raise bad(key, f"expected {want.__name__}, got {_type_name(value)}")
        args[key] = value
    if "handle" in args and len(args["handle"]) != HANDLE_SIZE:
        raise bad("handle", f"must be {HANDLE_SIZE} bytes")
    if "nonce" in args and not 16 <= len(args["nonce"]) <= MAX_NONCE_SIZE:
        raise bad("nonce", f"must be 16 to {MAX_NONCE_SIZE} bytes, fresh for every request")
    for key in ("message", "payload"):
        if key in args and len(args[key]) > MAX_MESSAGE_SIZE:
            raise ApiError(TOO_LARGE, f"field {key!r}: {len(args[key])} bytes exceeds {MAX_MESSAGE_SIZE}")
    if "request_id" in args and len(args["request_id"]) != REQUEST_ID_SIZE:
        raise bad("request_id", f"must be {REQUEST_ID_SIZE} bytes (as pending returned it)")
    if "protocol" in args and args["protocol"] not in DISTRIBUTED_PROTOCOLS:
        raise bad("protocol", f"one of {', '.join(sorted(DISTRIBUTED_PROTOCOLS))}")
    if "password" in args and not 0 < len(args["password"]) <= MAX_PASSWORD_SIZE:
        raise bad("password", f"must be 1 to {MAX_PASSWORD_SIZE} bytes")
    if op in ("register", "register_distributed"):
        name = args["name"]
        if not 0 < len(name) <= MAX_NAME_LENGTH or _NAME_RE.fullmatch(name) is None:
            raise bad(
                "name",
                f"1 to {MAX_NAME_LENGTH} characters from [A-Za-z0-9._:@+-], starting alphanumeric",
            )
        if op == "register" and not 0 < len(args["unique_id"]) <= MAX_UNIQUE_ID_SIZE:
            raise bad("unique_id", f"must be 1 to {MAX_UNIQUE_ID_SIZE} bytes")
    return Request(obj["id"], op, args)


def error_response(rid: int | None, code: str, message: str) -> dict[str, Any]:
    return {"v": API_VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}}


def ok_response(rid: int, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"v": API_VERSION, "id": rid, "ok": True, "result": dict(result)}


def encode_response(response: Mapping[str, Any]) -> bytes:
    return encoding.encode(dict(response))


# Quotas ---------------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float, cost: float = 1.0) -> bool:
        elapsed = max(0.0, now - self.stamp)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


@dataclass(frozen=True)
class Limits:
    """Per-client quotas; the defaults suit a handful of local applications."""

    max_registrations: int = 16
    max_names: int = 64
    sign_rate: float = 50.0
    sign_burst: float = 100.0
    control_rate: float = 20.0
    control_burst: float = 40.0


# Registrations ---------------------------------------------------------------------------------


@dataclass
class Registration:
    """One handle. ``unique_id`` is empty and ``verifier`` set for a distributed application."""

    name: str
    unique_id: bytes
    uid: int
    pid: int
    handle_digest: bytes
    bucket: TokenBucket
    verifier: bytes | None = None

    def __repr__(self) -> str:  # the verifier stays out of logs and tracebacks
        kind = "distributed" if self.verifier is not None else "centralized"
        return f"Registration({self.name!r}, {kind}, uid={self.uid})"


def _digest(handle: bytes) -> bytes:
    return hashlib.sha256(b"pst/api/handle\x00" + handle).digest()


@dataclass
class Registry:
    """The registrations: by handle digest, by (name, unique_id, uid), name owners."""

    reserved: Mapping[str, int] = field(default_factory=dict)
    by_handle: dict[bytes, Registration] = field(default_factory=dict)
    by_key: dict[tuple[str, bytes, int], Registration] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)
    per_uid: dict[int, int] = field(default_factory=dict)
    names_per_uid: dict[int, int] = field(default_factory=dict)

    def owner(self, name: str) -> int | None:
        return self.reserved.get(name, self.owners.get(name))

    def remove(self, reg: Registration) -> None:
        del self.by_handle[reg.handle_digest]
        del self.by_key[(reg.name, reg.unique_id, reg.uid)]
        left = self.per_uid[reg.uid] - 1
        if left:
            self.per_uid[reg.uid] = left
        else:
            del self.per_uid[reg.uid]


# The core --------------------------------------------------------------------------------------


class ApiCore:
    """Turns requests into responses for one PServer; owns the registrations."""

    def __init__(
        self,
        backend: Backend,
        *,
        limits: Limits | None = None,
        reserved: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[int], bytes] = os.urandom,
        store: RegistrationStore | None = None,
        offload: Callable[[Callable[[], bytes]], Awaitable[bytes]] | None = None,
        request_wait: float = 15.0,
    ) -> None:
        """``store`` keeps registrations across restarts; ``offload`` runs scrypt off the event
        loop (e.g. in a thread); ``request_wait`` bounds how long a distributed request waits
        for the other clients' approvals."""
        self.backend = backend
        self.distributed = backend if isinstance(backend, DistributedBackend) else None
        self.limits = limits if limits is not None else Limits()
        self.clock = clock
        self.rand = rand
        self.offload = offload
        self.request_wait = request_wait
        self.registry = Registry(reserved=dict(reserved or {}))
        self._control: dict[int, TokenBucket] = {}
        self.store = store
        self._dirty = False
        self._saved_at = clock()
        #: Requests answered, by (operation, "ok" or error code): what /metrics shows. The
        #: operation is one of :data:`OPS`, "invalid" (no known op), "connection" (refused or
        #: closed before a request was read) or "unknown" (timed out); nothing a client chose.
        self.counts: Counter[tuple[str, str]] = Counter()
        if store is not None:
            saved = store.load()
            self._restore(saved)
            for problem in saved.problems:
                log.error("api: registrations: %s", problem)
            log.info("api: %d registrations restored from %s", len(self.registry.by_handle), store.path)

    # Persistence ------------------------------------------------------------------------------

    def _restore(self, saved: Saved) -> None:
        reg, now = self.registry, self.clock()
        for name, uid in saved.owners.items():
            if name not in reg.reserved:
                reg.owners[name] = uid
                reg.names_per_uid[uid] = reg.names_per_uid.get(uid, 0) + 1
        for s in saved.registrations:
            where = f"{self.store.path if self.store else 'store'}: registration of {s.name!r}"
            owner = reg.owner(s.name)
            if owner is not None and owner != s.uid:
                saved.problems.append(f"{where} by uid {s.uid}, but uid {owner} owns the name; skipped")
                continue
            key = (s.name, s.unique_id, s.uid)
            if key in reg.by_key or s.handle_digest in reg.by_handle:
                saved.problems.append(f"{where} by uid {s.uid} appears twice; skipped")
                continue
            if owner is None and s.name not in reg.reserved:
                reg.owners[s.name] = s.uid
                reg.names_per_uid[s.uid] = reg.names_per_uid.get(s.uid, 0) + 1
            limits = self.limits
            bucket = TokenBucket(limits.sign_rate, limits.sign_burst, min(limits.sign_burst, s.tokens), now)
            new = Registration(s.name, s.unique_id, s.uid, s.pid, s.handle_digest, bucket, s.verifier)
            reg.by_handle[s.handle_digest] = new
            reg.by_key[key] = new
            reg.per_uid[s.uid] = reg.per_uid.get(s.uid, 0) + 1

    def _save(self) -> None:
        """Write the registrations now (after any change to them)."""
        if self.store is None:
            return
        now = self.clock()
        regs = [
            SavedRegistration(r.name, r.unique_id, r.uid, r.pid, r.handle_digest, r.bucket.tokens, r.verifier)
            for r in self.registry.by_handle.values()
        ]
        try:
            self.store.save(regs, self.registry.owners)
        except OSError as exc:
            log.error(
                "api: cannot save registrations to %s (%s); they will not survive a restart",
                self.store.path,
                exc.strerror or type(exc).__name__,
            )
            return
        self._dirty, self._saved_at = False, now

    def _spent(self) -> None:
        """A quota moved: save when the last save is old enough."""
        self._dirty = True
        if self.clock() - self._saved_at >= SAVE_INTERVAL:
            self._save()

    def flush(self) -> None:
        """Save quota changes not written yet (call when the server stops)."""
        if self._dirty:
            self._save()

    # Entry points ---------------------------------------------------------------------------

    async def handle_frame(self, payload: bytes, peer: PeerCred) -> tuple[bytes, bool]:
        """One request frame to one response frame; the flag says "close the connection".

        Undecodable frames (not canonical CBOR, not a map) answer ``bad-request`` and ask
        for the connection to be closed; well-formed requests with bad fields keep it.
        """
        try:
            obj = encoding.decode(payload, max_size=MAX_REQUEST_SIZE, what="request")
        except DecodeError as exc:
            self.count("invalid", BAD_REQUEST)
            return encode_response(error_response(None, BAD_REQUEST, str(exc)[:200])), True
        if not isinstance(obj, dict):
            self.count("invalid", BAD_REQUEST)
            msg = f"request: expected a map, got {_type_name(obj)}"
            return encode_response(error_response(None, BAD_REQUEST, msg)), True
        return encode_response(await self.handle(obj, peer)), False

    def count(self, op: object, code: str) -> None:
        """Count one answer (an ``op`` outside :data:`OPS` and the labels above is "invalid")."""
        label = op if isinstance(op, str) and (op in OPS or op in ("connection", "unknown")) else "invalid"
        self.counts[(label, code)] += 1

    async def handle(self, obj: object, peer: PeerCred) -> dict[str, Any]:
        """One decoded request to one response map; never raises (except cancellation)."""
        rid = request_id_of(obj)
        op = obj.get("op") if isinstance(obj, dict) else None
        try:
            request = parse_request(obj)
            result = await self._dispatch(request, peer)
        except ApiError as exc:
            self.count(op, exc.code)
            return error_response(rid, exc.code, exc.message)
        self.count(op, "ok")
        return ok_response(request.id, result)

    # Operations ------------------------------------------------------------------------------

    async def _dispatch(self, request: Request, peer: PeerCred) -> Mapping[str, Any]:
        args = request.args
        if request.op == "sign":
            return await self._sign(args["handle"], args["message"], peer)
        if request.op == "sign_digest":
            if len(args["sha512"]) != SHA512_SIZE:
                raise ApiError(BAD_REQUEST, f"'sha512' must be a {SHA512_SIZE}-byte SHA-512 digest")
            return await self._sign(args["handle"], args["sha512"], peer, digest=True)
        if request.op == "random":
            return await self._random(args["handle"], args["nonce"], peer)
        if request.op == "request":
            return await self._request(args["handle"], args["protocol"], args["payload"], peer)
        self._charge_control(peer.uid, 4.0 if request.op == "register_distributed" else 1.0)
        if request.op == "upgrade_sign":
            return {"certificate": await self._upgrade_sign(peer)}
        if request.op == "register":
            return self._register(args["name"], args["unique_id"], peer)
        if request.op == "register_distributed":
            return await self._register_distributed(args["name"], args["password"], peer)
        if request.op == "unregister":
            self._unregister(args["handle"], peer)
            return {}
        if request.op == "pending":
            return {"requests": await self._pending(args["handle"], peer)}
        if request.op in ("approve", "deny"):
            await self._decide(args["handle"], args["request_id"], request.op == "approve", peer)
            return {}
        if request.op == "get_time":
            return {"times_us": await self._get_time()}
        assert request.op == "status", request.op
        return {"status": await self._status()}

    async def _upgrade_sign(self, peer: PeerCred) -> bytes:
        """The operator's request for the network's signature on the upgrade they approved.

        Only root or the server's own user may ask (``pst upgrade sign``): an application must
        not be able to start the signing of an upgrade, even one the operators approved.
        """
        if peer.uid not in (0, os.getuid()):
            log.warning("api: uid %d (pid %d) refused upgrade_sign: not the operator", peer.uid, peer.pid)
            raise ApiError(NOT_PERMITTED, "only the operator (root or the server's user) may sign upgrades")
        sign_upgrade = getattr(self.backend, "sign_upgrade", None)
        if sign_upgrade is None:
            raise ApiError(UNAVAILABLE, "this server cannot sign upgrades")
        try:
            certificate = await sign_upgrade()
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, str(exc)[:300]) from None
        if not isinstance(certificate, bytes):
            raise ApiError(UNAVAILABLE, "the server returned no certificate")
        return certificate

    def _charge_control(self, uid: int, cost: float = 1.0) -> None:
        now = self.clock()
        bucket = self._control.get(uid)
        if bucket is None:
            bucket = TokenBucket.full(self.limits.control_rate, self.limits.control_burst, now)
            self._control[uid] = bucket
        if not bucket.take(now, cost):
            raise ApiError(QUOTA, "too many requests: slow down")

    def _register(
        self, name: str, unique_id: bytes, peer: PeerCred, verifier: bytes | None = None
    ) -> Mapping[str, Any]:
        reg = self.registry
        owner = reg.owner(name)
        if owner is not None and owner != peer.uid:
            log.warning(
                "api: uid %d (pid %d) refused name %r owned by uid %d", peer.uid, peer.pid, name, owner
            )
            raise ApiError(NOT_PERMITTED, "this application name is registered by another user")
        key = (name, unique_id, peer.uid)
        old = reg.by_key.get(key)
        if old is None:
            if reg.per_uid.get(peer.uid, 0) >= self.limits.max_registrations:
                raise ApiError(QUOTA, f"at most {self.limits.max_registrations} registrations per user")
            if owner is None and reg.names_per_uid.get(peer.uid, 0) >= self.limits.max_names:
                raise ApiError(QUOTA, f"at most {self.limits.max_names} application names per user")
        handle = self.rand(HANDLE_SIZE)
        if len(handle) != HANDLE_SIZE:
            raise ApiError(UNAVAILABLE, "no randomness")
        digest = _digest(handle)
        if digest in reg.by_handle:  # only with a broken random source
            raise ApiError(UNAVAILABLE, "handle collision")
        if old is not None:
            bucket = old.bucket
            reg.remove(old)
        else:
            bucket = TokenBucket.full(self.limits.sign_rate, self.limits.sign_burst, self.clock())
        if owner is None and name not in reg.reserved:
            reg.owners[name] = peer.uid
            reg.names_per_uid[peer.uid] = reg.names_per_uid.get(peer.uid, 0) + 1
        new = Registration(name, unique_id, peer.uid, peer.pid, digest, bucket, verifier)
        reg.by_handle[digest] = new
        reg.by_key[key] = new
        reg.per_uid[peer.uid] = reg.per_uid.get(peer.uid, 0) + 1
        self._save()
        log.info(
            "api: %s %s%r for uid %d (pid %d)",
            "re-registered" if old is not None else "registered",
            "distributed application " if verifier is not None else "",
            name,
            peer.uid,
            peer.pid,
        )
        return {"handle": handle}

    async def _register_distributed(self, name: str, password: bytes, peer: PeerCred) -> Mapping[str, Any]:
        if self.distributed is None:
            raise ApiError(UNAVAILABLE, "this server does not serve distributed applications")
        owner = self.registry.owner(name)
        if owner is not None and owner != peer.uid:  # refuse before spending scrypt on it
            raise ApiError(NOT_PERMITTED, "this application name is registered by another user")
        derive = functools.partial(password_verifier, name, password)
        verifier = await self.offload(derive) if self.offload is not None else derive()
        return self._register(name, b"", peer, verifier)

    def _lookup(self, handle: bytes, peer: PeerCred) -> Registration:
        reg = self.registry.by_handle.get(_digest(handle))
        if reg is None:
            raise ApiError(UNKNOWN_HANDLE, "no registration has this handle (register first)")
        if reg.uid != peer.uid:
            log.warning("api: uid %d (pid %d) presented a handle of uid %d", peer.uid, peer.pid, reg.uid)
            raise ApiError(NOT_PERMITTED, "this handle belongs to another user")
        return reg

    def _unregister(self, handle: bytes, peer: PeerCred) -> None:
        reg = self._lookup(handle, peer)
        self.registry.remove(reg)
        self._save()
        log.info("api: unregistered %r for uid %d (pid %d)", reg.name, peer.uid, peer.pid)

    async def _sign(
        self, handle: bytes, message: bytes, peer: PeerCred, *, digest: bool = False
    ) -> Mapping[str, Any]:
        reg = self._lookup(handle, peer)
        if reg.verifier is not None:
            raise ApiError(
                NOT_PERMITTED, "a distributed application signs through 'request' (a majority must agree)"
            )
        if not reg.bucket.take(self.clock()):
            raise ApiError(QUOTA, "signing rate limit exceeded for this registration")
        self._spent()
        try:
            if digest:
                signature = await self.backend.sign_digest(reg.name, message)
            else:
                signature = await self.backend.sign(reg.name, message)
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"cannot sign now: {str(exc)[:200]}") from None
        except Exception as exc:
            log.error("api: backend sign for %r failed (%s)", reg.name, type(exc).__name__)
            raise ApiError(UNAVAILABLE, "cannot sign now") from None
        if not isinstance(signature, bytes):
            log.error("api: backend sign returned %s", _type_name(signature))
            raise ApiError(UNAVAILABLE, "cannot sign now")
        return {"signature": signature}

    async def _random(self, handle: bytes, nonce: bytes, peer: PeerCred) -> Mapping[str, Any]:
        reg = self.registry.by_handle.get(_digest(handle))
        if reg is None:
            raise ApiError(UNKNOWN_HANDLE, "no registration has this handle (register first)")
        if reg.uid != peer.uid:
            raise ApiError(NOT_PERMITTED, "this handle belongs to another user")
        if not reg.bucket.take(self.clock()):
            raise ApiError(QUOTA, "too many requests for this registration: slow down")
        self._spent()
        try:
            value, used_input = await self.backend.random(nonce)
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"cannot draw randomness now: {str(exc)[:200]}") from None
        except Exception as exc:
            log.error("api: random backend failed (%s)", type(exc).__name__)
            raise ApiError(UNAVAILABLE, "cannot draw randomness now") from None
        return {"random": value, "input": used_input}

    # Distributed applications ---------------------------------------------------------------------

    def _distributed(self, handle: bytes, peer: PeerCred) -> tuple[Registration, bytes, DistributedBackend]:
        reg = self._lookup(handle, peer)
        if reg.verifier is None:
            raise ApiError(
                NOT_PERMITTED, "this handle is not a distributed registration (register_distributed)"
            )
        if self.distributed is None:
            raise ApiError(UNAVAILABLE, "this server does not serve distributed applications")
        return reg, reg.verifier, self.distributed

    async def _request(
        self, handle: bytes, protocol: str, payload: bytes, peer: PeerCred
    ) -> Mapping[str, Any]:
        reg, verifier, node = self._distributed(handle, peer)
        if not reg.bucket.take(self.clock()):
            raise ApiError(QUOTA, "request rate limit exceeded for this registration")
        self._spent()
        signature = await self._call_distributed(
            "request", node.distributed_request(reg.name, verifier, protocol, payload, self.request_wait)
        )
        if not isinstance(signature, bytes):
            log.error("api: distributed request returned %s", _type_name(signature))
            raise ApiError(UNAVAILABLE, "cannot serve the request now")
        log.info("api: request of distributed application %r (uid %d) serviced", reg.name, peer.uid)
        return {"signature": signature}

    async def _pending(self, handle: bytes, peer: PeerCred) -> list[dict[str, Any]]:
        reg, verifier, node = self._distributed(handle, peer)
        entries = await self._call_distributed("pending", node.distributed_pending(reg.name, verifier))
        out = []
        fields = {
            "request_id": bytes,
            "protocol": str,
            "payload": bytes,
            "servers": list,
            "expires_in_ms": int,
        }
        try:
            for entry in entries:
                out.append(encoding.expect_map(dict(entry), fields, "pending request"))
        except (DecodeError, TypeError) as exc:
            log.error("api: distributed pending returned a malformed entry (%s)", exc)
            raise ApiError(UNAVAILABLE, "cannot list the pending requests now") from None
        return out

    async def _decide(self, handle: bytes, request_id: bytes, approve: bool, peer: PeerCred) -> None:
        reg, verifier, node = self._distributed(handle, peer)
        what = "approve" if approve else "deny"
        await self._call_distributed(what, node.distributed_decide(reg.name, verifier, request_id, approve))
        done = "approved" if approve else "denied"
        log.info("api: uid %d %s a request of distributed application %r", peer.uid, done, reg.name)

    async def _call_distributed(self, what: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except BackendRefused as exc:
            code = exc.code if exc.code in (REFUSED, UNKNOWN_REQUEST) else REFUSED
            raise ApiError(code, str(exc)[:2000]) from None
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"cannot {what} now: {str(exc)[:200]}") from None
        except Exception as exc:
            log.error("api: distributed %s failed (%s)", what, type(exc).__name__)
            raise ApiError(UNAVAILABLE, f"cannot {what} now") from None

    async def _get_time(self) -> dict[int, int | None]:
        try:
            times = await self.backend.get_time()
            out: dict[int, int | None] = {}
            for server, value in times.items():
                if isinstance(server, bool) or not isinstance(server, int):
                    raise TypeError("server id")
                if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                    out[server] = None
                else:
                    us = value * 1_000_000
                    out[server] = round(us) if math.isfinite(us) and abs(us) < 2**63 else None
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"cannot read the time now: {str(exc)[:200]}") from None
        except Exception as exc:
            log.error("api: backend get_time failed (%s)", type(exc).__name__)
            raise ApiError(UNAVAILABLE, "cannot read the time now") from None
        return out

    async def _status(self) -> Any:
        try:
            status = await self.backend.status()
            return to_plain(status)
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"cannot read the status now: {str(exc)[:200]}") from None
        except Exception as exc:
            log.error("api: backend status failed (%s)", type(exc).__name__)
            raise ApiError(UNAVAILABLE, "cannot read the status now") from None


def to_plain(obj: Any, depth: int = 0) -> Any:
    """``obj`` as plain CBOR data: floats become their ``repr``, tuples lists; else TypeError."""
    if depth > encoding.MAX_DEPTH:
        raise TypeError("nested too deep")
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (int, str, bytes)):
                raise TypeError("map key")
            out[key] = to_plain(value, depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, depth + 1) for v in obj]
    raise TypeError(f"value of type {_type_name(obj)}")
