"""RFC 3161 over HTTP (section 3.4 of the RFC): ``POST /tsa``, ``application/timestamp-query``
in, ``application/timestamp-reply`` out.

* A body of another media type: 415 (JSON error, like every other error of the service).
* A body larger than the authority's request cap: 413 with a ``TimeStampResp`` rejection
  (``badRequest``); the body is read no further than the cap.
* Every other request gets 200 and a ``TimeStampResp``: a token, or a rejection whose status
  string and failure bit say what was wrong (:mod:`appliance.apps.tsa.rfc3161`).

The signer is the caller's (an ``async`` callable returning a DER ECDSA signature): a local key
in "period-key" mode, the network's threshold signers later. Each token's record goes to
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
from appliance.apps.tsa.authority import Authority, Reply, TokenRecord, rejection
from appliance.apps.tsa.rfc3161 import FailureInfo, RequestError
from appliance.web._app import HttpError

log = logging.getLogger("pst.tsa")

QUERY_TYPE: Final = "application/timestamp-query"
REPLY_TYPE: Final = "application/timestamp-reply"
PATH: Final = "/tsa"

AsyncSigner = Callable[[bytes], Awaitable[bytes]]


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
            signature = await sign(prepared.to_sign)
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

    async def signer(data: bytes) -> bytes:
        return sign(data)

    return signer
