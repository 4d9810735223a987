"""Pruning of superseded partial tiles and bundles (appliance.apps.log.tiles.prune_partials).

A log appended in batches that leave partial tiles of many widths, on disk and in memory:
once a signed size covers a full tile or bundle, its partial files go (crash-safely: a pass
that dies between deletions leaves a store that opens, reads and verifies, and the next pass
cleans it), the partials of the signed size itself stay, the read side answers 404 for a
pruned partial and still gives proofs and entries, and ``pst log verify``'s audit passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from logread import ORIGIN, SignedLog, build

from appliance.apps.log import merkle
from appliance.apps.log.repair import older_partials
from appliance.apps.log.tiles import (
    TILE_WIDTH,
    MemoryStorage,
    PosixStorage,
    Storage,
    TileLog,
    new_bundles,
    prune_partials,
    tiles_for_size,
)
from appliance.apps.log.verify import DirSource, LogVerifier

# Sizes 1, 255, 256, 259, 559, 1559, 1999, 66000, 66001: partial tiles at levels 0-2.
BATCHES = [1, 254, 1, 3, 300, 1000, 440, 64001, 1]
SIZE = sum(BATCHES)


def partials(files: list[str]) -> list[str]:
    return sorted(p for p in files if ".p/" in p)


def posix_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def superseded(files: list[str], size: int) -> list[str]:
    """The partial files of ``files`` at a position where the tree of ``size`` has a full file."""
    full = {r.path for r in [*tiles_for_size(size), *new_bundles(0, size)] if r.width == TILE_WIDTH}
    return [p for p in partials(files) if p.split(".p/")[0] in full]


def appended(storage: Storage, batches: list[int]) -> TileLog:
    log = TileLog.open(storage, ORIGIN)
    for count in batches:
        log.append([f"entry {log.size + i}".encode() for i in range(count)])
    return log


def test_pruning_leaves_only_the_partials_no_full_tile_supersedes(tmp_path: Path) -> None:
    for storage in (MemoryStorage(), PosixStorage(tmp_path)):
        log = appended(storage, BATCHES)
        files = storage.files if isinstance(storage, MemoryStorage) else posix_files(tmp_path)
        before = partials(list(files))
        assert len(superseded(before, SIZE)) > 10
        assert "tile/0/000.p/255" in before and "tile/entries/006.p/23" in before
        deleted = log.prune(SIZE)
        files = storage.files if isinstance(storage, MemoryStorage) else posix_files(tmp_path)
        after = partials(list(files))
        assert sorted(deleted) == superseded(before, SIZE)
        assert superseded(after, SIZE) == []
        # The signed size's own partials stay: 66001 = 257 full tiles and 209, level 1: 1.
        kept = {"tile/0/257.p/209", "tile/entries/257.p/209", "tile/1/001.p/1", "tile/2/000.p/1"}
        assert set(after) >= kept
        assert "tile/1/000.p/7" not in after  # tile/1/000 is full at 66,001
        assert log.prune(SIZE) == []  # nothing left to look at
        reopened = TileLog.open(storage, ORIGIN)
        assert reopened.root() == log.root() and reopened.prune(SIZE) == []
        assert reopened.read_entries(SIZE - 300, SIZE)[-1] == f"entry {SIZE - 1}".encode()
    # The emptied <N>.p directories went with their files.
    assert not (tmp_path / "tile/0/000.p").exists() and (tmp_path / "tile/0/257.p").is_dir()


def test_a_smaller_covered_size_prunes_only_what_it_covers() -> None:
    storage = MemoryStorage()
    log = appended(storage, BATCHES)
    deleted = log.prune(559)  # full tiles 0 and 1 (and bundles)
    assert sorted(deleted) == [
        "tile/0/000.p/1",
        "tile/0/000.p/255",
        "tile/0/001.p/3",
        "tile/entries/000.p/1",
        "tile/entries/000.p/255",
        "tile/entries/001.p/3",
    ]
    assert "tile/0/002.p/47" in storage.files  # 559 has tile 2 partial: kept
    assert "tile/0/002.p/47" in log.prune(1999)
    with pytest.raises(ValueError):
        log.prune(SIZE + 1)  # beyond what is durable


def test_partials_stay_while_their_full_tile_is_missing_or_short() -> None:
    storage = MemoryStorage()
    appended(storage, [3, 300])
    storage.delete("tile/0/000")
    storage.delete("tile/entries/000")
    assert prune_partials(storage, 303) == []
    assert {"tile/0/000.p/3", "tile/entries/000.p/3"} <= set(storage.files)
    storage.files["tile/0/000"] = bytes(31)
    assert prune_partials(storage, 303) == []


class Crash(Exception):
    pass


class CrashingStorage(MemoryStorage):
    """Deletes until the ``after``-th, then raises (a process killed between two deletions)."""

    def __init__(self, files: dict[str, bytes], after: int) -> None:
        super().__init__()
        self.files = files
        self.after = after

    def delete(self, path: str) -> None:
        if self.after == 0:
            raise Crash(path)
        self.after -= 1
        super().delete(path)


def test_a_crash_between_deletions_leaves_a_consistent_store_the_next_pass_cleans() -> None:
    good = MemoryStorage()
    log = appended(good, BATCHES)
    count = len(superseded(list(good.files), SIZE))
    for after in range(0, count, 7):
        files = dict(good.files)
        crashing = CrashingStorage(files, after)
        with pytest.raises(Crash):
            TileLog.open(crashing, ORIGIN).prune(SIZE)
        # What is left: every full file, some of the superseded partials.
        assert len(superseded(list(files), SIZE)) == count - after
        restarted = MemoryStorage()
        restarted.files = files
        reopened = TileLog.open(restarted, ORIGIN)  # the frontier and root check pass
        assert reopened.root() == log.root()
        assert reopened.inclusion_proof(300, SIZE) == log.inclusion_proof(300, SIZE)
        assert len(reopened.prune(SIZE)) == count - after
        assert superseded(list(files), SIZE) == [] and set(files) == set(good.files) - set(
            superseded(list(good.files), SIZE)
        )


def test_read_side_and_audit_after_pruning(tmp_path: Path) -> None:
    signed: SignedLog = build(tmp_path / "log", [1, 254, 1, 3, 300, 1000, 440])
    size = signed.log.size
    assert (signed.directory / "tile/0/001.p/3").exists()
    before = signed.reader()
    old_inclusion = before.inclusion(257, 259)
    old_consistency = before.consistency(259, size)
    pruned = TileLog.open(PosixStorage(signed.directory), ORIGIN).prune(size)
    assert "tile/0/001.p/3" in pruned and "tile/entries/002.p/47" in pruned
    reader = signed.reader()
    # A pruned partial is a 404 (the client fetches the full one); the full one is served.
    assert reader.resource("tile/0/001.p/3") is None
    assert reader.resource("tile/entries/002.p/47") is None
    assert reader.resource("tile/0/001") is not None
    assert reader.resource("tile/0/007.p/207") is not None  # the signed size's own partial
    assert reader.inclusion(257, 259) == old_inclusion
    assert reader.consistency(259, size) == old_consistency
    assert [e["index"] for e in reader.entries(250, 300)["entries"]] == list(range(250, 300))
    # pst log verify's audit of the directory recomputes everything against the checkpoint.
    checker = LogVerifier(DirSource(signed.directory), signed.signer.verifier)
    latest = checker.latest()
    report = checker.audit_report(latest)
    assert report.ok, report
    assert merkle.root_hash(signed.log._reader, size) == latest.root


def test_reader_takes_a_pruned_partials_prefix_from_the_full_tile(tmp_path: Path) -> None:
    """A reader holding an older checkpoint while the writer prunes: proofs and entries of the
    older size come from the full tile's and bundle's prefix."""
    signed = build(tmp_path / "log", [1, 254, 1, 3, 300])
    signed.publish(signed.notes[3])  # size 259: tile 1 is partial (3) in the signed tree
    reader = signed.reader()
    expected = reader.inclusion(257, 259), reader.entries(256, 259)
    for path in ("tile/0/001.p/3", "tile/entries/001.p/3"):
        (signed.directory / path).unlink()  # as a prune at size 559 does
    assert (reader.inclusion(257, 259), reader.entries(256, 259)) == expected


def test_verify_falls_back_to_the_full_tile_like_a_client(tmp_path: Path) -> None:
    """The server's audit (and `pst log verify`) of a checkpoint whose partials a newer one's
    pruning deleted in the meantime: the prefix of the full tile and bundle stands in."""
    signed = build(tmp_path / "log", [1, 254, 1, 3, 300])
    signed.publish(signed.notes[3])  # size 259
    TileLog.open(PosixStorage(signed.directory), ORIGIN).prune(559)
    assert not (signed.directory / "tile/0/001.p/3").exists()
    checker = LogVerifier(DirSource(signed.directory), signed.signer.verifier)
    latest = checker.latest()
    assert latest.size == 259 and checker.audit_report(latest).ok
    checker.inclusion(latest, 258, signed.entries[258])
    # A partial with no full tile to stand in for it is still missing.
    (signed.directory / "tile/0/001").unlink()
    report = checker.audit_report(latest)
    assert not report.ok and "the log does not serve tile/0/001.p/3" in str(report)


def test_a_start_drops_the_partials_a_lost_batch_left_beyond_the_durable_size() -> None:
    storage = MemoryStorage()
    log = appended(storage, [3, 300])  # 303: tile/0/001.p/47
    durable = dict(storage.files)
    # What a batch lost in a crash (303 -> 800) leaves: full tiles 1 and 2, partials beyond.
    lost = TileLog(MemoryStorage(), ORIGIN, merkle.Frontier())
    lost.append([f"entry {i}".encode() for i in range(303)])
    lost.append([f"lost {i}".encode() for i in range(497)])
    leftovers = {p: d for p, d in lost.storage.files.items() if p not in durable}  # type: ignore[attr-defined]
    storage.files.update(leftovers)
    assert {"tile/0/003.p/32", "tile/entries/003.p/32", "tile/1/000.p/3"} <= set(leftovers)
    reopened = TileLog.open(storage, ORIGIN)
    dropped = reopened.drop_leftovers()
    assert sorted(dropped) == sorted(leftovers)  # the leftover full files too (since 2026-12-01)
    # The durable files, of this size and older ones, stay.
    assert storage.files == durable and "tile/0/000.p/3" in storage.files
    assert reopened.drop_leftovers() == []
    assert TileLog.open(storage, ORIGIN).root() == log.root()


def test_a_power_cut_that_kept_only_some_of_a_lost_batch_s_files_is_not_taken_for_damage() -> None:
    """A power cut keeps any subset of a lost batch's renames: here not its full tile and bundle
    at position 2 but its partials at position 3. They are dropped at the start all the same
    (the search used to end at the first position without a full file), so that once the log
    grows past position 3 with other entries, the audit of older partials finds nothing wrong."""
    storage = MemoryStorage()
    appended(storage, [3, 300])  # 303
    lost = TileLog(MemoryStorage(), ORIGIN, merkle.Frontier())
    lost.append([f"entry {i}".encode() for i in range(303)])
    lost.append([f"lost {i}".encode() for i in range(497)])  # 303 -> 800: tile/0/003.p/32
    kept = {
        p: d
        for p, d in lost.storage.files.items()  # type: ignore[attr-defined]
        if p not in storage.files and p not in ("tile/0/002", "tile/entries/002")
    }
    storage.files.update(kept)
    assert {"tile/0/003.p/32", "tile/entries/003.p/32"} <= set(kept)
    reopened = TileLog.open(storage, ORIGIN)
    assert sorted(reopened.drop_leftovers()) == sorted(kept)
    reopened.append([f"other {i}".encode() for i in range(600)])  # 903: tile/0/003.p/135
    assert older_partials(storage, 903, 903) == ({}, [])
