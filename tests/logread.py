"""Helpers for the log's read-side tests: a signed log on disk and a real HTTP server over it."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from nacl.signing import SigningKey
from test_web import free_port, make_service

from appliance.apps.log.checkpoint import Signer, sign_checkpoint
from appliance.apps.log.reader import CHECKPOINT_PATH, LogReader
from appliance.apps.log.syslog import receive
from appliance.apps.log.tiles import MemoryStorage, PosixStorage, TileLog
from appliance.host.config import HttpConfig

ORIGIN = "log.example/read"
#: Receive time of entry 0 (microseconds); entry i is received i seconds later.
T0 = 1_764_504_000_000_000
HOSTS = ("web1", "web2", "db1")
APPS = ("nginx", "sshd", "cron", "kernel")


def signer(name: str = ORIGIN, seed: bytes = b"read side key") -> Signer:
    key = SigningKey(hashlib.sha256(seed).digest())
    return Signer(name, bytes(key.verify_key), lambda m: bytes(key.sign(m).signature))


def entry(i: int, salt: str = "") -> bytes:
    """Entry ``i``: a real log entry of an RFC 5424 message (every 7th is RFC 3164)."""
    host, app = HOSTS[i % len(HOSTS)], APPS[i % len(APPS)]
    if i % 7 == 6:
        raw = f"<13>Nov 30 12:00:00 {host} {app}[{i}]: bsd line {i}".encode()
    else:
        raw = f"<14>1 2026-11-30T12:00:00Z {host} {app} {i} - - line {i}{salt}".encode()
    return receive(raw, received=T0 + i * 1_000_000, transport="udp", peer="192.0.2.7:514").encode()


@dataclass
class SignedLog:
    directory: Path
    log: TileLog
    entries: list[bytes]
    #: The signed checkpoint at the end of each batch.
    notes: list[bytes]
    signer: Signer

    @property
    def vkey(self) -> str:
        return self.signer.verifier.encode()

    def reader(self) -> LogReader:
        return LogReader(PosixStorage(self.directory), ORIGIN, [self.signer.verifier])

    def publish(self, note: bytes) -> None:
        """Make ``note`` the log's latest signed checkpoint."""
        (self.directory / CHECKPOINT_PATH).write_bytes(note)


def build(
    directory: Path, batches: Sequence[int], key: Signer | None = None, *, salt: str = "", fork_at: int = 0
) -> SignedLog:
    """A log appended in ``batches`` (in memory, copied to ``directory``), the last one published.

    With a ``salt``, entries from ``fork_at`` on differ from the unsalted log's (a fork).
    """
    key = key or signer()
    memory = MemoryStorage()
    log = TileLog.open(memory, ORIGIN)
    entries: list[bytes] = []
    notes = []
    for count in batches:
        batch = [entry(i, salt if i >= fork_at else "") for i in range(len(entries), len(entries) + count)]
        log.append(batch)
        entries += batch
        notes.append(sign_checkpoint(log.checkpoint(), [key]))
    for path, data in memory.files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    signed = SignedLog(directory, TileLog.open(PosixStorage(directory), ORIGIN), entries, notes, key)
    signed.publish(notes[-1])
    return signed


def copy(signed: SignedLog, directory: Path) -> SignedLog:
    """The same log in another directory (to damage it there)."""
    shutil.copytree(signed.directory, directory)
    return SignedLog(directory, signed.log, signed.entries, signed.notes, signed.signer)


@asynccontextmanager
async def serving(tmp_path: Path, reader: LogReader | None) -> AsyncIterator[str]:
    """A real hypercorn on loopback serving the log; yields its base URL."""
    port = free_port()
    service, _, _ = make_service(
        tmp_path / "web", http=HttpConfig(listen=("127.0.0.1", port)), log_reader=reader
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()
