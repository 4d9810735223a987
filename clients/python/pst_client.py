"""pst-client: the client library of a PServer's local API, for machines that run applications.

It needs the standard library and cbor2 only (no part of the server), and speaks the wire
format of docs/api.md over the server's Unix socket (``/run/pst/api.sock``):

    from pst_client import PstClient, verify

    with PstClient() as client:              # the end of the block releases the registration
        client.register("my-app")            # unique id b"default": one registration per app
        signature = client.sign(b"a message")              # at most 64 KiB
        big = client.sign_file("/var/log/archive.tar")     # any size: signed by its SHA-512

    public_key = open("group.pem").read()                  # pst pubkey --pem
    assert verify(signature, "my-app", b"a message", public_key)

Every failure is a :class:`PstError` whose ``code`` is the server's error code
(``bad-request``, ``unknown-handle``, ``quota``, ``too-large``, ``not-permitted``,
``unavailable``, ``refused``, ``unknown-request``) or ``connection``; its message says what
happened and, for a quota, how to recover.

What the client does by itself: a handle the server no longer knows (it expired after a day
unused, the operator revoked it, the server lost its state) is registered again with the same
name and unique id, and the call is retried once; a rate limit's ``quota`` error carries the
wait after which the call would pass, which the client sleeps and retries, up to
``quota_wait`` seconds in all. Several processes of one application may register and sign in
parallel; each gets its own handle.

:func:`verify` checks an application signature with the group's public key (PEM); it uses
``cryptography`` if it is installed, else PyNaCl, and says so if neither is. The signed
payload is the canonical CBOR map ``{"dom": "pst/app-signed/v1", "app": name, "sha512":
SHA-512(message)}`` (:func:`app_signing_payload`), so anything that verifies Ed25519 can check
a signature: ``pst-client payload --app NAME FILE`` prints that payload.

Command line (``pst-client`` or ``python -m pst_client``)::

    pst-client [--socket PATH] sign [--name APP] FILE          # prints the hex signature
    pst-client verify --key group.pem [--app APP] FILE SIGNATURE
    pst-client payload [--app APP] FILE > payload.bin          # what the group signed
    pst-client time | status
    pst-client store put|get|write|batch|pending|approve ...  # public data; --password-file: quorum

The store (docs/store.md): :meth:`PstClient.store_data`, :meth:`PstClient.write`,
:meth:`PstClient.retrieve` and :meth:`PstClient.store_record` for *public* data
(``public-once``, ``public-rw``, and StoreUntil items once the network released them), many
items in one request (:meth:`PstClient.store_many`, :meth:`PstClient.store_batch`), and a
distributed application's quorum operations: registered with :meth:`PstClient.register_distributed`,
``store_data(..., "public-rw")`` and ``write`` wait until a strict majority of the
application's clients approved them; the others see them in :meth:`PstClient.pending`
(:meth:`PendingRequest.store_request` says what is asked) and :meth:`PstClient.approve` or
:meth:`PstClient.deny` them. Secret
types are sealed under the network's store key and opened from t+1 servers' decryption shares
(TDH2 on P-256 or Ed25519, shares checked with Chaum-Pedersen proofs): that needs elliptic-curve
group arithmetic that neither the standard library nor cbor2 offers, so this library refuses
them with ``not-supported``; applications that store secrets use ``appliance.api.client``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

import cbor2

__version__ = "1.0.0"
__all__ = [
    "DEFAULT_SOCKET",
    "DEFAULT_UNIQUE_ID",
    "IssuedCertificate",
    "PendingRequest",
    "PstClient",
    "PstError",
    "RegistrationInfo",
    "app_signing_payload",
    "distributed_sign_payload",
    "public_key_bytes",
    "sha512_of",
    "sign_file",
    "verify",
    "verify_distributed",
]

API_VERSION = 1
DEFAULT_SOCKET = "/run/pst/api.sock"
#: The unique id :meth:`PstClient.register` uses unless told otherwise: one per application.
DEFAULT_UNIQUE_ID = b"default"
HANDLE_SIZE = 32
#: Largest message :meth:`PstClient.sign` may send; larger content goes by its digest.
MAX_MESSAGE_SIZE = 64 * 1024
MAX_RESPONSE_SIZE = 4 * 1024 * 1024
SHA512_SIZE = 64
APP_SIGN_DOMAIN = "pst/app-signed/v1"
DISTRIBUTED_DOMAIN = "pst/app-distributed/v1"
#: DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the key's 32 bytes follow.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
_HEADER = struct.Struct(">I")
#: The store's data types this library writes and reads (secrets need the in-package client).
PUBLIC_TYPES = ("public-once", "public-rw")
_SECRET_NOTE = (
    "secret data is sealed and opened by threshold decryption (TDH2 on P-256 or Ed25519), which "
    "needs group arithmetic beyond this library's dependencies: use appliance.api.client"
)

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]


class PstError(Exception):
    """A request failed: ``code`` is the server's error code, or ``connection``.

    ``retry_after`` (seconds) is set for a rate limit: the wait after which the call would pass.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class IssuedCertificate:
    """A period certificate (:meth:`PstClient.certificate`): leaf PEM, bundle (leaf and group
    root), validity and renewal time (Unix seconds), the key (PEM) if the server made it."""

    certificate: bytes
    bundle: bytes
    not_before: int
    not_after: int
    renew_after: int
    key: bytes | None = None


@dataclass(frozen=True)
class PendingRequest:
    """A request of another server's client that waits for ours (:meth:`PstClient.pending`)."""

    request_id: bytes
    protocol: str
    payload: bytes
    servers: tuple[int, ...]
    expires_in: float

    def store_request(self) -> dict[str, Any]:
        """For protocol ``store``: what the quorum is asked, ``{"kind": "write" or "read",
        "app", "id", "v", ...}`` (a write also has ``type``, ``value`` (public data; a secret's
        is sealed), ``sealed``, ``reader``, ``until``; a read the ``reader`` key the shares
        are sealed to). :class:`PstError` ``bad-request`` if the payload is not one."""
        return store_request_of(self.protocol, self.payload)


@dataclass(frozen=True)
class RegistrationInfo:
    """One registration as the operator sees it (:meth:`PstClient.registrations`); Unix seconds."""

    name: str
    uid: int
    kind: str
    unique_id: bytes
    pid: int
    handles: int
    created: float
    last_used: float


# Payloads and verification ----------------------------------------------------------------------


def _encode(obj: Any) -> bytes:
    return bytes(cbor2.dumps(obj, canonical=True))


def app_signing_payload(app: str, sha512: bytes) -> bytes:
    """The bytes the group signs for application ``app`` on a message with this SHA-512 digest:
    the canonical CBOR map ``{"dom": "pst/app-signed/v1", "app": app, "sha512": digest}``."""
    if len(sha512) != SHA512_SIZE:
        raise ValueError(f"a SHA-512 digest is {SHA512_SIZE} bytes, not {len(sha512)}")
    return _encode({"dom": APP_SIGN_DOMAIN, "app": app, "sha512": bytes(sha512)})


def distributed_sign_payload(app: str, payload: bytes) -> bytes:
    """The bytes the group signs for distributed application ``app`` over ``payload``."""
    digest = hashlib.sha512(payload).digest()
    return _encode({"dom": DISTRIBUTED_DOMAIN, "app": app, "op": "sign", "sha512": digest})


def public_key_bytes(public_key: str | bytes) -> bytes:
    """The 32 bytes of an Ed25519 public key given as PEM (``pst pubkey --pem``), 64 hex digits
    (``pst pubkey``) or the raw 32 bytes; ValueError naming what is wrong."""
    if isinstance(public_key, bytes) and len(public_key) == 32:
        return public_key
    text = public_key.decode("ascii", "replace") if isinstance(public_key, bytes) else public_key
    text = text.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if begin not in text or end not in text:
        raise ValueError(
            "public key: expected a PEM 'PUBLIC KEY' (pst pubkey --pem), 64 hex digits or 32 bytes"
        )
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        raise ValueError("public key: the PEM body is not base64") from None
    if len(der) != len(_ED25519_SPKI) + 32 or not der.startswith(_ED25519_SPKI):
        raise ValueError("public key: not an Ed25519 SubjectPublicKeyInfo (the group key is Ed25519)")
    return der[len(_ED25519_SPKI) :]


def _ed25519_verify(key: bytes, message: bytes, signature: bytes) -> bool:
    """Ed25519 with ``cryptography`` if installed, else PyNaCl; RuntimeError if neither is."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        pass
    else:
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True
    try:
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey
    except ImportError:
        raise RuntimeError(
            "verifying needs the 'cryptography' or the 'PyNaCl' package: pip install cryptography"
        ) from None
    try:
        VerifyKey(key).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def _digest_of(message_or_digest: Any) -> bytes:
    """SHA-512 of a message (bytes), of a binary file (read to its end), or a hashlib SHA-512."""
    if isinstance(message_or_digest, (bytes, bytearray, memoryview)):
        return hashlib.sha512(message_or_digest).digest()
    if getattr(message_or_digest, "name", None) == "sha512" and hasattr(message_or_digest, "digest"):
        digest = message_or_digest.digest()
        if isinstance(digest, bytes) and len(digest) == SHA512_SIZE:
            return digest
    if hasattr(message_or_digest, "read"):
        return sha512_of(message_or_digest)
    raise TypeError(
        "message_or_digest: bytes (the message), a binary file, or hashlib.sha512(...) (its digest), "
        f"not {type(message_or_digest).__name__}"
    )


def verify(signature: bytes, app: str, message_or_digest: Any, public_key_pem: str | bytes) -> bool:
    """Is ``signature`` the group's signature for application ``app`` on this message?

    ``message_or_digest``: the message (bytes), a binary file (hashed as it is read), or a
    ``hashlib.sha512`` object holding its digest (for content hashed elsewhere).
    ``public_key_pem``: the group public key (``pst pubkey --pem``; hex or raw also accepted).
    False for a signature that does not match; ValueError for a malformed key or signature.
    """
    key = public_key_bytes(public_key_pem)
    if len(signature) != 64:
        raise ValueError(f"signature: an Ed25519 signature is 64 bytes, not {len(signature)}")
    payload = app_signing_payload(app, _digest_of(message_or_digest))
    return _ed25519_verify(key, payload, bytes(signature))


def verify_distributed(group_public_key: str | bytes, app: str, payload: bytes, signature: bytes) -> bool:
    """Does ``signature`` (from :meth:`PstClient.request_distributed`) sign ``payload`` for ``app``?"""
    if len(signature) != 64:
        return False
    key = public_key_bytes(group_public_key)
    return _ed25519_verify(key, distributed_sign_payload(app, payload), bytes(signature))


def sha512_of(file: PathOrFile, chunk: int = 1 << 20) -> bytes:
    """SHA-512 of a file (path) or stream read to its end in chunks (memory stays bounded)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return sha512_of(f, chunk)
    h = hashlib.sha512()
    while True:
        block = file.read(chunk)
        if not block:
            return h.digest()
        h.update(block)


# Responses --------------------------------------------------------------------------------------


def decode_response(frame: bytes, rid: int) -> dict[str, Any]:
    """The ``result`` of a response frame to request ``rid``; :class:`PstError` otherwise (the
    server's error, or ``connection`` for anything malformed). Never raises anything else."""
    try:
        response = cbor2.loads(frame)
    except Exception:  # cbor2 raises several types on malformed input
        raise PstError("connection", "the server's response is not CBOR") from None
    if not isinstance(response, dict) or response.get("v") != API_VERSION or response.get("v") is True:
        raise PstError("connection", "malformed response")
    if response.get("ok") is False:
        error = response.get("error")
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            wait = error.get("retry_after_ms")
            retry_after = None
            if isinstance(wait, int) and not isinstance(wait, bool) and 0 < wait < 2**31:
                retry_after = wait / 1000
            if isinstance(code, str) and code and isinstance(message, str):
                raise PstError(code, message, retry_after)
        raise PstError("connection", "malformed error response")
    if response.get("id") != rid or isinstance(response.get("id"), bool):
        raise PstError("connection", "response to another request")
    result = response.get("result")
    if response.get("ok") is not True or not isinstance(result, dict):
        raise PstError("connection", "malformed response")
    return result


_STORE_DOMAINS = {"write": "pst/store/write/v1", "read": "pst/store/read/v1"}


def _batch_outcome(result: Any) -> int | PstError:
    """One item of a ``store_batch`` answer: its version, or its refusal as a PstError."""
    version = result.get("version") if isinstance(result, dict) else None
    code = result.get("code") if isinstance(result, dict) else None
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    if isinstance(code, str):
        return PstError(code, str(result.get("message", "")))
    raise PstError("connection", "malformed store_batch response")


def store_request_of(protocol: str, payload: bytes) -> dict[str, Any]:
    """The store request a pending approval carries (see :meth:`PendingRequest.store_request`)."""
    if protocol != "store":
        raise PstError("bad-request", f"a request of protocol {protocol!r}, not a store request")
    try:
        obj = cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise PstError("bad-request", f"store approval payload: {exc}") from None
    if (
        not isinstance(obj, dict)
        or set(obj) != {"dom", "store", "req"}
        or _STORE_DOMAINS.get(obj["store"]) != obj["dom"]
        or not isinstance(obj["req"], dict)
        or not {"app", "id", "v"} <= set(obj["req"])
    ):
        raise PstError("bad-request", "store approval payload: neither a write nor a read")
    return {"kind": obj["store"], **obj["req"]}


def _bytes(result: Mapping[str, Any], key: str, op: str, size: int | None = None) -> bytes:
    value = result.get(key)
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise PstError("connection", f"malformed {op} response")
    return value


# The client -------------------------------------------------------------------------------------


class PstClient:
    """A synchronous client of one PServer's local API at ``path`` (thread-safe, one call at a
    time). ``timeout`` bounds each socket operation; ``quota_wait`` how long in all one call may
    wait for rate limits before its ``quota`` error is raised (0: raise at once)."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SOCKET,
        *,
        timeout: float = 30.0,
        quota_wait: float = 10.0,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.quota_wait = quota_wait
        self.handle: bytes | None = None
        self._registration: tuple[str, bytes] | None = None
        #: The distributed application registered as (:meth:`register_distributed`), if so.
        self._distributed_app: str | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1
        self._lock = threading.RLock()

    def __enter__(self) -> PstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release our registration's handle (unregister; best effort) and close the connection.

        The client may be used again afterwards: it reconnects, and needs :meth:`register`.
        """
        with self._lock:
            handle, self.handle, self._registration = self.handle, None, None
            if handle is not None:
                with contextlib.suppress(PstError):
                    self._call("unregister", quota_wait=0.0, handle=handle)
            self.disconnect()

    def disconnect(self) -> None:
        """Close the connection only: the handle stays valid, and the next call reconnects."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                reason = exc.strerror or exc
                raise PstError("connection", f"cannot connect to {self.path}: {reason}") from None
            self._sock, self._buffer = sock, b""
        return self._sock

    def _receive(self, sock: socket.socket, size: int) -> bytes:
        while len(self._buffer) < size:
            data = sock.recv(65536)
            if not data:
                raise PstError("connection", "the server closed the connection")
            self._buffer += data
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def _call_once(self, op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            payload = _encode({"v": API_VERSION, "op": op, "id": rid, **fields})
            sock = self._connect()
            try:
                # A refused connection: the server answered at once and closed; read why.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(_HEADER.pack(len(payload)) + payload)
                (size,) = _HEADER.unpack(self._receive(sock, _HEADER.size))
                if size > MAX_RESPONSE_SIZE:
                    raise PstError("connection", f"the server announced a response of {size} bytes")
                frame = self._receive(sock, size)
            except PstError:
                self.disconnect()
                raise
            except OSError as exc:
                self.disconnect()
                raise PstError("connection", f"{type(exc).__name__}: {exc}") from None
        return decode_response(frame, rid)

    def _call(self, op: str, *, quota_wait: float | None = None, **fields: Any) -> dict[str, Any]:
        budget = self.quota_wait if quota_wait is None else quota_wait
        while True:
            try:
                return self._call_once(op, fields)
            except PstError as exc:
                wait = exc.retry_after
                # A rate limit, or a server between two periods' shares (a refresh): both say
                # when to ask again.
                if exc.code not in ("quota", "unavailable") or wait is None or wait > budget:
                    raise
                budget -= wait
                time.sleep(wait)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``result`` map; :class:`PstError` on an error."""
        return self._call(op, **fields)

    def _with_handle(self, op: str, handle: bytes | None, **fields: Any) -> dict[str, Any]:
        if handle is not None:
            return self._call(op, handle=handle, **fields)
        own = self.handle
        if own is None:
            raise PstError("unknown-handle", "register first (this client holds no registration)")
        try:
            return self._call(op, handle=own, **fields)
        except PstError as exc:
            registration = self._registration
            if exc.code != "unknown-handle" or registration is None:
                raise
        with self._lock:
            if self.handle == own:
                self.register(*registration)
            own = self.handle
        assert own is not None
        return self._call(op, handle=own, **fields)

    # Operations -------------------------------------------------------------------------------

    def register(self, name: str, unique_id: bytes | str | None = None) -> bytes:
        """Register as application ``name`` and keep the handle; returns it. ``unique_id``
        tells instances apart (default ``b"default"``: one registration per application and
        user); every register adds a handle, and :meth:`close` releases ours."""
        if unique_id is None:
            unique_id = DEFAULT_UNIQUE_ID
        elif isinstance(unique_id, str):
            unique_id = unique_id.encode()
        result = self._call("register", name=name, unique_id=unique_id)
        handle = _bytes(result, "handle", "register", HANDLE_SIZE)
        with self._lock:
            self.handle, self._registration = handle, (name, unique_id)
        return handle

    def unregister(self, handle: bytes | None = None) -> None:
        """Release a handle (by default ours; then :meth:`register` is needed again)."""
        chosen = handle if handle is not None else self.handle
        if chosen is None:
            raise PstError("unknown-handle", "register first (this client holds no registration)")
        self._call("unregister", handle=chosen)
        with self._lock:
            if chosen == self.handle:
                self.handle, self._registration = None, None

    def sign(self, message: bytes, handle: bytes | None = None) -> bytes:
        """The group's signature for this application over ``message`` (at most 64 KiB)."""
        return _bytes(self._with_handle("sign", handle, message=bytes(message)), "signature", "sign")

    def sign_digest(self, sha512: bytes, handle: bytes | None = None) -> bytes:
        """The same signature as :meth:`sign` on the message whose SHA-512 digest is ``sha512``."""
        return _bytes(self._with_handle("sign_digest", handle, sha512=bytes(sha512)), "signature", "sign")

    def sign_file(self, file: PathOrFile, handle: bytes | None = None) -> bytes:
        """Sign a file of any size (a path, or a binary stream read to its end) by its SHA-512
        digest: the same signature as :meth:`sign` on the whole content."""
        return self.sign_digest(sha512_of(file), handle)

    def get_random(self, nonce: bytes | None = None, handle: bytes | None = None) -> tuple[bytes, bytes]:
        """64 bytes of joint randomness no server can bias, and the input they answer
        (``nonce``: 16-64 bytes, fresh per request; random by default)."""
        result = self._with_handle("random", handle, nonce=nonce or os.urandom(32))
        return _bytes(result, "random", "random"), _bytes(result, "input", "random")

    def get_time(self) -> dict[int, float | None]:
        """Every server's clock in Unix seconds (None where unknown), by server id, as this
        server collected them (unsigned: see docs/api.md)."""
        times = self._call("get_time").get("times_us")
        if not isinstance(times, dict):
            raise PstError("connection", "malformed get_time response")
        return {int(k): (v / 1_000_000 if isinstance(v, int) else None) for k, v in times.items()}

    def status(self) -> dict[str, Any]:
        """The PServer's status (floats arrive as their decimal strings)."""
        status = self._call("status").get("status")
        if not isinstance(status, dict):
            raise PstError("connection", "malformed status response")
        return status

    def register_distributed(self, name: str, password: bytes | str) -> bytes:
        """Register as this server's client of distributed application ``name`` (one client per
        server, all with the same password). Not renewed by itself: the password is not kept."""
        if isinstance(password, str):
            password = password.encode()
        result = self._call("register_distributed", name=name, password=password)
        handle = _bytes(result, "handle", "register_distributed", HANDLE_SIZE)
        with self._lock:
            self.handle, self._registration, self._distributed_app = handle, None, name
        return handle

    def request_distributed(self, payload: bytes, handle: bytes | None = None) -> bytes:
        """The group's signature over ``payload`` once a strict majority of the application's
        clients asked for or approved it (``refused`` otherwise)."""
        result = self._with_handle("request", handle, protocol="sign", payload=bytes(payload))
        return _bytes(result, "signature", "request")

    def pending(self, handle: bytes | None = None) -> list[PendingRequest]:
        """The other clients' requests that wait for our approval."""
        entries = self._with_handle("pending", handle).get("requests")
        try:
            return [
                PendingRequest(
                    bytes(e["request_id"]),
                    str(e["protocol"]),
                    bytes(e["payload"]),
                    tuple(int(i) for i in e["servers"]),
                    e["expires_in_ms"] / 1000,
                )
                for e in entries  # type: ignore[union-attr]
            ]
        except (KeyError, TypeError, ValueError):
            raise PstError("connection", "malformed pending response") from None

    def approve(self, request_id: bytes, handle: bytes | None = None) -> None:
        """Approve a pending request (it then counts as our client's)."""
        self._with_handle("approve", handle, request_id=bytes(request_id))

    def deny(self, request_id: bytes, handle: bytes | None = None) -> None:
        """Deny a pending request."""
        self._with_handle("deny", handle, request_id=bytes(request_id))

    def registrations(self) -> list[RegistrationInfo]:
        """The operator's view of every registration (root or the server's user only)."""
        result = self._call("registrations")
        try:
            return [
                RegistrationInfo(
                    str(r["name"]),
                    int(r["uid"]),
                    str(r["kind"]),
                    bytes(r["unique_id"]),
                    int(r["pid"]),
                    int(r["handles"]),
                    r["created_ms"] / 1000,
                    r["last_used_ms"] / 1000,
                )
                for r in result["registrations"]
            ]
        except (KeyError, TypeError, ValueError):
            raise PstError("connection", "malformed registrations response") from None

    def revoke(self, name: str, uid: int | None = None, *, release_name: bool = False) -> dict[str, Any]:
        """The operator ends the registrations of ``name`` (of ``uid`` only, if given); with
        ``release_name`` the name may then go to another user. Returns ``{"revoked": count,
        "handles": count, "released": bool, "owner": uid or None}``."""
        fields: dict[str, Any] = {"name": name}
        if uid is not None:
            fields["uid"] = uid
        if release_name:
            fields["release_name"] = True
        return self._call("revoke", **fields)

    def certificate(
        self,
        *,
        csr: bytes | None = None,
        names: Sequence[str] | None = None,
        handle: bytes | None = None,
    ) -> IssuedCertificate:
        """A period certificate for this application from the group's CA (docs/api.md): for the
        key of ``csr`` (PKCS #10, PEM or DER; the private key stays here), or for a P-256 key the
        server makes and returns (``key``). ``names``: a subset of the application's profile."""
        fields: dict[str, Any] = {}
        if csr is not None:
            fields["csr"] = bytes(csr)
        if names is not None:
            fields["names"] = list(names)
        result = self._with_handle("certificate", handle, **fields)
        cert, bundle, key = result.get("certificate"), result.get("bundle"), result.get("key")
        times = [result.get(k) for k in ("not_before", "not_after", "renew_after")]
        if (
            not isinstance(cert, bytes)
            or not isinstance(bundle, bytes)
            or not (key is None or isinstance(key, bytes))
            or not all(isinstance(t, int) for t in times)
        ):
            raise PstError("connection", "malformed certificate response")
        return IssuedCertificate(cert, bundle, times[0], times[1], times[2], key)

    # Data storage, public data (§5.2, Table 4; docs/store.md) ------------------------------------

    def _app(self) -> str:
        if self._registration is None:
            if self._distributed_app is not None:
                return self._distributed_app
            raise PstError("unknown-handle", "register first (the store's data ids are per application)")
        return self._registration[0]

    def _public_request(self, data_id: str, value: bytes, dtype: str, version: int) -> bytes:
        """The encoded write request of public data (the model's canonical encoding)."""
        if dtype not in PUBLIC_TYPES:
            raise PstError("not-supported", _SECRET_NOTE)
        request = {
            "app": self._app(),
            "id": data_id,
            "type": dtype,
            "v": version,
            "value": bytes(value),
            "sealed": {},
            "reader": b"",
            "until": 0,
        }
        return _encode(request)

    def _store_write(
        self, op: str, data_id: str, value: bytes, dtype: str, version: int, handle: bytes | None
    ) -> int:
        request = self._public_request(data_id, value, dtype, version)
        result = self._with_handle(op, handle, request=request)
        got = result.get("version")
        if not isinstance(got, int) or isinstance(got, bool):
            raise PstError("connection", f"malformed {op} response")
        return got

    def store_data(
        self, data_id: str, value: bytes, dtype: str = "public-once", *, handle: bytes | None = None
    ) -> int:
        """StoreData(DataID, value, type) for public data (``public-once`` or ``public-rw``): a new
        item of this application, version 1. ``public-rw`` is a quorum's: with a distributed
        registration this blocks until a strict majority of the application's clients approved
        it; a centralized client is refused (``not-permitted``). Refusals keep the store's codes
        (``exists``, ``quota``, ...); a secret type is ``not-supported`` here (module doc)."""
        return self._store_write("store_data", data_id, value, dtype, 1, handle)

    def write(
        self,
        data_id: str,
        value: bytes,
        version: int,
        dtype: str = "public-rw",
        *,
        handle: bytes | None = None,
    ) -> int:
        """Write(DataID, newValue): ``version`` (the next) of read/write data. The network changes
        such data only for a quorum of the application's clients: with a distributed
        registration (:meth:`register_distributed`) this blocks until a strict majority of them
        asked for or approved it (:meth:`pending`, :meth:`approve`; ``refused`` naming each
        server's reason otherwise); a centralized client is refused (``not-permitted``)."""
        return self._store_write("write", data_id, value, dtype, version, handle)

    def store_many(
        self, items: Sequence[tuple[str, bytes]], dtype: str = "public-once", *, handle: bytes | None = None
    ) -> list[int | PstError]:
        """StoreData of many new public items in one request (``store_batch``): ``(data_id,
        value)`` pairs of one type, ordered by the network together, in this order; each one's
        version, or the :class:`PstError` it got (a refusal does not stop the others). At most
        1,024 items and 128 KiB per request. For a centralized registration (a quorum approves
        one request at a time)."""
        return self.store_batch([self._public_request(i, v, dtype, 1) for i, v in items], handle=handle)

    def store_batch(self, requests: Sequence[bytes], *, handle: bytes | None = None) -> list[int | PstError]:
        """Encoded write requests (the model's WriteRequest, docs/api.md) in one call: each
        one's version, or its :class:`PstError`, in order."""
        result = self._with_handle("store_batch", handle, requests=[bytes(r) for r in requests])
        results = result.get("results")
        if not isinstance(results, list) or len(results) != len(requests):
            raise PstError("connection", "malformed store_batch response")
        return [_batch_outcome(r) for r in results]

    def store_record(self, data_id: str, *, handle: bytes | None = None) -> dict[str, Any]:
        """The item as this server holds it (``type``, ``v``, owner; a public value, a secret's
        ciphertexts), without reading a secret."""
        record = self._with_handle("retrieve", handle, data_id=data_id).get("record")
        if not isinstance(record, dict):
            raise PstError("connection", "malformed retrieve response")
        return record

    def retrieve(self, data_id: str, *, handle: bytes | None = None) -> bytes:
        """Retrieve(DataID) of public data (or of a StoreUntil item the network released at its
        date); a secret that needs a threshold decryption is ``not-supported`` here."""
        record = self.store_record(data_id, handle=handle)
        value = record.get("value")
        if not isinstance(value, bytes):
            raise PstError("connection", "malformed retrieve response")
        released = record.get("type") == "store-until" and value
        if record.get("type") not in PUBLIC_TYPES and not released:
            raise PstError("not-supported", f"{data_id}: {_SECRET_NOTE}")
        return value


def sign_file(
    file: PathOrFile,
    app: str,
    *,
    socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
    unique_id: bytes | str | None = None,
) -> bytes:
    """Register as ``app``, sign a file of any size by its SHA-512 digest, release: the signature
    (the same as :meth:`PstClient.sign` on the whole content)."""
    digest = sha512_of(file)
    with PstClient(socket_path) as client:
        client.register(app, unique_id)
        return client.sign_digest(digest)


# Command line -----------------------------------------------------------------------------------


def _signature_from(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(1024)
    if len(raw) == 64:
        return raw
    try:
        return bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: expected 64 bytes or 128 hex digits (what 'sign' prints)") from None


_STORE_HELP = (
    "the data store, public data: put, get, write, batch; a distributed application's pending and approve"
)


def _store_parser(sub: Any) -> None:
    actions = sub.add_parser("store", help=_STORE_HELP).add_subparsers(
        dest="action", metavar="ACTION", required=True
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="pst-client", help="application name (default pst-client)")
        p.add_argument("--unique-id", default=None, help="instance id (default 'default')")
        p.add_argument(
            "--password-file",
            help="be this server's client of the distributed application --name (password: the "
            "file's first line, - for stdin): public-rw data is then changed by a quorum",
        )

    put = actions.add_parser("put", help="StoreData of ID (version 1) from FILE (- or none: stdin)")
    write = actions.add_parser("write", help="Write: VERSION (the next) of public-rw data ID (a quorum's)")
    for p in (put, write):
        common(p)
        p.add_argument("id")
        if p is write:
            p.add_argument("version", type=int)
        p.add_argument("file", nargs="?", default="-")
    put.add_argument("--type", default="public-once", choices=PUBLIC_TYPES, help="default public-once")
    get = actions.add_parser("get", help="Retrieve ID: its public value to stdout")
    common(get)
    get.add_argument("id")
    batch = actions.add_parser("batch", help="StoreData of many items (ID=FILE) in one request")
    common(batch)
    batch.add_argument("items", nargs="+", metavar="ID=FILE")
    for name, what in (("pending", "list"), ("approve", "approve (or --deny)")):
        p = actions.add_parser(name, help=f"{what} the store requests of the application's other clients")
        common(p)
        if name == "approve":
            p.add_argument("ids", nargs="*", metavar="ID", help="hex request ids (as pending prints them)")
            p.add_argument("--all", action="store_true", help="every waiting store request")
            p.add_argument("--deny", action="store_true", help="deny instead of approve")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _store_command(client: PstClient, args: argparse.Namespace) -> int:
    if args.password_file is not None:
        line = _read(args.password_file).split(b"\n", 1)[0].rstrip(b"\r")
        if not line:
            raise ValueError(f"{args.password_file}: no password on its first line")
        client.register_distributed(args.name, line)
    elif args.action in ("pending", "approve"):
        raise ValueError(f"store {args.action} is for a distributed application: give --password-file")
    else:
        client.register(args.name, args.unique_id)
    if args.action == "put":
        print(f"stored {args.id} version {client.store_data(args.id, _read(args.file), args.type)}")
    elif args.action == "write":
        print(f"wrote {args.id} version {client.write(args.id, _read(args.file), args.version)}")
    elif args.action == "get":
        sys.stdout.buffer.write(client.retrieve(args.id))
    elif args.action == "batch":
        pairs = [item.partition("=") for item in args.items]
        if not all(data_id and sep and path for data_id, sep, path in pairs):
            raise ValueError("store batch: each item is ID=FILE")
        outcomes = client.store_many([(data_id, _read(path)) for data_id, _sep, path in pairs])
        for (data_id, _sep, _path), outcome in zip(pairs, outcomes):
            print(f"{data_id}\t{outcome if isinstance(outcome, int) else f'refused: {outcome}'}")
        return 1 if any(isinstance(o, PstError) for o in outcomes) else 0
    else:
        chosen = {i.lower() for i in getattr(args, "ids", [])}
        if args.action == "approve" and not (chosen or args.all):
            raise ValueError("store approve: name request ids (as pending prints them) or give --all")
        for p in client.pending():
            if p.protocol != "store":
                continue
            asked = p.store_request()
            verdict = "pending"
            if args.action == "approve" and (args.all or p.request_id.hex() in chosen):
                (client.deny if args.deny else client.approve)(p.request_id)
                verdict = "denied" if args.deny else "approved"
            what = (
                f"{asked['kind']} {asked['app']}/{asked['id']} version {asked['v']} {asked.get('type', '')}"
            )
            print(f"{p.request_id.hex()}\t{verdict}\t{what.strip()}\tfrom {','.join(map(str, p.servers))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pst-client", description="Use the local PServer's API.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"API socket (default {DEFAULT_SOCKET})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sign = sub.add_parser("sign", help="sign FILE (- for stdin, any size); print the hex signature")
    sign.add_argument("--name", default="pst-client", help="application name (default pst-client)")
    sign.add_argument("--unique-id", default=None, help="instance id (default 'default')")
    sign.add_argument("file")
    check = sub.add_parser("verify", help="check a signature made by 'sign' (exit 0 valid, 1 invalid)")
    check.add_argument("--key", required=True, help="the group public key: PEM file (pst pubkey --pem)")
    check.add_argument("--app", default="pst-client", help="application name (default pst-client)")
    check.add_argument("file")
    check.add_argument("signature", help="file with the 64-byte signature or its hex")
    payload = sub.add_parser("payload", help="write the bytes the group signed for FILE to stdout")
    payload.add_argument("--app", default="pst-client")
    payload.add_argument("file")
    sub.add_parser("time", help="every server's clock, as this server collected them")
    sub.add_parser("status", help="the server's status as JSON")
    _store_parser(sub)
    args = parser.parse_args(argv)
    prog = "pst-client"
    try:
        if args.command in ("verify", "payload"):
            source = sys.stdin.buffer if args.file == "-" else args.file
            if args.command == "payload":
                sys.stdout.buffer.write(app_signing_payload(args.app, sha512_of(source)))
                return 0
            with open(args.key, "rb") as f:
                key = f.read(65536)
            signature = _signature_from(args.signature)
            if args.file == "-":
                ok = verify(signature, args.app, sys.stdin.buffer, key)
            else:
                with open(args.file, "rb") as f:
                    ok = verify(signature, args.app, f, key)
            print(f"{'OK' if ok else 'INVALID'}: {args.file} for application {args.app!r}")
            return 0 if ok else 1
        with PstClient(args.socket) as client:
            if args.command == "store":
                return _store_command(client, args)
            if args.command == "sign":
                digest = sha512_of(sys.stdin.buffer if args.file == "-" else args.file)
                client.register(args.name, args.unique_id)
                print(client.sign_digest(digest).hex())
            elif args.command == "time":
                for server, t in sorted(client.get_time().items()):
                    print(f"{server}\t{'unknown' if t is None else f'{t:.6f}'}")
            else:
                print(json.dumps(client.status(), indent=2, sort_keys=True, default=str))
    except PstError as exc:
        print(f"{prog}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
