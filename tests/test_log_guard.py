"""The checkpoint guard: a server signs a checkpoint only if its own log backs it (unit tests).

The guard runs alone here, on a TileLog in memory; tests/test_log_signing.py runs it inside the
signing service of several servers.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log.checkpoint import Checkpoint
from appliance.apps.log.errors import CorruptStoreError
from appliance.apps.log.guard import SIGNED_PATH, STALE_GRACE, CheckpointGuard, SharedTileLog
from appliance.apps.log.tiles import MemoryStorage, PosixStorage, TileLog
from appliance.crypto import encoding
from appliance.protocols.signing import NotYet

ORIGIN = "log.example/guard"


def entries(n: int, tag: str = "line") -> list[bytes]:
    return [f"<13>1 - host app - - - {tag} {i}".encode() for i in range(n)]


def new_log(items: list[bytes], storage: MemoryStorage | None = None) -> TileLog:
    log = TileLog.open(storage if storage is not None else MemoryStorage(), ORIGIN)
    log.append(items)
    return log


def body(log: TileLog, size: int) -> bytes:
    return Checkpoint(ORIGIN, size, log.root_at(size)).text().encode()


def test_a_checkpoint_of_the_local_log_is_accepted_and_recorded_before_the_share() -> None:
    log = new_log(entries(10))
    guard = CheckpointGuard.open(log)
    assert guard.check(body(log, 10)) is None
    assert log.storage.read(SIGNED_PATH) == body(log, 10)
    assert guard.check(body(log, 10)) is None  # the same checkpoint again: fine
    log.append(entries(5, "more"))
    assert guard.check(body(log, 15)) is None
    assert guard.last == Checkpoint(ORIGIN, 15, log.root())


def test_a_fork_at_the_same_size_is_refused() -> None:
    log = new_log(entries(10))
    guard = CheckpointGuard.open(log)
    forked = new_log(entries(10, "forged"))
    why = guard.check(body(forked, 10))
    assert why is not None and why.startswith("fork: this server's root at size 10 is ")
    assert log.storage.read(SIGNED_PATH) is None  # nothing recorded for a refusal


def test_a_smaller_tree_than_the_last_signed_is_refused_as_a_truncation() -> None:
    now = [100.0]
    log = new_log(entries(10))
    guard = CheckpointGuard.open(log, clock=lambda: now[0])
    assert guard.check(body(log, 10)) is None
    now[0] += STALE_GRACE
    why = guard.check(body(log, 7))  # a true prefix of our log, but we signed 10 already
    assert why == "truncation: size 7 is smaller than 10, the size of the last checkpoint this server signed"
    assert not isinstance(why, NotYet)  # an alert naming the requester


def test_a_prefix_asked_for_just_after_a_larger_signature_is_refused_without_an_alert() -> None:
    """Two coordinators at once (a takeover racing a slow one): the slower one's request is a
    prefix of what the signer just signed. Refused, but not taken for an attack."""
    now = [100.0]
    log = new_log(entries(10))
    guard = CheckpointGuard.open(log, clock=lambda: now[0])
    assert guard.check(body(log, 10)) is None
    now[0] += 2.0
    why = guard.check(body(log, 7))
    assert isinstance(why, NotYet)
    assert why.startswith("stale: size 7 is a prefix of the checkpoint of size 10")
    forked = new_log(entries(7, "forged"))
    why = guard.check(body(forked, 7))  # not a prefix: a truncation to a fork, at once an alert
    assert why is not None and why.startswith("truncation:") and not isinstance(why, NotYet)
    assert guard.last == Checkpoint(ORIGIN, 10, log.root())


def test_a_tree_beyond_what_this_server_holds_is_refused() -> None:
    log = new_log(entries(10))
    ahead = new_log(entries(12))
    why = CheckpointGuard.open(log).check(body(ahead, 12))
    assert why == "this server holds 10 entries, fewer than the 12 the checkpoint claims"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\xa3cappx\n5\nabc\n", "malformed checkpoint: not UTF-8 text"),
        (b"log.example/guard\n10\n", "malformed checkpoint: a checkpoint has at least three lines"),
        (b"log.example/guard\n010\nAAAA\n", "malformed checkpoint: the checkpoint tree size '010'"),
        (b"log.example/guard\n1\nnot base64!\n", "malformed checkpoint: the checkpoint root hash"),
        (b"other.example/log\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n", "unknown origin: "),
        (
            b"log.example/guard\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\nextra line\n",
            "the checkpoint has extension lines",
        ),
    ],
)
def test_malformed_and_foreign_bodies_are_refused_with_the_reason(message: bytes, reason: str) -> None:
    guard = CheckpointGuard.open(new_log(entries(3)), claim_all=True)
    assert guard.claims(message)
    why = guard.check(message)
    assert why is not None and why.startswith(reason), why


def test_a_restarted_guard_remembers_what_it_signed() -> None:
    storage = MemoryStorage()
    log = new_log(entries(10), storage)
    wall = [1_800_000_000.0]
    assert CheckpointGuard.open(log, wall=lambda: wall[0]).check(body(log, 10)) is None
    wall[0] += STALE_GRACE + 1
    again = CheckpointGuard.open(TileLog.open(storage, ORIGIN), wall=lambda: wall[0])
    assert again.last == Checkpoint(ORIGIN, 10, log.root())
    assert (again.check(body(log, 8)) or "").startswith("truncation: ")


def test_a_restarted_guard_keeps_the_grace_of_a_stale_request() -> None:
    """A signer restarted just after signing, asked by a slow coordinator for a prefix of its own
    log, refuses without an alert as it would have without the restart (the wall-clock time of
    its last signature is kept with it); later, or with that time unreadable, it is an alert."""
    storage = MemoryStorage()
    log = new_log(entries(10), storage)
    wall = [1_800_000_000.0]
    assert CheckpointGuard.open(log, wall=lambda: wall[0]).check(body(log, 10)) is None
    assert storage.read("state/signed-at") == b"1800000000000"
    wall[0] += 2.0
    monotonic = [5.0]  # a new process: its monotonic clock has nothing to do with the old one's
    again = CheckpointGuard.open(
        TileLog.open(storage, ORIGIN), clock=lambda: monotonic[0], wall=lambda: wall[0]
    )
    why = again.check(body(log, 8))
    assert isinstance(why, NotYet) and why.startswith("stale: size 8 is a prefix") and "2.0 s ago" in why
    monotonic[0] += STALE_GRACE
    why = again.check(body(log, 8))
    assert why is not None and not isinstance(why, NotYet) and why.startswith("truncation: ")
    storage.files["state/signed-at"] = b"not a time"
    third = CheckpointGuard.open(TileLog.open(storage, ORIGIN), wall=lambda: wall[0])
    assert (third.check(body(log, 8)) or "").startswith("truncation: ")


def test_a_local_log_replaced_by_a_fork_does_not_make_the_guard_sign_the_fork() -> None:
    """Whoever rewrites the tiles while the server is down still cannot get the fork signed."""
    storage = MemoryStorage()
    log = new_log(entries(10), storage)
    assert CheckpointGuard.open(log).check(body(log, 10)) is None
    forked = new_log(entries(12, "forged"))
    assert isinstance(forked.storage, MemoryStorage)
    for path, data in forked.storage.files.items():
        storage.files[path] = data  # every tile, bundle and state/tree; state/signed stays
    guard = CheckpointGuard.open(TileLog.open(storage, ORIGIN))
    why = guard.check(body(forked, 12))
    assert why is not None and why.startswith(
        "fork: the tree of size 12 does not extend the checkpoint of size 10 this server signed"
    )


def test_an_unreadable_signed_record_stops_the_guard_instead_of_forgetting() -> None:
    storage = MemoryStorage()
    log = new_log(entries(3), storage)
    storage.files[SIGNED_PATH] = b"garbage"
    with pytest.raises(CorruptStoreError, match="the last checkpoint this server signed"):
        CheckpointGuard.open(log)
    storage.files[SIGNED_PATH] = Checkpoint("other.example/log", 0, log.root_at(0)).text().encode()
    with pytest.raises(CorruptStoreError, match=r"is a checkpoint of 'other\.example/log'"):
        CheckpointGuard.open(log)


def test_a_failed_write_of_the_record_refuses_the_share() -> None:
    class Broken(MemoryStorage):
        def write(self, path: str, data: bytes) -> None:
            if path == SIGNED_PATH:
                raise OSError(28, "No space left on device")
            super().write(path, data)

    from appliance.protocols.signing import run_check

    log = new_log(entries(4), Broken())
    guard = CheckpointGuard.open(log)
    why = run_check(guard, body(log, 4))
    assert why is not None and "No space left on device" in why
    assert guard.last is None


def test_what_the_guard_claims_on_the_group_key() -> None:
    """Without claim_all (the log borrowing the group key): every text a checkpoint parser could
    read as a checkpoint is claimed, the group key's other payloads (CBOR) are not."""
    guard = CheckpointGuard.open(new_log(entries(1)))
    root = base64.b64encode(bytes(32)).decode()
    for text in (f"{ORIGIN}\n1\n{root}\n", f"another/log\n+5\n{root}\n", f"x\n007\n{root}\next\n"):
        assert guard.claims(text.encode()), text
    app = encoding.encode({"dom": "pst/app-signed/v1", "app": "x\n5\nAAAA\n", "sha512": bytes(64)})
    assert not guard.claims(app)
    assert not guard.claims(b"plain message")
    assert CheckpointGuard.open(new_log(entries(1)), claim_all=True).claims(b"plain message")


@settings(max_examples=40, deadline=None)
@given(data=st.data(), batches=st.lists(st.integers(0, 40), min_size=1, max_size=6))
def test_whatever_is_asked_the_signed_checkpoints_only_grow_along_the_local_log(
    data: st.DataObject, batches: list[int]
) -> None:
    """Requests of any size (forked or not), restarts at any point: the guard accepts exactly the
    checkpoints of its own log that are at least as large as the last it accepted."""
    storage = MemoryStorage()
    log = TileLog.open(storage, ORIGIN)
    guard = CheckpointGuard.open(log)
    accepted: list[Checkpoint] = []
    total = 0
    for count in batches:
        log.append(entries(count, f"batch{total}"))
        total += count
        for _ in range(data.draw(st.integers(0, 3))):
            size = data.draw(st.integers(0, total + 3))
            if size <= total and not data.draw(st.booleans()):
                root = log.root_at(size)
            else:  # a fork, or a tree beyond ours
                root = hashlib.sha256(b"forged %d" % size).digest()
            message = Checkpoint(ORIGIN, size, root).text().encode()
            last = accepted[-1].size if accepted else 0
            expect = last <= size <= total and root == log.root_at(size)
            why = guard.check(message)
            assert (why is None) == expect, (size, total, last, why)
            if why is None:
                accepted.append(Checkpoint(ORIGIN, size, root))
        if data.draw(st.booleans()):
            log = TileLog.open(storage, ORIGIN)  # restart
            guard = CheckpointGuard.open(log)
            assert guard.last == (accepted[-1] if accepted else None)
    for old, new in itertools.pairwise(accepted):
        assert old.size <= new.size and log.root_at(old.size) == old.root


def test_the_key_holders_guard_follows_a_log_another_process_appends_to(tmp_path: Path) -> None:
    writer = TileLog.open(PosixStorage(tmp_path / "log"), ORIGIN)
    writer.append(entries(5))
    shared = SharedTileLog(PosixStorage(tmp_path / "log"), ORIGIN)
    now = [0.0]
    guard = CheckpointGuard(shared, PosixStorage(tmp_path / "guard"), claim_all=True, clock=lambda: now[0])
    assert guard.check(body(writer, 5)) is None
    later = body(writer, 5)
    writer.append(entries(300, "more"))  # grows past a full tile while the guard holds a view
    assert guard.check(body(writer, 305)) is None
    assert shared.size == 305
    assert (guard.check(later) or "").startswith("stale: ")  # just after signing 305: a slow coordinator
    now[0] += STALE_GRACE
    assert (guard.check(later) or "").startswith("truncation: ")
