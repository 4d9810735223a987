"""A :class:`~appliance.api.Backend` on top of a running PServer.

Theory of operation
-------------------
The API core only needs three async methods; this adapter builds them from what a
PServer already has, without importing the node package (it takes callables and paths):

* ``sign(app, message)``: the node's group-key signing (``PServer.sign``) over
  :func:`~appliance.api.app_signing_payload` ``(app, message)``, so the application name
  is always bound in and the payload never carries the protocols' signing domain (the
  signing service refuses those). ``SigningRefused`` and timeouts become
  :class:`~appliance.api.BackendUnavailable` with a short, secret-free reason.
* ``get_time()``: every server's clock through ``time_vector`` (the §5.3 GetTime service:
  the other servers' answers arrive signed with their period keys and are checked there;
  the vector returned here carries no signatures); without it, this server's own clock
  and ``None`` for the others.
* ``status()``: the status file the node rewrites after every refresh
  (``<state>/public/status.json``), as a map.
* distributed applications (:class:`~appliance.api.DistributedBackend`): through a
  :class:`DistributedNode` (``appliance.node._approvals``: ``LocalApprovals`` in process,
  ``LinkApprovals`` over the key-holder link), whose plain-data answers
  (``{"error": code, "message": ...}`` on failure) become :class:`BackendRefused` or
  :class:`BackendUnavailable`.
* the log (:class:`~appliance.api.LogBackend`): :class:`LogAdapter` around the server's
  :class:`~appliance.apps.log.service.LogService`, whose
  :class:`~appliance.apps.log.service.LogUnavailable` becomes :class:`BackendUnavailable`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

if TYPE_CHECKING:
    from appliance.apps.log.service import LogService

from appliance.api._core import (
    REFUSED,
    UNKNOWN_REQUEST,
    BackendRefused,
    BackendUnavailable,
)
from appliance.protocols.signing import SigningRefused


class DistributedNode(Protocol):
    """The node's side of distributed applications; answers are plain data (see the module)."""

    async def request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> Mapping[str, Any]: ...

    async def pending(self, app: str, verifier: bytes) -> Mapping[str, Any]: ...

    async def decide(
        self, app: str, verifier: bytes, request_id: bytes, approve: bool
    ) -> Mapping[str, Any]: ...


def _checked(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    """The answer if it is no error; else the error as BackendRefused or BackendUnavailable."""
    code = answer.get("error")
    if code is None:
        return answer
    message = answer.get("message")
    message = message if isinstance(message, str) else "no reason given"
    if code in (REFUSED, UNKNOWN_REQUEST):
        raise BackendRefused(message, code)
    raise BackendUnavailable(message[:200])


#: Seconds between two tries of a store quorum request that a refresh interrupted.
STORE_RETRY: Final = 0.3


class AppDss(Protocol):
    """Per-application DSS keys in the key-holder (appliance.apps.dsskeys)."""

    async def sign_app_dss(self, group: str, app: str, uid: bytes, key: str, message: bytes) -> bytes: ...

    async def app_dss_public_key(self, group: str, app: str, key: str) -> bytes | None: ...


class PServerBackend:
    """Backend for the local API: ``sign_app`` is the node's ``PServer.sign_app`` (or the link's
    ``sign``): it takes the application's name and the message's SHA-512 digest, never a payload
    to sign."""

    def __init__(
        self,
        sign_app: Callable[[str, bytes], Awaitable[bytes]],
        server_id: int,
        *,
        servers: Iterable[int] = (),
        status_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        time_vector: Callable[[], Awaitable[Mapping[int, float | None]]] | None = None,
        random: Callable[[bytes], Awaitable[tuple[bytes, bytes]]] | None = None,
        distributed: DistributedNode | None = None,
        sign_upgrade: Callable[[], Awaitable[bytes]] | None = None,
        dss_sign: Callable[[str, bytes], Awaitable[bytes]] | None = None,
        dss_key: Callable[[str], Awaitable[bytes | None]] | None = None,
        app_dss: AppDss | None = None,
        timestamp: Callable[[bytes], Awaitable[bytes]] | None = None,
    ) -> None:
        #: The timestamping authority: a DER ``TimeStampReq`` in, the ``TimeStampResp`` out.
        self._timestamp = timestamp
        self._dss_sign = dss_sign
        self._dss_key = dss_key
        self._app_dss = app_dss
        self._sign_upgrade = sign_upgrade
        self._random = random
        self._distributed = distributed
        self._sign_app = sign_app
        self._time_vector = time_vector
        self.server_id = server_id
        self.servers = sorted(set(servers) | {server_id})
        self.status_file = status_file
        self.clock = clock
        #: Group-key signatures asked of the node through this backend, by (kind, outcome):
        #: kind "app", "distributed", "upgrade" or "dss"; outcome "signed", "refused" or "unavailable".
        self.signatures: Counter[tuple[str, str]] = Counter()

    async def sign(self, app: str, message: bytes) -> bytes:
        return await self.sign_digest(app, hashlib.sha512(message).digest())

    async def sign_digest(self, app: str, sha512: bytes) -> bytes:
        return await self._counted("app", 200, self._sign_app(app, sha512))

    async def _counted(self, kind: str, limit: int, signing: Awaitable[bytes]) -> bytes:
        """A signature, counted by kind and outcome; a refusal or a timeout is BackendUnavailable
        (the refusal's reason cut at ``limit`` characters)."""
        try:
            signature = await signing
        except SigningRefused as exc:
            self.signatures[kind, "unavailable"] += 1
            raise BackendUnavailable(str(exc)[:limit]) from None
        except trio.TooSlowError:
            self.signatures[kind, "unavailable"] += 1
            raise BackendUnavailable("the signing servers did not answer in time") from None
        self.signatures[kind, "signed"] += 1
        return signature

    async def sign_dss(self, secret: str, message: bytes) -> bytes:
        """A threshold DSS signature (DER) by the DSS secret ``secret`` of C (operator only)."""
        if self._dss_sign is None:
            raise BackendUnavailable("threshold DSS is not available on this server")
        return await self._counted("dss", 300, self._dss_sign(secret, message))

    async def sign_app_dss(self, group: str, app: str, uid: bytes, key: str, message: bytes) -> bytes:
        """A signature by key ``key`` of application ``app`` for its client ``uid`` (DER)."""
        if self._app_dss is None:
            raise BackendUnavailable("threshold DSS is not available on this server")
        return await self._counted("dss", 300, self._app_dss.sign_app_dss(group, app, uid, key, message))

    async def app_dss_public_key(self, group: str, app: str, key: str) -> bytes | None:
        if self._app_dss is None:
            raise BackendUnavailable("threshold DSS is not available on this server")
        try:
            return await self._app_dss.app_dss_public_key(group, app, key)
        except (SigningRefused, trio.TooSlowError) as exc:
            raise BackendUnavailable(str(exc)[:200] or "the key-holder did not answer") from None

    async def timestamp(self, query: bytes) -> bytes:
        if self._timestamp is None:
            raise BackendUnavailable("this server has no timestamping authority (no [tsa] section)")
        return await self._timestamp(query)

    async def dss_public_key(self, secret: str) -> bytes | None:
        if self._dss_key is None:
            raise BackendUnavailable("threshold DSS is not available on this server")
        try:
            return await self._dss_key(secret)
        except (SigningRefused, trio.TooSlowError) as exc:
            raise BackendUnavailable(str(exc)[:200] or "the key-holder did not answer") from None

    async def sign_upgrade(self) -> bytes:
        """[Scert(U), U] for the upgrade this server's operator approved (``pst upgrade sign``)."""
        if self._sign_upgrade is None:
            raise BackendUnavailable("this server cannot sign upgrades")
        try:
            certificate = await self._sign_upgrade()
        except SigningRefused as exc:
            self.signatures["upgrade", "unavailable"] += 1
            raise BackendUnavailable(str(exc)[:300]) from None
        except trio.TooSlowError:
            self.signatures["upgrade", "unavailable"] += 1
            raise BackendUnavailable(
                "no signature in time: fewer than t+1 servers' operators approved this upgrade?"
            ) from None
        self.signatures["upgrade", "signed"] += 1
        return certificate

    async def random(self, nonce: bytes) -> tuple[bytes, bytes]:
        if self._random is None:
            raise BackendUnavailable("joint randomness is not available on this server")
        try:
            return await self._random(nonce)
        except SigningRefused as exc:
            raise BackendUnavailable(str(exc)[:200]) from None
        except trio.TooSlowError:
            raise BackendUnavailable("not enough servers answered in time") from None

    def _node(self) -> DistributedNode:
        if self._distributed is None:
            raise BackendUnavailable("distributed applications are not available on this server")
        return self._distributed

    async def distributed_request(
        self, app: str, verifier: bytes, protocol: str, payload: bytes, timeout: float
    ) -> bytes:
        try:
            if protocol == "store":
                answer = await self._store_quorum(app, verifier, payload, timeout)
            else:
                answer = _checked(await self._node().request(app, verifier, protocol, payload, timeout))
        except BackendRefused:
            self.signatures["distributed", "refused"] += 1
            raise
        except BackendUnavailable:
            self.signatures["distributed", "unavailable"] += 1
            raise
        signature = answer.get("certificate" if protocol == "store" else "signature")
        if not isinstance(signature, bytes):
            self.signatures["distributed", "unavailable"] += 1
            raise BackendUnavailable("the node returned no signature or certificate")
        self.signatures["distributed", "signed"] += 1
        return signature

    async def _store_quorum(
        self, app: str, verifier: bytes, payload: bytes, timeout: float
    ) -> Mapping[str, Any]:
        """A store request's certificate. A refresh replaces the period's approvals (and the
        key-holder) under a waiting request, or the server holds no share for a moment: asked
        again in the new period while ``timeout`` lasts (the other clients see it again in
        their ``pending``). A refusal is final."""
        deadline = trio.current_time() + timeout
        while True:
            left = deadline - trio.current_time()
            try:
                return _checked(await self._node().request(app, verifier, "store", payload, max(left, 1.0)))
            except BackendUnavailable:
                if deadline - trio.current_time() < 1.0:
                    raise
            await trio.sleep(STORE_RETRY)

    async def distributed_pending(self, app: str, verifier: bytes) -> Sequence[Mapping[str, Any]]:
        requests = _checked(await self._node().pending(app, verifier)).get("requests")
        if not isinstance(requests, list):
            raise BackendUnavailable("the node returned no list of requests")
        return requests

    async def distributed_decide(self, app: str, verifier: bytes, request_id: bytes, approve: bool) -> None:
        _checked(await self._node().decide(app, verifier, request_id, approve))

    async def get_time(self) -> Mapping[int, float | None]:
        if self._time_vector is not None:
            vector = await self._time_vector()
            return {i: vector.get(i) for i in self.servers}
        now = self.clock()
        return {i: (now if i == self.server_id else None) for i in self.servers}

    async def status(self) -> Mapping[str, Any]:
        if self.status_file is None:
            return {"server": self.server_id}
        try:
            body = json.loads(await trio.Path(self.status_file).read_text())
        except (OSError, ValueError):
            raise BackendUnavailable("no status yet") from None
        if not isinstance(body, dict):
            raise BackendUnavailable("no status yet")
        return body


class LogAdapter:
    """The :class:`~appliance.api.LogBackend` of a :class:`~appliance.apps.log.service.LogService`."""

    def __init__(self, service: LogService) -> None:
        self.service = service

    @property
    def max_message_size(self) -> int:
        return self.service.max_message_size

    async def _call(self, call: Awaitable[Any]) -> Any:
        from appliance.apps.log.service import LogUnavailable

        try:
            return await call
        except LogUnavailable as exc:
            raise BackendUnavailable(str(exc)) from None

    async def log_append(self, client: str, messages: Sequence[bytes]) -> tuple[Sequence[int], int]:
        indices, size = await self._call(self.service.log_append(client, messages))
        return list(indices), int(size)

    async def log_size(self) -> Mapping[str, Any]:
        return dict(await self._call(self.service.log_size()))

    async def log_entries(self, start: int, count: int) -> Sequence[bytes]:
        return list(await self._call(self.service.log_entries(start, count)))

    async def log_audit(self) -> Mapping[str, Any]:
        return dict(await self._call(self.service.log_audit()))
