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

from starlette.types import Receive, Scope, Send

from appliance.apps.tsa.authority import Authority, Reply, rejection
from appliance.apps.tsa.issuing import AsyncSigner, OnRecord, local_signer, network_signer, respond
from appliance.apps.tsa.rfc3161 import FailureInfo, RequestError
from appliance.web._app import (
    RAW_SECURITY_HEADERS,
    BodyTooLarge,
    HttpError,
    RawPostRoute,
    header,
    read_raw_body,
)

log = logging.getLogger("pst.tsa")

QUERY_TYPE: Final = "application/timestamp-query"
REPLY_TYPE: Final = "application/timestamp-reply"
PATH: Final = "/tsa"

__all__ = ["QUERY_TYPE", "REPLY_TYPE", "local_signer", "network_signer", "timestamp_route"]

_REPLY_HEADERS: Final = [(b"content-type", REPLY_TYPE.encode()), *RAW_SECURITY_HEADERS]


def timestamp_route(
    authority: Authority,
    sign: AsyncSigner,
    *,
    on_record: OnRecord | None = None,
    path: str = PATH,
) -> RawPostRoute:
    """The route serving ``authority`` with ``sign``; see the module's docstring. Its POST is a
    raw ASGI handler (:class:`appliance.web._app.RawPostRoute`: no Starlette request objects)."""

    async def send_reply(send: Send, reply: Reply, status: int = 200) -> int:
        headers = [*_REPLY_HEADERS, (b"content-length", b"%d" % len(reply.body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        return status

    async def handler(scope: Scope, receive: Receive, send: Send) -> int:
        media = (header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if media != QUERY_TYPE.encode():
            raise HttpError(415, "unsupported-media-type", f"send {QUERY_TYPE}")
        try:
            data = await read_raw_body(scope, receive, authority.max_request)
        except BodyTooLarge:
            text = f"request larger than {authority.max_request} bytes"
            return await send_reply(send, rejection(RequestError(FailureInfo.BAD_REQUEST, text)), 413)
        if data is None:
            return 400  # the client went away: nothing to answer
        return await send_reply(send, await respond(authority, sign, data, on_record))

    return RawPostRoute(path, handler)
