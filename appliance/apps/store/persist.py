"""The store's state on disk: the agreed sequence is the journal, plus a snapshot now and then.

Theory of operation
-------------------
Every write the store applies is an entry of its agreed sequence (``appliance.apps.store.node``),
and the sequence is already an append-only journal on disk: a decided slot's entries are appended
to its :class:`~appliance.apps.log.tiles.TileLog` and synced before they are applied (one sync
per decided slot, whatever the number of writes in it; the tile log is crash-safe on its own).
The state is a function of that journal (:meth:`.service.StoreService.apply` is deterministic),
so this module writes no second copy of the operations: it keeps a **snapshot**, the state after
the first ``applied`` operations (:meth:`.service.StoreService.encode`), in one file written
atomically (temp file, fsync, rename, directory fsync), and at start the state is the snapshot
plus the journal's entries after it, applied again (:func:`load`, then the node's follower).

So a write is acknowledged once it is applied in memory: it is durable in the journal before
that. A kill at any point leaves the old snapshot or the new one (each opens), and the journal
entries after either give the same state again: no acknowledged write is lost, and the state
digest after the replay is the one the server had. A snapshot that does not open, or that is
ahead of the journal (its operations were lost; the replica fetches them again), is dropped and
the state rebuilt from the journal.

When (:class:`SnapshotPolicy`): after ``every`` operations, or after ``interval`` seconds when at
least one was applied, so that its cost, O(stored bytes), is spread over many writes, and a restart
replays at most ``every`` operations (or those of ``interval`` seconds). The records are copied
(a dict of immutable records, O(records) pointers) at the moment the snapshot is taken, then
encoded and written in a worker thread while the store goes on applying.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance.apps.store.model import Record
from appliance.apps.store.service import StoreService, encode_snapshot
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import Group
from appliance.host.files import atomic_write

__all__ = ["SNAPSHOT_EVERY", "SNAPSHOT_INTERVAL", "Snapshot", "SnapshotPolicy", "load", "write"]

log = logging.getLogger("pst.store")

#: Operations applied between two snapshots, at most; seconds before a snapshot of fewer.
SNAPSHOT_EVERY: Final = 10_000
SNAPSHOT_INTERVAL: Final = 60.0


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot holds, captured at one moment (the records are immutable)."""

    group: str
    records: Mapping[tuple[str, str], Record]
    applied: int
    #: The store sequence's period (StoreService.period) after those operations, and its
    #: latest period mark (:mod:`.attest`).
    period: int = 0
    mark: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, service: StoreService[Any]) -> Snapshot:
        return cls(
            service.group.name,
            dict(service.state.records),
            service.applied,
            service.period,
            service.verifier.to_obj(),
        )

    def encode(self) -> bytes:
        return encode_snapshot(self.group, self.records, self.applied, self.period, self.mark)


@dataclass
class SnapshotPolicy:
    """When to take the next snapshot (see the module docstring)."""

    every: int = SNAPSHOT_EVERY
    interval: float = SNAPSHOT_INTERVAL
    #: Operations in the last snapshot, and when it was taken (the clock's seconds).
    applied: int = 0
    at: float = 0.0

    def due(self, applied: int, now: float) -> bool:
        behind = applied - self.applied
        return behind >= self.every or (behind > 0 and now - self.at >= self.interval)

    def taken(self, applied: int, now: float) -> None:
        self.applied, self.at = applied, now


def write(path: Path, snapshot: Snapshot) -> None:
    """Encode ``snapshot`` and write it to ``path`` atomically (blocking: a worker thread's)."""
    atomic_write(path, snapshot.encode())


def load(path: Path, group: Group[Any], public_key: Any, t: int, journal_size: int) -> StoreService[Any]:
    """The service from the snapshot at ``path`` if it opens and is not ahead of the journal
    (``journal_size`` operations), else an empty one (blocking). The caller applies the journal's
    entries from ``service.applied`` on."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return StoreService(group, public_key, t)
    try:
        saved = StoreService.decode(group, public_key, t, raw)
    except DecodeError as exc:
        log.error("store: %s unreadable (%s): rebuilt from the operations", path, exc)
        return StoreService(group, public_key, t)
    if saved.applied > journal_size:
        log.error(
            "store: %s has %d operations applied, the sequence holds %d: rebuilt from them",
            path,
            saved.applied,
            journal_size,
        )
        return StoreService(group, public_key, t)
    return saved
