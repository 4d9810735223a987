"""Helpers for the log's ingest tests: a running ingest, a RELP client, a TLS certificate."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from tlsutil import self_signed  # noqa: F401 - re-exported for the ingest tests

from appliance.apps.log.ingest import Batcher, IngestServer, Limits, LocalSink, Sink
from appliance.apps.log.merkle import MemoryTree
from appliance.apps.log.syslog import Entry
from appliance.apps.log.tiles import PosixStorage, TileLog

ORIGIN = "log.example/ingest"
#: Every entry of an in-process ingest is stamped with this receive time, so that a test can
#: rebuild the exact entry bytes.
RECEIVED = 1_764_000_000_123_456


@dataclass
class Ingest:
    server: IngestServer
    batcher: Batcher
    ports: dict[str, int]


@asynccontextmanager
async def running_ingest(
    sink: Sink,
    limits: Limits | None = None,
    *,
    ssl_context: object = None,
    batch_entries: int = 256,
    batch_delay: float = 0.005,
    max_queued: int = 4096,
) -> AsyncIterator[Ingest]:
    """UDP, TCP and RELP servers on loopback (and TLS ones with ``ssl_context``) feeding ``sink``."""
    batcher = Batcher(sink, batch_entries=batch_entries, batch_delay=batch_delay, max_queued=max_queued)
    server = IngestServer(batcher, limits, clock=lambda: RECEIVED)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        ports = {
            "udp": await nursery.start(server.serve_udp, "127.0.0.1", 0),
            "tcp": await nursery.start(server.serve_tcp, "127.0.0.1", 0),
            "relp": await nursery.start(server.serve_relp, "127.0.0.1", 0),
        }
        if ssl_context is not None:
            ports["tls"] = await nursery.start(
                lambda task_status: server.serve_tcp(
                    "127.0.0.1", 0, ssl_context=ssl_context, task_status=task_status
                )
            )
            ports["relp-tls"] = await nursery.start(
                lambda task_status: server.serve_relp(
                    "127.0.0.1", 0, ssl_context=ssl_context, task_status=task_status
                )
            )
        yield Ingest(server, batcher, ports)
        nursery.cancel_scope.cancel()


async def eventually(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"{what} not reached within {timeout}s")


def stored(directory: Path) -> list[bytes]:
    """The entries of the log in ``directory``, after checking its tiles give its root."""
    tile_log = TileLog.open(PosixStorage(directory), ORIGIN)
    entries = tile_log.read_entries(0, tile_log.size)
    tree = MemoryTree()
    for entry in entries:
        tree.append(entry)
    assert tree.root() == tile_log.root(), "the stored tiles do not give the Merkle root of the entries"
    return entries


def decoded(sink: LocalSink) -> list[Entry]:
    return [Entry.decode(e) for e in sink.log.read_entries(0, sink.log.size)]


def root_of(entries: Sequence[bytes]) -> bytes:
    tree = MemoryTree()
    for entry in entries:
        tree.append(entry)
    return tree.root()


# --- RELP ----------------------------------------------------------------------------------------


def relp_frame(txnr: int, command: str, data: bytes = b"") -> bytes:
    if not data:
        return b"%d %s 0\n" % (txnr, command.encode())
    return b"%d %s %d %s\n" % (txnr, command.encode(), len(data), data)


RELP_OPEN = relp_frame(1, "open", b"relp_version=0\nrelp_software=pst-test\ncommands=syslog")


_FRAME = re.compile(rb"([0-9]{1,9}) ([A-Za-z]{1,32}) ([0-9]{1,9})[ \n]")


class RelpResponses:
    """Reads ``TXNR rsp DATALEN DATA LF`` responses (and the ``serverclose`` hint) from a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> tuple[int, str, bytes] | None:
        """(txnr, command, data), or None at the end of the stream."""
        while True:
            m = _FRAME.match(self.buffer)
            if m is not None:
                length = int(m.group(3))
                end = m.end() + length + (1 if length else 0)
                if length == 0 or len(self.buffer) >= end:
                    assert self.buffer[end - 1 : end] == b"\n", self.buffer[:end]
                    data = self.buffer[m.end() : m.end() + length]
                    self.buffer = self.buffer[end:]
                    return int(m.group(1)), m.group(2).decode(), data
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk


# --- TLS -----------------------------------------------------------------------------------------


# --- rsyslog as a client -------------------------------------------------------------------------


def rsyslog_config(directory: Path, input_file: Path, actions: Sequence[str]) -> Path:
    """An rsyslogd configuration that reads ``input_file`` (imfile) and runs ``actions`` on each line.

    Only imfile is loaded (no imuxsock, no imklog): rsyslogd's own messages go to the default
    ruleset, which has no action, so only the file's lines are forwarded.
    """
    lines = [
        f'global(workDirectory="{directory}")',
        'module(load="imfile")',
        'module(load="omrelp")',
        f'input(type="imfile" File="{input_file}" Tag="pst-test:" ruleset="forward")',
        'ruleset(name="forward") {',
        *(f"  {action}" for action in actions),
        "}",
    ]
    path = directory / "rsyslog.conf"
    path.write_text("\n".join(lines) + "\n")
    return path
