"""RFC 3161 over HTTP (section 3.4 of the RFC): ``POST /tsa``, ``application/timestamp-query``
in, ``application/timestamp-reply`` out.

* A body of another media type: 415 (JSON error, like every other error of the service).
* A body larger than the authority's request cap: 413 with a ``TimeStampResp`` rejection
  (``badRequest``); the body is read no further than the cap.
* Every other request gets 200 and a ``TimeStampResp``: a token, or a rejection whose status
  string and failure bit say what was wrong (:mod:`appliance.apps.tsa.rfc3161`).

The signer is the caller's (an ``async`` callable taking the :class:`Prepared` token and
returning a DER ECDSA signature): a local key in "period-key" mode (:func:`local_signer`), the
network's threshold signers in "threshold" mode (the payload of
:mod:`appliance.apps.tsa.threshold`). A signer that raises :class:`SignerUnavailable` has its
text sent in the ``systemFailure`` reply (e.g. the presignature stock ran dry); any other
exception gets a generic text. Each token's record goes to
``on_record`` (the secure log's append) and the token is released only once that returned:
a token whose record could not be stored is answered with ``systemFailure``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import Authority, Prepared, Reply, TokenRecord, rejection
from appliance.apps.tsa.rfc3161 import FailureInfo, RequestError
from appliance.web._app import HttpError

log = logging.getLogger("pst.tsa")

QUERY_TYPE: Final = "application/timestamp-query"
REPLY_TYPE: Final = "application/timestamp-reply"
PATH: Final = "/tsa"

AsyncSigner = Callable[[Prepared], Awaitable[bytes]]


class SignerUnavailable(Exception):
    """The signer cannot sign now; its text (public, no secret) goes to the client."""


class StaleProposal(SignerUnavailable):
    """The token waited (for a presignature) until its genTime was no longer within the stated
    accuracy of our own clock: the route prepares it again (a new genTime and serial), once."""


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise _TooLarge
    return bytes(body)


def _reply(reply: Reply, status: int = 200) -> Response:
    return Response(reply.body, status, media_type=REPLY_TYPE)


def timestamp_route(
    authority: Authority,
    sign: AsyncSigner,
    *,
    on_record: Callable[[TokenRecord], Awaitable[None]] | None = None,
    path: str = PATH,
) -> Route:
    """The Starlette route serving ``authority`` with ``sign``; see the module's docstring."""

    async def endpoint(request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != QUERY_TYPE:
            raise HttpError(415, "unsupported-media-type", f"send {QUERY_TYPE}")
        try:
            data = await _read_body(request, authority.max_request)
        except _TooLarge:
            text = f"request larger than {authority.max_request} bytes"
            return _reply(rejection(RequestError(FailureInfo.BAD_REQUEST, text)), 413)
        except ClientDisconnect:
            return Response(b"", 400)
        prepared = authority.prepare(data)
        if isinstance(prepared, Reply):
            return _reply(prepared)
        try:
            try:
                signature = await sign(prepared)
            except StaleProposal as exc:
                log.info("tsa: %s; proposing a new genTime", exc)
                prepared = authority.prepare(data)
                if isinstance(prepared, Reply):
                    return _reply(prepared)
                signature = await sign(prepared)
        except SignerUnavailable as exc:
            log.warning("tsa: not signed: %s", exc)
            text = f"not signed: {str(exc)[:300]}"
            return _reply(rejection(RequestError(FailureInfo.SYSTEM_FAILURE, text)))
        except Exception as exc:  # the signer's failure is the authority's, told as systemFailure
            log.error("tsa: signing failed (%s)", type(exc).__name__)
            text = "signing failed; try again later"
            return _reply(rejection(RequestError(FailureInfo.SYSTEM_FAILURE, text)))
        reply = authority.finish(prepared, signature)
        if reply.record is None:
            log.error("tsa: a signature that does not verify was returned by the signer")
        elif on_record is not None:
            # A token leaves only once its record is in the secure log: a misdated token
            # cannot stay hidden. No record, no token.
            try:
                await on_record(reply.record)
            except Exception as exc:
                log.error("tsa: token %x not recorded, not released: %s", reply.record.serial, exc)
                text = "the token could not be recorded in the secure log; try again later"
                return _reply(rejection(RequestError(FailureInfo.SYSTEM_FAILURE, text)))
        return _reply(reply)

    return Route(path, endpoint, methods=["POST"])


def local_signer(sign: rfc3161.Signer) -> AsyncSigner:
    """An :data:`AsyncSigner` over a synchronous one (a local key: microseconds, no need to yield)."""

    async def signer(prepared: Prepared) -> bytes:
        return sign(prepared.to_sign)

    return signer


#: How long a token waits for the network's signature (the DSS service itself gives up after 5 s
#: without a presignature: protocols/dss_signing.py ``REQUEST_TIMEOUT``).
NETWORK_TIMEOUT: Final = 8.0


def network_signer(
    sign_dss: Callable[[bytes, float], Awaitable[bytes]], *, timeout: float = NETWORK_TIMEOUT
) -> AsyncSigner:
    """An :data:`AsyncSigner` for "threshold" mode: the network signs the token's payload
    (:func:`appliance.apps.tsa.threshold.encode_payload`) with ``sign_dss(payload, timeout)``.
    A refusal or a timeout becomes :class:`SignerUnavailable` with the reason (bounded by
    ``timeout``): no presignature in stock, too few servers, the signers' checks refused it."""
    import trio

    from appliance.apps.tsa.threshold import encode_payload
    from appliance.protocols.signing import SigningRefused

    async def signer(prepared: Prepared) -> bytes:
        payload = encode_payload(prepared.tst_info_der, prepared.chain.tsa_certificate)
        try:
            return await sign_dss(payload, timeout)
        except trio.TooSlowError:
            raise SignerUnavailable(
                f"the network did not sign within {timeout:g} s; try again later"
            ) from None
        except (SigningRefused, OSError) as exc:
            text = str(exc)
            if "now refuses the timestamp" in text and "genTime" in text:
                raise StaleProposal(text) from None
            raise SignerUnavailable(f"{text}; try again later") from None

    return signer
