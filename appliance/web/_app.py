"""The ASGI application: the status page, ``/v1/...`` (JSON), ``/metrics``; read-only.

Every answer that is not a success is a JSON object ``{"error": {"status": int, "code": str,
"message": str}}`` with a 4xx or 5xx status: unknown path (404 ``not-found``), method other
than GET or HEAD (405 ``method-not-allowed``), unknown or bad query parameter (400
``bad-request``), a Host header this server does not answer to (421 ``misdirected``), and
anything unexpected (500 ``internal``, logged by exception type; the client learns nothing
more). The outermost layer (:class:`_Guard`) catches every exception of the handlers, so no
request can stop the service. Request bodies are never read, except by the timestamping
authority's ``POST /tsa`` when it is served (:mod:`appliance.web._tsa`, capped) and the
enrollment endpoint's ``POST /ca/enroll`` (:mod:`appliance.web._enroll`, capped).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.host.config import is_loopback
from appliance.web._metrics import CONTENT_TYPE, Metrics
from appliance.web._page import INDEX_HTML, PAGE_CSS, PAGE_JS
from appliance.web._view import API_NAME, MAX_TIMELINE, STATES, LocalView, PeerPoller, network_document

if TYPE_CHECKING:
    from appliance.apps.log.reader import LogReader

log = logging.getLogger("pst.web")

SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
#: Longest path and query string answered with anything but 414.
MAX_TARGET: Final = 2048


class BodyTooLarge(Exception):
    """A request body over the route's cap (declared or streamed)."""


async def read_body(request: Request, cap: int) -> bytes:
    """:func:`read_raw_body` of a Starlette request; ClientDisconnect if the client went away."""
    body = await read_raw_body(request.scope, request.receive, cap)
    if body is None:
        raise ClientDisconnect
    return body


async def read_raw_body(scope: Scope, receive: Receive, cap: int) -> bytes | None:
    """The request's body, at most ``cap`` bytes: refused as soon as a Content-Length or the
    stream itself says more (BodyTooLarge), never read whole first; None if the client went
    away first."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > cap:
                raise BodyTooLarge
            break
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        body += bytes(message.get("body", b""))
        if len(body) > cap:
            raise BodyTooLarge
        if not message.get("more_body", False):
            return body


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of the request header ``name`` (lower case, as ASGI gives names)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


#: The security headers as ASGI gives them, for a raw handler's answer.
RAW_SECURITY_HEADERS: Final = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

#: A :class:`RawPostRoute`'s handler: serves one ASGI request and returns the status it sent.
RawHandler = Callable[[Scope, Receive, Send], Awaitable[int]]


class RawPostRoute(Route):
    """A POST route whose handler is an ASGI callable: :class:`_Guard` calls it directly, with
    the same checks before it (target length, Host) and counting after, but without
    Starlette's routing, middleware and request objects (about a quarter of the CPU of a small
    POST under hypercorn: ``POST /tsa``, docs/performance.md). The handler sends the security
    headers itself and may raise :class:`HttpError` before it has started its answer. Other
    methods on the path go through Starlette (405 with ``Allow: POST``)."""

    def __init__(self, path: str, handler: RawHandler) -> None:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await handler(scope, receive, send)

        super().__init__(path, app, methods=["POST"])
        self.handler = handler


class HttpError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


def error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": {"status": status, "code": code, "message": message}}).encode()


def _params(request: Request, allowed: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Integer query parameters within bounds; anything else is a 400 that names it."""
    out: dict[str, int] = {}
    for key, value in request.query_params.multi_items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise HttpError(400, "bad-request", f"unknown query parameter {key[:40]!r} (known: {known})")
        if key in out:
            raise HttpError(400, "bad-request", f"query parameter {key!r} given twice")
        low, high = allowed[key]
        if not (value.isascii() and value.isdigit() and len(value) <= 9 and low <= int(value) <= high):
            raise HttpError(
                400, "bad-request", f"query parameter {key!r} must be an integer in {low}..{high}"
            )
        out[key] = int(value)
    return out


def _json(body: Any, status: int = 200) -> Response:
    return JSONResponse(body, status_code=status)


def openapi(*, log: bool = False, enroll: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the JSON API (``/v1/openapi.json``), with ``/log/`` and the
    enrollment endpoint (:mod:`appliance.web._enroll`) if served."""
    error = {"$ref": "#/components/schemas/Error"}

    def answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        content = {"application/json": {"schema": schema or {"type": "object"}}}
        return {"description": description, "content": content}

    errors = {
        "400": answer("a bad query parameter", error),
        "404": answer("no such path", error),
        "405": answer("only GET and HEAD", error),
        "421": answer("a Host this server does not answer to", error),
        "500": answer("an internal error (logged by the server)", error),
    }
    log_paths: dict[str, Any] = {}
    if log:
        from appliance.web._log import log_paths as make_log_paths

        log_paths = make_log_paths(answer, errors)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pst: PServer status API",
            "version": "1",
            "description": "Read-only, public data of one PServer and of the network as it sees it. "
            "No secret is ever served.",
        },
        "paths": {
            "/v1/status": {
                "get": {
                    "summary": "This server: state, period, KeyTable, refreshes, peers' connections, alerts",
                    "responses": {
                        "200": answer("this server's status", {"$ref": "#/components/schemas/Status"})
                    }
                    | errors,
                }
            },
            "/v1/network": {
                "get": {
                    "summary": "Every server as this one sees it (what the status page shows)",
                    "responses": {"200": answer("the network")} | errors,
                }
            },
            "/v1/refreshes": {
                "get": {
                    "summary": "This server's recent refreshes, oldest first",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TIMELINE},
                        }
                    ],
                    "responses": {"200": answer("refresh records")} | errors,
                }
            },
            "/v1/alerts": {
                "get": {
                    "summary": "The alerts this server raised: counts by kind and the newest",
                    "responses": {"200": answer("alerts")} | errors,
                }
            },
            "/v1/health": {
                "get": {
                    "summary": "200 if this server is operational with a fresh status, else 503",
                    "responses": {
                        "200": answer("operational", {"$ref": "#/components/schemas/Health"}),
                        "503": answer(
                            "not operational (recovering, stale)", {"$ref": "#/components/schemas/Health"}
                        ),
                    }
                    | errors,
                }
            },
            "/v1/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": answer("OpenAPI")}}
            },
        }
        | log_paths
        | (_enroll_paths(answer, error) if enroll else {}),
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["status", "code", "message"],
                            "properties": {
                                "status": {"type": "integer"},
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["server", "healthy", "state", "reason"],
                    "properties": {
                        "server": {"type": "integer"},
                        "healthy": {"type": "boolean"},
                        "state": {"enum": list(STATES)},
                        "reason": {"type": "string"},
                        "period": {"type": ["integer", "null"]},
                    },
                },
                "Status": {
                    "type": "object",
                    "required": ["api", "server", "now", "state", "reason", "status", "peers", "alerts"],
                    "properties": {
                        "api": {"const": API_NAME},
                        "server": {"type": "integer"},
                        "now": {"type": "number", "description": "this server's clock (Unix time)"},
                        "state": {"enum": list(STATES)},
                        "reason": {"type": "string"},
                        "status": {"type": ["object", "null"], "description": "from status.json"},
                        "peers": {"type": ["object", "null"], "description": "connections, by peer id"},
                        "alerts": {"type": "object"},
                        "keyholder": {"type": "object"},
                        "clock": {"type": "object"},
                        "constants": {"type": "object"},
                        "log": {
                            "type": ["object", "null"],
                            "description": "this server's log (null without [log]): state, error, origin, "
                            "size, entries_per_second, appended, api_appended, queued, append_failures, "
                            "listening (transport -> address), ingest (counters)",
                        },
                    },
                },
            }
        },
    }


def _enroll_paths(answer: Callable[..., dict[str, Any]], error: dict[str, Any]) -> dict[str, Any]:
    """``GET /ca/enroll/challenge`` and ``POST /ca/enroll`` (docs/ca.md, "Over HTTP")."""
    refusals = {
        str(status): answer(text, error)
        for status, text in (
            (400, "a malformed body, field or CSR"),
            (403, "a bad challenge, credential or signature; names outside the profile"),
            (404, "the application cannot enroll here (no profile or no enroll_ca)"),
            (413, "a body over 64 KiB"),
            (415, "not application/json"),
            (429, "the application's rate limit (Retry-After)"),
            (503, "the network cannot sign now"),
        )
    }
    text = {"type": "string"}
    return {
        "/ca/enroll/challenge": {
            "get": {
                "summary": "A one-time challenge for POST /ca/enroll (this server, 60 s)",
                "responses": {"200": answer("server, challenge (base64), expires_in")},
            }
        },
        "/ca/enroll": {
            "post": {
                "summary": "An application's period certificate for an enrollment credential",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["app", "challenge", "credential", "signature"],
                                "additionalProperties": False,
                                "properties": {
                                    "app": text,
                                    "challenge": text,
                                    "credential": text,
                                    "signature": text,
                                    "csr": text,
                                    "names": {"type": "array", "items": text},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": answer("certificate, bundle, not_before, not_after, renew_after, serial, key")
                }
                | refusals,
            }
        },
    }


Handler = Callable[[Request], Awaitable[Response]]


class WebApp:
    """The routes over one server's views; :attr:`asgi` is what hypercorn serves."""

    def __init__(
        self,
        local: LocalView,
        poller: PeerPoller | None,
        metrics: Metrics,
        *,
        watched: Callable[[], Awaitable[None]] | None = None,
        hosts: tuple[str, ...] = (),
        loopback_only: bool = True,
        log: LogReader | None = None,
        tsa: Route | None = None,
        ca_root: Callable[[bool], Awaitable[bytes | None]] | None = None,
        enroll: Sequence[Route] = (),
    ) -> None:
        """``watched``: awaited before answering what shows the peers' polls (``/v1/network``,
        ``/metrics``): the pollers run only while someone looks (appliance.web._serve).
        ``log``: the log's read-only view, served under ``/log/`` (none: those paths are 404s).
        ``enroll``: the enrollment routes of applications' period certificates
        (:class:`appliance.web._enroll.EnrollService`).
        ``tsa``: the timestamping authority's POST route (:func:`appliance.web._tsa.timestamp_route`).
        ``ca_root``: the group root certificate's PEM (argument: only if already stored), served
        as ``/ca/root.pem`` (none: a 404)."""
        self.ca_root = ca_root
        self.local = local
        self.poller = poller
        self.metrics = metrics
        self.watched = watched
        self.hosts = frozenset(h.lower() for h in hosts)
        self.loopback_only = loopback_only
        self._openapi = json.dumps(openapi(log=log is not None, enroll=bool(enroll))).encode()
        routes = [
            Route("/", self.index, methods=["GET", "HEAD"]),
            Route("/static/page.js", self.script, methods=["GET", "HEAD"]),
            Route("/static/page.css", self.style, methods=["GET", "HEAD"]),
            Route("/v1/status", self.status, methods=["GET", "HEAD"]),
            Route("/v1/network", self.network, methods=["GET", "HEAD"]),
            Route("/v1/refreshes", self.refreshes, methods=["GET", "HEAD"]),
            Route("/v1/alerts", self.alerts, methods=["GET", "HEAD"]),
            Route("/v1/health", self.health, methods=["GET", "HEAD"]),
            Route("/v1/openapi.json", self.openapi, methods=["GET", "HEAD"]),
            Route("/metrics", self.prometheus, methods=["GET", "HEAD"]),
            Route("/ca/root.pem", self.ca_root_pem, methods=["GET", "HEAD"]),
        ]
        if log is not None:
            from appliance.web._log import LogRoutes

            routes += LogRoutes(log).routes()
        if tsa is not None:
            routes.append(tsa)
        routes += enroll
        post_paths = frozenset(r.path for r in routes if r.methods is not None and "POST" in r.methods)
        #: POST handlers called before Starlette's routing (RawPostRoute), by path.
        self.raw_posts = {r.path: r.handler for r in routes if isinstance(r, RawPostRoute)}
        self.routes = frozenset(r.path for r in routes)
        #: Routes with a path parameter, by the fixed prefix before it (a metrics label each).
        self.templates = tuple((r.path.split("{")[0], r.path) for r in routes if "{" in r.path)

        async def http_error(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 500)
            code = {404: "not-found", 405: "method-not-allowed"}.get(status, "bad-request")
            allow = "POST" if request.url.path in post_paths else "GET, HEAD"
            detail = {404: "no such path", 405: f"only {allow} served here"}.get(status, "bad request")
            headers = {"allow": allow} if status == 405 else None
            return Response(error_body(status, code, detail), status, headers, media_type="application/json")

        async def own_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HttpError)
            body = error_body(exc.status, exc.code, exc.message)
            return Response(body, exc.status, exc.headers, media_type="application/json")

        async def internal_error(request: Request, exc: Exception) -> Response:
            body = error_body(500, "internal", "internal error (logged by the server)")
            return Response(body, 500, media_type="application/json")

        self.starlette = Starlette(
            routes=routes,
            exception_handlers={HTTPException: http_error, HttpError: own_error, Exception: internal_error},
        )
        self.starlette.router.redirect_slashes = False  # /v1/status/ is a 404, not a redirect
        self.asgi: ASGIApp = _Guard(self.starlette, self)

    # -- routes -------------------------------------------------------------------------------

    async def ca_root_pem(self, request: Request) -> Response:
        """The group root certificate (PEM); ``?stored=1``: only if this server already has it."""
        stored = _params(request, {"stored": (0, 1)}).get("stored", 0) == 1
        if self.ca_root is None:
            raise HttpError(404, "not-found", "this network has no certificate authority key 'ca'")
        try:
            pem = await self.ca_root(stored)
        except Exception as exc:  # the key-holder refused or timed out: say so, keep serving
            log.warning("web: /ca/root.pem: %s", exc)
            raise HttpError(503, "unavailable", "the group root certificate could not be had now") from None
        if pem is None:
            raise HttpError(404, "not-found", "this server has no group root certificate yet")
        return Response(pem, media_type="application/x-pem-file")

    async def index(self, request: Request) -> Response:
        _params(request, {})
        return Response(INDEX_HTML, media_type="text/html; charset=utf-8")

    async def script(self, request: Request) -> Response:
        _params(request, {})
        return Response(PAGE_JS, media_type="text/javascript; charset=utf-8")

    async def style(self, request: Request) -> Response:
        _params(request, {})
        return Response(PAGE_CSS, media_type="text/css; charset=utf-8")

    async def status(self, request: Request) -> Response:
        _params(request, {})
        return _json(self.local.document())

    async def network(self, request: Request) -> Response:
        _params(request, {})
        await self._watched()
        return _json(network_document(self.local, self.poller))

    async def refreshes(self, request: Request) -> Response:
        limit = _params(request, {"limit": (1, MAX_TIMELINE)}).get("limit", MAX_TIMELINE)
        recent = (self.local.status or {}).get("recent_refreshes", [])
        return _json({"server": self.local.sources.server_id, "refreshes": recent[-limit:]})

    async def alerts(self, request: Request) -> Response:
        _params(request, {})
        return _json({"server": self.local.sources.server_id, **self.local.alerts.summary()})

    async def health(self, request: Request) -> Response:
        _params(request, {})
        healthy, body = self.local.health()
        return _json(body, 200 if healthy else 503)

    async def openapi(self, request: Request) -> Response:
        _params(request, {})
        return Response(self._openapi, media_type="application/json")

    async def prometheus(self, request: Request) -> Response:
        _params(request, {})
        await self._watched()
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _watched(self) -> None:
        if self.watched is not None:
            await self.watched()

    # -- checks done before routing -----------------------------------------------------------

    def route_of(self, path: str) -> str:
        """The route template that serves ``path`` (a label from a fixed set), or ``other``."""
        if path in self.routes:
            return path
        for prefix, template in self.templates:
            if path.startswith(prefix):
                return template
        return "other"

    def check_host(self, host: str | None) -> None:
        """Refuse Host headers this server does not answer to (DNS rebinding on loopback)."""
        if host is None:
            return  # HTTP/1.0 without Host: no browser sends that
        name = host.lower()
        if name.startswith("["):
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        if self.hosts and name in self.hosts:
            return
        if self.loopback_only or self.hosts:
            if is_loopback(name):
                return
            raise HttpError(421, "misdirected", "this server does not answer to that Host")


class _Guard:
    """Outermost ASGI layer: target length, Host check, error bodies, counting, headers."""

    def __init__(self, app: ASGIApp, web: WebApp) -> None:
        self.app = app
        self.web = web
        self._counters: dict[tuple[str, int], Any] = {}

    def _count(self, route: str, status: int) -> None:
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[route, status] = self.web.metrics.http_requests.labels(
                route, str(status)
            )
        counter.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served: the connection is closed
        path = scope.get("path", "")
        route = self.web.route_of(path)
        started = False
        status_code = 500

        async def send_wrapped(message: Message) -> None:
            nonlocal started, status_code
            if message["type"] == "http.response.start":
                started = True
                status_code = int(message["status"])
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in names:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            target = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            if target > MAX_TARGET:
                raise HttpError(414, "uri-too-long", f"path and query longer than {MAX_TARGET} bytes")
            host = None
            for name, value in scope.get("headers", []):
                if name.lower() == b"host":
                    if host is not None:
                        raise HttpError(400, "bad-request", "more than one Host header")
                    host = value.decode("latin-1")
            self.web.check_host(host)
            raw = self.web.raw_posts.get(path) if scope["method"] == "POST" else None
            if raw is not None:
                status_code = await raw(scope, receive, send)
                started = True
            else:
                await self.app(scope, receive, send_wrapped)
        except HttpError as exc:
            if not started:
                await _send_error(send_wrapped, exc.status, exc.code, exc.message, exc.headers)
        except Exception as exc:  # a bug costs one request, never the service
            log.error("web: %s %s failed (%s)", scope.get("method"), route, type(exc).__name__)
            if not started:
                await _send_error(send_wrapped, 500, "internal", "internal error (logged by the server)")
        finally:
            self._count(route, status_code)


async def _send_error(
    send: Send, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> None:
    body = error_body(status, code, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
