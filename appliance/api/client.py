"""Client of the PServer's local API (Unix socket), and a tiny command line around it.

Theory of operation
-------------------
A :class:`PstClient` holds one Unix stream connection to the PServer on this machine and
speaks its wire format: each request is a canonical CBOR map ``{"v": 1, "op": ..., "id":
n, ...}`` in a length-prefixed frame, answered by exactly one response frame
``{"v": 1, "id": n, "ok": ..., "result" | "error": {"code", "message"}}``. Calls are
synchronous and one at a time (a lock makes a client safe to share between threads).
The server knows who we are from the kernel (``SO_PEERCRED``), so there is nothing to
log in with: :meth:`PstClient.register` gives the application's name and a unique id
(paper §5.1; by default the constant ``b"default"``, so the application comes back as the
same registration every run) and gets a handle, which the client keeps and sends with later
requests. :meth:`PstClient.close` (and the end of a ``with`` block) releases the handle, so
an application that registers, signs and exits leaves nothing behind; several processes of
the same application may register and sign at the same time, each with its own handle.

The client recovers by itself where it safely can: handles outlive connections (if the
server closes the connection, after a malformed request or when idle, the next call
reconnects and the handle still works); if the server no longer knows our handle (it expired
after a day unused, the operator revoked it, the server lost its state), the client registers
again with the same name and unique id and retries the call once; and a rate limit's
``quota`` error carries the wait after which the call would pass, which the client sleeps
and retries, up to ``quota_wait`` seconds in all. Distributed registrations are not renewed
by themselves (the client does not keep the password).

Signatures are checked with :func:`verify` (the group's public key as PEM, from ``pst pubkey
--pem``), for a message or for its SHA-512 digest; :func:`sign_file` hashes a file of any
size as it reads it. docs/api.md describes every operation, its errors and limits.

A distributed application (§5.1, one client next to each PServer, all with the same name
and password) uses :meth:`PstClient.register_distributed`, then
:meth:`PstClient.request_distributed` to get a group signature once a strict majority of its
clients asked for or approved the same payload, and :meth:`PstClient.pending` /
:meth:`PstClient.approve` / :meth:`PstClient.deny` to answer the other clients' requests.
:func:`verify_distributed` checks such a signature with the group public key.

Every failure is a :class:`PstError` with the server's error ``code`` (``bad-request``,
``unknown-handle``, ``quota``, ``too-large``, ``not-permitted``, ``unavailable``,
``refused`` (no majority: the message says which servers refused and why),
``unknown-request``) or ``connection`` for a socket problem on our side.

This module depends on the ``appliance`` package (its canonical CBOR codec and frame
decoder, so that client and server cannot disagree on the format). Machines that run
applications but no server install ``clients/python`` instead (distribution ``pst-client``,
module ``pst_client``: cbor2 and the standard library), which has the same API; the tests
run the same cases against both.

Command line::

    python clients/pst_client.py --socket /run/pst/api.sock sign FILE   # hex signature
    python clients/pst_client.py --socket /run/pst/api.sock time
    python clients/pst_client.py --socket /run/pst/api.sock status
    python clients/pst_client.py --name APP --password-file PW request FILE  # distributed
    python clients/pst_client.py --name APP --password-file PW approve [--deny] [--all | ID...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.net._framing import FrameDecoder, FramingError, encode_frame
from appliance.protocols.approvals import distributed_sign_payload

if TYPE_CHECKING:
    from appliance.apps.store.client import StoreKey

API_VERSION = 1
#: Responses are small, but a status can hold a few lists.
MAX_RESPONSE_SIZE = 4 * 1024 * 1024
DEFAULT_SOCKET = "/run/pst/api.sock"
#: The unique id :meth:`PstClient.register` uses unless told otherwise: one per application.
DEFAULT_UNIQUE_ID = b"default"
#: Handle, unique id and message sizes the server accepts.
HANDLE_SIZE = 32
MAX_MESSAGE_SIZE = 64 * 1024
#: Domain of application signatures (the server's ``APP_SIGN_DOMAIN``).
APP_SIGN_DOMAIN = "pst/app-signed/v1"
SHA512_SIZE = 64
#: DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the key's 32 bytes follow.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


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
class PendingRequest:
    """A request of another server's client that waits for ours (see :meth:`PstClient.pending`)."""

    request_id: bytes
    protocol: str
    payload: bytes
    #: The servers whose clients asked for it.
    servers: tuple[int, ...]
    expires_in: float

    def store_request(self) -> Any:
        """For protocol ``store``: the WriteRequest or ReadRequest to approve or deny
        (``appliance.apps.store.model``); DecodeError if the payload is not one."""
        from appliance.apps.store.model import decode_approval_payload

        return decode_approval_payload(self.payload)


@dataclass(frozen=True)
class RegistrationInfo:
    """One registration as the operator sees it (:meth:`PstClient.registrations`); times are Unix s."""

    name: str
    uid: int
    kind: str
    unique_id: bytes
    pid: int
    handles: int
    created: float
    last_used: float


def app_signing_payload(app: str, sha512: bytes) -> bytes:
    """The bytes the group signs for application ``app`` on a message with this SHA-512 digest:
    the canonical CBOR map ``{"dom": "pst/app-signed/v1", "app": app, "sha512": digest}``."""
    if len(sha512) != SHA512_SIZE:
        raise ValueError(f"a SHA-512 digest is {SHA512_SIZE} bytes, not {len(sha512)}")
    return encoding.encode({"dom": APP_SIGN_DOMAIN, "app": app, "sha512": bytes(sha512)})


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
    try:
        VerifyKey(key).verify(payload, bytes(signature))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def verify_distributed(group_public_key: bytes, app: str, payload: bytes, signature: bytes) -> bool:
    """Does ``signature`` (from :meth:`PstClient.request_distributed`) sign ``payload`` for ``app``?"""
    try:
        VerifyKey(public_key_bytes(group_public_key)).verify(
            distributed_sign_payload(app, payload), signature
        )
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


class PstClient:
    """A synchronous client of one PServer's local API at ``path``.

    ``timeout`` bounds each socket operation; ``quota_wait`` how long in all one call may wait
    for rate limits before its ``quota`` error is raised (0: raise at once).
    """

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
        #: (name, unique id) of our own registration, to register again if the server lost it.
        self._registration: tuple[str, bytes] | None = None
        #: The application name of a distributed registration (its store data ids are its own).
        self._distributed_app: str | None = None
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        self._next_id = 1
        self._lock = threading.RLock()
        self._sealing_key: StoreKey | None = None

    # Connection -------------------------------------------------------------------------------

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
                raise PstError(
                    "connection", f"cannot connect to {self.path}: {exc.strerror or exc}"
                ) from None
            self._sock = sock
            self._decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        return self._sock

    def _receive_frame(self, sock: socket.socket) -> bytes:
        while True:
            data = sock.recv(65536)
            if not data:
                raise PstError("connection", "the server closed the connection")
            frames = self._decoder.feed(data)
            if frames:
                if len(frames) > 1:
                    raise PstError("connection", "the server sent an unexpected response")
                return frames[0]

    # Requests ---------------------------------------------------------------------------------

    def _call(self, op: str, *, quota_wait: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request; a rate limit is waited out (up to ``quota_wait`` in all) and retried."""
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

    def _call_once(self, op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            payload = encoding.encode({"v": API_VERSION, "op": op, "id": rid, **fields})
            sock = self._connect()
            try:
                # A refused connection: the server answered at once and closed; read why.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(encode_frame(payload))
                frame = self._receive_frame(sock)
                response = encoding.decode(frame, max_size=MAX_RESPONSE_SIZE, what="response")
            except PstError:
                self.disconnect()
                raise
            except (OSError, FramingError, DecodeError) as exc:
                self.disconnect()
                raise PstError("connection", f"{type(exc).__name__}: {exc}") from None
        return _result(response, rid)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``result`` map; :class:`PstError` on an error."""
        return self._call(op, **fields)

    def _with_handle(self, op: str, handle: bytes | None, **fields: Any) -> dict[str, Any]:
        """A request carrying a handle: ours by default, registered again once if the server
        lost it (only ours: a handle the caller passed is the caller's business)."""
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
            if self.handle == own:  # another thread may have registered again already
                self.register(*registration)
            own = self.handle
        assert own is not None
        return self._call(op, handle=own, **fields)

    def register(self, name: str, unique_id: bytes | str | None = None) -> bytes:
        """Register as application ``name`` (§5.1) and keep the handle; returns it.

        ``unique_id`` tells instances of one application apart (default ``b"default"``: one
        registration per application and user). Registering the same name and unique id again
        adds a handle and leaves the others valid; :meth:`close` releases ours.
        """
        if unique_id is None:
            unique_id = DEFAULT_UNIQUE_ID
        elif isinstance(unique_id, str):
            unique_id = unique_id.encode()
        result = self._call("register", name=name, unique_id=unique_id)
        handle = result.get("handle")
        if not isinstance(handle, bytes) or len(handle) != HANDLE_SIZE:
            raise PstError("connection", "malformed register response")
        with self._lock:
            self.handle = handle
            self._registration = (name, unique_id)
        return handle

    def sign(self, message: bytes, handle: bytes | None = None) -> bytes:
        """The group's signature for this application over ``message`` (at most 64 KiB)."""
        result = self._with_handle("sign", handle, message=bytes(message))
        signature = result.get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed sign response")
        return signature

    def sign_digest(self, sha512: bytes, handle: bytes | None = None) -> bytes:
        """The same signature as :meth:`sign` on the message whose SHA-512 digest is ``sha512``."""
        result = self._with_handle("sign_digest", handle, sha512=bytes(sha512))
        signature = result.get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed sign response")
        return signature

    def sign_file(self, file: BinaryIO | str | os.PathLike[str], handle: bytes | None = None) -> bytes:
        """Sign a file of any size (a path, or a binary stream read to its end): it is hashed as
        it is read (1 MiB at a time), and the group signs the same payload as :meth:`sign` would
        on the whole content, so :func:`verify` on the content accepts it."""
        return self.sign_digest(sha512_of(file), handle)

    def get_random(self, nonce: bytes | None = None, handle: bytes | None = None) -> tuple[bytes, bytes]:
        """64 bytes of joint randomness no server can bias, and the input they answer.

        ``nonce`` (16-64 bytes, fresh per request; random by default) is part of the input.
        """
        result = self._with_handle("random", handle, nonce=nonce or os.urandom(32))
        return bytes(result["random"]), bytes(result["input"])

    def register_distributed(self, name: str, password: bytes | str) -> bytes:
        """Register as this server's client of distributed application ``name`` (§5.1).

        Every client of the application, one per server, registers with the same name and
        password. Registering again with the same password adds a handle; with another one,
        it replaces the earlier handles. Returns the handle (kept).
        """
        if isinstance(password, str):
            password = password.encode()
        handle = self._call("register_distributed", name=name, password=password).get("handle")
        if not isinstance(handle, bytes) or len(handle) != HANDLE_SIZE:
            raise PstError("connection", "malformed register_distributed response")
        with self._lock:
            self.handle = handle
            self._registration = None  # not renewed by itself: we do not keep the password
            self._distributed_app = name
        return handle

    def register_certified(self, certificate: bytes, key: Any, server: int) -> bytes:
        """Register at ``server`` as the component of a distributed application that
        ``certificate`` (PEM or DER, one-time, from the CA the operator named) certifies, proving
        possession of its private ``key`` (a ``cryptography`` Ed25519 or P-256 private key) by
        signing the server's challenge (§5.1, option 2). Returns the handle (kept). A certificate
        registers once: to register again, get a new one."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        from appliance.api._certreg import registration_payload

        try:
            cert = (
                x509.load_pem_x509_certificate(certificate)
                if b"-----BEGIN" in certificate
                else x509.load_der_x509_certificate(certificate)
            )
        except ValueError as exc:
            raise PstError("bad-request", f"not an X.509 certificate: {exc}") from None
        der = cert.public_bytes(serialization.Encoding.DER)
        challenge = self._call("challenge").get("challenge")
        if not isinstance(challenge, bytes):
            raise PstError("connection", "malformed challenge response")
        payload = registration_payload(server, challenge, hashlib.sha256(der).digest())
        if isinstance(key, ed25519.Ed25519PrivateKey):
            signature = key.sign(payload)
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
        else:
            raise TypeError("key must be an Ed25519 or P-256 private key of the cryptography package")
        result = self._call("register_certified", certificate=der, challenge=challenge, signature=signature)
        handle = result.get("handle")
        if not isinstance(handle, bytes) or len(handle) != HANDLE_SIZE:
            raise PstError("connection", "malformed register_certified response")
        with self._lock:
            self.handle = handle
            self._registration = None  # not renewed by itself: the certificate is spent
        return handle

    def request_distributed(self, payload: bytes, handle: bytes | None = None) -> bytes:
        """The group's signature over ``payload`` for our distributed application.

        Blocks until a strict majority of the application's clients asked for or approved
        the same payload (``refused`` if they did not in time, or refused it).
        """
        result = self._with_handle("request", handle, protocol="sign", payload=bytes(payload))
        signature = result.get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed request response")
        return signature

    def pending(self, handle: bytes | None = None) -> list[PendingRequest]:
        """The other clients' requests that wait for our approval."""
        entries = self._with_handle("pending", handle).get("requests")
        if not isinstance(entries, list):
            raise PstError("connection", "malformed pending response")
        try:
            return [
                PendingRequest(
                    bytes(e["request_id"]),
                    str(e["protocol"]),
                    bytes(e["payload"]),
                    tuple(int(i) for i in e["servers"]),
                    e["expires_in_ms"] / 1000,
                )
                for e in entries
            ]
        except (KeyError, TypeError, ValueError):
            raise PstError("connection", "malformed pending response") from None

    def approve(self, request_id: bytes, handle: bytes | None = None) -> None:
        """Approve a pending request (it then counts as our client's)."""
        self._with_handle("approve", handle, request_id=bytes(request_id))

    def deny(self, request_id: bytes, handle: bytes | None = None) -> None:
        """Deny a pending request (the servers that asked are told at once)."""
        self._with_handle("deny", handle, request_id=bytes(request_id))

    def upgrade_sign(self) -> bytes:
        """The operator's request: the signed upgrade [Scert(U), U] this server approved."""
        certificate = self._call("upgrade_sign").get("certificate")
        if not isinstance(certificate, bytes):
            raise PstError("connection", "malformed upgrade_sign response")
        return certificate

    def dss_sign(self, secret: str, message: bytes) -> bytes:
        """The operator's threshold DSS signature (DER; P-256 ECDSA or DSA over SHA-256(message))
        by the DSS secret ``secret`` of C, e.g. ``tsa``; verifies with ``openssl dgst -sha256``."""
        signature = self._call("dss_sign", secret=secret, message=message).get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed dss_sign response")
        return signature

    def generate_dss_key(self, name: str, group: str = "p256", *, handle: bytes | None = None) -> bytes:
        """GenerateDSSKey: a threshold key ``name`` of this application (``p256`` ECDSA or
        ``dsa2048`` DSA 2048/256), owned by this client; returns its PEM public key. Asking again
        for a key this client owns returns it; another client's name is refused (``exists``)."""
        pem = self._with_handle("generate_dss_key", handle, name=name, group=group).get("pem")
        if not isinstance(pem, bytes):
            raise PstError("connection", "malformed generate_dss_key response")
        return pem

    def dss_sign_with_key(self, name: str, message: bytes, *, handle: bytes | None = None) -> bytes:
        """GenerateDSASignature: a DER signature over SHA-256(message) by this client's key
        ``name``, made by t+1 servers that each checked the key is ours (``openssl dgst -sha256
        -verify`` accepts it)."""
        signature = self._with_handle("dss_sign", handle, key=name, message=message).get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed dss_sign response")
        return signature

    def dss_key_public_key(self, name: str, *, handle: bytes | None = None) -> bytes:
        """The PEM public key of key ``name`` of this application."""
        pem = self._with_handle("dss_public_key", handle, key=name).get("pem")
        if not isinstance(pem, bytes):
            raise PstError("connection", "malformed dss_public_key response")
        return pem

    def timestamp(
        self, digest: bytes, hash: str = "sha256", *, nonce: int | None = None, cert_req: bool = True
    ) -> bytes:
        """An RFC 3161 ``TimeStampResp`` (DER, what ``openssl ts -reply`` reads) for ``digest``
        made with ``hash`` (sha256, sha384 or sha512): a token, or a rejection saying why."""
        fields: dict[str, Any] = {"hash": hash, "digest": digest, "cert_req": cert_req}
        if nonce is not None:
            fields["nonce"] = nonce
        response = self._call("timestamp", **fields).get("response")
        if not isinstance(response, bytes):
            raise PstError("connection", "malformed timestamp response")
        return response

    def dss_public_key(self, secret: str) -> bytes:
        """The PEM (SubjectPublicKeyInfo) public key of the DSS secret ``secret`` of C."""
        pem = self._call("dss_public_key", secret=secret).get("pem")
        if not isinstance(pem, bytes):
            raise PstError("connection", "malformed dss_public_key response")
        return pem

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

    def unregister(self, handle: bytes | None = None) -> None:
        """Release a handle (by default ours; then :meth:`register` is needed again)."""
        chosen = handle if handle is not None else self.handle
        if chosen is None:
            raise PstError("unknown-handle", "register first (this client holds no registration)")
        self._call("unregister", handle=chosen)
        with self._lock:
            if chosen == self.handle:
                self.handle, self._registration = None, None

    def get_time(self) -> dict[int, float | None]:
        """Every server's clock in Unix seconds (None where unknown), by server id (§5.3).

        The vector comes from this server, unsigned: the other servers' answers reached it
        signed with their period keys, but the API does not pass the signatures on.
        """
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

    # The log --------------------------------------------------------------------------------

    def log_append(self, messages: Sequence[bytes], handle: bytes | None = None) -> tuple[list[int], int]:
        """Append 1 to 64 messages (64 KiB in all) to the server's log as one registered client;
        (the index of each entry, the log's size) once they are durable. The entries name this
        client (``uid U app NAME``)."""
        result = self._with_handle("log_append", handle, messages=[bytes(m) for m in messages])
        indices, size = result.get("indices"), result.get("size")
        if (
            not isinstance(indices, list)
            or len(indices) != len(messages)
            or not all(isinstance(i, int) for i in indices)
            or not isinstance(size, int)
        ):
            raise PstError("connection", "malformed log_append response")
        return indices, size

    def log_size(self) -> tuple[int, str]:
        """(the log's size, its origin)."""
        result = self._call("log_size")
        size, origin = result.get("size"), result.get("origin")
        if not isinstance(size, int) or not isinstance(origin, str):
            raise PstError("connection", "malformed log_size response")
        return size, origin

    def log_audit(self) -> dict[str, Any]:
        """Audit the server's copy of the log against its latest checkpoint now, repairing it from
        the peers if it differs (operator only; as long as the audit takes: give the client a
        ``timeout`` to match). ``{"ok", "checkpoint_size", "damaged", "repairs"}``."""
        result = self._call("log_audit")
        if not isinstance(result.get("ok"), bool) or not isinstance(result.get("repairs"), int):
            raise PstError("connection", "malformed log_audit response")
        return dict(result)

    def log_entries(self, start: int, count: int) -> list[bytes]:
        """Up to ``count`` (1-256) entries from index ``start``, as stored (CBOR: decode them with
        ``appliance.apps.log.syslog.Entry.decode``); fewer at the end of the log or past 1 MiB."""
        entries = self._call("log_entries", start=start, count=count).get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, bytes) for e in entries):
            raise PstError("connection", "malformed log_entries response")
        return entries

    # Period certificates (§5.4) ---------------------------------------------------------------

    def certificate(
        self,
        *,
        csr: bytes | None = None,
        names: Sequence[str] | None = None,
        handle: bytes | None = None,
    ) -> IssuedCertificate:
        """A period certificate for this application from the group's CA, valid for the current
        period plus the grace. With ``csr`` (PKCS #10, PEM or DER, P-256 or Ed25519) for the key
        it carries, whose private key stays here; without, the server makes a P-256 key and
        returns it (``key``). ``names``: a subset of the application's profile (``[ca.apps]``;
        default: its names without wildcards); outside it: ``not-permitted``."""
        fields: dict[str, Any] = {}
        if csr is not None:
            fields["csr"] = bytes(csr)
        if names is not None:
            fields["names"] = list(names)
        return issued_certificate(self._with_handle("certificate", handle, **fields))

    # Proactively secure links (§5.4) ---------------------------------------------------------

    def send(self, to: int, data: bytes, *, timeout: float = 10.0, handle: bytes | None = None) -> None:
        """Deliver ``data`` (at most 64 KiB) to this application's client at server ``to``, over the
        servers' period channels; returns once it is in that server's inbox. ``refused`` says why
        not (no client of this application there, its inbox full), ``unavailable`` that the server
        did not answer within ``timeout`` seconds (at most 20)."""
        result = self._with_handle(
            "send", handle, to=to, data=bytes(data), timeout_ms=max(1, round(timeout * 1000))
        )
        if result.get("delivered") is not True:
            raise PstError("connection", "malformed send response")

    def receive(
        self, *, limit: int = 64, wait: float = 0.0, handle: bytes | None = None
    ) -> list[LinkMessage]:
        """Up to ``limit`` (1-256) messages sent to this application here by its clients at other
        servers, oldest first, waiting up to ``wait`` seconds (at most 20) for the first."""
        result = self._with_handle("receive", handle, max=limit, wait_ms=round(wait * 1000))
        messages = result.get("messages")
        out: list[LinkMessage] = []
        if not isinstance(messages, list):
            raise PstError("connection", "malformed receive response")
        for m in messages:
            sender, period, data = (
                (m.get("from"), m.get("period"), m.get("data")) if isinstance(m, dict) else (None,) * 3
            )
            if (
                not isinstance(sender, int)
                or not isinstance(data, bytes)
                or not isinstance(period, int | None)
            ):
                raise PstError("connection", "malformed receive response")
            out.append(LinkMessage(sender, period, data))
        return out

    # Data storage (§5.2, Table 4; docs/store.md) -----------------------------------------------

    def store_key(self, handle: bytes | None = None) -> StoreKey:
        """The network's store key (its group and public sharing): what secrets are sealed to."""
        from appliance.apps.store.client import StoreKey

        try:
            return StoreKey.from_result(self._with_handle("store_key", handle))
        except DecodeError as exc:
            raise PstError("connection", f"malformed store_key response: {exc}") from None

    def _store_public_key(self, handle: bytes | None) -> StoreKey:
        """:meth:`store_key`, asked once: what sealing and opening use of it (the group, n, t and
        the public key) never changes, a refresh renews only the shares and the rest of the
        commitment, and each answer of a read names its own. One round trip less per call."""
        if self._sealing_key is None:
            self._sealing_key = self.store_key(handle)
        return self._sealing_key

    def _app(self) -> str:
        if self._registration is None:
            if self._distributed_app is not None:
                return self._distributed_app
            raise PstError("unknown-handle", "register first (the store's data ids are per application)")
        return self._registration[0]

    def _store_write(
        self,
        op: str,
        data_id: str,
        value: bytes,
        dtype: str,
        *,
        version: int = 1,
        reader: bytes = b"",
        until_ms: int = 0,
        handle: bytes | None = None,
    ) -> int:
        from appliance.apps.store.client import seal_write
        from appliance.apps.store.model import DataType

        try:
            kind = DataType(dtype)
        except ValueError:
            raise PstError("bad-request", f"unknown data type {dtype!r}") from None
        key = self._store_public_key(handle) if kind.secret else None
        request = seal_write(
            key, self._app(), data_id, kind, bytes(value), version=version, reader=reader, until_ms=until_ms
        )
        result = self._with_handle(op, handle, request=request.encode())
        got = result.get("version")
        if not isinstance(got, int):
            raise PstError("connection", f"malformed {op} response")
        return got

    def store_data(
        self,
        data_id: str,
        value: bytes,
        dtype: str = "public-once",
        *,
        reader: Any = None,
        handle: bytes | None = None,
    ) -> int:
        """StoreData(DataID, value, type): a new item of this application (version 1). Secret
        types are sealed under the store key here, never sent in clear; ``secret-single`` needs
        ``reader``, the owner's ``nacl.public.PrivateKey`` (or its 32-byte public key): only it
        can open the shares later. Refusals keep the store's codes (``exists``, ``quota``, ...)."""
        return self._store_write(
            "store_data", data_id, value, dtype, reader=_reader_public(reader), handle=handle
        )

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
        such data only for a quorum of the application's clients: with a distributed registration
        (:meth:`register_distributed`) this blocks until a strict majority of its clients approved
        the request (:meth:`pending`, :meth:`approve`); a centralized client is refused
        (``not-permitted``)."""
        return self._store_write("write", data_id, value, dtype, version=version, handle=handle)

    def store_until(self, data_id: str, value: bytes, until: float, *, handle: bytes | None = None) -> int:
        """StoreUntil(DataID, value, date): sealed here; every honest server refuses to help
        open it before ``until`` (Unix seconds, by its own clock)."""
        return self._store_write(
            "store_until", data_id, value, "store-until", until_ms=round(until * 1000), handle=handle
        )

    def generate_joint_secret(
        self, data_id: str, value: bytes | None = None, *, handle: bytes | None = None
    ) -> int:
        """GenerateJointSecret for a distributed registration (a quorum's request: this blocks
        until a strict majority of its clients approved it). Without ``value``, random: at least
        t+1 servers each seal a random contribution of their own (no t servers know the secret;
        read, it is HKDF over them). With ``value``, the one the quorum specifies, sealed here.
        A centralized client is refused (``not-permitted``)."""
        if value is None:
            got = self._with_handle("generate_random_secret", handle, data_id=data_id).get("version")
            if not isinstance(got, int):
                raise PstError("connection", "malformed generate_random_secret response")
            return got
        return self._store_write("generate_joint_secret", data_id, value, "joint-secret", handle=handle)

    def store_many(
        self,
        items: Sequence[tuple[str, bytes]],
        dtype: str = "public-once",
        *,
        reader: Any = None,
        until: float | None = None,
        handle: bytes | None = None,
    ) -> list[int | PstError]:
        """StoreData for many new items in one request (``store_batch``): ``(data_id, value)``
        pairs of one type, sealed here as :meth:`store_data` does (``until``: StoreUntil's date,
        for ``store-until``). The network orders them together, in this order; each one's
        version, or the :class:`PstError` it got (a refusal does not stop the others). At most
        1,024 items and 128 KiB per request: split larger sets."""
        from appliance.apps.store.client import seal_write
        from appliance.apps.store.model import DataType

        try:
            kind = DataType(dtype)
        except ValueError:
            raise PstError("bad-request", f"unknown data type {dtype!r}") from None
        key = self._store_public_key(handle) if kind.secret else None
        public = _reader_public(reader)
        until_ms = round(until * 1000) if until is not None else 0
        requests = [
            seal_write(
                key, self._app(), data_id, kind, bytes(value), reader=public, until_ms=until_ms
            ).encode()
            for data_id, value in items
        ]
        return self.store_batch(requests, handle=handle)

    def store_batch(self, requests: Sequence[bytes], *, handle: bytes | None = None) -> list[int | PstError]:
        """Encoded write requests (``appliance.apps.store.model.WriteRequest``) in one call:
        each one's version, or its :class:`PstError`, in order."""
        result = self._with_handle("store_batch", handle, requests=list(requests))
        results = result.get("results")
        if not isinstance(results, list) or len(results) != len(requests):
            raise PstError("connection", "malformed store_batch response")
        out: list[int | PstError] = []
        for r in results:
            if isinstance(r, dict) and isinstance(r.get("version"), int):
                out.append(r["version"])
            elif isinstance(r, dict) and isinstance(r.get("code"), str):
                out.append(PstError(r["code"], str(r.get("message", ""))))
            else:
                raise PstError("connection", "malformed store_batch response")
        return out

    def store_record(self, data_id: str, *, handle: bytes | None = None) -> dict[str, Any]:
        """The item as this server holds it (type, version, owner; a public value, a secret's
        ciphertexts), without reading a secret."""
        record = self._with_handle("retrieve", handle, data_id=data_id).get("record")
        if not isinstance(record, dict):
            raise PstError("connection", "malformed retrieve response")
        return record

    def store_kind(self, data_id: str, *, handle: bytes | None = None) -> bool:
        """Is ``data_id`` secret (read by threshold decryption)?"""
        from appliance.apps.store.model import DataType

        try:
            return DataType(self.store_record(data_id, handle=handle).get("type")).secret
        except ValueError:
            raise PstError("connection", "malformed retrieve response") from None

    def retrieve(self, data_id: str, *, reader: Any = None, handle: bytes | None = None) -> bytes:
        """Retrieve(DataID): a public value, or a secret opened here from t+1 servers' shares,
        which they seal to ``reader`` (a ``nacl.public.PrivateKey``; a new one by default: only
        secret-single data needs the owner's). A refusal by the servers raises :class:`PstError`
        with their code (``too-early``, ``not-permitted``, ...) naming each server's reason."""
        import nacl.public

        from appliance.apps.store.client import ReadRefused, open_answers

        key = reader if reader is not None else nacl.public.PrivateKey.generate()
        if not isinstance(key, nacl.public.PrivateKey):
            raise PstError("bad-request", "reader: a nacl.public.PrivateKey")
        result = self._with_handle("retrieve", handle, data_id=data_id, reader=bytes(key.public_key))
        record = result.get("record")
        if not isinstance(record, dict):
            raise PstError("connection", "malformed retrieve response")
        if "answers" not in result:
            value = record.get("value")
            if not isinstance(value, bytes):
                raise PstError("connection", "malformed retrieve response")
            return value
        answers = result.get("answers")
        if not isinstance(answers, dict):
            raise PstError("connection", "malformed retrieve response")
        try:
            return open_answers(self._store_public_key(handle), record, answers, key)
        except ReadRefused as exc:
            raise PstError(exc.code, str(exc)) from None
        except DecodeError as exc:
            raise PstError("connection", f"malformed retrieve response: {exc}") from None


def _reader_public(reader: Any) -> bytes:
    """The 32-byte X25519 public key of ``reader`` (a private or public key, or bytes)."""
    import nacl.public

    if reader is None:
        return b""
    if isinstance(reader, nacl.public.PrivateKey):
        return bytes(reader.public_key)
    if isinstance(reader, nacl.public.PublicKey):
        return bytes(reader)
    if isinstance(reader, bytes) and len(reader) == 32:
        return reader
    raise PstError("bad-request", "reader: an X25519 key (nacl.public.PrivateKey or 32 bytes)")


def issued_certificate(result: Mapping[str, Any]) -> IssuedCertificate:
    """The ``certificate`` operation's result, checked."""
    cert, bundle, key = result.get("certificate"), result.get("bundle"), result.get("key")
    times = [result.get(k) for k in ("not_before", "not_after", "renew_after")]
    if (
        not isinstance(cert, bytes)
        or not isinstance(bundle, bytes)
        or not isinstance(key, bytes | None)
        or not all(isinstance(t, int) for t in times)
    ):
        raise PstError("connection", "malformed certificate response")
    return IssuedCertificate(cert, bundle, times[0], times[1], times[2], key)  # type: ignore[arg-type]


@dataclass(frozen=True)
class IssuedCertificate:
    """A period certificate from the group's CA (``PstClient.certificate``): the leaf (PEM), the
    bundle (leaf and group root, PEM), its validity and when to renew it (Unix seconds), and
    the private key (PKCS #8 PEM) when the server made it (no CSR)."""

    certificate: bytes
    bundle: bytes
    not_before: int
    not_after: int
    renew_after: int
    key: bytes | None = None


@dataclass(frozen=True)
class LinkMessage:
    """A message from this application's client at server ``sender``, received in ``period``."""

    sender: int
    period: int | None
    data: bytes


def _result(response: object, rid: int) -> dict[str, Any]:
    if not isinstance(response, dict) or response.get("v") != API_VERSION:
        raise PstError("connection", "malformed response")
    if response.get("ok") is False:
        error = response.get("error")
        if isinstance(error, Mapping):
            code, message = error.get("code"), error.get("message")
            wait = error.get("retry_after_ms")
            retry_after = (
                wait / 1000 if isinstance(wait, int) and not isinstance(wait, bool) and wait > 0 else None
            )
            if isinstance(code, str) and code and isinstance(message, str):
                raise PstError(code, message, retry_after)
        raise PstError("connection", "malformed error response")
    if response.get("id") != rid:
        raise PstError("connection", "response to another request")
    result = response.get("result")
    if response.get("ok") is not True or not isinstance(result, dict):
        raise PstError("connection", "malformed response")
    return result


def sha512_of(file: BinaryIO | str | os.PathLike[str], chunk: int = 1 << 20) -> bytes:
    """SHA-512 of a file (path) or stream read to its end in chunks (memory stays bounded)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return sha512_of(f, chunk)
    h = hashlib.sha512()
    while block := file.read(chunk):
        h.update(block)
    return h.digest()


def sign_file(
    file: BinaryIO | str | os.PathLike[str],
    app: str,
    *,
    socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
    unique_id: bytes | str | None = None,
) -> bytes:
    """Register as ``app``, sign a file of any size by its SHA-512 digest, release: the signature
    (same as :meth:`PstClient.sign` on the whole content)."""
    digest = sha512_of(file)
    with PstClient(socket_path) as client:
        client.register(app, unique_id)
        return client.sign_digest(digest)


# Command line -----------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else str(value)


def _read_password(path: str | None) -> bytes:
    if path is None:
        raise PstError("bad-request", "distributed commands need --password-file")
    if path == "-":
        line = sys.stdin.buffer.readline()
    else:
        with open(path, "rb") as f:
            line = f.readline()
    return line.rstrip(b"\r\n")


def _read_message(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(MAX_MESSAGE_SIZE + 1)
    with open(path, "rb") as f:
        return f.read(MAX_MESSAGE_SIZE + 1)


def _distributed_command(client: PstClient, args: argparse.Namespace) -> None:
    client.register_distributed(args.name, _read_password(args.password_file))
    if args.command == "request":
        print(client.request_distributed(_read_message(args.file)).hex())
        return
    waiting = client.pending()
    chosen = {bytes.fromhex(i) for i in args.ids}
    for p in waiting:
        if args.all or p.request_id in chosen:
            (client.deny if args.deny else client.approve)(p.request_id)
            verdict = "denied" if args.deny else "approved"
        else:
            verdict = "pending"
        servers = ",".join(str(i) for i in p.servers)
        digest = hashlib.sha256(p.payload).hexdigest()[:16]
        size = len(p.payload)
        print(f"{p.request_id.hex()}\t{verdict}\t{p.protocol}\tfrom {servers}\tsha256:{digest}\t{size} bytes")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pst_client", description="Talk to the local PServer's API.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"API socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--name", default="pst-client", help="application name to register as")
    parser.add_argument(
        "--unique-id",
        default=None,
        help="application instance id (default 'default': parallel runs share one registration)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sign = sub.add_parser("sign", help="sign FILE (- for stdin); print the hex signature")
    sign.add_argument("file")
    sub.add_parser("time", help="print every server's clock")
    sub.add_parser("status", help="print the server's status as JSON")
    parser.add_argument(
        "--password-file", help="distributed application's password (first line of this file; - for stdin)"
    )
    request = sub.add_parser("request", help="distributed: get FILE signed once a majority agrees")
    request.add_argument("file")
    approve = sub.add_parser("approve", help="distributed: list pending requests, or approve/deny them")
    approve.add_argument("ids", nargs="*", help="hex request ids to decide (default: only list)")
    approve.add_argument("--all", action="store_true", help="decide every pending request")
    approve.add_argument("--deny", action="store_true", help="deny instead of approve")
    args = parser.parse_args(argv)
    try:
        with PstClient(args.socket) as client:
            if args.command == "sign":
                digest = sha512_of(sys.stdin.buffer if args.file == "-" else args.file)
                client.register(args.name, args.unique_id)
                print(client.sign_digest(digest).hex())  # the with block releases the handle
            elif args.command in ("request", "approve"):
                _distributed_command(client, args)
            elif args.command == "time":
                for server, t in sorted(client.get_time().items()):
                    print(f"{server}\t{'unknown' if t is None else f'{t:.6f}'}")
            else:
                print(json.dumps(client.status(), indent=2, sort_keys=True, default=_json_default))
    except PstError as exc:
        print(f"pst_client: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pst_client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
