"""The store's persistence (appliance.apps.store.persist): the agreed sequence as the journal, a
snapshot now and then. A real process is killed with SIGKILL at random moments while it appends
batches to a real tile log, applies them, acknowledges them and writes snapshots; after every kill
the state opens, holds every acknowledged write, and equals the state rebuilt from the journal."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from appliance.apps.log.tiles import PosixStorage, TileLog
from appliance.apps.store import persist
from appliance.apps.store.model import Client, DataType, WriteRequest
from appliance.apps.store.service import Operation, StoreService
from appliance.crypto.groups import ED25519 as G

T = 1
PUBLIC_KEY = G.mul_base(12345)
CLIENT = Client("vault", b"alice")
ORIGIN = "pst-store"

CHILD = """
import sys
from pathlib import Path
from appliance.apps.log.tiles import PosixStorage, TileLog
from appliance.apps.store import persist
from test_store_persist import ORIGIN, PUBLIC_KEY, T, G, entry

root = Path(sys.argv[1])
journal = TileLog.open(PosixStorage(root / "ops"), ORIGIN)
service = persist.load(root / "state", G, PUBLIC_KEY, T, journal.size)
for e in journal.read_entries(service.applied, journal.size):  # the node's follower, at start
    service.apply(service.applied, e)
print("ready", service.applied, flush=True)
policy = persist.SnapshotPolicy(every=40, interval=1e9)
policy.taken(service.applied, 0.0)
while True:
    start = journal.size
    batch = [entry(k) for k in range(start, start + 16)]
    journal.append(batch)  # the journal: durable (synced) before anything is applied
    for e in batch:
        service.apply(service.applied, e)
    print("acked", service.applied, flush=True)  # what a caller learns: durable and applied
    if policy.due(service.applied, 0.0):
        persist.write(root / "state", persist.Snapshot.of(service))
        policy.taken(service.applied, 0.0)
"""


def value(k: int) -> bytes:
    return k.to_bytes(4, "big") * 512  # 2 KiB: a snapshot takes a while to write


def entry(k: int) -> bytes:
    request = WriteRequest("vault", f"k{k}", DataType.PUBLIC_ONCE, 1, value=value(k))
    return Operation(request, CLIENT, 1_800_000_000_000 + k).encode()


def _reopen(root: Path) -> tuple[StoreService[bytes], TileLog]:
    journal = TileLog.open(PosixStorage(root / "ops"), ORIGIN)
    service = persist.load(root / "state", G, PUBLIC_KEY, T, journal.size)
    for e in journal.read_entries(service.applied, journal.size):
        service.apply(service.applied, e)
    return service, journal


def test_a_kill_at_any_moment_loses_no_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(5)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    acked = 0
    snapshots = set()
    for _round in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout is not None
        word, count = child.stdout.readline().split()
        assert word == "ready" and int(count) >= acked  # every write acknowledged before is back
        time.sleep(rng.uniform(0.2, 0.8))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        lines = [line.split() for line in out.splitlines() if line.startswith("acked ")]
        if lines:
            acked = max(acked, int(lines[-1][1]))
        state = tmp_path / "state"
        if state.exists():
            snapshots.add(state.stat().st_mtime_ns)
        # The state opens, holds every acknowledged write, and is the journal's.
        service, journal = _reopen(tmp_path)
        assert service.applied == journal.size >= acked
        for k in range(acked):
            assert service.state.get("vault", f"k{k}").value == value(k)
    rebuilt = StoreService(G, PUBLIC_KEY, T)
    for i, e in enumerate(journal.read_entries(0, journal.size)):
        rebuilt.apply(i, e)
    assert service.digest() == rebuilt.digest()
    assert service.encode() == rebuilt.encode()
    assert acked > 100 and len(snapshots) > 1  # the kills fell among many writes and snapshots


def test_a_snapshot_ahead_of_the_journal_or_unreadable_is_dropped(tmp_path: Path) -> None:
    journal = TileLog.open(PosixStorage(tmp_path / "ops"), ORIGIN)
    journal.append([entry(k) for k in range(8)])
    service, _ = _reopen(tmp_path)
    persist.write(tmp_path / "state", persist.Snapshot.of(service))
    assert persist.load(tmp_path / "state", G, PUBLIC_KEY, T, 8).applied == 8
    # Ahead of a journal of 5 operations (its end was lost): rebuilt from the journal.
    assert persist.load(tmp_path / "state", G, PUBLIC_KEY, T, 5).applied == 0
    (tmp_path / "state").write_bytes(b"\xa0garbage")
    assert persist.load(tmp_path / "state", G, PUBLIC_KEY, T, 8).applied == 0
    (tmp_path / "state").unlink()
    assert persist.load(tmp_path / "state", G, PUBLIC_KEY, T, 8).applied == 0


def test_the_snapshot_policy() -> None:
    policy = persist.SnapshotPolicy(every=100, interval=60.0)
    policy.taken(10, 1000.0)
    assert not policy.due(10, 5000.0)  # nothing new: never
    assert not policy.due(109, 1059.0)
    assert policy.due(110, 1001.0)  # 100 operations
    assert policy.due(11, 1060.0)  # one operation, 60 s later


def test_a_snapshot_larger_than_a_message_opens(tmp_path: Path) -> None:
    """A snapshot of more than 16 MiB (the default limit of a decoded message) opens: the
    100,000-item benchmark's (50 MB) was refused as unreadable and rebuilt from the journal."""
    service = StoreService(G, PUBLIC_KEY, T)
    big = bytes(16_000)
    for k in range(1_100):
        app = f"vault{k % 2}"
        request = WriteRequest(app, f"k{k}", DataType.PUBLIC_ONCE, 1, value=big[:-4] + k.to_bytes(4, "big"))
        assert not isinstance(service.apply(k, Operation(request, Client(app, b"a"), 1).encode()), Exception)
    persist.write(tmp_path / "state", persist.Snapshot.of(service))
    assert (tmp_path / "state").stat().st_size > 16 * 1024 * 1024
    again = persist.load(tmp_path / "state", G, PUBLIC_KEY, T, 1_100)
    assert again.applied == 1_100 and again.digest() == service.digest()
