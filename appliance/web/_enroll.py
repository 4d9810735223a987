"""Applications' period certificates over HTTP (issue 13 §1): ``GET /ca/enroll/challenge`` and
``POST /ca/enroll``, with an enrollment credential (see :mod:`appliance.api._enroll` for the
design and why renewal by the previous period's key is not offered).

Answers (every error a JSON ``{"error": {"status", "code", "message"}}``):

* ``GET /ca/enroll/challenge``: 200 ``{"server": i, "challenge": base64, "expires_in": 60}``.
* ``POST /ca/enroll`` (``application/json``, at most 64 KiB): 200 ``{"certificate", "bundle"
  (PEM), "not_before", "not_after", "renew_after" (Unix seconds), "serial" (hex), "key" (PEM,
  when the server made it)}``; 415 another media type; 413 too large; 400 a malformed body or
  CSR; 404 an application without a profile or without ``enroll_ca``; 403 an unknown, used or
  expired challenge, a credential that is not the application's, a signature that does not
  verify, names outside the profile, a refusal by the signers, or a server-made key asked for
  over plain HTTP from another machine (the key would travel in the clear); 429 the
  application's rate limit (``Retry-After``); 503 the network cannot sign now.
"""

from __future__ import annotations

import base64
import datetime
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.api import BackendRefused, BackendUnavailable, CertificateBackend, _certs
from appliance.api._core import TokenBucket
from appliance.api._enroll import (
    CHALLENGE_LIFETIME,
    MAX_BODY,
    Challenges,
    EnrollCA,
    EnrollError,
    EnrollRequest,
    decode_request,
    verify_signature,
)
from appliance.host.config import is_loopback
from appliance.web._app import BodyTooLarge, HttpError, read_body

log = logging.getLogger("pst.ca")

CHALLENGE_PATH: Final = "/ca/enroll/challenge"
ENROLL_PATH: Final = "/ca/enroll"
#: Each application's certificates over HTTP: 50 per second, bursts of 100 (as the local API's).
RATE: Final = 50.0
BURST: Final = 100.0


def _error(exc: EnrollError) -> HttpError:
    return HttpError(exc.status, exc.code, exc.message)


class EnrollService:
    """One server's enrollment endpoint over its :class:`~appliance.api.CertificateBackend`."""

    def __init__(
        self,
        server_id: int,
        cas: Mapping[str, EnrollCA],
        certificates: CertificateBackend,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.server_id = server_id
        self.cas = dict(cas)
        self.certificates = certificates
        self.clock = clock
        self.wall = wall
        self.challenges = Challenges(clock)
        self._buckets: dict[str, TokenBucket] = {}
        #: Certificates issued over HTTP, and requests refused (any 4xx).
        self.issued = 0
        self.refused = 0

    def routes(self) -> list[Route]:
        return [
            Route(CHALLENGE_PATH, self.challenge, methods=["GET"]),
            Route(ENROLL_PATH, self.enroll, methods=["POST"]),
        ]

    async def challenge(self, request: Request) -> Response:
        if request.query_params:
            raise HttpError(400, "bad-request", "no query parameters here")
        source = request.client.host if request.client is not None else "?"
        challenge, _ = self.challenges.issue(source)
        body = {
            "server": self.server_id,
            "challenge": base64.b64encode(challenge).decode(),
            "expires_in": int(CHALLENGE_LIFETIME),
        }
        return JSONResponse(body)

    async def enroll(self, request: Request) -> Response:
        try:
            return await self._enroll(request)
        except HttpError as exc:
            if exc.status < 500:
                self.refused += 1
            raise

    async def _enroll(self, request: Request) -> Response:
        if request.query_params:
            raise HttpError(400, "bad-request", "no query parameters here")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise HttpError(415, "unsupported-media-type", "send application/json")
        try:
            body = await read_body(request, MAX_BODY)
        except BodyTooLarge:
            raise HttpError(413, "too-large", f"request body larger than {MAX_BODY} bytes") from None
        except ClientDisconnect:
            raise HttpError(400, "bad-request", "the client went away") from None
        try:
            req = decode_request(body)
        except EnrollError as exc:
            raise _error(exc) from None
        source = request.client.host if request.client is not None else "?"
        plain_remote = request.url.scheme != "https" and not is_loopback(source)
        if req.csr is None and plain_remote:
            raise HttpError(
                403,
                "forbidden",
                "a key made by the server is sent only over HTTPS or to this machine: send a CSR",
            )
        return JSONResponse(await self.issue(req, source))

    async def issue(self, req: EnrollRequest, source: str) -> dict[str, Any]:
        """Check ``req`` and have its certificate issued; :class:`HttpError` otherwise."""
        ca = self.cas.get(req.app)
        profile = self.certificates.app_names(req.app)
        if ca is None or profile is None:
            raise HttpError(
                404,
                "no-enrollment",
                f"application {req.app!r} cannot enroll here: the operator gives it "
                f"[ca.apps.{req.app}] names and enroll_ca",
            )
        # The challenge is spent first: a request that fails any check below used it up.
        if not self.challenges.take(req.challenge):
            raise HttpError(
                403, "forbidden", f"unknown, used or expired challenge: GET {CHALLENGE_PATH} for a new one"
            )
        now = datetime.datetime.fromtimestamp(self.wall(), datetime.UTC)
        try:
            enrollee = ca.check(req.credential, now=now)
        except EnrollError as exc:
            log.warning("ca: enrollment for %r from %s refused: %s", req.app, source, exc.message)
            raise _error(exc) from None
        if not verify_signature(enrollee, req.payload(self.server_id), req.signature):
            log.warning("ca: enrollment for %r from %s: a signature that does not verify", req.app, source)
            raise HttpError(
                403, "forbidden", "the signature does not verify with the credential's key over this request"
            )
        try:
            names = _certs.choose_names(req.app, req.names, profile)
        except _certs.NamesRefused as exc:
            if exc.outside:
                log.warning("ca: enrollment for %r refused names %s", req.app, exc.outside[:4])
                raise HttpError(403, "not-permitted", str(exc)) from None
            raise HttpError(400, "bad-request", f"field 'names': {exc}") from None
        bucket = self._buckets.get(req.app)
        if bucket is None:
            bucket = self._buckets[req.app] = TokenBucket.full(RATE, BURST, self.clock())
        if not bucket.take(self.clock()):
            wait = bucket.wait() or 1.0
            raise HttpError(
                429,
                "rate-limited",
                f"certificates of {req.app!r} over HTTP: at most {RATE:g} per second",
                {"retry-after": str(max(1, math.ceil(wait)))},
            )
        key_pem: bytes | None = None
        if req.csr is not None:
            try:
                spki = _certs.spki_of(_certs.csr_public_key(req.csr))
            except _certs.CsrError as exc:
                raise HttpError(400, "bad-request", f"field 'csr': {exc}") from None
        else:
            spki, key_pem = _certs.generate_key()
        try:
            leaf, root = await self.certificates.issue_certificate(enrollee.describe(), req.app, spki, names)
        except BackendRefused as exc:
            raise HttpError(403, "not-permitted", str(exc)[:500]) from None
        except BackendUnavailable as exc:
            raise HttpError(503, "unavailable", f"no certificate now: {str(exc)[:300]}") from None
        result = _certs.certificate_answer(leaf, root, self.certificates.next_period(), key_pem)
        self.issued += 1
        log.info(
            "ca: period certificate of %r over HTTP for %s (%s), serial %x",
            req.app,
            enrollee.describe(),
            source,
            result["serial"],
        )
        out: dict[str, Any] = {
            key: value.decode("ascii") if isinstance(value, bytes) else value for key, value in result.items()
        }
        out["serial"] = f"{result['serial']:x}"
        return out
