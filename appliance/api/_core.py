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
is ``{"code": str, "message": str}`` (plus ``"retry_after_ms": int`` for a rate limit, and for
an ``unavailable`` while the server holds no share: a refresh's handover).
The codes are fixed (:data:`ERROR_CODES`); messages name the offending field but never echo
a handle, a message or a backend exception text. docs/api.md describes every operation for
application writers.

Registration (§5.1, centralized application): ``register`` carries ``name`` (the
application's name, which the backend binds into everything it signs) and ``unique_id``
(which instance of the application this is; the client library's default is the constant
``b"default"``, so an application that registers, signs and exits comes back as the same
registration). A *registration* is the triple ``(name, unique_id, uid)``; each ``register``
gives it one more *handle*: 32 bytes from ``os.urandom`` that every later request carries.
Only SHA-256 of a handle is kept, so a dump of this process's registrations gives no usable
handle. Rules:

* a name belongs to the first uid that registers it, for the lifetime of the process or,
  with a store, of the state directory (for good if the operator pins it in ``reserved``):
  another uid is refused with ``not-permitted``, even after the owner unregistered, so
  that nobody can take over a released name and sign in its place (only the operator
  releases a name: ``revoke`` with ``release_name``);
* registering the same ``(name, unique_id, uid)`` again adds a handle and leaves the earlier
  ones valid, up to ``max_handles`` per registration; beyond that the least recently used
  handle is released. So eight copies of a script that register the same application and
  sign in parallel each keep their own handle, and one finishing (``unregister``) does not
  break the others;
* a handle presented by another uid than the one that registered it is ``not-permitted``;
* ``unregister(handle)`` releases that handle (the client library does it on ``close()``
  and at the end of a ``with`` block); a registration goes with its last handle;
* a handle unused for ``idle_expiry`` seconds (default a day) is released, so a process
  that died without unregistering holds nothing for long; the client library registers
  again by itself when its handle is gone.

Why several handles rather than one handle returned to every caller of the same triple:
only SHA-256 of a handle is kept, so the server cannot hand the same handle out twice
without storing it, which a dump of this process (or of the registration file) would then
give away; and with one shared handle, one process's ``unregister`` would cut off every
other process of the same application. A handle per caller costs a few hundred bytes, and
all handles of a registration share its quota (one token bucket), so parallel callers get
no more signatures than one.

Operators (root, or the server's own uid, by ``SO_PEERCRED``; anyone else is
``not-permitted``): ``registrations`` lists name, uid, kind, unique id, number of handles,
when made and last used (never a handle or a verifier); ``revoke(name[, uid][,
release_name])`` ends those registrations and all their handles now (quota freed; the
application may register again: a revocation is no ban) and, with ``release_name``, lets
the name go to whoever registers it next. ``pst api registrations list|revoke`` call them.
They go through the socket, not the file, because the running server owns the
registrations in memory and rewrites the file whole: an edit of the file would be
overwritten or lost, and the file also holds verifiers that only the server's user may read.

Signing: ``sign(handle, message)`` (a message of at most 64 KiB) and ``sign_digest(handle,
sha512)`` (the message's 64-byte SHA-512 digest, for content of any size hashed by the client)
give the same signature: the group's Ed25519 signature on :func:`app_signing_payload`, the
canonical CBOR map ``{"dom": "pst/app-signed/v1", "app": name, "sha512": SHA-512(message)}``.

Registration (§5.1, distributed application): ``register_distributed`` carries ``name`` and
``password``. The server keeps only the password's *verifier* (scrypt, salted with the name:
:func:`~appliance.api._distributed.password_verifier`, computed off the event loop) and
returns a handle under the same rules as above (at most one distributed registration per
name and uid; registering again with the same password adds a handle, with another
password replaces every handle and the verifier). With that handle:

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
(handle digests, names, owner uids, verifiers, quota tokens, use times) survive a restart: the
store is rewritten at once when a registration, a name owner or a verifier changes, and at
most every ten seconds as quotas, use times and the handles of existing registrations move
(and by :meth:`ApiCore.flush` on the way out). Name ownership then lasts as long as
the state directory.

The log (``[log]`` in the server's config; :mod:`appliance.apps.log.service`), reached
through :class:`LogBackend`: ``log_append(handle, messages)`` appends one to
:data:`MAX_LOG_BATCH` messages (together at most :data:`MAX_MESSAGE_SIZE` bytes) as entries of
transport ``api`` whose peer names the registration (``uid U app NAME``: the name and uid are
the server's knowledge, not the client's claim), and answers with each entry's index only
once they are durable (in order; consecutive in a server's own log, but a replicated log may
place other entries between them). Entries are a quota of their own, per
registration (``log_rate`` entries per second, bursts of ``log_burst``; in memory: a restart
refills it). ``log_size`` and ``log_entries(start, count)`` (at most
:data:`MAX_LOG_READ` entries, fewer when they pass 1 MiB) read the log without a handle, as
the control operations (the log is public: the HTTP read side will serve the same entries).
A server without a log, or whose log could not be opened, answers ``unavailable`` saying why.

Quotas (the paper's "quota on the number of services a specific client can request"):
at most ``max_registrations`` live registrations and ``max_names`` owned names per uid;
``sign``, ``sign_digest``, ``random`` and ``request`` are rate-limited by a token bucket per
registration (shared by its handles; it survives re-registration and restarts, so neither
refills it); the other operations by a token bucket per uid (``register_distributed`` costs
four tokens: scrypt is expensive). All exceeded limits answer ``quota`` with a message that
says how to recover; a rate limit's error also carries ``retry_after_ms``, the wait until
the request would pass, and the client library waits that long and retries by itself (as it
does for an ``unavailable`` that says the server is not operational, within the same budget).

``sign`` hands the *registered* name and the message to :meth:`Backend.sign`; a client
never chooses a protocol context, so it can only get signatures that the backend
domain-separates as "application <name> signed this" (see :func:`app_signing_payload`).
Backend failures answer ``unavailable`` and are logged by exception type only.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from appliance.api._certreg import (
    CHALLENGE_SIZE,
    CertificateRefused,
    ClientCA,
    UsedCertificates,
    registration_payload,
    verify_possession,
)
from appliance.api._distributed import password_verifier
from appliance.api._registrations import (
    SAVE_INTERVAL,
    RegistrationStore,
    Saved,
    SavedHandle,
    SavedRegistration,
)
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
#: The store's refusals (appliance.apps.store.model) keep their own codes.
NOT_FOUND: Final = "not-found"
EXISTS: Final = "exists"
TOO_EARLY: Final = "too-early"
STALE_VERSION: Final = "stale-version"
ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNKNOWN_HANDLE,
        QUOTA,
        TOO_LARGE,
        NOT_PERMITTED,
        UNAVAILABLE,
        REFUSED,
        UNKNOWN_REQUEST,
        NOT_FOUND,
        EXISTS,
        TOO_EARLY,
        STALE_VERSION,
    }
)
MAX_PASSWORD_SIZE: Final = 1024
REQUEST_ID_SIZE: Final = 32
#: Messages one ``log_append`` carries at most; entries one ``log_entries`` returns at most.
MAX_LOG_BATCH: Final = 64
MAX_LOG_READ: Final = 256
#: Types a distributed application writes through a quorum of its clients (its ``store_data``,
#: ``write``, ``generate_joint_secret``); its other writes are its client's alone.
QUORUM_WRITES: Final = frozenset({"public-rw", "secret-dw-dr", "joint-secret"})
#: Types a distributed application reads through a quorum (``retrieve`` with a reader key).
QUORUM_READS: Final = frozenset({"secret-sw-dr", "secret-dw-dr", "joint-secret"})
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


class LogBackend(Protocol):
    """What the log operations need from the node (``LogService`` in appliance.apps.log).

    Raise :class:`BackendUnavailable` with a message safe to show the client."""

    @property
    def max_message_size(self) -> int:
        """The longest message ``log_append`` takes (octets)."""
        ...

    async def log_append(self, client: str, messages: Sequence[bytes]) -> tuple[Sequence[int], int]:
        """Append the messages from ``client``; (the index of each entry, the log's size) once
        they are durable."""
        ...

    async def log_size(self) -> Mapping[str, Any]:
        """``{"size": int, "origin": str, "verifier": str | None}``."""
        ...

    async def log_entries(self, start: int, count: int) -> Sequence[bytes]:
        """Up to ``count`` entries from index ``start`` (fewer at the end of the log)."""
        ...

    async def log_audit(self) -> Mapping[str, Any]:
        """Audit (and repair) this server's copy against its latest checkpoint, now; ``{"ok":
        bool, "checkpoint_size": int | None, "damaged": str | None, "repairs": int}``."""
        ...


class LinkBackend(Protocol):
    """Proactively secure links (:mod:`appliance.protocols.links`): messages between the clients of
    one application at two servers. Refusals raise :class:`BackendRefused`, a destination that
    does not answer :class:`BackendUnavailable`."""

    async def link_send(self, app: str, to: int, data: bytes, timeout: float) -> None:
        """Deliver ``data`` into the inbox of ``app`` at server ``to`` (returns once it is there)."""
        ...

    async def link_receive(
        self, app: str, limit: int, wait: float
    ) -> Sequence[tuple[int, int | None, bytes]]:
        """Up to ``limit`` messages for ``app`` here, as (server, period, data), oldest first,
        waiting up to ``wait`` seconds for the first."""
        ...


class StoreBackend(Protocol):
    """The data storage API (paper §5.2, Table 4; appliance.apps.store.node.StoreNode).

    Refusals raise :class:`appliance.apps.store.model.Refused` (its code is the answer's),
    a store that cannot serve now ``StoreUnavailable`` or any other exception (``unavailable``;
    with the exception's ``retry_after`` seconds, if it has them, as ``retry_after_ms``: a
    server still replaying its journal after a restart)."""

    async def store_key(self) -> Mapping[str, Any]:
        """The store key's group, threshold, period and Feldman commitment (clients seal to it)."""
        ...

    async def store_write(
        self, request: bytes, app: str, unique_id: bytes, quorum: bytes | None = None
    ) -> Mapping[str, Any]:
        """Order the encoded WriteRequest ``request`` of client (app, unique_id), or of the quorum
        whose encoded certificate is ``quorum``, through the network; the stored record's summary
        once applied here."""
        ...

    async def store_contribute(self, app: str, data_id: str) -> bytes:
        """A random joint secret's encoded WriteRequest (version 1): the sealed contributions of
        at least t+1 servers with their proofs; not ordered yet (a quorum approves it first)."""
        ...

    async def store_retrieve(
        self, app: str, unique_id: bytes, data_id: str, reader: bytes | None, quorum: bytes | None = None
    ) -> Mapping[str, Any]:
        """The record (a public value), or for a secret the record and every server's answer
        (shares sealed to ``reader``, or its refusal); ``quorum``: a quorum's certificate for the
        read (the ReadRequest of the record's version and ``reader``)."""
        ...

    async def store_write_many(
        self, requests: list[bytes], app: str, unique_id: bytes
    ) -> list[Mapping[str, Any]]:
        """``store_write`` of each of ``requests``, in this order, ordered together: each one's
        summary, or ``{"code": ..., "message": ...}`` (its refusal)."""
        ...


class CertificateBackend(Protocol):
    """The group's certificate authority for applications (issue 13 §1; appliance.node.ca).

    Refusals raise :class:`BackendRefused` (answered ``not-permitted``), a network that cannot
    sign now :class:`BackendUnavailable`."""

    def app_names(self, app: str) -> Sequence[str] | None:
        """The names ``[ca.apps.APP]`` allows application ``app`` (None: no profile for it)."""
        ...

    def next_period(self) -> float:
        """When the next period of C's clock starts (Unix seconds): a new certificate is worth
        asking for only then (the leaves of one period all have the same validity)."""
        ...

    async def issue_certificate(
        self, client: str, app: str, spki: bytes, names: Sequence[str]
    ) -> tuple[bytes, bytes]:
        """(the leaf PEM, the group root PEM) for the key ``spki``, once the leaf's record is in
        the secure log; ``client`` names the requester there."""
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
    """An error response: ``code`` is one of :data:`ERROR_CODES`; ``retry_after`` (seconds) is
    set for a rate limit: the wait after which the same request would pass."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


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
    "dss_sign": {"message": bytes},
    "dss_public_key": {},
    "generate_dss_key": {"handle": bytes, "name": str},
    "registrations": {},
    "revoke": {"name": str},
    "log_append": {"handle": bytes, "messages": list},
    "log_size": {},
    "log_entries": {"start": int, "count": int},
    "log_audit": {},
    "send": {"handle": bytes, "to": int, "data": bytes},
    "receive": {"handle": bytes},
    "challenge": {},
    "register_certified": {"certificate": bytes, "challenge": bytes, "signature": bytes},
    "certificate": {"handle": bytes},
    "timestamp": {"hash": str, "digest": bytes},
    "store_key": {"handle": bytes},
    "store_data": {"handle": bytes, "request": bytes},
    "write": {"handle": bytes, "request": bytes},
    "store_until": {"handle": bytes, "request": bytes},
    "generate_joint_secret": {"handle": bytes, "request": bytes},
    "generate_random_secret": {"handle": bytes, "data_id": str},
    "retrieve": {"handle": bytes, "data_id": str},
    "store_batch": {"handle": bytes, "requests": list},
}
#: Optional fields of each operation, with their types.
OPTIONAL: Final[Mapping[str, Mapping[str, type]]] = {
    "revoke": {"uid": int, "release_name": bool},
    "send": {"timeout_ms": int},
    "receive": {"max": int, "wait_ms": int},
    "certificate": {"csr": bytes, "names": list},
    "timestamp": {"nonce": int, "cert_req": bool},
    "retrieve": {"reader": bytes},
    # A DSS secret of C (the operator's), or an application's key (its handle and key name).
    "dss_sign": {"secret": str, "handle": bytes, "key": str},
    "dss_public_key": {"secret": str, "handle": bytes, "key": str},
    "generate_dss_key": {"group": str},
}
#: The store's write operations and the data types each takes (``write``: the next version of
#: read/write data; the model says which types those are).
STORE_WRITES: Final[Mapping[str, frozenset[str]]] = {
    "store_data": frozenset({"public-once", "public-rw", "secret-single", "secret-sw-dr", "secret-dw-dr"}),
    "write": frozenset({"public-rw", "secret-dw-dr"}),
    "store_until": frozenset({"store-until"}),
    "generate_joint_secret": frozenset({"joint-secret"}),
}
#: Write requests in one ``store_batch`` (the request's size limit, MAX_REQUEST_SIZE, holds too).
MAX_STORE_BATCH: Final = 1024
#: Operations only the operator (root or the server's own uid) may call.
OPERATOR_OPS: Final = frozenset({"upgrade_sign", "registrations", "revoke", "dss_sign", "log_audit"})
#: Largest message ``dss_sign`` takes (as the signing services).
MAX_DSS_MESSAGE: Final = 64 * 1024
MAX_NONCE_SIZE: Final = 64
#: Challenges for certificate registration: how many a uid may hold, and for how long.
MAX_CHALLENGES: Final = 8
CHALLENGE_LIFETIME: Final = 60.0
#: Bytes one link message carries (appliance.protocols.links.MAX_DATA).
MAX_LINK_DATA: Final = 64 * 1024
#: Longest a link send or receive may wait.
MAX_LINK_WAIT_MS: Final = 20_000
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
    optional = OPTIONAL.get(op, {})
    known = {*fields, *optional, "v", "id", "op"}
    extra = sorted(str(k) for k in obj if k not in known)
    if extra:
        raise bad(extra[0][:40], f"unexpected in {op}")
    args: dict[str, Any] = {}
    for key, want in (*fields.items(), *optional.items()):
        if key not in obj:
            if key in fields:
                raise bad(key, f"missing in {op}")
            continue
        value = obj[key]
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            raise bad(key, f"expected {want.__name__}, got {_type_name(value)}")
        args[key] = value
    if op in ("dss_sign", "dss_public_key") and (
        ("secret" in args) == ("key" in args) or ("key" in args) != ("handle" in args)
    ):
        raise bad(
            "secret", "give either 'secret' (a DSS secret of C) or 'handle' and 'key' (an application's key)"
        )
    if "uid" in args and not 0 <= args["uid"] < 2**32:
        raise bad("uid", "must be in [0, 2**32)")
    if "handle" in args and len(args["handle"]) != HANDLE_SIZE:
        raise bad("handle", f"must be {HANDLE_SIZE} bytes")
    if op == "random" and not 16 <= len(args["nonce"]) <= MAX_NONCE_SIZE:  # (timestamp's is an int)
        raise bad("nonce", f"must be 16 to {MAX_NONCE_SIZE} bytes, fresh for every request")
    for key in ("message", "payload"):
        if key in args and len(args[key]) > MAX_MESSAGE_SIZE:
            raise ApiError(TOO_LARGE, f"field {key!r}: {len(args[key])} bytes exceeds {MAX_MESSAGE_SIZE}")
    if "request_id" in args and len(args["request_id"]) != REQUEST_ID_SIZE:
        raise bad("request_id", f"must be {REQUEST_ID_SIZE} bytes (as pending returned it)")
    if "messages" in args:
        messages = args["messages"]
        if not 0 < len(messages) <= MAX_LOG_BATCH or not all(isinstance(m, bytes) for m in messages):
            raise bad("messages", f"must be a list of 1 to {MAX_LOG_BATCH} byte strings")
        total = sum(len(m) for m in messages)
        if total > MAX_MESSAGE_SIZE:
            raise ApiError(TOO_LARGE, f"field 'messages': {total} bytes in all exceeds {MAX_MESSAGE_SIZE}")
    if "requests" in args:
        requests = args["requests"]
        if not 0 < len(requests) <= MAX_STORE_BATCH or not all(isinstance(r, bytes) for r in requests):
            raise bad("requests", f"must be a list of 1 to {MAX_STORE_BATCH} byte strings")
    if "start" in args and not 0 <= args["start"] < 2**63:
        raise bad("start", "must be in [0, 2**63)")
    if "count" in args and not 1 <= args["count"] <= MAX_LOG_READ:
        raise bad("count", f"must be 1 to {MAX_LOG_READ}")
    if "protocol" in args and args["protocol"] not in DISTRIBUTED_PROTOCOLS:
        raise bad("protocol", f"one of {', '.join(sorted(DISTRIBUTED_PROTOCOLS))}")
    if "password" in args and not 0 < len(args["password"]) <= MAX_PASSWORD_SIZE:
        raise bad("password", f"must be 1 to {MAX_PASSWORD_SIZE} bytes")
    if op in ("register", "register_distributed", "revoke"):
        name = args["name"]
        if not 0 < len(name) <= MAX_NAME_LENGTH or _NAME_RE.fullmatch(name) is None:
            raise bad(
                "name",
                f"1 to {MAX_NAME_LENGTH} characters from [A-Za-z0-9._:@+-], starting alphanumeric",
            )
        if op == "register" and not 0 < len(args["unique_id"]) <= MAX_UNIQUE_ID_SIZE:
            raise bad("unique_id", f"must be 1 to {MAX_UNIQUE_ID_SIZE} bytes")
    return Request(obj["id"], op, args)


#: How our servers word "no share now" (a refresh between the decision and the new period's
#: services, or a recovering server): such an ``unavailable`` carries ``retry_after_ms``.
NOT_OPERATIONAL: Final = "this server is not operational"
NOT_OPERATIONAL_RETRY: Final = 0.5


def error_response(
    rid: int | None, code: str, message: str, retry_after: float | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if retry_after is not None:
        error["retry_after_ms"] = max(1, min(2**31, math.ceil(retry_after * 1000)))
    return {"v": API_VERSION, "id": rid, "ok": False, "error": error}


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

    def wait(self, cost: float = 1.0) -> float | None:
        """Seconds until ``cost`` tokens are there (after a failed :meth:`take`); None if never."""
        if self.rate <= 0 or cost > self.burst:
            return None
        return max(0.0, (cost - self.tokens) / self.rate)


def duration(seconds: float) -> str:
    """``seconds`` for people: 45 s, 12 min, 3 h, 2 days."""
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


@dataclass(frozen=True)
class Limits:
    """Per-client quotas; the defaults suit a handful of local applications."""

    #: Live registrations, (name, unique_id) pairs, per uid.
    max_registrations: int = 16
    #: Application names a uid may own (names stay with their first user).
    max_names: int = 64
    #: Live handles per registration; one more releases the least recently used.
    max_handles: int = 32
    #: A handle unused this long (seconds) is released; a registration goes with its last handle.
    idle_expiry: float = 24 * 3600.0
    sign_rate: float = 50.0
    sign_burst: float = 100.0
    control_rate: float = 20.0
    control_burst: float = 40.0
    #: Log entries appended through ``log_append``, per registration.
    log_rate: float = 100.0
    log_burst: float = 1000.0
    #: The store's writes (``store_data``, ``write``, ``store_until``,
    #: ``generate_joint_secret``, each request of ``store_batch``), per registration.
    store_rate: float = 2000.0
    store_burst: float = 10000.0


# Registrations ---------------------------------------------------------------------------------


@dataclass
class Handle:
    """One handle of a registration: SHA-256 of it, who got it, when, and its last use (Unix s)."""

    digest: bytes
    pid: int
    created: float
    last_used: float


@dataclass
class Registration:
    """``(name, unique_id, uid)`` and its handles. ``unique_id`` is empty and ``verifier`` set
    for a distributed application. ``pid`` registered last; times are Unix seconds."""

    name: str
    unique_id: bytes
    uid: int
    pid: int
    bucket: TokenBucket
    verifier: bytes | None = None
    created: float = 0.0
    last_used: float = 0.0
    handles: dict[bytes, Handle] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, bytes, int]:
        return (self.name, self.unique_id, self.uid)

    @property
    def kind(self) -> str:
        return "distributed" if self.verifier is not None else "centralized"

    def __repr__(self) -> str:  # the verifier and handle digests stay out of logs and tracebacks
        return f"Registration({self.name!r}, {self.kind}, uid={self.uid}, handles={len(self.handles)})"


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

    def own(self, name: str, uid: int) -> bool:
        """Make ``uid`` the owner of ``name`` if nobody owns it; True if that changed anything."""
        if self.owner(name) is not None:
            return False
        self.owners[name] = uid
        self.names_per_uid[uid] = self.names_per_uid.get(uid, 0) + 1
        return True

    def release_name(self, name: str) -> int | None:
        """Forget the owner of ``name`` (not a reserved one); the former owner, if any."""
        uid = self.owners.pop(name, None)
        if uid is not None:
            left = self.names_per_uid.get(uid, 1) - 1
            if left > 0:
                self.names_per_uid[uid] = left
            else:
                self.names_per_uid.pop(uid, None)
        return uid

    def add(self, reg: Registration) -> None:
        self.by_key[reg.key] = reg
        self.per_uid[reg.uid] = self.per_uid.get(reg.uid, 0) + 1
        for digest in reg.handles:
            self.by_handle[digest] = reg

    def add_handle(self, reg: Registration, handle: Handle) -> None:
        reg.handles[handle.digest] = handle
        self.by_handle[handle.digest] = reg

    def remove_handle(self, reg: Registration, digest: bytes) -> bool:
        """Release one handle; True if the registration went with it (it was the last)."""
        reg.handles.pop(digest, None)
        self.by_handle.pop(digest, None)
        if reg.handles:
            return False
        self.remove(reg)
        return True

    def remove(self, reg: Registration) -> None:
        for digest in reg.handles:
            self.by_handle.pop(digest, None)
        reg.handles.clear()
        if self.by_key.get(reg.key) is reg:
            del self.by_key[reg.key]
            left = self.per_uid[reg.uid] - 1
            if left:
                self.per_uid[reg.uid] = left
            else:
                del self.per_uid[reg.uid]


#: Expired handles are looked for at most this often (a handle's own expiry is checked on use).
SWEEP_INTERVAL: Final = 60.0


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
        wall: Callable[[], float] = time.time,
        rand: Callable[[int], bytes] = os.urandom,
        store: RegistrationStore | None = None,
        offload: Callable[[Callable[[], bytes]], Awaitable[bytes]] | None = None,
        request_wait: float = 15.0,
        operators: frozenset[int] | None = None,
        log_backend: LogBackend | None = None,
        links: LinkBackend | None = None,
        client_ca: ClientCA | None = None,
        server_id: int | None = None,
        used_certificates: UsedCertificates | None = None,
        certificates: CertificateBackend | None = None,
        data_store: StoreBackend | None = None,
    ) -> None:
        """``store`` keeps registrations across restarts; ``offload`` runs scrypt off the event
        loop (e.g. in a thread); ``request_wait`` bounds how long a distributed request waits
        for the other clients' approvals. ``clock`` (monotonic) drives the rate limits, ``wall``
        (Unix time, kept across restarts) the registrations' ages and expiry. ``operators``:
        the uids allowed the operator's operations (default root and our own uid).
        ``log_backend``: the server's log (None: the log operations answer ``unavailable``)."""
        self.backend = backend
        self.log_backend = log_backend
        self.links = links
        #: The data storage API (None: C has no store key, the store operations answer unavailable).
        self.store_backend = data_store
        #: Period certificates for applications (None: this server issues none).
        self.certificates = certificates
        #: Certificate-based registration of distributed applications (§5.1, option 2).
        self.client_ca = client_ca
        self.server_id = server_id
        self.used_certificates = (
            used_certificates if used_certificates is not None else UsedCertificates(None)
        )
        self._challenges: dict[int, dict[bytes, float]] = {}
        self._log_buckets: dict[tuple[str, bytes, int], TokenBucket] = {}
        self._store_buckets: dict[tuple[str, bytes, int], TokenBucket] = {}
        self.distributed = backend if isinstance(backend, DistributedBackend) else None
        self.limits = limits if limits is not None else Limits()
        self.clock = clock
        self.wall = wall
        self.rand = rand
        self.offload = offload
        self.request_wait = request_wait
        self.operators = operators if operators is not None else frozenset({0, os.getuid()})
        self.registry = Registry(reserved=dict(reserved or {}))
        self._control: dict[int, TokenBucket] = {}
        self.store = store
        self._dirty = False
        self._saved_at = clock()
        #: Requests answered, by (operation, "ok" or error code): what /metrics shows. The
        #: operation is one of :data:`OPS`, "invalid" (no known op), "connection" (refused or
        #: closed before a request was read) or "unknown" (timed out); nothing a client chose.
        self.counts: Counter[tuple[str, str]] = Counter()
        self._swept_at = clock()
        if store is not None:
            saved = store.load(now=wall())
            self._restore(saved)
            for problem in saved.problems:
                log.error("api: registrations: %s", problem)
            log.info("api: %d registrations restored from %s", len(self.registry.by_key), store.path)

    # Persistence ------------------------------------------------------------------------------

    def _restore(self, saved: Saved) -> None:
        reg, now, wall = self.registry, self.clock(), self.wall()
        for name, uid in saved.owners.items():
            if name not in reg.reserved:
                reg.own(name, uid)
        expired = 0
        for s in saved.registrations:
            where = f"{self.store.path if self.store else 'store'}: registration of {s.name!r}"
            owner = reg.owner(s.name)
            if owner is not None and owner != s.uid:
                saved.problems.append(f"{where} by uid {s.uid}, but uid {owner} owns the name; skipped")
                continue
            if (s.name, s.unique_id, s.uid) in reg.by_key:
                saved.problems.append(f"{where} by uid {s.uid} appears twice; skipped")
                continue
            handles = {}
            for h in s.handles:
                if h.digest in reg.by_handle:
                    saved.problems.append(f"{where} by uid {s.uid}: a handle appears twice; skipped")
                elif wall - h.last_used >= self.limits.idle_expiry:
                    expired += 1
                else:
                    handles[h.digest] = Handle(h.digest, h.pid, h.created, h.last_used)
            if not handles:
                continue
            if s.name not in reg.reserved:
                reg.own(s.name, s.uid)
            limits = self.limits
            bucket = TokenBucket(limits.sign_rate, limits.sign_burst, min(limits.sign_burst, s.tokens), now)
            reg.add(
                Registration(
                    s.name, s.unique_id, s.uid, s.pid, bucket, s.verifier, s.created, s.last_used, handles
                )
            )
        if expired:
            log.info("api: %d handles unused for %s expired", expired, duration(self.limits.idle_expiry))
            self._dirty = True

    def _save(self) -> None:
        """Write the registrations now (after any change to them)."""
        if self.store is None:
            return
        now = self.clock()
        regs = [
            SavedRegistration(
                r.name,
                r.unique_id,
                r.uid,
                r.pid,
                r.bucket.tokens,
                r.verifier,
                r.created,
                r.last_used,
                tuple(SavedHandle(h.digest, h.pid, h.created, h.last_used) for h in r.handles.values()),
            )
            for r in self.registry.by_key.values()
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
        """A quota, a use time or a handle moved: save when the last save is old enough."""
        self._dirty = True
        if self.clock() - self._saved_at >= SAVE_INTERVAL:
            self._save()

    def flush(self) -> None:
        """Save quota changes not written yet (call when the server stops)."""
        if self._dirty:
            self._save()

    def expire(self) -> int:
        """Release every handle unused for ``idle_expiry``; the number released."""
        wall, limit = self.wall(), self.limits.idle_expiry
        self._swept_at = self.clock()
        released, gone = 0, 0
        for reg in list(self.registry.by_key.values()):
            for handle in list(reg.handles.values()):
                if wall - handle.last_used >= limit:
                    released += 1
                    if self.registry.remove_handle(reg, handle.digest):
                        gone += 1
                        log.info("api: registration %r of uid %d expired (unused)", reg.name, reg.uid)
        if gone:
            self._save()
        elif released:
            self._spent()
        return released

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
        if self.clock() - self._swept_at >= SWEEP_INTERVAL:
            self.expire()
        try:
            request = parse_request(obj)
            result = await self._dispatch(request, peer)
        except ApiError as exc:
            self.count(op, exc.code)
            retry_after = exc.retry_after
            if retry_after is None and exc.code == UNAVAILABLE and NOT_OPERATIONAL in exc.message:
                retry_after = NOT_OPERATIONAL_RETRY  # a refresh's handover: soon again
            return error_response(rid, exc.code, exc.message, retry_after)
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
        if request.op == "log_append":
            return await self._log_append(args["handle"], args["messages"], peer)
        if request.op == "send":
            return await self._link_send(
                args["handle"], args["to"], args["data"], args.get("timeout_ms"), peer
            )
        if request.op == "receive":
            return await self._link_receive(args["handle"], args.get("max", 64), args.get("wait_ms", 0), peer)
        if request.op == "certificate":
            return await self._certificate(args["handle"], args.get("csr"), args.get("names"), peer)
        if request.op in STORE_WRITES or request.op in (
            "store_key",
            "retrieve",
            "generate_random_secret",
            "store_batch",
        ):
            return await self._store(request, peer)
        if request.op == "generate_dss_key" or "key" in request.args:
            return await self._app_dss(request, peer)
        self._charge_control(
            peer, 4.0 if request.op in ("register_distributed", "register_certified") else 1.0
        )
        if request.op in OPERATOR_OPS and peer.uid not in self.operators:
            log.warning("api: uid %d (pid %d) refused %s: not the operator", peer.uid, peer.pid, request.op)
            raise ApiError(
                NOT_PERMITTED,
                f"{request.op!r} is for the operator (root or the server's own user), not uid {peer.uid}",
            )
        if request.op == "timestamp":
            return {"response": await self._timestamp(args)}
        if request.op == "upgrade_sign":
            return {"certificate": await self._upgrade_sign()}
        if request.op == "dss_sign":
            return {"signature": await self._dss_call("sign_dss", args["secret"], args["message"])}
        if request.op == "dss_public_key":
            return {"pem": await self._dss_call("dss_public_key", args["secret"])}
        if request.op == "registrations":
            return self._list_registrations()
        if request.op == "revoke":
            return self._revoke(args["name"], args.get("uid"), args.get("release_name", False), peer)
        if request.op == "register":
            return self._register(args["name"], args["unique_id"], peer)
        if request.op == "register_distributed":
            return await self._register_distributed(args["name"], args["password"], peer)
        if request.op == "challenge":
            return {"challenge": self._challenge(peer)}
        if request.op == "register_certified":
            return self._register_certified(args["certificate"], args["challenge"], args["signature"], peer)
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
        if request.op == "log_size":
            return dict(await self._call_log("read the log", lambda log: log.log_size()))
        if request.op == "log_entries":
            return await self._log_entries(args["start"], args["count"])
        if request.op == "log_audit":
            return dict(await self._call_log("audit the log", lambda log: log.log_audit()))
        assert request.op == "status", request.op
        return {"status": await self._status()}

    async def _upgrade_sign(self) -> bytes:
        """The operator's request for the network's signature on the upgrade they approved.

        Only root or the server's own user may ask (``pst upgrade sign``): an application must
        not be able to start the signing of an upgrade, even one the operators approved.
        """
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

    async def _timestamp(self, args: Mapping[str, Any]) -> bytes:
        """RFC 3161 from a local client: the hash algorithm's name and the digest in, the DER
        ``TimeStampResp`` out (a token, or a rejection saying why), as ``POST /tsa`` answers the
        same request. Open to every local user (a public service over HTTP too), at the control
        rate."""
        from appliance.apps.tsa import rfc3161

        timestamp = getattr(self.backend, "timestamp", None)
        if timestamp is None:
            raise ApiError(UNAVAILABLE, "this server has no timestamping authority (no [tsa] section)")
        name, nonce = args["hash"], args.get("nonce")
        if name not in rfc3161.HASHES_BY_NAME:
            accepted = ", ".join(rfc3161.HASHES_BY_NAME)
            raise ApiError(BAD_REQUEST, f"'hash' must be one of {accepted}, not {name[:20]!r}")
        if nonce is not None and not 0 <= nonce < 1 << 160:
            raise ApiError(BAD_REQUEST, "'nonce' must be in 0 .. 2**160-1")
        if len(args["digest"]) > 128:
            raise ApiError(TOO_LARGE, "'digest' is longer than any accepted hash")
        query = rfc3161.encode_request(name, args["digest"], nonce=nonce, cert_req=args.get("cert_req", True))
        try:
            response = await timestamp(query)
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, str(exc)[:300]) from None
        if not isinstance(response, bytes):
            raise ApiError(UNAVAILABLE, "the timestamping authority returned no response")
        return response

    async def _dss_call(self, method: str, secret: str, *message: bytes) -> bytes:
        """The operator's threshold DSS signature by secret ``secret`` of C, or its public key.

        Operator only: the DSS keys of C (a timestamping authority's key) sign raw SHA-256
        digests that openssl verifies, with no domain of ours around them, so no application
        may make them sign what it likes (per-application DSS keys are not done yet).
        """
        call = getattr(self.backend, method, None)
        if call is None:
            raise ApiError(UNAVAILABLE, "this server has no threshold DSS service")
        if message and len(message[0]) > MAX_DSS_MESSAGE:
            raise ApiError(TOO_LARGE, f"'message' is larger than {MAX_DSS_MESSAGE} bytes")
        try:
            value = await call(secret, *message)
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, str(exc)[:300]) from None
        if not isinstance(value, bytes):
            raise ApiError(UNAVAILABLE, f"the network has no DSS secret {secret[:40]!r}")
        return value

    def _charge_control(self, peer: PeerCred, cost: float = 1.0) -> None:
        now = self.clock()
        bucket = self._control.get(peer.uid)
        if bucket is None:
            bucket = TokenBucket.full(self.limits.control_rate, self.limits.control_burst, now)
            self._control[peer.uid] = bucket
        if not bucket.take(now, cost):
            wait = bucket.wait(cost)
            limits = self.limits
            log.info("api: uid %d (pid %d) over its request rate", peer.uid, peer.pid)
            raise ApiError(
                QUOTA,
                f"too many requests from uid {peer.uid} (at most {limits.control_rate:g} per second, "
                f"bursts of {limits.control_burst:g}): {_retry_hint(wait)}",
                wait,
            )

    def _register(
        self, name: str, unique_id: bytes, peer: PeerCred, verifier: bytes | None = None
    ) -> Mapping[str, Any]:
        reg, limits = self.registry, self.limits
        owner = reg.owner(name)
        if owner is not None and owner != peer.uid:
            log.warning(
                "api: uid %d (pid %d) refused name %r owned by uid %d", peer.uid, peer.pid, name, owner
            )
            raise ApiError(
                NOT_PERMITTED,
                f"the application name {name!r} belongs to another user (names stay with the first "
                "user who registers them); choose another name, or ask the operator",
            )
        handle = self.rand(HANDLE_SIZE)
        if len(handle) != HANDLE_SIZE:
            raise ApiError(UNAVAILABLE, "no randomness")
        digest = _digest(handle)
        if digest in reg.by_handle:  # only with a broken random source
            raise ApiError(UNAVAILABLE, "handle collision")
        key = (name, unique_id, peer.uid)
        old = reg.by_key.get(key)
        if (
            old is not None
            and verifier is not None
            and not hmac.compare_digest(old.verifier or b"", verifier)
        ):
            reg.remove(old)  # a new password: the handles of the old one go
            log.info("api: distributed application %r of uid %d: new password", name, peer.uid)
            replaced: Registration | None = old
            old = None
        else:
            replaced = None
        if old is None and replaced is None:
            self._check_quotas(name, owner, peer)
        now = self.wall()
        if old is None:
            if replaced is not None:
                bucket = replaced.bucket
            else:
                bucket = TokenBucket.full(limits.sign_rate, limits.sign_burst, self.clock())
            target = Registration(name, unique_id, peer.uid, peer.pid, bucket, verifier, now, now)
            reg.add(target)
        else:
            target = old
            target.pid, target.last_used = peer.pid, now
            while target.handles and len(target.handles) >= max(1, limits.max_handles):
                oldest = min(target.handles.values(), key=lambda h: h.last_used)
                del target.handles[oldest.digest]  # the registration stays: a handle is added below
                reg.by_handle.pop(oldest.digest, None)
                log.info(
                    "api: %r of uid %d has %d handles, the limit: released the least recently used",
                    name,
                    peer.uid,
                    limits.max_handles,
                )
        reg.add_handle(target, Handle(digest, peer.pid, now, now))
        if name not in reg.reserved:
            reg.own(name, peer.uid)
        if old is None:
            self._save()  # a new registration, owner or verifier: the key-holder reads them
        else:
            self._spent()  # one more handle of a registration already on disk
        log.info(
            "api: %s %s%r for uid %d (pid %d), %d handle(s)",
            "registered" if old is None else "new handle of",
            "distributed application " if verifier is not None else "",
            name,
            peer.uid,
            peer.pid,
            len(target.handles),
        )
        return {"handle": handle}

    def _check_quotas(self, name: str, owner: int | None, peer: PeerCred) -> None:
        """May ``peer`` make one more registration (of ``name``, owned by ``owner``)?"""
        reg, limits = self.registry, self.limits
        if reg.per_uid.get(peer.uid, 0) >= limits.max_registrations:
            self.expire()
        if reg.per_uid.get(peer.uid, 0) >= limits.max_registrations:
            log.warning(
                "api: uid %d (pid %d) refused a registration of %r: %d registrations, the limit",
                peer.uid,
                peer.pid,
                name,
                limits.max_registrations,
            )
            raise ApiError(
                QUOTA,
                f"uid {peer.uid} has {limits.max_registrations} registrations, the limit per user. "
                "Release them when done (PstClient.close(), or the end of its with block), register "
                "with one unique id per application instance (the client's default), or have the "
                "operator free them (pst api registrations list / revoke NAME); "
                f"a handle unused for {duration(limits.idle_expiry)} expires by itself",
            )
        if owner is None and reg.names_per_uid.get(peer.uid, 0) >= limits.max_names:
            log.warning(
                "api: uid %d (pid %d) refused the new name %r: %d names, the limit",
                peer.uid,
                peer.pid,
                name,
                limits.max_names,
            )
            raise ApiError(
                QUOTA,
                f"uid {peer.uid} owns {limits.max_names} application names, the limit per user "
                "(a name stays with its first user so that nobody else can sign under it). "
                "Reuse a name you own, or have the operator release one "
                "(pst api registrations revoke NAME --release-name)",
            )

    # Operator ------------------------------------------------------------------------------------

    def _list_registrations(self) -> Mapping[str, Any]:
        """Every registration, without handles or verifiers; and the names' owners."""
        regs = sorted(self.registry.by_key.values(), key=lambda r: (r.name, r.uid, r.unique_id))
        return {
            "now_ms": _ms(self.wall()),
            "idle_expiry_ms": _ms(self.limits.idle_expiry),
            "registrations": [
                {
                    "name": r.name,
                    "uid": r.uid,
                    "kind": r.kind,
                    "unique_id": r.unique_id,
                    "pid": r.pid,
                    "handles": len(r.handles),
                    "created_ms": _ms(r.created),
                    "last_used_ms": _ms(max(h.last_used for h in r.handles.values())),
                }
                for r in regs
            ],
            "owners": dict(sorted(self.registry.owners.items())),
            "reserved": dict(sorted(self.registry.reserved.items())),
        }

    def _revoke(self, name: str, uid: int | None, release_name: bool, peer: PeerCred) -> Mapping[str, Any]:
        reg = self.registry
        if release_name and name in reg.reserved:
            raise ApiError(
                NOT_PERMITTED,
                f"{name!r} is reserved for uid {reg.reserved[name]} by the server's configuration; "
                "change the configuration to release it",
            )
        chosen = [r for r in reg.by_key.values() if r.name == name and (uid is None or r.uid == uid)]
        handles = sum(len(r.handles) for r in chosen)
        for r in chosen:
            reg.remove(r)
        owner = reg.owners.get(name)
        released = release_name and owner is not None and (uid is None or owner == uid)
        if released:
            reg.release_name(name)
        if chosen or released:
            self._save()
        whose = "every uid" if uid is None else f"uid {uid}"
        log.log(
            logging.WARNING if chosen or released else logging.INFO,
            "api: operator uid %d (pid %d) revoked %d registration(s) of %r for %s%s",
            peer.uid,
            peer.pid,
            len(chosen),
            name,
            whose,
            f"; name released (was uid {owner}'s)" if released else "",
        )
        return {"revoked": len(chosen), "handles": handles, "released": released, "owner": owner}

    async def _register_distributed(self, name: str, password: bytes, peer: PeerCred) -> Mapping[str, Any]:
        if self.distributed is None:
            raise ApiError(UNAVAILABLE, "this server does not serve distributed applications")
        owner = self.registry.owner(name)
        if owner is not None and owner != peer.uid:  # refuse before spending scrypt on it
            raise ApiError(NOT_PERMITTED, "this application name is registered by another user")
        derive = functools.partial(password_verifier, name, password)
        verifier = await self.offload(derive) if self.offload is not None else derive()
        return self._register(name, b"", peer, verifier)

    def _challenge(self, peer: PeerCred) -> bytes:
        """A fresh challenge for ``register_certified``: good once, for this uid, for a minute."""
        now = self.clock()
        pending = self._challenges.setdefault(peer.uid, {})
        for old in [c for c, expires in pending.items() if expires < now]:
            del pending[old]
        while len(pending) >= MAX_CHALLENGES:
            del pending[next(iter(pending))]
        challenge = self.rand(CHALLENGE_SIZE)
        pending[challenge] = now + CHALLENGE_LIFETIME
        return challenge

    def _register_certified(
        self, certificate: bytes, challenge: bytes, signature: bytes, peer: PeerCred
    ) -> Mapping[str, Any]:
        if self.distributed is None:
            raise ApiError(UNAVAILABLE, "this server does not serve distributed applications")
        if self.client_ca is None or self.server_id is None:
            raise ApiError(
                UNAVAILABLE, "this server registers no clients by certificate (no [server] distributed_ca)"
            )
        expires = self._challenges.get(peer.uid, {}).pop(challenge, None)
        if expires is None or expires < self.clock():
            raise ApiError(NOT_PERMITTED, "unknown or expired challenge: ask for a new one ('challenge')")
        now = datetime.datetime.fromtimestamp(self.wall(), datetime.UTC)
        try:
            client = self.client_ca.check(certificate, server=self.server_id, now=now)
        except CertificateRefused as exc:
            log.warning("api: uid %d (pid %d): certificate refused: %s", peer.uid, peer.pid, exc)
            raise ApiError(NOT_PERMITTED, str(exc)) from None
        if not verify_possession(
            client, registration_payload(self.server_id, challenge, client.digest), signature
        ):
            raise ApiError(NOT_PERMITTED, "the signature does not prove possession of the certified key")
        if client.digest in self.used_certificates:
            log.warning(
                "api: uid %d (pid %d) presented a used certificate of %r", peer.uid, peer.pid, client.name
            )
            raise ApiError(
                NOT_PERMITTED, "this one-time certificate registered before; get a new one from the CA"
            )
        owner = self.registry.owner(client.name)
        if owner is not None and owner != peer.uid:
            raise ApiError(NOT_PERMITTED, "this application name is registered by another user")
        self.used_certificates.add(client.digest)  # durable before the handle exists
        log.info(
            "api: %r component %d registered by certificate for uid %d (pid %d)",
            client.name,
            client.index,
            peer.uid,
            peer.pid,
        )
        return self._register(client.name, b"", peer, self.client_ca.verifier(client.name))

    def _lookup(self, handle: bytes, peer: PeerCred) -> Registration:
        digest = _digest(handle)
        reg = self.registry.by_handle.get(digest)
        if reg is None:
            raise ApiError(
                UNKNOWN_HANDLE,
                "no registration has this handle: it was released (unregister), replaced, revoked by "
                "the operator, or unused too long; register again",
            )
        if reg.uid != peer.uid:
            log.warning("api: uid %d (pid %d) presented a handle of uid %d", peer.uid, peer.pid, reg.uid)
            raise ApiError(NOT_PERMITTED, "this handle belongs to another user")
        entry = reg.handles[digest]
        now = self.wall()
        if now - entry.last_used >= self.limits.idle_expiry:
            if self.registry.remove_handle(reg, digest):
                self._save()
            else:
                self._spent()
            raise ApiError(
                UNKNOWN_HANDLE,
                f"this handle was unused for more than {duration(self.limits.idle_expiry)} and "
                "expired; register again",
            )
        entry.last_used = reg.last_used = now
        self._dirty = True
        return reg

    def _unregister(self, handle: bytes, peer: PeerCred) -> None:
        reg = self._lookup(handle, peer)
        if self.registry.remove_handle(reg, _digest(handle)):
            self._save()
            log.info("api: unregistered %r for uid %d (pid %d)", reg.name, peer.uid, peer.pid)
        else:
            self._spent()
            log.info(
                "api: released a handle of %r for uid %d (pid %d), %d left",
                reg.name,
                peer.uid,
                peer.pid,
                len(reg.handles),
            )

    def _take(self, reg: Registration, what: str) -> None:
        """Spend one token of ``reg``'s bucket, or answer ``quota`` with the wait."""
        if reg.bucket.take(self.clock()):
            self._spent()
            return
        wait = reg.bucket.wait()
        raise ApiError(
            QUOTA,
            f"{what} rate limit of {reg.name!r} exceeded (at most {reg.bucket.rate:g} per second, bursts "
            f"of {reg.bucket.burst:g}, shared by its handles): {_retry_hint(wait)}",
            wait,
        )

    async def _sign(
        self, handle: bytes, message: bytes, peer: PeerCred, *, digest: bool = False
    ) -> Mapping[str, Any]:
        reg = self._lookup(handle, peer)
        if reg.verifier is not None:
            raise ApiError(
                NOT_PERMITTED, "a distributed application signs through 'request' (a majority must agree)"
            )
        self._take(reg, "signing")
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
        reg = self._lookup(handle, peer)
        self._take(reg, "request")
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
        self._take(reg, "request")
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

    # Proactively secure links (§5.4) -----------------------------------------------------------

    def has_registration(self, name: str) -> bool:
        """Is an application named ``name`` registered here (a client that may receive)?"""
        return any(key[0] == name for key in self.registry.by_key)

    def _links(self) -> LinkBackend:
        if self.links is None:
            raise ApiError(UNAVAILABLE, "this server does not run proactive links")
        return self.links

    async def _link_send(
        self, handle: bytes, to: int, data: bytes, timeout_ms: int | None, peer: PeerCred
    ) -> Mapping[str, Any]:
        reg = self._lookup(handle, peer)
        links = self._links()
        if len(data) > MAX_LINK_DATA:
            raise ApiError(TOO_LARGE, f"field 'data' has {len(data)} bytes, over {MAX_LINK_DATA}")
        if timeout_ms is not None and not 0 < timeout_ms <= MAX_LINK_WAIT_MS:
            raise ApiError(BAD_REQUEST, f"field 'timeout_ms' must be in 1..{MAX_LINK_WAIT_MS}")
        self._take(reg, "send")
        timeout = (timeout_ms or 10_000) / 1000
        try:
            await links.link_send(reg.name, to, data, timeout)
        except BackendRefused as exc:
            raise ApiError(REFUSED, str(exc)[:300]) from None
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, str(exc)[:300]) from None
        except Exception as exc:
            log.error("api: link send failed (%s)", type(exc).__name__)
            raise ApiError(UNAVAILABLE, "cannot send now") from None
        return {"delivered": True}

    async def _link_receive(
        self, handle: bytes, limit: int, wait_ms: int, peer: PeerCred
    ) -> Mapping[str, Any]:
        reg = self._lookup(handle, peer)
        links = self._links()
        if not 1 <= limit <= 256:
            raise ApiError(BAD_REQUEST, "field 'max' must be in 1..256")
        if not 0 <= wait_ms <= MAX_LINK_WAIT_MS:
            raise ApiError(BAD_REQUEST, f"field 'wait_ms' must be in 0..{MAX_LINK_WAIT_MS}")
        try:
            got = await links.link_receive(reg.name, limit, wait_ms / 1000)
        except Exception as exc:
            log.error("api: link receive failed (%s)", type(exc).__name__)
            raise ApiError(UNAVAILABLE, "cannot receive now") from None
        return {
            "messages": [{"from": sender, "period": period, "data": data} for sender, period, data in got]
        }

    # Data storage (§5.2, Table 4) --------------------------------------------------------------

    async def _store(self, request: Request, peer: PeerCred) -> Mapping[str, Any]:
        from appliance.apps.store.model import Refused, WriteRequest

        args = request.args
        reg = self._lookup(args["handle"], peer)
        backend = self.store_backend
        if backend is None:
            raise ApiError(UNAVAILABLE, "this network has no store key (pst cluster init --store)")
        if request.op in STORE_WRITES or request.op == "store_batch":
            self._take_store(reg, len(args["requests"]) if request.op == "store_batch" else 1)
        else:
            self._take(reg, "store")
        try:
            if request.op == "store_batch":
                return await self._store_batch(backend, reg, args["requests"])
            if request.op == "store_key":
                return dict(await backend.store_key())
            if request.op == "retrieve":
                reader = args.get("reader")
                if reader is not None and len(reader) != 32:
                    raise bad("reader", "an X25519 public key has 32 bytes")
                if reg.verifier is not None and reader is not None:
                    return await self._quorum_retrieve(reg, args["data_id"], reader, backend)
                return dict(await backend.store_retrieve(reg.name, reg.unique_id, args["data_id"], reader))
            if request.op == "generate_random_secret":
                return await self._random_secret(reg, args["data_id"], backend)
            try:
                write = WriteRequest.decode(args["request"])
            except DecodeError as exc:
                raise bad("request", str(exc)) from None
            allowed = STORE_WRITES[request.op]
            if write.dtype.value not in allowed:
                raise ApiError(
                    BAD_REQUEST,
                    f"{request.op} takes data of type {', '.join(sorted(allowed))}, not {write.dtype.value}",
                )
            if request.op == "store_data" and write.version != 1:
                raise ApiError(STALE_VERSION, "store_data creates data (version 1); change it with write")
            if reg.verifier is not None and write.dtype.value in QUORUM_WRITES:
                if write.app != reg.name:
                    raise ApiError(
                        NOT_PERMITTED, f"a client of {reg.name!r} cannot write {write.app!r}'s data"
                    )
                quorum = await self._quorum(reg, write.approval_payload())
                return dict(await backend.store_write(args["request"], reg.name, reg.unique_id, quorum))
            return dict(await backend.store_write(args["request"], reg.name, reg.unique_id))
        except Refused as exc:
            raise ApiError(exc.code if exc.code in ERROR_CODES else REFUSED, str(exc)[:1000]) from None
        except ApiError:
            raise
        except Exception as exc:
            log.warning("api: store %s failed: %s", request.op, exc)
            retry = getattr(exc, "retry_after", None)
            raise ApiError(
                UNAVAILABLE,
                f"the store cannot serve now: {str(exc)[:300]}",
                float(retry) if isinstance(retry, (int, float)) else None,
            ) from None

    def _bucket(
        self, buckets: dict[tuple[str, bytes, int], TokenBucket], reg: Registration, rate: float, burst: float
    ) -> TokenBucket:
        """``reg``'s bucket in ``buckets`` (a new full one the first time)."""
        bucket = buckets.get(reg.key)
        if bucket is None:
            if len(buckets) >= 4096:  # forget the buckets of registrations that are gone
                live = set(self.registry.by_key)
                for gone in [k for k in buckets if k not in live]:
                    del buckets[gone]
            bucket = buckets[reg.key] = TokenBucket.full(rate, burst, self.clock())
        return bucket

    def _take_store(self, reg: Registration, count: int) -> None:
        """Spend ``count`` tokens of ``reg``'s bucket of store writes, or answer ``quota``."""
        limits = self.limits
        bucket = self._bucket(self._store_buckets, reg, limits.store_rate, limits.store_burst)
        if not bucket.take(self.clock(), count):
            wait = bucket.wait(count)
            raise ApiError(
                QUOTA,
                f"store rate limit of {reg.name!r} exceeded (at most {limits.store_rate:g} writes per "
                f"second, bursts of {limits.store_burst:g}, shared by its handles): {_retry_hint(wait)}",
                wait,
            )

    async def _store_batch(
        self, backend: StoreBackend, reg: Registration, requests: list[bytes]
    ) -> Mapping[str, Any]:
        """Many writes in one call, ordered together (in this order): each one's summary or
        error, as the single operation would answer (``store_data``, ``store_until`` or
        ``generate_joint_secret`` for version 1 by its type, ``write`` for later versions)."""
        from appliance.apps.store.model import WriteRequest

        if reg.verifier is not None:
            raise ApiError(
                NOT_PERMITTED, "store_batch is for centralized registrations (a quorum approves one request)"
            )
        results: list[Mapping[str, Any] | None] = []
        send: list[bytes] = []
        for raw in requests:
            try:
                write = WriteRequest.decode(raw)
            except DecodeError as exc:
                results.append({"code": BAD_REQUEST, "message": f"field 'request': {exc}"[:1000]})
                continue
            if write.version == 1:
                allowed = frozenset().union(*(STORE_WRITES[op] for op in STORE_WRITES if op != "write"))
            else:
                allowed = STORE_WRITES["write"]
            if write.dtype.value not in allowed:
                results.append(
                    {
                        "code": BAD_REQUEST,
                        "message": f"version {write.version} of {write.dtype.value} data cannot be written",
                    }
                )
                continue
            results.append(None)
            send.append(raw)
        done = list(await backend.store_write_many(send, reg.name, reg.unique_id)) if send else []
        if len(done) != len(send):
            raise ApiError(UNAVAILABLE, "the store answered for another number of writes")
        answers = iter(done)
        out: list[Mapping[str, Any]] = []
        for result in results:
            if result is None:
                got = dict(next(answers))
                if "code" in got and got["code"] not in ERROR_CODES:
                    got["code"] = REFUSED
                out.append(got)
            else:
                out.append(result)
        return {"results": out}

    async def _quorum(self, reg: Registration, payload: bytes) -> bytes:
        """The approvals certificate (protocol ``store``) of ``payload``: once a strict majority
        of the application's clients asked for or approved it; ``refused`` naming the servers
        otherwise."""
        if self.distributed is None or reg.verifier is None:
            raise ApiError(UNAVAILABLE, "this server does not serve distributed applications")
        certificate = await self._call_distributed(
            "request",
            self.distributed.distributed_request(reg.name, reg.verifier, "store", payload, self.request_wait),
        )
        if not isinstance(certificate, bytes):
            raise ApiError(UNAVAILABLE, "cannot serve the request now")
        log.info("api: a quorum of distributed application %r approved a store request", reg.name)
        return certificate

    async def _random_secret(
        self, reg: Registration, data_id: str, backend: StoreBackend
    ) -> Mapping[str, Any]:
        """GenerateJointSecret, random: at least t+1 servers' sealed contributions (each with its
        server's proof), approved by a quorum of the application's clients, then ordered. The
        proofs must be of the quorum's period: a refresh in between, and it starts again."""
        from appliance.apps.store.model import Contribution, Quorum, WriteRequest

        if reg.verifier is None:
            raise ApiError(
                NOT_PERMITTED,
                "a random joint secret is made for a quorum of a distributed application's clients "
                "(register_distributed), not for one client",
            )
        for _attempt in range(3):
            raw = await backend.store_contribute(reg.name, data_id)
            write = WriteRequest.decode(raw)
            periods = {Contribution.decode(proof).period for proof in write.proofs.values()}
            quorum = await self._quorum(reg, write.approval_payload())
            if Quorum.decode(quorum).period in periods:
                return dict(await backend.store_write(raw, reg.name, reg.unique_id, quorum))
        raise ApiError(
            UNAVAILABLE, "refreshes came between the contributions and the quorum's approval; try again"
        )

    async def _quorum_retrieve(
        self, reg: Registration, data_id: str, reader: bytes, backend: StoreBackend
    ) -> Mapping[str, Any]:
        """A distributed client's Retrieve: the record first; a secret that only a quorum reads
        (``secret-sw-dr``, ``secret-dw-dr``, ``joint-secret``) is read with the certificate of
        its ReadRequest (this version, this reader key); anything else as the client alone."""
        from appliance.apps.store.model import ReadRequest

        head = dict(await backend.store_retrieve(reg.name, reg.unique_id, data_id, None))
        record = head.get("record")
        if not isinstance(record, Mapping) or record.get("type") not in QUORUM_READS:
            return dict(await backend.store_retrieve(reg.name, reg.unique_id, data_id, reader))
        version = record.get("v")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ApiError(UNAVAILABLE, "the store returned a malformed record")
        read = ReadRequest(reg.name, data_id, version, reader)
        quorum = await self._quorum(reg, read.approval_payload())
        return dict(await backend.store_retrieve(reg.name, reg.unique_id, data_id, reader, quorum))

    # Per-application DSS keys (§5.3, issue 12) ----------------------------------------------------

    async def _app_dss(self, request: Request, peer: PeerCred) -> Mapping[str, Any]:
        """generate_dss_key, and dss_sign / dss_public_key with an application's key
        (appliance.apps.dsskeys): the key's record is a store write; a signature is made by the
        application keys' secret of its group, every signer checking the client owns the key."""
        from appliance.apps.dsskeys import model as dsskeys
        from appliance.apps.store.model import DataType, Refused, WriteRequest
        from appliance.crypto import appkeys
        from appliance.crypto.errors import ParameterError

        args = request.args
        reg = self._lookup(args["handle"], peer)
        if reg.verifier is not None:
            raise ApiError(NOT_PERMITTED, "DSS keys are for centralized registrations (register) for now")
        store = self.store_backend
        if store is None:
            raise ApiError(
                UNAVAILABLE, "DSS keys are recorded in the store: this network has no store key (--store)"
            )
        sign_app_dss = getattr(self.backend, "sign_app_dss", None)
        public_key = getattr(self.backend, "app_dss_public_key", None)
        if sign_app_dss is None or public_key is None:
            raise ApiError(UNAVAILABLE, "this server has no threshold DSS service")
        name = args["name"] if request.op == "generate_dss_key" else args["key"]
        try:
            appkeys.check_name("the key name", name)
        except ParameterError as exc:
            raise bad("name" if request.op == "generate_dss_key" else "key", str(exc)) from None
        if request.op == "dss_sign" and len(args["message"]) > dsskeys.MAX_APP_MESSAGE:
            raise ApiError(TOO_LARGE, f"'message' is larger than {dsskeys.MAX_APP_MESSAGE} bytes")
        self._take(reg, "dss")

        async def pem_of(group: str) -> bytes:
            try:
                pem = await public_key(group, reg.name, name)
            except BackendUnavailable as exc:
                raise ApiError(UNAVAILABLE, str(exc)[:300]) from None
            if not isinstance(pem, bytes):
                raise ApiError(
                    UNAVAILABLE,
                    f"the network has no {group} application keys (no {dsskeys.BASE_SECRETS[group]} in C)",
                )
            return pem

        try:
            if request.op == "generate_dss_key":
                group = args.get("group", "p256")
                if group not in dsskeys.BASE_SECRETS:
                    raise bad("group", f"one of {', '.join(sorted(dsskeys.BASE_SECRETS))}")
                pem = await pem_of(group)
                value = dsskeys.KeyRecord(group).encode()
                write = WriteRequest(reg.name, dsskeys.data_id(name), DataType.PUBLIC_ONCE, 1, value=value)
                try:
                    await store.store_write(write.encode(), reg.name, reg.unique_id)
                except Refused as exc:
                    if exc.code != EXISTS:
                        raise
                    record = await self._app_key_record(store, reg, name)
                    if record.get("owner") != reg.unique_id or record.get("value") != value:
                        raise ApiError(
                            EXISTS, f"application {reg.name!r} has a key {name!r} already"
                        ) from None
                return {"name": name, "group": group, "pem": pem}
            record = await self._app_key_record(store, reg, name)
            group = dsskeys.KeyRecord.decode(record.get("value", b"")).group
            if request.op == "dss_public_key":
                return {"pem": await pem_of(group)}
            if record.get("owner") != reg.unique_id:
                raise ApiError(NOT_PERMITTED, f"key {name!r} of {reg.name!r} belongs to another client")
            try:
                signature = await sign_app_dss(group, reg.name, reg.unique_id, name, args["message"])
            except BackendUnavailable as exc:
                raise ApiError(UNAVAILABLE, str(exc)[:300]) from None
            return {"signature": signature}
        except Refused as exc:
            raise ApiError(exc.code if exc.code in ERROR_CODES else REFUSED, str(exc)[:1000]) from None
        except DecodeError as exc:
            raise ApiError(UNAVAILABLE, f"the key's record is unreadable: {exc}") from None

    async def _app_key_record(self, store: Any, reg: Registration, name: str) -> Mapping[str, Any]:
        from appliance.apps.dsskeys import model as dsskeys
        from appliance.apps.store.model import NOT_FOUND as STORE_NOT_FOUND
        from appliance.apps.store.model import Refused

        try:
            found = await store.store_retrieve(reg.name, reg.unique_id, dsskeys.data_id(name), None)
        except Refused as exc:
            if exc.code == STORE_NOT_FOUND:
                raise ApiError(NOT_FOUND, f"application {reg.name!r} has no DSS key {name!r}") from None
            raise
        record = found.get("record")
        if not isinstance(record, Mapping):
            raise ApiError(UNAVAILABLE, "the store returned no record")
        return record

    # Period certificates (§5.4) ---------------------------------------------------------------

    async def _certificate(
        self, handle: bytes, csr: bytes | None, names: list[Any] | None, peer: PeerCred
    ) -> Mapping[str, Any]:
        from appliance.api import _certs

        reg = self._lookup(handle, peer)
        if reg.verifier is not None:
            raise ApiError(NOT_PERMITTED, "period certificates are for centralized applications (register)")
        if self.certificates is None:
            raise ApiError(UNAVAILABLE, "this server issues no certificates (no ca key in C)")
        profile = self.certificates.app_names(reg.name)
        if profile is None:
            raise ApiError(
                NOT_PERMITTED,
                f"no certificate profile for application {reg.name!r}: the operator adds "
                f"[ca.apps.{reg.name}] names = [...] to every server's config",
            )
        try:
            canonical = _certs.choose_names(reg.name, names, profile)
        except _certs.NamesRefused as exc:
            if not exc.outside:
                raise bad("names", str(exc)) from None
            log.warning("api: uid %d refused a certificate of %r for %s", peer.uid, reg.name, exc.outside[:4])
            raise ApiError(NOT_PERMITTED, str(exc)) from None
        self._take(reg, "certificate")  # before the CSR's signature is checked: that costs too
        key_pem: bytes | None = None
        if csr is not None:
            try:
                spki = _certs.spki_of(_certs.csr_public_key(csr))
            except _certs.CsrError as exc:
                raise bad("csr", str(exc)) from None
        else:
            spki, key_pem = _certs.generate_key()
        try:
            leaf, root = await self.certificates.issue_certificate(
                f"uid {reg.uid} app {reg.name}", reg.name, spki, canonical
            )
        except BackendRefused as exc:
            raise ApiError(NOT_PERMITTED, str(exc)[:500]) from None
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"no certificate now: {str(exc)[:300]}") from None
        except Exception as exc:
            log.error("api: certificate for %r failed (%s)", reg.name, type(exc).__name__)
            raise ApiError(UNAVAILABLE, "no certificate now") from None
        result = _certs.certificate_answer(leaf, root, self.certificates.next_period(), key_pem)
        serial = result.pop("serial")
        log.info(
            "api: period certificate of %r for uid %d (pid %d), serial %x",
            reg.name,
            peer.uid,
            peer.pid,
            serial,
        )
        return result

    # The log ----------------------------------------------------------------------------------

    async def _call_log(self, what: str, call: Callable[[LogBackend], Awaitable[Any]]) -> Any:
        if self.log_backend is None:
            raise ApiError(UNAVAILABLE, "this server runs no log (no [log] section in its config)")
        try:
            return await call(self.log_backend)
        except BackendUnavailable as exc:
            raise ApiError(UNAVAILABLE, f"cannot {what} now: {str(exc)[:300]}") from None
        except Exception as exc:
            log.error("api: log backend failed to %s (%s)", what, type(exc).__name__)
            raise ApiError(UNAVAILABLE, f"cannot {what} now") from None

    async def _log_append(self, handle: bytes, messages: list[bytes], peer: PeerCred) -> Mapping[str, Any]:
        reg = self._lookup(handle, peer)
        if self.log_backend is None:
            raise ApiError(UNAVAILABLE, "this server runs no log (no [log] section in its config)")
        limit = self.log_backend.max_message_size
        for k, message in enumerate(messages):
            if len(message) > limit:
                raise ApiError(
                    TOO_LARGE, f"field 'messages': message {k} has {len(message)} bytes, over {limit}"
                )
        limits = self.limits
        bucket = self._bucket(self._log_buckets, reg, limits.log_rate, limits.log_burst)
        if not bucket.take(self.clock(), len(messages)):
            wait = bucket.wait(len(messages))
            raise ApiError(
                QUOTA,
                f"log rate limit of {reg.name!r} exceeded (at most {limits.log_rate:g} entries per second, "
                f"bursts of {limits.log_burst:g}, shared by its handles): {_retry_hint(wait)}",
                wait,
            )
        client = f"uid {reg.uid} app {reg.name}"
        indices, size = await self._call_log(
            "append to the log", lambda log: log.log_append(client, messages)
        )
        indices = list(indices)
        if len(indices) != len(messages) or not all(isinstance(i, int) for i in (*indices, size)):
            log.error("api: log backend returned %d indices for %d messages", len(indices), len(messages))
            raise ApiError(UNAVAILABLE, "cannot append to the log now")
        return {"indices": indices, "size": size}

    async def _log_entries(self, start: int, count: int) -> Mapping[str, Any]:
        async def read(log: LogBackend) -> tuple[Mapping[str, Any], Sequence[bytes]]:
            return await log.log_size(), await log.log_entries(start, count)

        head, entries = await self._call_log("read the log", read)
        return {"start": start, "entries": list(entries)[:MAX_LOG_READ], "size": head["size"]}

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


def _ms(seconds: float) -> int:
    return max(0, min(2**63 - 1, round(seconds * 1000)))


def _retry_hint(wait: float | None) -> str:
    if wait is None:
        return "this quota does not refill; ask the operator"
    return f"retry in {max(wait, 0.001):.3g} s (the client library waits and retries by itself)"


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
