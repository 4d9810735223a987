"""Running the HTTP service inside ``pst serve``: hypercorn's trio worker and the pollers.

:class:`WebService` owns the views, the metrics and the application. :meth:`WebService.run`
(started in the network-facing process's nursery) binds the listener with hypercorn on trio,
checks every :data:`LOCAL_INTERVAL` seconds whether status.json or alerts.jsonl changed (and
re-reads them if so), counts the refused peer connections, and polls every peer's
``/v1/status`` with a timeout of :data:`POLL_TIMEOUT`, every :data:`POLL_INTERVAL` seconds
but only while someone looks at what the polls gather: for :data:`WATCH_WINDOW` seconds after
the last request of ``/v1/network`` (what the status page asks every two seconds) or of
``/metrics`` (:meth:`WebService.watched`). A server nobody watches sends no request to its
peers and so costs them nothing either. The first of these requests after a quiet time waits
for one round of polls (at most about :data:`POLL_TIMEOUT`), so that what it shows is never
older than a round: no answer is shown from before the quiet time as if it were current. A
peer's ``/v1/status`` is not a reason to poll (else one watched server would keep the whole
network polling). It never touches the key-holder: everything it reads is public.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from appliance.host.config import HttpConfig, is_loopback
from appliance.web._app import WebApp
from appliance.web._metrics import Metrics
from appliance.web._view import MAX_PEER_ANSWER, Fetcher, LocalView, PeerPoller, Sources, refused_since

if TYPE_CHECKING:
    from starlette.routing import Route

    from appliance.apps.log.reader import LogReader

log = logging.getLogger("pst.web")
#: Seconds between two updates of the log's search index; bundles indexed per update while
#: the log is quiet, and while it grows.
INDEX_INTERVAL: Final = 2.0
INDEX_STEP: Final = 256
INDEX_BUSY_STEP: Final = 1
#: Intervals without a new checkpoint after which the log counts as quiet.
INDEX_QUIET: Final = 5

POLL_INTERVAL: Final = 2.0
POLL_TIMEOUT: Final = 1.5
#: The longest a round of polls takes (each peer's poll is cut off after this).
ROUND_LIMIT: Final = POLL_TIMEOUT + 0.5
#: Seconds of polling after the last request that shows the polls' answers.
WATCH_WINDOW: Final = 30.0
#: While the pollers run, the last round ended at most this long ago; older answers are not
#: served without a new round first.
FRESH_FOR: Final = POLL_INTERVAL + ROUND_LIMIT + 1.0
LOCAL_INTERVAL: Final = 1.0


class WebService:
    """One server's HTTP service: views, metrics, application."""

    def __init__(
        self,
        sources: Sources,
        http: HttpConfig,
        *,
        fetch: Fetcher | None = None,
        log_reader: LogReader | None = None,
        tsa: Route | None = None,
        ca_root: Callable[[bool], Awaitable[bytes | None]] | None = None,
        enroll: Sequence[Route] = (),
    ) -> None:
        """``log_reader``: the log's read-only view, served under ``/log/`` (see appliance.web._log);
        ``ca_root``: the group root certificate, served as ``/ca/root.pem`` (appliance.node.ca)."""
        self.sources = sources
        self.http = http
        self.log_reader = log_reader
        self.local = LocalView(sources)
        self._client: httpx.AsyncClient | None = None
        peers = {i: u for i, u in sources.peer_urls.items() if i != sources.server_id}
        self.poller = PeerPoller(sources, fetch or self._fetch) if peers else None
        self.metrics = Metrics(sources, self.local, self.poller)
        self.local.on_refresh = self.metrics.observe_refresh
        #: Until when (trio's clock) the pollers run; a request that shows them moves it on.
        self.watched_until = -math.inf
        #: When (trio's clock) the last round of polls ended; rounds of polls done so far.
        self.polled_at = -math.inf
        self.rounds = 0
        self._round: trio.Event | None = None
        self._wake = trio.Event()
        self.app = WebApp(
            self.local,
            self.poller,
            self.metrics,
            watched=self.watched,
            hosts=http.hosts,
            loopback_only=is_loopback(http.listen[0]),
            log=log_reader,
            tsa=tsa,
            ca_root=ca_root,
            enroll=enroll,
        )
        self._last_rejection: Any = None

    async def fetch(self, url: str) -> tuple[int, bytes]:
        """GET ``url`` from a peer's HTTP service (the client of the peers' status pages)."""
        return await self._fetch(url)

    async def _fetch(self, url: str) -> tuple[int, bytes]:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.http.ca is not None:
                verify = ssl.create_default_context(cafile=str(self.http.ca))
            self._client = httpx.AsyncClient(
                timeout=POLL_TIMEOUT, verify=verify, follow_redirects=False, trust_env=False
            )
        async with self._client.stream("GET", url, headers={"accept": "application/json"}) as answer:
            body = b""
            async for chunk in answer.aiter_bytes():
                body += chunk
                if len(body) > MAX_PEER_ANSWER:
                    break
            return answer.status_code, body

    def update_local(self, *, force: bool = True) -> None:
        """Re-read this server's files (``force=False``: only those that changed, as the loop
        does) and count new refused connections."""
        self.local.update(force=force)
        new, self._last_rejection = refused_since(self.sources.rejections(), self._last_rejection)
        self.metrics.count_refused(new)

    async def watched(self) -> None:
        """Someone looks at what the polls gather (``/v1/network``, ``/metrics``): keep polling
        for :data:`WATCH_WINDOW` seconds more and, if the pollers were idle, poll once now and
        return when that round is done (at most about :data:`ROUND_LIMIT` seconds)."""
        if self.poller is None:
            return
        now = trio.current_time()
        self.watched_until = now + WATCH_WINDOW
        self._wake.set()
        if now - self.polled_at > FRESH_FOR:
            await self.poll_peers()

    async def poll_peers(self) -> None:
        """One round: every peer's ``/v1/status``, in parallel. A round under way is waited
        for, not doubled."""
        if self.poller is None:
            return
        if self._round is not None:
            await self._round.wait()
            return
        self._round = done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                for server in self.poller.records:
                    nursery.start_soon(self._poll_one, server)
            self.polled_at = trio.current_time()  # not if cut short (its requester went away)
            self.rounds += 1
        finally:
            self._round = None
            done.set()

    async def _poll_one(self, server: int) -> None:
        assert self.poller is not None
        with trio.move_on_after(POLL_TIMEOUT + 0.5) as scope:
            await self.poller.poll(server)
        if scope.cancelled_caught:
            self.poller.records[server].error = "no answer in time"

    async def _local_loop(self) -> None:
        while True:
            try:
                self.update_local(force=False)
            except Exception as exc:  # the service outlives a bad file
                log.error("web: reading the server's state failed (%s)", type(exc).__name__)
            await trio.sleep(LOCAL_INTERVAL)

    async def _index_loop(self, reader: LogReader) -> None:
        """Keep the log's search index up with the signed tree (appliance.apps.log.index).

        Indexing reads every entry once, which costs CPU the ingest needs: while the signed
        tree grows, at most :data:`INDEX_BUSY_STEP` bundles every :data:`INDEX_INTERVAL`
        seconds; once it has not grown for :data:`INDEX_QUIET` intervals, :data:`INDEX_STEP`
        bundles at a time until the index is up with it. Searches scan what is not indexed yet."""
        said: str | None = None
        last_size, quiet = -1, 0
        while True:
            problem: str | None
            try:
                signed = await trio.to_thread.run_sync(reader.latest)
                size = signed.checkpoint.size if signed is not None else 0
                # Quiet: no new checkpoint for INDEX_QUIET intervals (under load checkpoints
                # can be seconds apart, so one interval without one does not say much).
                quiet = quiet + 1 if size == last_size else 0
                step = INDEX_STEP if quiet >= INDEX_QUIET else INDEX_BUSY_STEP
                last_size = size
                added = await trio.to_thread.run_sync(reader.update_index, step)
            except Exception as exc:  # the read side outlives a bad file; searches scan instead
                added, step, problem = 0, 1, f"{type(exc).__name__}: {exc}"
            else:
                problem = reader.index.problem
            if problem != said:
                if problem is not None:
                    log.warning("log: the search index stops short of the signed tree: %s", problem)
                said = problem
            await trio.sleep(0 if added == step == INDEX_STEP else INDEX_INTERVAL)

    async def _peer_loop(self) -> None:
        """Poll every :data:`POLL_INTERVAL` seconds while watched; asleep otherwise (the request
        that wakes it has polled already, if the answers were old)."""
        while True:
            if trio.current_time() < self.watched_until:
                await self.poll_peers()
            else:
                self._wake = trio.Event()
                await self._wake.wait()
            await trio.sleep(POLL_INTERVAL)

    def start_loops(self, nursery: trio.Nursery) -> None:
        """Start the periodic work (files, peers, the log's index) in ``nursery``."""
        nursery.start_soon(self._local_loop)
        nursery.start_soon(self._peer_loop)
        if self.log_reader is not None:
            nursery.start_soon(self._index_loop, self.log_reader)

    def hypercorn_config(self) -> HypercornConfig:
        http = self.http
        config = HypercornConfig()
        host, port = http.listen
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("pst.web.hypercorn")
        config.include_server_header = False
        config.keep_alive_timeout = 5.0
        config.read_timeout = 10
        config.ssl_handshake_timeout = 10.0
        config.graceful_timeout = 1.0
        config.h11_max_incomplete_size = 16 * 1024
        config.h2_max_concurrent_streams = 16
        config.wsgi_max_body_size = 0
        if http.cert is not None and http.key is not None:
            config.certfile, config.keyfile = str(http.cert), str(http.key)
            if http.client_ca is not None:
                config.ca_certs = str(http.client_ca)
                config.verify_mode = ssl.CERT_REQUIRED
        return config

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``nursery.start`` returns the bound URLs (or raises OSError)."""
        self.update_local()
        config = self.hypercorn_config()
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    lambda task_status: hypercorn_serve(self.app.asgi, config, task_status=task_status)  # type: ignore[arg-type]
                )
                self.start_loops(nursery)
                task_status.started(binds)
        finally:
            if self._client is not None:
                with trio.CancelScope(shield=True):
                    await self._client.aclose()
