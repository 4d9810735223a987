"""C2SP tlog-tiles: paths, the tiles of a tree, batch appends, and crash safety of the tile store."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log import merkle
from appliance.apps.log.checkpoint import Checkpoint
from appliance.apps.log.errors import CorruptStoreError, EntryTooLargeError, LogDecodeError, LogError
from appliance.apps.log.merkle import MemoryTree
from appliance.apps.log.tiles import (
    STATE_PATH,
    Bundle,
    MemoryStorage,
    PosixStorage,
    Storage,
    Tile,
    TileLog,
    decode_bundle,
    encode_bundle,
    encode_index,
    new_bundles,
    new_tiles,
    parse_path,
    tile_data,
    tiles_for_size,
)

ORIGIN = "log.example/tiles"


def _entries(start: int, count: int, tag: bytes = b"e") -> list[bytes]:
    return [tag + i.to_bytes(4, "big") for i in range(start, start + count)]


def _reference(entries: list[bytes]) -> MemoryTree:
    tree = MemoryTree()
    for e in entries:
        tree.append(e)
    return tree


def _check_files(storage: Storage, entries: list[bytes], sizes: list[int]) -> None:
    """Every tile and bundle of every size in ``sizes`` is stored and built from the right hashes."""
    tree = _reference(entries)
    for size in sizes:
        for tile in tiles_for_size(size):
            assert storage.read(tile.path) == tile_data(tile, tree), tile.path
        for bundle in new_bundles(0, size):
            first = bundle.index * 256
            assert storage.read(bundle.path) == encode_bundle(entries[first : first + bundle.width])


# --- Paths -------------------------------------------------------------------------------------


def test_index_encoding_follows_the_spec() -> None:
    assert encode_index(1234067) == "x001/x234/067"
    assert encode_index(0) == "000"
    assert encode_index(999) == "999"
    assert encode_index(1000) == "x001/000"
    assert Tile(0, 1234067).path == "tile/0/x001/x234/067"
    assert Tile(3, 5, 17).path == "tile/3/005.p/17"
    assert Bundle(1000, 1).path == "tile/entries/x001/000.p/1"
    assert Bundle(7).path == "tile/entries/007"


@given(
    tile=st.one_of(
        st.builds(Tile, st.integers(0, 63), st.integers(0, 2**63 - 1), st.integers(1, 256)),
        st.builds(Bundle, st.integers(0, 2**63 - 1), st.integers(1, 256)),
    )
)
def test_paths_round_trip(tile: Tile | Bundle) -> None:
    assert parse_path(tile.path) == tile


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/x000/001",  # leading zero group
        "tile/0/1",  # not 3 digits
        "tile/0/0001",
        "tile/0/001/002",  # upper group without x
        "tile/0/x001",  # last group with x
        "tile/00/001",  # level with a leading zero
        "tile/64/001",  # level too high
        "tile/0/001.p/256",  # a full tile has no .p
        "tile/0/001.p/0",
        "tile/0/001.p/07",
        "tile/0/001.p",
        "tile/0/x001.p/5",
        "tile/data/001",
        "tiles/0/001",
        "tile/entries",
        "tile/0/" + "x999/" * 10 + "999",  # beyond 2**63
    ],
)
def test_non_canonical_paths_are_refused(path: str) -> None:
    with pytest.raises(LogDecodeError):
        parse_path(path)


@given(
    st.one_of(
        st.text(max_size=40), st.from_regex(r"tile/(entries|[0-9]{1,2})(/x?[0-9]{1,4}){1,3}(\.p/[0-9]{1,3})?")
    )
)
def test_fuzz_parse_path_raises_only_decode_errors(path: str) -> None:
    try:
        parsed = parse_path(path)
    except LogDecodeError:
        return
    assert parsed.path == path


# --- The tiles of a tree ------------------------------------------------------------------------


def test_tiles_of_the_spec_examples() -> None:
    tiles = tiles_for_size(70_000)
    by_level = {level: [t for t in tiles if t.level == level] for level in (0, 1, 2)}
    assert len(tiles) == sum(len(v) for v in by_level.values())
    assert [t.width for t in by_level[0]] == [256] * 273 + [112]
    assert [t.width for t in by_level[1]] == [256, 17]
    assert [(t.index, t.width) for t in by_level[2]] == [(0, 1)]
    assert tiles_for_size(256) == [Tile(0, 0), Tile(1, 0, 1)]
    assert tiles_for_size(0) == []
    assert new_tiles(256, 256) == []
    assert new_tiles(255, 257) == [Tile(0, 0), Tile(0, 1, 1), Tile(1, 0, 1)]


def test_a_tree_of_70000_entries_in_the_spec_layout() -> None:
    entries = _entries(0, 70_000)
    log = TileLog.open(MemoryStorage(), ORIGIN)
    for start in range(0, 70_000, 9_000):
        log.append(entries[start : start + 9_000])
    tree = _reference(entries)
    assert log.root() == tree.root()
    _check_files(log.storage, entries, [70_000])
    # Level 2 is reached: a hash of level 16 comes from the partial level-2 tile... of width 1.
    assert log.node_hash(16, 0) == tree.node_hash(16, 0)
    assert log.inclusion_proof(65_537) == merkle.inclusion_proof(tree, 65_537, 70_000)
    assert log.consistency_proof(65_536) == merkle.consistency_proof(tree, 65_536, 70_000)


# --- Batch appends -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.integers(0, 600), min_size=1, max_size=6), data=st.data())
def test_batches_write_the_tiles_of_every_size_and_proofs_agree(
    batches: list[int], data: st.DataObject
) -> None:
    storage = MemoryStorage()
    log = TileLog.open(storage, ORIGIN)
    entries: list[bytes] = []
    sizes = []
    for count in batches:
        batch = _entries(len(entries), count)
        assert log.append(batch) == len(entries) + count
        entries += batch
        sizes.append(len(entries))
    tree = _reference(entries)
    assert log.root() == tree.root()
    assert log.checkpoint() == Checkpoint(ORIGIN, len(entries), tree.root())
    _check_files(storage, entries, sizes)
    if entries:
        n = data.draw(st.integers(1, len(entries)), label="size")
        m = data.draw(st.integers(0, n - 1), label="index")
        assert log.inclusion_proof(m, n) == merkle.inclusion_proof(tree, m, n)
        assert log.consistency_proof(m, n) == merkle.consistency_proof(tree, m, n)
        assert log.root_at(n) == merkle.root_hash(tree, n)
        assert log.read_entries(m, n) == entries[m:n]
    reopened = TileLog.open(storage, ORIGIN)
    assert (reopened.size, reopened.root()) == (log.size, log.root())
    reopened.append([b"after reopening"])
    tree.append(b"after reopening")
    assert reopened.root() == tree.root()


def test_entry_size_limit() -> None:
    storage = MemoryStorage()
    log = TileLog.open(storage, ORIGIN)
    with pytest.raises(EntryTooLargeError, match="65535"):
        log.append([b"ok", bytes(65_536)])
    assert storage.files == {}
    assert log.append([bytes(65_535), b""]) == 2
    assert log.read_entries(0, 2) == [bytes(65_535), b""]
    with pytest.raises(TypeError):
        log.append(["text"])  # type: ignore[list-item]


def test_bundles_are_strictly_decoded() -> None:
    bundle = Bundle(0, 2)
    data = encode_bundle([b"a", b"bc"])
    assert decode_bundle(bundle, data) == [b"a", b"bc"]
    for bad, reason in [
        (data[:-1], "inside entry 1"),
        (data + b"\x00", "1 bytes after"),
        (data[:3], "length of entry 1"),
    ]:
        with pytest.raises(LogDecodeError, match=reason):
            decode_bundle(bundle, bad)


# --- Crash safety ------------------------------------------------------------------------------


class Crash(Exception):
    """The simulated power cut."""


class FailingStorage:
    """Passes ``allowed`` writes through to ``inner``, then every write raises (the machine died)."""

    def __init__(self, inner: Storage, allowed: int) -> None:
        self.inner = inner
        self.allowed = allowed

    def read(self, path: str) -> bytes | None:
        return self.inner.read(path)

    def write(self, path: str, data: bytes) -> None:
        if self.allowed == 0:
            raise Crash(path)
        self.allowed -= 1
        self.inner.write(path, data)

    def sync(self) -> None:
        self.inner.sync()


def _crash_at_every_write(make_storage: object) -> None:
    assert callable(make_storage)
    old = _entries(0, 300)
    batch = _entries(300, 300, b"lost")
    replacement = _entries(300, 77, b"new")
    writes = None
    for allowed in range(0, 20):
        storage: Storage = make_storage(allowed)
        TileLog.open(storage, ORIGIN).append(old)
        crashing = TileLog.open(FailingStorage(storage, allowed), ORIGIN)
        try:
            crashing.append(batch)
        except Crash:
            with pytest.raises(LogError, match="reopen"):
                crashing.append(replacement)
            survived = old
        else:
            writes = allowed if writes is None else writes
            survived = old + batch
        log = TileLog.open(storage, ORIGIN)
        assert log.size == len(survived)
        assert log.root() == _reference(survived).root()
        log.append(replacement)
        final = survived + replacement
        assert log.root() == _reference(final).root()
        _check_files(storage, final, [len(old), len(survived), len(final)])
        assert TileLog.open(storage, ORIGIN).read_entries(0, len(final)) == final
    # 300 -> 600 entries writes tiles 0/001, 0/002.p/88, 1/000.p/2, two bundles, the state record.
    assert writes == 6


def test_crash_between_any_two_writes_loses_only_the_unacknowledged_batch() -> None:
    _crash_at_every_write(lambda allowed: MemoryStorage())


def test_crash_between_any_two_writes_on_disk(tmp_path: Path) -> None:
    _crash_at_every_write(lambda allowed: PosixStorage(tmp_path / f"crash{allowed}"))


class PowerCutStorage(MemoryStorage):
    """Writes since the last sync are pending; a power cut keeps an arbitrary subset of them."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[str, bytes] = {}

    def read(self, path: str) -> bytes | None:
        return self.pending.get(path, self.files.get(path))

    def write(self, path: str, data: bytes) -> None:
        self.pending[path] = bytes(data)

    def sync(self) -> None:
        self.files.update(self.pending)
        self.pending.clear()

    def power_cut(self, rng: random.Random) -> None:
        for path, data in self.pending.items():
            if rng.random() < 0.5:
                self.files[path] = data
        self.pending.clear()


class CutAfter(PowerCutStorage):
    def __init__(self, cut_after: int) -> None:
        super().__init__()
        self.cut_after = cut_after

    def write(self, path: str, data: bytes) -> None:
        if self.cut_after == 0:
            raise Crash(path)
        self.cut_after -= 1
        super().write(path, data)


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.integers(1, 400), min_size=1, max_size=4),
    cut=st.integers(0, 12),
    seed=st.integers(0, 2**32),
)
def test_power_cut_keeps_an_acknowledged_prefix_whatever_the_disk_kept(
    batches: list[int], cut: int, seed: int
) -> None:
    storage = CutAfter(10**9)
    log = TileLog.open(storage, ORIGIN)
    acknowledged: list[bytes] = []
    for count in batches[:-1]:
        batch = _entries(len(acknowledged), count)
        log.append(batch)
        acknowledged += batch
    last = _entries(len(acknowledged), batches[-1], b"last")
    storage.cut_after = cut
    try:
        log.append(last)
        acknowledged += last
        possible = [acknowledged]
    except Crash:
        possible = [acknowledged, acknowledged + last]
    storage.power_cut(random.Random(seed))
    reopened = TileLog.open(storage, ORIGIN)
    assert reopened.size in {len(p) for p in possible}
    kept = next(p for p in possible if len(p) == reopened.size)
    assert reopened.root() == _reference(kept).root()
    assert reopened.read_entries(0, len(kept)) == kept
    storage.cut_after = 10**9
    reopened.append([b"more"])
    assert TileLog.open(storage, ORIGIN).root() == _reference([*kept, b"more"]).root()


# --- A store that disagrees with itself is refused ----------------------------------------------


def test_damaged_store_is_refused() -> None:
    storage = MemoryStorage()
    TileLog.open(storage, ORIGIN).append(_entries(0, 300))
    good = dict(storage.files)

    def damaged(path: str, data: bytes | None) -> None:
        storage.files = dict(good)
        if data is None:
            del storage.files[path]
        else:
            storage.files[path] = data
        with pytest.raises(CorruptStoreError):
            TileLog.open(storage, ORIGIN)

    partial = Tile(0, 1, 44).path
    damaged(partial, None)
    damaged(partial, good[partial][:-1])
    damaged(partial, bytes(32) + good[partial][32:])
    damaged(Bundle(1, 44).path, encode_bundle([b"forged"] * 44))
    damaged(STATE_PATH, b"not a tree head")
    damaged(STATE_PATH, Checkpoint(ORIGIN, 300, bytes(32)).text().encode())
    storage.files = dict(good)
    with pytest.raises(CorruptStoreError, match="not 'other'"):
        TileLog.open(storage, "other")


def test_posix_storage_refuses_paths_outside_plain_names(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path / "log")
    for bad in ["../escape", "/abs", "tile/.hidden", "tile//x", ""]:
        with pytest.raises(ValueError, match="plain names"):
            storage.write(bad, b"x")
    storage.write("tile/0/001.p/5", b"data")
    assert (tmp_path / "log" / "tile" / "0" / "001.p" / "5").read_bytes() == b"data"
    assert storage.read("tile/0/001.p/5") == b"data"
    assert storage.read("tile/0/002") is None
    assert storage.read("tile/0/001.p/5/under-a-file") is None


def test_posix_storage_syncs_each_directory_written_once_per_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write syncs its file before the rename; the renames are made durable by ``sync``, one
    directory sync per directory written since the last one (not one per file)."""
    from appliance.apps.log import tiles as tiles_module

    synced: list[Path] = []
    real = tiles_module.sync_dir
    monkeypatch.setattr(tiles_module, "sync_dir", lambda d: (synced.append(d), real(d)))
    storage = PosixStorage(tmp_path)
    log = TileLog.open(storage, "log.example/sync")
    synced.clear()
    log.append([b"entry %d" % i for i in range(1000)])  # 3 full bundles and tiles, partials, state
    # Step 2's files, then the state record: each sync covers the directories written before it.
    written = ["tile/0", "tile/0/003.p", "tile/1/000.p", "tile/entries", "tile/entries/003.p"]
    assert sorted(synced[:-1]) == [tmp_path / d for d in written]  # 11 files, 5 directory syncs
    assert synced[-1] == tmp_path / "state"
    synced.clear()
    storage.write("a/b", b"1")
    storage.write("a/c", b"2")
    assert synced == []
    storage.sync()
    storage.sync()
    assert synced == [tmp_path / "a"]
    assert TileLog.open(PosixStorage(tmp_path), "log.example/sync").size == 1000


def test_a_private_file_is_never_written_without_its_directory_sync(tmp_path: Path) -> None:
    from appliance.host.files import atomic_write

    with pytest.raises(ValueError, match="private"):
        atomic_write(tmp_path / "secret", b"s", private=True, sync_dir=False)
    assert not (tmp_path / "secret").exists()


def test_posix_write_all_renames_nothing_before_every_file_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PosixStorage.write_all`` (a slot's tiles at once, synced concurrently): every content
    is written and synced before the first rename, so a crash (here: the third fsync fails)
    leaves each file with its old content, and the next append rewrites the files (the state
    record was not moved)."""
    import os as os_module

    from appliance.apps.log import tiles as tiles_module

    storage = PosixStorage(tmp_path)
    log = TileLog.open(storage, "log.example/all")
    log.append(_entries(0, 300))
    before = {p: storage.read(p) for p in ("tile/0/001.p/44", "tile/entries/001.p/44", "state/tree")}
    calls: list[int] = []
    real = os_module.fsync
    lock = threading.Lock()

    def failing(fd: int) -> None:
        with lock:
            calls.append(fd)
            third = len(calls) == 3
        if third:
            raise OSError(5, "simulated I/O error")
        real(fd)

    monkeypatch.setattr(tiles_module.os, "fsync", failing)
    with pytest.raises(OSError):
        log.append(_entries(300, 300))
    monkeypatch.setattr(tiles_module.os, "fsync", real)
    assert len(calls) >= 3  # (the others were synced concurrently)
    # Nothing renamed into place: 0/002, its bundle and the new partials do not exist.
    assert storage.read("tile/0/002") is None and storage.read("tile/entries/002") is None
    assert {p: storage.read(p) for p in before} == before
    reopened = TileLog.open(PosixStorage(tmp_path), "log.example/all")
    assert reopened.size == 300
    reopened.append(_entries(300, 300))
    assert reopened.root() == _reference(_entries(0, 600)).root()
    assert TileLog.open(PosixStorage(tmp_path), "log.example/all").read_entries(0, 600) == _entries(0, 600)
    storage.write_all({"x/a": b"1", "x/b": b"2"})
    storage.sync()
    assert (storage.read("x/a"), storage.read("x/b")) == (b"1", b"2")
