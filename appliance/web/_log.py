"""The log's read side over HTTP, under ``/log/``: c2sp.org/tlog-tiles and a small JSON API.

Static resources (c2sp.org/tlog-tiles), what any tlog client reads:

* ``GET /log/checkpoint``: the latest signed checkpoint as stored, ``text/plain; charset=utf-8``,
  ``Cache-Control: no-cache`` (the spec: no caching beyond a few seconds);
* ``GET /log/tile/<L>/<N>[.p/<W>]`` and ``GET /log/tile/entries/<N>[.p/<W>]``:
  ``application/octet-stream``; a full tile or bundle is ``public, max-age=31536000, immutable``,
  a partial one ``public, max-age=60`` (the log may stop serving it once the full one exists);
  entry bundles are gzipped for a client that accepts it (the spec: SHOULD be compressed).
  Paths are parsed strictly (one spelling per resource, no percent-encoding); anything else,
  and anything the signed size does not cover, is a 404 (:class:`~appliance.apps.log.reader.LogReader`
  decides what is served).

Every answer under ``/log/`` has a strong ETag (:func:`etag`; ``If-None-Match`` gives 304) and
``Access-Control-Allow-Origin: *`` (it is all public, read-only data).

JSON (``/log/v1/...``), conveniences computed from the same files, checked against the signed
checkpoint before they are sent: ``inclusion``, ``consistency``, ``entries`` and ``search``
(see :func:`log_paths`, which goes into the OpenAPI document). A bad parameter is a 400, an
index or size beyond the latest signed checkpoint a 404, a store that does not match its
checkpoint a 503 (logged), all with the ``error_body`` shape of the rest of the service.

The work is done in a worker thread (file reads, hashing, decoding), never in the event loop.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.apps.log.errors import CorruptStoreError, LogDecodeError
from appliance.apps.log.reader import (
    MAX_ENTRIES,
    MAX_SCAN,
    MAX_SEARCH_RESULTS,
    LogReader,
    NotCoveredError,
    SearchQuery,
)
from appliance.web._app import HttpError

log = logging.getLogger("pst.web")

PREFIX: Final = "/log"
IMMUTABLE: Final = "public, max-age=31536000, immutable"
SHORT_LIVED: Final = "public, max-age=60"
CHECKPOINT_CACHE: Final = "no-cache"
MAX_INT: Final = (1 << 63) - 1
#: Everything under /log/ is public and read-only: any web page may read it (CORS).
CORS: Final = {"access-control-allow-origin": "*", "access-control-expose-headers": "etag"}


def etag(data: bytes, variant: str = "") -> str:
    """A strong ETag of a representation: SHA-256 of its bytes before any content coding, and
    the coding (``variant``), so that the gzipped and the plain one never share a tag."""
    return f'"{hashlib.sha256(data).hexdigest()[:32]}{variant}"'


def not_modified(request: Request, tag: str) -> bool:
    """Does the request's If-None-Match name ``tag`` (weak comparison, RFC 9110 §13.1.2)?"""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    if header.strip() == "*":
        return True
    wanted = tag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == wanted for t in header.split(","))


def _answer(request: Request, data: bytes, media_type: str, headers: dict[str, str], tag: str) -> Response:
    headers = {**headers, **CORS, "etag": tag}
    if not_modified(request, tag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


# --- Query parameters ------------------------------------------------------------------------------


class BadParameter(ValueError):
    """A query parameter that is unknown, repeated or not of its kind; the message names it."""


@dataclass(frozen=True)
class Int:
    """A decimal integer without sign or leading zeros, in ``[low, high]``."""

    low: int = 0
    high: int = MAX_INT

    def parse(self, key: str, value: str) -> int:
        if not (re.fullmatch(r"0|[1-9][0-9]{0,18}", value) and self.low <= int(value) <= self.high):
            raise BadParameter(f"query parameter {key!r} must be an integer in {self.low}..{self.high}")
        return int(value)


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_UNIX = re.compile(r"(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,6}))?")


@dataclass(frozen=True)
class Time:
    """A time, as microseconds since the epoch: Unix seconds (``1764500000.25``) or RFC 3339."""

    def parse(self, key: str, value: str) -> int:
        unix = _UNIX.fullmatch(value)
        if unix:
            return int(unix[1]) * 1_000_000 + int((unix[2] or "").ljust(6, "0"))
        m = _RFC3339.fullmatch(value)
        if m:
            year, month, day, hour, minute, second = (int(m[i]) for i in range(1, 7))
            offset = 0 if m[8] else (1 if m[9] == "+" else -1) * (int(m[10]) * 60 + int(m[11]))
            if (
                year >= 1970
                and 1 <= month <= 12
                and 1 <= day <= calendar.monthrange(year, month)[1]
                and hour < 24
                and minute < 60
                and second < 60
                and int(m[10] or 0) < 24
                and int(m[11] or 0) < 60
            ):
                seconds = calendar.timegm((year, month, day, hour, minute, second)) - offset * 60
                if seconds >= 0:
                    return seconds * 1_000_000 + int((m[7] or "").ljust(6, "0"))
        raise BadParameter(
            f"query parameter {key!r} must be Unix seconds (up to 6 decimals) or an RFC 3339 time "
            "from 1970 (2026-11-30T12:00:00Z)"
        )


@dataclass(frozen=True)
class Name:
    """Printable US-ASCII without space, 1 to ``limit`` characters (a syslog HOSTNAME or APP-NAME)."""

    limit: int

    def parse(self, key: str, value: str) -> str:
        if not (1 <= len(value) <= self.limit and all("!" <= c <= "~" for c in value)):
            raise BadParameter(
                f"query parameter {key!r} must be 1 to {self.limit} printable ASCII characters"
            )
        return value


Param = Int | Time | Name


def parse_query(items: Sequence[tuple[str, str]], spec: Mapping[str, Param]) -> dict[str, int | str]:
    """The query parameters ``items`` read by ``spec``: each known, at most once, of its kind."""
    out: dict[str, int | str] = {}
    for key, value in items:
        kind = spec.get(key)
        if kind is None:
            known = ", ".join(sorted(spec)) or "none"
            raise BadParameter(f"unknown query parameter {key[:40]!r} (known: {known})")
        if key in out:
            raise BadParameter(f"query parameter {key!r} given twice")
        out[key] = kind.parse(key, value)
    return out


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header accepts gzip (by name or ``*``, with a q-value above 0)."""
    for item in header.split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        key, _, q = params.strip().partition("=")
        if not params.strip():
            return True
        if key.strip().lower() == "q":
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


def _query(request: Request, spec: Mapping[str, Param]) -> dict[str, Any]:
    try:
        return parse_query(request.query_params.multi_items(), spec)
    except BadParameter as exc:
        raise HttpError(400, "bad-request", str(exc)) from None


# --- Routes ------------------------------------------------------------------------------------------


class LogRoutes:
    """The ``/log/`` routes over one read-only log view."""

    def __init__(self, reader: LogReader) -> None:
        self.reader = reader

    def routes(self) -> list[Route]:
        get = ["GET", "HEAD"]
        return [
            Route(f"{PREFIX}/checkpoint", self.checkpoint, methods=get),
            Route(PREFIX + "/tile/{rest:path}", self.tile, methods=get),
            Route(f"{PREFIX}/v1/inclusion", self.inclusion, methods=get),
            Route(f"{PREFIX}/v1/consistency", self.consistency, methods=get),
            Route(f"{PREFIX}/v1/entries", self.entries, methods=get),
            Route(f"{PREFIX}/v1/search", self.search, methods=get),
        ]

    async def _call(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` in a worker thread; the log's errors become HTTP errors."""
        try:
            return await run_in_threadpool(work)
        except NotCoveredError as exc:
            raise HttpError(404, "not-found", str(exc)) from None
        except (CorruptStoreError, LogDecodeError) as exc:
            # Our own files: a checkpoint that does not verify, a damaged tile or bundle.
            log.error("log: the stored log cannot be served: %s", exc)
            raise HttpError(
                503, "log-unavailable", "the stored log is damaged (logged by the server)"
            ) from None
        except ValueError as exc:
            raise HttpError(400, "bad-request", str(exc)) from None

    async def checkpoint(self, request: Request) -> Response:
        _query(request, {})
        signed = await self._call(self.reader.latest)
        if signed is None:
            raise HttpError(404, "not-found", "the log has no signed checkpoint yet")
        note = signed.note
        return _answer(
            request, note, "text/plain; charset=utf-8", {"cache-control": CHECKPOINT_CACHE}, etag(note)
        )

    async def tile(self, request: Request) -> Response:
        _query(request, {})
        raw = request.scope.get("raw_path") or b""
        if b"%" in raw:  # one spelling per resource: no percent-encoded path
            raise HttpError(404, "not-found", "no such path")
        path = "tile/" + request.path_params["rest"]
        found = await self._call(lambda: self.reader.resource(path))
        if found is None:
            raise HttpError(404, "not-found", "no such tile or entry bundle in the latest signed tree")
        data, full = found
        headers = {"cache-control": IMMUTABLE if full else SHORT_LIVED}
        tag = etag(data)
        if path.startswith("tile/entries/"):
            headers["vary"] = "accept-encoding"
            if accepts_gzip(request.headers.get("accept-encoding", "")):
                tag = etag(data, "-gzip")
                if not_modified(request, tag):
                    return Response(status_code=304, headers={**headers, **CORS, "etag": tag})
                data = await run_in_threadpool(lambda: gzip.compress(data, compresslevel=6, mtime=0))
                headers["content-encoding"] = "gzip"
        return _answer(request, data, "application/octet-stream", headers, tag)

    async def inclusion(self, request: Request) -> Response:
        q = _query(request, {"index": Int(), "size": Int(1)})
        if "index" not in q:
            raise HttpError(400, "bad-request", "query parameter 'index' is required")
        return _json(await self._call(lambda: self.reader.inclusion(q["index"], q.get("size"))))

    async def consistency(self, request: Request) -> Response:
        q = _query(request, {"old": Int(), "new": Int()})
        if "old" not in q:
            raise HttpError(400, "bad-request", "query parameter 'old' is required")
        return _json(await self._call(lambda: self.reader.consistency(q["old"], q.get("new"))))

    async def entries(self, request: Request) -> Response:
        q = _query(request, {"start": Int(), "end": Int()})
        if "start" not in q:
            raise HttpError(400, "bad-request", "query parameter 'start' is required")
        return _json(await self._call(lambda: self.reader.entries(q["start"], q.get("end"))))

    async def search(self, request: Request) -> Response:
        q = _query(
            request,
            {
                "since": Time(),
                "until": Time(),
                "host": Name(255),
                "app": Name(48),
                "limit": Int(1, MAX_SEARCH_RESULTS),
                "before": Int(),
            },
        )
        query = SearchQuery(
            since=q.get("since"),
            until=q.get("until"),
            host=q.get("host"),
            app=q.get("app"),
            limit=q.get("limit", 100),
            before=q.get("before"),
        )
        return _json(await self._call(lambda: self.reader.search(query)))


def _json(body: Any) -> Response:
    return JSONResponse(body, headers={"cache-control": "no-store", **CORS})


# --- OpenAPI -----------------------------------------------------------------------------------------


def log_paths(answer: Callable[..., dict[str, Any]], errors: dict[str, Any]) -> dict[str, Any]:
    """The ``/log/`` paths of the OpenAPI document (``answer`` and ``errors`` are openapi()'s)."""

    def integer(name: str, description: str, *, required: bool = False, low: int = 0) -> dict[str, Any]:
        schema = {"type": "integer", "minimum": low, "maximum": MAX_INT}
        return {
            "name": name,
            "in": "query",
            "required": required,
            "description": description,
            "schema": schema,
        }

    def text(name: str, description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "description": description, "schema": {"type": "string"}}

    def binary(description: str, cache: str) -> dict[str, Any]:
        return {
            "description": f"{description} (Cache-Control: {cache})",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }

    unavailable = {"503": answer("the stored log does not match its signed checkpoint (logged)")}

    def get(summary: str, params: list[dict[str, Any]], ok: dict[str, Any]) -> dict[str, Any]:
        return {
            "get": {"summary": summary, "parameters": params, "responses": {"200": ok} | errors | unavailable}
        }

    tile_params = [
        {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    return {
        "/log/checkpoint": get(
            "The latest signed checkpoint (c2sp.org/tlog-checkpoint as a c2sp.org/signed-note)",
            [],
            {
                "description": f"the note (Cache-Control: {CHECKPOINT_CACHE}); 404 before the first",
                "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}},
            },
        ),
        "/log/tile/{path}": get(
            "A Merkle tile tile/<L>/<N>[.p/<W>] or an entry bundle tile/entries/<N>[.p/<W>] "
            "(c2sp.org/tlog-tiles), if the latest signed tree has it",
            tile_params,
            binary("the tile or bundle; full ones immutable, partial ones short-lived", IMMUTABLE),
        ),
        "/log/v1/inclusion": get(
            "The audit path of an entry in a tree the latest checkpoint covers, and the entry",
            [
                integer("index", "the entry's index", required=True),
                integer("size", "the tree size (default: the latest checkpoint's)", low=1),
            ],
            answer("index, size, root, leaf_hash, proof (base64 hashes), entry"),
        ),
        "/log/v1/consistency": get(
            "The consistency proof between two tree sizes (RFC 9162 §2.1.4)",
            [
                integer("old", "the older tree size", required=True),
                integer("new", "the newer tree size (default: the latest checkpoint's)"),
            ],
            answer("old, new, old_root, new_root, proof (base64 hashes)"),
        ),
        "/log/v1/entries": get(
            f"Entries [start, end), at most {MAX_ENTRIES}, decoded",
            [
                integer("start", "the first index", required=True),
                integer("end", f"one past the last (default: start + {MAX_ENTRIES}, within the tree)"),
            ],
            answer("size, start, end, entries"),
        ),
        "/log/v1/search": get(
            f"Entries by receive time, hostname and app-name, newest first: a backward scan of at "
            f"most {MAX_SCAN} entries per request; continue from next_before",
            [
                text("since", "received at or after: Unix seconds or RFC 3339"),
                text("until", "received before: Unix seconds or RFC 3339"),
                text("host", "the syslog HOSTNAME, exactly"),
                text("app", "the syslog APP-NAME (RFC 3164: the tag), exactly"),
                integer("limit", f"most entries returned (default 100, at most {MAX_SEARCH_RESULTS})", low=1),
                integer("before", "scan entries below this index (default: the latest checkpoint's size)"),
            ],
            answer("size, scanned [from, to), next_before, entries"),
        ),
    }
