"""RFC 3161 over HTTP (section 3.4 of the RFC): ``POST /tsa``, ``application/timestamp-query``
in, ``application/timestamp-reply`` out.

* A body of another media type: 415 (JSON error, like every other error of the service).
* A body larger than the authority's request cap: 413 with a ``TimeStampResp`` rejection
  (``badRequest``); the body is read no further than the cap.
* Every other request gets 200 and a ``TimeStampResp``: a token, or a rejection whose status
  string and failure bit say what was wrong (:mod:`appliance.apps.tsa.rfc3161`).

Issuing itself (the signer, the record in the secure log before the token leaves) is
:func:`appliance.apps.tsa.issuing.respond`, shared with the local API's ``timestamp``.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.apps.tsa.authority import Authority, Reply, rejection
from appliance.apps.tsa.issuing import AsyncSigner, OnRecord, local_signer, network_signer, respond
from appliance.apps.tsa.rfc3161 import FailureInfo, RequestError
from appliance.web._app import BodyTooLarge, HttpError, read_body

log = logging.getLogger("pst.tsa")

QUERY_TYPE: Final = "application/timestamp-query"
REPLY_TYPE: Final = "application/timestamp-reply"
PATH: Final = "/tsa"

__all__ = ["QUERY_TYPE", "REPLY_TYPE", "local_signer", "network_signer", "timestamp_route"]


def _reply(reply: Reply, status: int = 200) -> Response:
    return Response(reply.body, status, media_type=REPLY_TYPE)


def timestamp_route(
    authority: Authority,
    sign: AsyncSigner,
    *,
    on_record: OnRecord | None = None,
    path: str = PATH,
) -> Route:
    """The Starlette route serving ``authority`` with ``sign``; see the module's docstring."""

    async def endpoint(request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != QUERY_TYPE:
            raise HttpError(415, "unsupported-media-type", f"send {QUERY_TYPE}")
        try:
            data = await read_body(request, authority.max_request)
        except BodyTooLarge:
            text = f"request larger than {authority.max_request} bytes"
            return _reply(rejection(RequestError(FailureInfo.BAD_REQUEST, text)), 413)
        except ClientDisconnect:
            return Response(b"", 400)
        return _reply(await respond(authority, sign, data, on_record))

    return Route(path, endpoint, methods=["POST"])
