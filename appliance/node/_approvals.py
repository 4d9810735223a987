"""The PServer's side of distributed applications (paper §5.1): requests, pending, approvals.

Theory of operation
-------------------
The exchange between servers is :class:`~appliance.protocols.approvals.ApprovalService`,
which :class:`~appliance.protocols.core.ServerCore` runs next to the signing service. This
module drives it from a running :class:`~appliance.node.server.PServer` the way
``PServer.sign`` drives the signing service: start a request, wake the main loop so that it
sends what the service queued, and wait until the service settles the request. Once a
majority of the application's clients agreed, the group key signs the request's message
through ``PServer.sign`` (the certificate that lets the other signers take part went out
first, in the same tick that settled the request).

Every function returns plain data (what crosses the key-holder link): a result, or
``{"error": code, "message": text}`` with code ``refused``, ``unknown-request`` or
``unavailable``; messages name servers and reasons, never a secret.

Which applications have a client at this server, and their verifiers, is the API's
business: the API process writes them into its registration file
(:mod:`appliance.api._registrations`), and :class:`RegistrationClients` is a read-only view
of that file which re-reads it when it changes; the node sets it as the core's
``distributed_clients``.

Three ways in:

* :class:`LocalApprovals`: a :class:`~appliance.api.DistributedNode` over a PServer in the
  same process (tests, or a server without a key-holder);
* :func:`keyholder_methods`: the handlers to add to the key-holder child's call table;
* :class:`LinkApprovals`: a DistributedNode that calls those handlers over the link.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from appliance.api._registrations import load_verifiers, registrations_path
from appliance.crypto import encoding
from appliance.protocols.approvals import ApprovalService, UnknownRequest
from appliance.protocols.signing import SigningRefused

if TYPE_CHECKING:
    from appliance.node.server import PServer

#: How often a waiting request looks at its service.
POLL = 0.02
#: Extra time the group signature may take once the majority is there.
SIGN_TIMEOUT = 10.0


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": code, "message": message}


def _not_operational() -> dict[str, Any]:
    return _error("unavailable", "this server is not operational: it holds no share of the group key now")


def _service(server: PServer) -> ApprovalService | None:
    core = server.core
    return core.approvals if core is not None else None


class RegistrationClients(Mapping[str, bytes]):
    """name -> verifier of the distributed applications in the API's registration file.

    Re-reads the file whenever it was replaced (atomic writes give it a new inode), so a
    client registered a moment ago is known to the next request of another server.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = registrations_path(state_dir)
        self._stamp: tuple[int, int, int] | None = None
        self._verifiers: dict[str, bytes] = {}

    def _current(self) -> dict[str, bytes]:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._verifiers = load_verifiers(self.path) if stamp is not None else {}
            self._stamp = stamp
        return self._verifiers

    def __getitem__(self, app: str) -> bytes:
        return self._current()[app]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __repr__(self) -> str:
        return f"RegistrationClients({str(self.path)!r})"


def use_registration_clients(server: PServer) -> None:
    """Make the running core look up distributed clients in the API's registration file."""
    if server.core is not None:
        server.core.distributed_clients = RegistrationClients(server.config.state_dir)


async def distributed_request(
    server: PServer, app: str, verifier: bytes, protocol: str, payload: bytes, *, timeout: float
) -> dict[str, Any]:
    """Our client's request: ``{"signature": ...}`` (protocol ``sign``) or ``{"certificate": ...}``
    (``store``: the encoded certificate) once a majority agreed, else an error."""
    service = _service(server)
    if service is None:
        return _not_operational()
    try:
        lid = service.request(app, verifier, protocol, payload, server.clock(), timeout)
    except ValueError as exc:
        return _error("refused", str(exc))
    server._poke()  # send the request now
    with trio.move_on_after(timeout + 1.0):
        while lid not in service.done and lid not in service.failed and _service(server) is service:
            await trio.sleep(POLL)
    if lid not in service.done:
        why = service.failed.pop(lid, None)
        if why is None:  # not a refusal: nobody judged it; ask again in the new period
            why = "a refresh replaced the period's services before the request settled; retry"
            return _error("unavailable", why)
        return _error("refused", why)
    message = service.done.pop(lid)
    certificate = service.certificates.pop(lid, None)
    if protocol == "store":  # the store checks the certificate itself: nothing to sign
        if certificate is None:
            return _error("unavailable", "a majority agreed, but the certificate was not kept")
        return {"certificate": encoding.encode(certificate)}
    try:
        return {"signature": await server.sign_payload(message, timeout=SIGN_TIMEOUT)}
    except SigningRefused as exc:
        return _error("unavailable", f"a majority agreed, but the group could not sign: {exc}")
    except trio.TooSlowError:
        return _error("unavailable", "a majority agreed, but the signing servers did not answer in time")


def pending(server: PServer, app: str, verifier: bytes) -> dict[str, Any]:
    """``{"requests": [...]}``: the requests of other servers' clients waiting for ours."""
    service = _service(server)
    if service is None:
        return _not_operational()
    now = server.clock()
    return {
        "requests": [
            {
                "request_id": p.request_id,
                "protocol": p.protocol,
                "payload": p.payload,
                "servers": list(p.servers),
                "expires_in_ms": max(0, round((p.expires - now) * 1000)),
            }
            for p in service.pending(app, verifier, now)
        ]
    }


def decide(server: PServer, app: str, verifier: bytes, request_id: bytes, approve: bool) -> dict[str, Any]:
    """Our client approves or denies a waiting request: ``{}``, or an error."""
    service = _service(server)
    if service is None:
        return _not_operational()
    try:
        if approve:
            service.approve(app, verifier, request_id, server.clock())
        else:
            service.deny(app, verifier, request_id, server.clock())
    except UnknownRequest as exc:
        return _error("unknown-request", str(exc))
    server._poke()  # send the vote (or refusal) now
    return {}


# Ways in ------------------------------------------------------------------------------------------


class LocalApprovals:
    """A :class:`~appliance.api.DistributedNode` over a PServer in this process."""

    def __init__(self, server: PServer) -> None:
        self.server = server

    async def request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> Mapping[str, Any]:
        return await distributed_request(self.server, app, verifier, protocol, payload, timeout=timeout)

    async def pending(self, app: str, verifier: bytes) -> Mapping[str, Any]:
        return pending(self.server, app, verifier)

    async def decide(self, app: str, verifier: bytes, request_id: bytes, approve: bool) -> Mapping[str, Any]:
        return decide(self.server, app, verifier, request_id, approve)


def _arg(args: Mapping[str, Any], key: str, typ: type) -> Any:
    value = args.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise TypeError(f"'{key}' must be {typ.__name__}")
    return value


def keyholder_methods(server: PServer) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
    """Handlers for the key-holder child's call table (``_Child.methods.update(...)``)."""

    async def request(args: dict[str, Any]) -> Any:
        timeout_ms = _arg(args, "timeout_ms", int)
        if not 0 < timeout_ms <= 600_000:
            raise ValueError("'timeout_ms' must be in (0, 600000]")
        return await distributed_request(
            server,
            _arg(args, "app", str),
            _arg(args, "verifier", bytes),
            _arg(args, "protocol", str),
            _arg(args, "payload", bytes),
            timeout=timeout_ms / 1000,
        )

    async def pending_(args: dict[str, Any]) -> Any:
        return pending(server, _arg(args, "app", str), _arg(args, "verifier", bytes))

    async def decide_(args: dict[str, Any]) -> Any:
        return decide(
            server,
            _arg(args, "app", str),
            _arg(args, "verifier", bytes),
            _arg(args, "request_id", bytes),
            _arg(args, "approve", bool),
        )

    return {"distributed_request": request, "distributed_pending": pending_, "distributed_decide": decide_}


class _Caller(Protocol):
    async def call(self, method: str, timeout: float, **args: Any) -> Any: ...


class LinkApprovals:
    """A :class:`~appliance.api.DistributedNode` that calls :func:`keyholder_methods` over the link."""

    def __init__(self, link: _Caller) -> None:
        self.link = link

    async def _call(self, method: str, timeout: float, **args: Any) -> Mapping[str, Any]:
        try:
            value = await self.link.call(method, timeout, **args)
        except SigningRefused as exc:
            return _error("unavailable", str(exc)[:200])
        except trio.TooSlowError:
            return _error("unavailable", "the key-holder did not answer in time")
        if not isinstance(value, dict):
            return _error("unavailable", "the key-holder returned a malformed answer")
        return value

    async def request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> Mapping[str, Any]:
        args = {"app": app, "verifier": verifier, "protocol": protocol, "payload": payload}
        return await self._call(
            "distributed_request", timeout + SIGN_TIMEOUT + 2.0, timeout_ms=round(timeout * 1000), **args
        )

    async def pending(self, app: str, verifier: bytes) -> Mapping[str, Any]:
        return await self._call("distributed_pending", 5.0, app=app, verifier=verifier)

    async def decide(self, app: str, verifier: bytes, request_id: bytes, approve: bool) -> Mapping[str, Any]:
        args = {"app": app, "verifier": verifier, "request_id": request_id, "approve": approve}
        return await self._call("distributed_decide", 5.0, **args)


__all__: Sequence[str] = [
    "LinkApprovals",
    "LocalApprovals",
    "RegistrationClients",
    "decide",
    "distributed_request",
    "keyholder_methods",
    "pending",
    "use_registration_clients",
]
