"""The log inside ``pst serve``: the sink, the batcher, the syslog servers and the local API's side.

Theory of operation
-------------------
:class:`LogService` is what ``pst serve`` (:mod:`appliance.node.run`) runs when its config has a
``[log]`` section. It owns one :class:`~appliance.apps.log.ingest.Batcher` in front of one
:class:`~appliance.apps.log.ingest.Sink` (in ``pst serve`` the replicated log,
:class:`~appliance.apps.log.node.LogNode`; a :class:`~appliance.apps.log.ingest.LocalSink` for a
log of one server) and
one :class:`~appliance.apps.log.ingest.IngestServer` for the syslog transports, on sockets the
caller bound (before privileges were dropped, for port 514). Everything that enters the log goes
through that one batcher, which hands each submitter the indices the sink gives its entries:

* the syslog servers (UDP, TCP, TLS, RELP, RELP over TLS), as :mod:`~appliance.apps.log.ingest`
  describes;
* the local API's ``log_append`` (:meth:`log_append`): the client's messages become entries of
  transport ``api`` whose ``peer`` names the client (``uid U app NAME``, the kernel's uid and the
  registered name), answered with their indices only once they are durable.

Reads (:meth:`log_size`, :meth:`log_entries`) go to the sink's reader (``size`` and
``read_entries``), which takes turns with appends.

**If the log cannot be opened** (a directory that cannot be created or read, a store that
disagrees with itself: :class:`~appliance.apps.log.errors.CorruptStoreError`), the service is
*unavailable*: it says why (naming the directory) in the server's log and status, it starts no
syslog server and closes the sockets, so that senders see a refused connection (TCP and RELP
senders keep their messages and retry) rather than messages taken and not stored, and the API's
log operations answer ``unavailable`` with the reason. The rest of the server (refreshes,
signing, the status page) goes on: the key service is not stopped by its first application.

**Stopping** (:meth:`stop`, on SIGTERM): the syslog servers stop accepting and reading, RELP
sessions get their acknowledgements for what becomes durable and then ``serverclose``, the
batcher appends what is queued, and only then does ``pst serve`` cancel the rest. Each step
is bounded (``stop_timeout``): connections still open then are closed (RELP clients resend
what was not acknowledged), and the queue is appended all the same.

Counters for the status page and ``/metrics`` (:meth:`status`): the log's size, entries per
second (over the last ten seconds), the ingest's :class:`~appliance.apps.log.ingest.IngestStats`,
appends and failures; and, for the replicated log, its slot, the period of its committee and
the size of the last checkpoint this server published.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from appliance.apps.log.errors import LogError
from appliance.apps.log.ingest import Batcher, IngestServer, Limits, LocalSink, Sink, SinkError, format_peer
from appliance.apps.log.syslog import receive

__all__ = ["MAX_READ_BYTES", "MAX_READ_ENTRIES", "Listener", "LogService", "LogUnavailable", "ReadableSink"]

log = logging.getLogger("pst.log")

#: At most this many entries, and about this many bytes, per :meth:`LogService.log_entries`.
MAX_READ_ENTRIES: Final = 256
MAX_READ_BYTES: Final = 1024 * 1024
#: Entries per second are measured over this many seconds.
RATE_WINDOW: Final = 10
STOP_TIMEOUT: Final = 10.0


class LogUnavailable(LogError):
    """The log cannot serve now (not opened, or stopping); the message says why and is safe to show."""


class ReadableSink(Sink, Protocol):
    """A sink that the API's reads go to as well (``LocalSink`` is one; so must its
    replacement be): its durable size, and entries ``[start, end)`` of it."""

    @property
    def size(self) -> int: ...

    async def read_entries(self, start: int, end: int) -> list[bytes]: ...


@dataclass(frozen=True)
class Listener:
    """A syslog server to run: its transport (``udp``, ``tcp``, ``relp``, ``tls``, ``relp_tls``),
    the configured address, and the socket bound for it."""

    transport: str
    host: str
    port: int
    sock: socket.socket


class LogService:
    """The log of one ``pst serve`` (see the module docstring)."""

    def __init__(
        self,
        origin: str,
        *,
        sink: ReadableSink | None,
        error: str | None = None,
        listeners: Sequence[Listener] = (),
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        batching: Mapping[str, Any] | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        clock: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        """``sink`` None: the log could not be opened and ``error`` says why. ``batching``: the
        :class:`Batcher`'s ``batch_entries`` and ``batch_delay`` (its defaults where absent)."""
        self.origin = origin
        self.sink = sink
        self.error = error if sink is None else None
        self.listeners = list(listeners)
        self.ssl_context = ssl_context
        self.limits = limits or Limits()
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.batcher = Batcher(sink, **(batching or {})) if sink else None
        self.ingest = IngestServer(self.batcher, self.limits, clock=clock) if self.batcher else None
        #: transport -> "host:port" where it listens (once started).
        self.listening: dict[str, str] = {}
        self.api_appended = 0
        #: The log's note-verifier key (``name+id+key``) once the key-holder told us the key.
        self.verifier: str | None = None
        self.stopping = False
        self._samples: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)
        self._servers_done = trio.Event()

    @classmethod
    def open(
        cls,
        directory: Path,
        origin: str,
        *,
        sink: Callable[[Path, str], ReadableSink] = LocalSink,
        **kwargs: Any,
    ) -> LogService:
        """Open (or create) the log in ``directory`` with ``sink(directory, origin)`` (in
        ``pst serve``: the replicated log, :class:`~appliance.apps.log.node.LogNode`); an
        unavailable service if that fails."""
        opened: ReadableSink
        try:
            if not directory.exists() or directory.is_dir():  # a file in its place: the sink's
                directory.mkdir(parents=True, exist_ok=True, mode=0o750)  # (LogNode sets it aside)
            opened = sink(directory, origin)
        except (OSError, LogError, ValueError) as exc:
            reason = f"the log in {directory} cannot be opened: {_describe(exc)}"
            log.error("%s; this server runs without its log (no syslog server started)", reason)
            return cls(origin, sink=None, error=reason, **kwargs)
        log.info("log %r opened in %s: %d entries", origin, directory, opened.size)
        return cls(origin, sink=opened, **kwargs)

    @property
    def available(self) -> bool:
        return self.sink is not None

    # --- Running ---

    async def run(self, *, task_status: trio.TaskStatus[LogService] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the batcher and the syslog servers until cancelled (or :meth:`stop`)."""
        if self.batcher is None or self.ingest is None:
            for listener in self.listeners:
                listener.sock.close()
            self._servers_done.set()
            task_status.started(self)
            await trio.sleep_forever()
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self.batcher.run)
            nursery.start_soon(self._sample)
            async with trio.open_nursery() as servers:
                for listener in self.listeners:
                    port = await servers.start(self._serve, listener)
                    self.listening[listener.transport] = format_peer((listener.host, port))
                task_status.started(self)
            self._servers_done.set()
            await trio.sleep_forever()

    async def _serve(self, listener: Listener, *, task_status: trio.TaskStatus[int]) -> None:
        assert self.ingest is not None
        ingest, sock = self.ingest, listener.sock
        host, port = listener.host, listener.port
        tls = self.ssl_context if listener.transport in ("tls", "relp_tls") else None
        try:
            if listener.transport == "udp":
                await ingest.serve_udp(host, port, sock=sock, task_status=task_status)
            elif listener.transport in ("tcp", "tls"):
                await ingest.serve_tcp(host, port, ssl_context=tls, sock=sock, task_status=task_status)
            else:
                await ingest.serve_relp(host, port, ssl_context=tls, sock=sock, task_status=task_status)
        except Exception as exc:  # one transport failing must not stop the server (nor the others)
            where = format_peer((host, port))
            log.error("syslog %s on %s stopped: %s", listener.transport, where, _describe(exc))
            self.listening.pop(listener.transport, None)

    async def _sample(self) -> None:
        while True:
            assert self.batcher is not None
            self._samples.append((trio.current_time(), self.batcher.appended))
            await trio.sleep(1.0)

    async def stop(self) -> None:
        """Stop taking entries; return once what was taken is appended (at most ``stop_timeout``)."""
        self.stopping = True
        if self.ingest is None or self.batcher is None:
            return
        self.ingest.close()
        self.batcher.hurry()
        with trio.move_on_after(self.stop_timeout) as waited:
            await self._servers_done.wait()
        if waited.cancelled_caught:
            log.warning(
                "log: syslog connections still open %gs after stopping; closing them "
                "(RELP clients resend what was not acknowledged)",
                self.stop_timeout,
            )
        with trio.move_on_after(self.stop_timeout) as appended:
            await self.batcher.close()
        if appended.cancelled_caught:
            log.warning(
                "log: %d queued entries not appended within %gs of stopping",
                self.batcher.queued,
                self.stop_timeout,
            )
        else:
            log.info("log: stopped with %d entries", self.size)

    # --- The local API's side (appliance.api._core.LogBackend) ---

    @property
    def max_message_size(self) -> int:
        return self.limits.max_message_size

    def _open_sink(self) -> tuple[ReadableSink, Batcher]:
        if self.sink is None or self.batcher is None:
            raise LogUnavailable(self.error or "the log is not open")
        return self.sink, self.batcher

    @property
    def size(self) -> int:
        return self.sink.size if self.sink is not None else 0

    async def log_append(self, client: str, messages: Sequence[bytes]) -> tuple[list[int], int]:
        """Append ``messages`` as entries of transport ``api`` from ``client``; (the index of
        each, the log's size) once they are durable."""
        _, batcher = self._open_sink()
        if self.stopping:
            raise LogUnavailable("the server is stopping")
        now = self.clock()
        entries = [
            receive(bytes(m), received=now, transport="api", peer=client, size=len(m)).encode()
            for m in messages
        ]
        try:
            indices = await batcher.append(entries)
        except SinkError as exc:
            raise LogUnavailable(f"the entries were not stored: {exc}") from None
        self.api_appended += len(entries)
        return indices, self.size

    async def log_size(self) -> Mapping[str, Any]:
        self._open_sink()
        return {"size": self.size, "origin": self.origin, "verifier": self.verifier}

    async def log_audit(self) -> Mapping[str, Any]:
        """Audit this server's copy of the log now (``LogNode.audit``: re-hash it up to the latest
        checkpoint, alert and repair from the peers if it differs)."""
        sink, _ = self._open_sink()
        audit = getattr(sink, "audit", None)
        if audit is None:
            raise LogUnavailable(
                "this server's log is not replicated: it has no checkpoints to audit against"
            )
        ok = await audit()
        return {
            "ok": bool(ok),
            "checkpoint_size": getattr(sink, "checkpointed_size", None),
            "damaged": getattr(sink, "damaged", None),
            "repairs": int(getattr(sink, "repairs", 0)),
        }

    async def log_entries(self, start: int, count: int) -> list[bytes]:
        """Up to ``count`` entries from ``start`` (at most :data:`MAX_READ_ENTRIES` and about
        :data:`MAX_READ_BYTES`); fewer at the end of the log."""
        sink, _ = self._open_sink()
        end = min(sink.size, start + max(0, min(count, MAX_READ_ENTRIES)))
        if start >= end:
            return []
        try:
            entries = await sink.read_entries(start, end)
        except (OSError, LogError, ValueError) as exc:
            log.error("log: cannot read entries [%d, %d): %s", start, end, _describe(exc))
            raise LogUnavailable(f"the log cannot be read now: {_describe(exc)}") from None
        out: list[bytes] = []
        total = 0
        for entry in entries:
            if out and total + len(entry) > MAX_READ_BYTES:
                break
            out.append(entry)
            total += len(entry)
        return out

    # --- Status ---

    def entries_per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, a0), (t1, a1) = self._samples[0], self._samples[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self) -> dict[str, Any]:
        """Public figures for ``/v1/status``, the page and ``/metrics``."""
        if self.sink is None or self.batcher is None or self.ingest is None:
            return {"state": "unavailable", "error": self.error, "origin": self.origin}
        return {
            "state": "stopping" if self.stopping else "running",
            "error": None,
            "origin": self.origin,
            "verifier": self.verifier,
            "size": self.size,
            "entries_per_second": round(self.entries_per_second(), 3),
            "appended": self.batcher.appended,
            "api_appended": self.api_appended,
            "queued": self.batcher.queued,
            "append_failures": self.batcher.failures,
            "listening": dict(self.listening),
            "ingest": asdict(self.ingest.stats),
            **({"replication": self.sink.replication()} if hasattr(self.sink, "replication") else {}),
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__
