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
(paper §5.1) and gets a handle, which the client keeps and sends with later requests.
Handles outlive connections: if the server closes the connection (after a malformed
request, or when idle), the next call reconnects and the handle still works.

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
decoder, so that client and server cannot disagree on the format); install it, or run
from a checkout where it is importable.

Command line::

    python clients/pst_client.py --socket /run/pst/api.sock sign FILE   # hex signature
    python clients/pst_client.py --socket /run/pst/api.sock time
    python clients/pst_client.py --socket /run/pst/api.sock status
    python clients/pst_client.py --name APP --password-file PW request FILE  # distributed
    python clients/pst_client.py --name APP --password-file PW approve [--deny] [--all | ID...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.net._framing import FrameDecoder, FramingError, encode_frame
from appliance.protocols.approvals import distributed_sign_payload

API_VERSION = 1
#: Responses are small, but a status can hold a few lists.
MAX_RESPONSE_SIZE = 4 * 1024 * 1024
DEFAULT_SOCKET = "/run/pst/api.sock"
#: Handle, unique id and message sizes the server accepts.
HANDLE_SIZE = 32
MAX_MESSAGE_SIZE = 64 * 1024


class PstError(Exception):
    """A request failed: ``code`` is the server's error code, or ``connection``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PendingRequest:
    """A request of another server's client that waits for ours (see :meth:`PstClient.pending`)."""

    request_id: bytes
    protocol: str
    payload: bytes
    #: The servers whose clients asked for it.
    servers: tuple[int, ...]
    expires_in: float


def verify_distributed(group_public_key: bytes, app: str, payload: bytes, signature: bytes) -> bool:
    """Does ``signature`` (from :meth:`PstClient.request_distributed`) sign ``payload`` for ``app``?"""
    try:
        VerifyKey(group_public_key).verify(distributed_sign_payload(app, payload), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


class PstClient:
    """A synchronous client of one PServer's local API at ``path``."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.handle: bytes | None = None
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        self._next_id = 1
        self._lock = threading.Lock()

    # Connection -------------------------------------------------------------------------------

    def __enter__(self) -> PstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the registration stays valid on the server)."""
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

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its ``result`` map; :class:`PstError` on an error."""
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            payload = encoding.encode({"v": API_VERSION, "op": op, "id": rid, **fields})
            sock = self._connect()
            try:
                sock.sendall(encode_frame(payload))
                frame = self._receive_frame(sock)
                response = encoding.decode(frame, max_size=MAX_RESPONSE_SIZE, what="response")
            except PstError:
                self.close()
                raise
            except (OSError, FramingError, DecodeError) as exc:
                self.close()
                raise PstError("connection", f"{type(exc).__name__}: {exc}") from None
        return _result(response, rid)

    def register(self, name: str, unique_id: bytes | str | None = None) -> bytes:
        """Register as application ``name`` (§5.1) and keep the handle; returns it.

        ``unique_id`` identifies this instance of the application (default: a fresh random
        id). Registering the same name and unique id again revokes the previous handle.
        """
        if unique_id is None:
            unique_id = os.urandom(16)
        elif isinstance(unique_id, str):
            unique_id = unique_id.encode()
        result = self.request("register", name=name, unique_id=unique_id)
        handle = result.get("handle")
        if not isinstance(handle, bytes) or len(handle) != HANDLE_SIZE:
            raise PstError("connection", "malformed register response")
        self.handle = handle
        return handle

    def _handle(self, handle: bytes | None) -> bytes:
        chosen = handle if handle is not None else self.handle
        if chosen is None:
            raise PstError("unknown-handle", "register first")
        return chosen

    def sign(self, message: bytes, handle: bytes | None = None) -> bytes:
        """The group's signature for this application over ``message`` (at most 64 KiB)."""
        result = self.request("sign", handle=self._handle(handle), message=bytes(message))
        signature = result.get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed sign response")
        return signature

    def sign_digest(self, sha512: bytes, handle: bytes | None = None) -> bytes:
        """The same signature as :meth:`sign` on the message whose SHA-512 digest is ``sha512``."""
        result = self.request("sign_digest", handle=self._handle(handle), sha512=bytes(sha512))
        signature = result.get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed sign response")
        return signature

    def sign_file(self, stream: BinaryIO, handle: bytes | None = None) -> bytes:
        """Sign everything ``stream`` holds, of any size: it is hashed as it is read (1 MiB at a
        time), and the group signs the same payload as for :meth:`sign` on the whole content."""
        return self.sign_digest(sha512_of(stream), handle)

    def get_random(self, nonce: bytes | None = None, handle: bytes | None = None) -> tuple[bytes, bytes]:
        """64 bytes of joint randomness no server can bias, and the input they answer.

        ``nonce`` (16-64 bytes, fresh per request; random by default) is part of the input.
        """
        result = self.request("random", handle=self._handle(handle), nonce=nonce or os.urandom(32))
        return bytes(result["random"]), bytes(result["input"])

    def register_distributed(self, name: str, password: bytes | str) -> bytes:
        """Register as this server's client of distributed application ``name`` (§5.1).

        Every client of the application, one per server, registers with the same name and
        password. Registering again revokes the previous handle. Returns the handle (kept).
        """
        if isinstance(password, str):
            password = password.encode()
        handle = self.request("register_distributed", name=name, password=password).get("handle")
        if not isinstance(handle, bytes) or len(handle) != HANDLE_SIZE:
            raise PstError("connection", "malformed register_distributed response")
        self.handle = handle
        return handle

    def request_distributed(self, payload: bytes, handle: bytes | None = None) -> bytes:
        """The group's signature over ``payload`` for our distributed application.

        Blocks until a strict majority of the application's clients asked for or approved
        the same payload (``refused`` if they did not in time, or refused it).
        """
        result = self.request("request", handle=self._handle(handle), protocol="sign", payload=bytes(payload))
        signature = result.get("signature")
        if not isinstance(signature, bytes):
            raise PstError("connection", "malformed request response")
        return signature

    def pending(self, handle: bytes | None = None) -> list[PendingRequest]:
        """The other clients' requests that wait for our approval."""
        entries = self.request("pending", handle=self._handle(handle)).get("requests")
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
        self.request("approve", handle=self._handle(handle), request_id=bytes(request_id))

    def deny(self, request_id: bytes, handle: bytes | None = None) -> None:
        """Deny a pending request (the servers that asked are told at once)."""
        self.request("deny", handle=self._handle(handle), request_id=bytes(request_id))

    def upgrade_sign(self) -> bytes:
        """The operator's request: the signed upgrade [Scert(U), U] this server approved."""
        certificate = self.request("upgrade_sign").get("certificate")
        if not isinstance(certificate, bytes):
            raise PstError("connection", "malformed upgrade_sign response")
        return certificate

    def unregister(self, handle: bytes | None = None) -> None:
        """Revoke a handle (by default ours)."""
        chosen = self._handle(handle)
        self.request("unregister", handle=chosen)
        if chosen == self.handle:
            self.handle = None

    def get_time(self) -> dict[int, float | None]:
        """Every server's clock in Unix seconds (None where unknown), by server id (§5.3)."""
        times = self.request("get_time").get("times_us")
        if not isinstance(times, dict):
            raise PstError("connection", "malformed get_time response")
        return {int(k): (v / 1_000_000 if isinstance(v, int) else None) for k, v in times.items()}

    def status(self) -> dict[str, Any]:
        """The PServer's status (floats arrive as their decimal strings)."""
        status = self.request("status").get("status")
        if not isinstance(status, dict):
            raise PstError("connection", "malformed status response")
        return status


def _result(response: object, rid: int) -> dict[str, Any]:
    if not isinstance(response, dict) or response.get("v") != API_VERSION:
        raise PstError("connection", "malformed response")
    if response.get("ok") is False:
        error = response.get("error")
        if isinstance(error, Mapping):
            code, message = error.get("code"), error.get("message")
            if isinstance(code, str) and isinstance(message, str):
                raise PstError(code, message)
        raise PstError("connection", "malformed error response")
    if response.get("id") != rid:
        raise PstError("connection", "response to another request")
    result = response.get("result")
    if response.get("ok") is not True or not isinstance(result, dict):
        raise PstError("connection", "malformed response")
    return result


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


def sha512_of(stream: BinaryIO, chunk: int = 1 << 20) -> bytes:
    """SHA-512 of a stream read to its end in chunks (memory stays bounded whatever the size)."""
    h = hashlib.sha512()
    while block := stream.read(chunk):
        h.update(block)
    return h.digest()


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
        "--unique-id", default="pst-client-cli", help="application instance id (re-registering revokes)"
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
                if args.file == "-":
                    digest = sha512_of(sys.stdin.buffer)
                else:
                    with open(args.file, "rb") as f:
                        digest = sha512_of(f)
                client.register(args.name, args.unique_id)
                try:
                    print(client.sign_digest(digest).hex())
                finally:
                    # Best effort: the next run's registration replaces it anyway.
                    with contextlib.suppress(PstError):
                        client.unregister()
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
