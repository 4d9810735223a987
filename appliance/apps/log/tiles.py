"""The C2SP tlog-tiles layout: paths, tiles and entry bundles, and a crash-safe tile store.

Theory of operation
-------------------
A log of ``size`` entries is kept as the static files of c2sp.org/tlog-tiles:

* ``tile/<L>/<N>[.p/<W>]``: tile ``N`` of level ``L`` holds up to 256 consecutive hashes of
  Merkle level ``8 L`` (level 0: leaf hashes; level 1: the roots of full level-0 tiles; ...),
  32 bytes each. ``N`` is written in 3-digit groups, all but the last prefixed ``x``
  (1234067 is ``x001/x234/067``). A full tile has 256 hashes; the rightmost tile of a level
  is *partial* with ``W = (size >> 8 L) mod 256`` hashes and the suffix ``.p/<W>``.
* ``tile/entries/<N>[.p/<W>]``: the entries themselves, 256 to a full bundle, each preceded
  by its length as a big-endian uint16 (so an entry is at most 65,535 bytes).

Files never change once written, because a full tile's hashes and a partial tile of a given
width are functions of the entries before them; a tile of a new width goes to a new path and
the old partial tile stays until a full tile supersedes it: :func:`prune_partials` deletes
the partial files at every position where a durable signed size has the full one (the server
runs it after publishing a checkpoint; a client that gets a 404 for a partial tile fetches the
full one). So the only mutable file is the store's *state record* ``state/tree``, the
unsigned checkpoint body (origin, size, root) of the last durable size.

Appending a batch (:meth:`TileLog.append`) computes the new hashes with a
:class:`~appliance.apps.log.merkle.Frontier`, writes the new full and partial tiles and
bundles, syncs, and only then replaces the state record and syncs again. Each file is written
atomically (:func:`appliance.host.files.atomic_write`: temp file, fsync, rename, directory
fsync), so a crash at any point leaves either the old state record, with every file it
needs intact (new files are beyond its size, and are rewritten by the next append), or the
new one with every file it needs durable. Opening (:meth:`TileLog.open`) reads the state
record, rebuilds the frontier from O(log size) tile hashes and checks that they give the
recorded root, so a store that disagrees with itself is refused
(:class:`~appliance.apps.log.errors.CorruptStoreError`) rather than extended.

Storage is behind the small :class:`Storage` protocol (read, atomic write, sync) so that an
object store can come later; :class:`PosixStorage` is a directory, :class:`MemoryStorage` a
dict. One writer per store: nothing here locks.

Reading the tree back goes through :class:`TileReader`, the
:class:`~appliance.apps.log.merkle.NodeReader` of a tree size over any source of tiles (our
disk now; a peer's or a server's HTTP tiles for an auditor later). It checks that each tile
has the width the size implies, not that its hashes are right: that is what comparing the
root with a signed checkpoint does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from appliance.apps.log.checkpoint import Checkpoint
from appliance.apps.log.errors import CorruptStoreError, EntryTooLargeError, LogDecodeError, LogError
from appliance.apps.log.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    Frontier,
    NodeReader,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_hash,
)
from appliance.host.files import TEMP_MARK, atomic_write, make_dirs, sync_dir

__all__ = [
    "MAX_ENTRY_SIZE",
    "STATE_PATH",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "Bundle",
    "MemoryStorage",
    "PosixStorage",
    "Storage",
    "Tile",
    "TileLog",
    "TileReader",
    "decode_bundle",
    "encode_bundle",
    "encode_index",
    "new_bundles",
    "new_tiles",
    "parse_path",
    "prune_partials",
    "tile_data",
    "tiles_for_size",
]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_TILE_LEVEL = 63
MAX_ENTRY_SIZE = 0xFFFF
#: Indexes beyond this are refused when parsing a path (no tree is larger than 2**63 entries).
MAX_INDEX = 1 << 63
STATE_PATH = "state/tree"


# --- Paths -------------------------------------------------------------------------------------


def encode_index(index: int) -> str:
    """``N`` as zero-padded 3-digit path elements, all but the last prefixed ``x``."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"a tile index is a non-negative integer, not {index!r}")
    groups = []
    while True:
        index, group = divmod(index, 1000)
        groups.append(group)
        if index == 0:
            break
    *upper, last = reversed(groups)
    return "/".join([*(f"x{g:03d}" for g in upper), f"{last:03d}"])


def _suffix(width: int) -> str:
    return "" if width == TILE_WIDTH else f".p/{width}"


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"a tile's width is 1 to {TILE_WIDTH}, not {width!r}")


@dataclass(frozen=True)
class Tile:
    """Tile ``index`` of ``level``, ``width`` hashes wide (256 for a full tile)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int):
            raise ValueError(f"a tile level is an integer, not {self.level!r}")
        if not 0 <= self.level <= MAX_TILE_LEVEL:
            raise ValueError(f"a tile level is 0 to {MAX_TILE_LEVEL}, not {self.level}")
        encode_index(self.index)
        _check_width(self.width)

    @property
    def path(self) -> str:
        return f"tile/{self.level}/{encode_index(self.index)}{_suffix(self.width)}"


@dataclass(frozen=True)
class Bundle:
    """Entry bundle ``index``, holding ``width`` entries (256 for a full bundle)."""

    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        encode_index(self.index)
        _check_width(self.width)

    @property
    def path(self) -> str:
        return f"tile/entries/{encode_index(self.index)}{_suffix(self.width)}"


_DECIMAL = re.compile(r"0|[1-9][0-9]{0,2}")
_UPPER_GROUP = re.compile(r"x[0-9]{3}")
_LAST_GROUP = re.compile(r"[0-9]{3}")


def parse_path(path: str) -> Tile | Bundle:
    """Read a tile or bundle path (without the URL prefix) strictly: one spelling per resource."""
    if not isinstance(path, str) or len(path) > 200:
        raise LogDecodeError("a tile path is a string of at most 200 characters")
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise LogDecodeError(f"{path!r} is not tile/<L>/<N> or tile/entries/<N>")
    kind, rest = parts[1], parts[2:]
    if kind != "entries" and not (_DECIMAL.fullmatch(kind) and int(kind) <= MAX_TILE_LEVEL):
        raise LogDecodeError(f"{path!r}: the level is not a decimal from 0 to {MAX_TILE_LEVEL}")
    width = TILE_WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        w = rest.pop()
        rest[-1] = rest[-1][:-2]
        if not _DECIMAL.fullmatch(w) or not 1 <= int(w) < TILE_WIDTH:
            raise LogDecodeError(f"{path!r}: a partial width is a decimal from 1 to {TILE_WIDTH - 1}")
        width = int(w)
    *upper, last = rest
    if not all(_UPPER_GROUP.fullmatch(g) for g in upper) or not _LAST_GROUP.fullmatch(last):
        raise LogDecodeError(f"{path!r}: the index is not 3-digit groups, all but the last with 'x'")
    if upper and upper[0] == "x000":
        raise LogDecodeError(f"{path!r}: the index has a leading zero group")
    index = int("".join([*(g[1:] for g in upper), last]))
    if index >= MAX_INDEX:
        raise LogDecodeError(f"{path!r}: the index is too large")
    return Bundle(index, width) if kind == "entries" else Tile(int(kind), index, width)


# --- Which tiles a tree has --------------------------------------------------------------------


def _level_tiles(old_count: int, new_count: int) -> list[tuple[int, int]]:
    """(index, width) of the tiles holding hashes ``[old_count, new_count)`` of one level."""
    if new_count <= old_count:
        return []
    first, last = old_count >> TILE_HEIGHT, (new_count - 1) >> TILE_HEIGHT
    return [(n, min(TILE_WIDTH, new_count - (n << TILE_HEIGHT))) for n in range(first, last + 1)]


def new_tiles(old_size: int, new_size: int) -> list[Tile]:
    """The tiles that growing the tree from ``old_size`` to ``new_size`` adds, level by level."""
    tiles: list[Tile] = []
    level = 0
    while new_size >> (TILE_HEIGHT * level):
        shift = TILE_HEIGHT * level
        found = _level_tiles(old_size >> shift, new_size >> shift)
        if not found:
            break
        tiles.extend(Tile(level, n, w) for n, w in found)
        level += 1
    return tiles


def tiles_for_size(size: int) -> list[Tile]:
    """Every tile, full and partial, of the tree of ``size`` entries."""
    return new_tiles(0, size)


def new_bundles(old_size: int, new_size: int) -> list[Bundle]:
    """The entry bundles that growing the log from ``old_size`` to ``new_size`` adds."""
    return [Bundle(n, w) for n, w in _level_tiles(old_size, new_size)]


def tile_data(tile: Tile, reader: NodeReader) -> bytes:
    """Build a tile from a tree's stored hashes (the reader must hold all of them)."""
    level = TILE_HEIGHT * tile.level
    start = tile.index << TILE_HEIGHT
    return b"".join(reader.node_hash(level, start + i) for i in range(tile.width))


def tile_hashes(tile: Tile, data: bytes) -> list[bytes]:
    """Split a tile into its hashes, checking its length against its width."""
    if len(data) != tile.width * HASH_SIZE:
        raise LogDecodeError(f"{tile.path} is {len(data)} bytes, not {tile.width} hashes of {HASH_SIZE}")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def encode_bundle(entries: Sequence[bytes]) -> bytes:
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY_SIZE:
            raise EntryTooLargeError(f"an entry is at most {MAX_ENTRY_SIZE} bytes, not {len(entry)}")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def decode_bundle(bundle: Bundle, data: bytes) -> list[bytes]:
    """The entries of a bundle: exactly ``width`` length-prefixed entries, nothing after them."""
    entries = []
    pos = 0
    for i in range(bundle.width):
        if pos + 2 > len(data):
            raise LogDecodeError(f"{bundle.path} ends before the length of entry {i}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if pos + length > len(data):
            raise LogDecodeError(f"{bundle.path} ends inside entry {i}")
        entries.append(data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise LogDecodeError(f"{bundle.path} has {len(data) - pos} bytes after its {bundle.width} entries")
    return entries


def _perfect_root(hashes: list[bytes]) -> bytes:
    while len(hashes) > 1:
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


class TileReader:
    """The Merkle tree of ``size`` entries, read from tiles (a NodeReader).

    ``fetch`` returns a tile's bytes; the reader keeps the last ``cache`` tiles it used.
    """

    def __init__(self, fetch: Callable[[Tile], bytes], size: int, *, cache: int = 64) -> None:
        self.fetch = fetch
        self.size = size
        self._cache: OrderedDict[Tile, list[bytes]] = OrderedDict()
        self._cache_size = cache

    def tile_for(self, level: int, index: int) -> Tile:
        """The tile of the current size that holds hash ``index`` of tile level ``level``."""
        count = self.size >> (TILE_HEIGHT * level)
        if index >= count:
            raise ValueError(f"a tree of size {self.size} has no hash {index} at tile level {level}")
        n = index >> TILE_HEIGHT
        return Tile(level, n, TILE_WIDTH if n < count >> TILE_HEIGHT else count % TILE_WIDTH)

    def hashes(self, tile: Tile) -> list[bytes]:
        hashes = self._cache.get(tile)
        if hashes is None:
            hashes = tile_hashes(tile, self.fetch(tile))
            self._cache[tile] = hashes
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(tile)
        return hashes

    def node_hash(self, level: int, index: int) -> bytes:
        tile_level, height = divmod(level, TILE_HEIGHT)
        first = index << height
        last = first + (1 << height) - 1
        tile = self.tile_for(tile_level, last)
        offset = first % TILE_WIDTH
        return _perfect_root(self.hashes(tile)[offset : offset + (1 << height)])


# --- Storage -----------------------------------------------------------------------------------


class Storage(Protocol):
    """Where a log's files live. Paths are relative, ``/``-separated, like the URL paths."""

    def read(self, path: str) -> bytes | None:
        """The file's content, or None if there is none."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Replace the file atomically: after a crash it holds the old or the new data."""
        ...

    def sync(self) -> None:
        """Make every write before this call durable."""
        ...

    def list(self, directory: str) -> list[str]:
        """The paths of the files directly in ``directory``, sorted (none if it does not exist)."""
        ...

    def delete(self, path: str) -> None:
        """Remove the file if it exists (a deletion lost in a crash must be harmless)."""
        ...


class MemoryStorage:
    """Files in a dict: for tests and in-process simulations."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def write(self, path: str, data: bytes) -> None:
        self.files[path] = bytes(data)

    def sync(self) -> None:
        pass

    def list(self, directory: str) -> list[str]:
        prefix = directory.rstrip("/") + "/"
        return sorted(p for p in self.files if p.startswith(prefix) and "/" not in p[len(prefix) :])

    def delete(self, path: str) -> None:
        self.files.pop(path, None)


_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


_SYNC_THREADS = 8
_sync_pool: ThreadPoolExecutor | None = None
_sync_pool_lock = threading.Lock()


def _fsync_all(items: Sequence[Any], sync: Callable[[Any], None] | None = None) -> None:
    """``sync(item)`` for each (an fsync of a file descriptor, or of a directory), concurrently
    on up to :data:`_SYNC_THREADS` threads; returns once all are done (raises the first error,
    after every sync has finished)."""
    global _sync_pool
    sync = sync or os.fsync
    if len(items) <= 1:
        for item in items:
            sync(item)
        return
    with _sync_pool_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="pst-log-fsync")
        pool = _sync_pool
    futures = [pool.submit(sync, item) for item in items]
    wait(futures)
    for future in futures:
        future.result()


class PosixStorage:
    """Files under a directory, each written with :func:`~appliance.host.files.atomic_write`.

    A write's content is synced before its rename, so after a crash a file holds its old or
    its new content; the rename itself is made durable by :meth:`sync`, which syncs each
    directory written to since the last one (a slot's dozens of tiles in a few directories
    cost a few directory syncs, not one each). Deletions are not synced (the protocol lets
    a lost deletion be harmless). Thread-safe: a :meth:`sync` returns only once every write
    that returned before it is durable, whichever thread syncs. Names starting with a dot
    are refused: they are reserved for the temporary files of writes in progress.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        make_dirs(root)
        if not root.is_dir():  # (make_dirs takes a file in its place for a directory made)
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root))
        self._dirty: set[Path] = set()
        self._made: set[Path] = set()  # directories known to exist (durably): no stat each write
        self._lock = threading.Lock()

    def _file(self, path: str) -> Path:
        parts = path.split("/")
        if not all(_COMPONENT.fullmatch(p) for p in parts):
            raise ValueError(f"{path!r} is not a relative path of plain names")
        return self.root.joinpath(*parts)

    def read(self, path: str) -> bytes | None:
        try:
            return self._file(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, path: str, data: bytes) -> None:
        file = self._file(path)
        make_dirs(file.parent)
        atomic_write(file, data, sync_dir=False)
        with self._lock:
            self._dirty.add(file.parent)

    def write_all(self, files: Mapping[str, bytes]) -> None:
        """:meth:`write` of each file, with the same guarantee per file (its content is synced
        before its rename), but the contents are all written first, then synced together (the
        fsyncs at once from a few threads: the file system commits them in one go), then
        renamed. A slot's hundreds of tiles cost a few fsync latencies, not one each (on this
        machine's disk 2-10 ms each: one after the other they bounded the log's rate)."""
        staged: list[tuple[int, Path, Path]] = []
        try:
            for path, data in files.items():
                file = self._file(path)
                if file.parent not in self._made:
                    make_dirs(file.parent)
                    self._made.add(file.parent)
                tmp = file.with_name(f".{file.name}{TEMP_MARK}{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                staged.append((fd, tmp, file))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            _fsync_all([fd for fd, _tmp, _file in staged])
        finally:
            for fd, _tmp, _file in staged:
                os.close(fd)
        for _fd, tmp, file in staged:
            os.replace(tmp, file)
        with self._lock:
            self._dirty.update(file.parent for _fd, _tmp, file in staged)

    def sync(self) -> None:
        # Under the lock throughout: a sync that finds a directory already taken by another
        # thread's sync waits for that one's fsync to finish.
        with self._lock:
            if len(self._dirty) > 1:
                _fsync_all(list(self._dirty), sync_dir)
                self._dirty.clear()
            while self._dirty:
                sync_dir(self._dirty.pop())

    def list(self, directory: str) -> list[str]:
        try:
            names = sorted(p.name for p in self._file(directory).iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [f"{directory.rstrip('/')}/{name}" for name in names if _COMPONENT.fullmatch(name)]

    def delete(self, path: str) -> None:
        file = self._file(path)
        file.unlink(missing_ok=True)
        if file.parent.name.endswith(".p"):
            # A partial tile's ``<N>.p/`` directory, once its last width is gone (pruning).
            with contextlib.suppress(OSError):  # not empty, or already gone
                self._made.discard(file.parent)
                file.parent.rmdir()


# --- Pruning ---------------------------------------------------------------------------------


def prune_partials(storage: Storage, covered: int, since: int = 0) -> list[str]:
    """Delete the partial tiles and bundles that a full one covered by ``covered`` supersedes.

    ``covered`` is a size whose files are durable (the server passes its published signed
    checkpoint's size, which is written only after the tiles it covers are synced): at every
    position where that tree has a *full* tile or bundle, the partial files ``<N>.p/<W>`` are
    superseded (c2sp.org/tlog-tiles lets a log delete them; a client that gets a 404 for one
    fetches the full one). The full file is checked to exist, of full length, before its
    partials go; otherwise they stay. Positions whose full tile ``since`` already covered are
    not looked at (a caller that pruned up to ``since`` before). Deletions are not synced: a
    deletion lost in a crash leaves a superseded partial, which the next pass with an earlier
    ``since`` (a restarted server starts at 0) deletes. Returns the deleted paths.
    """
    if covered < 0 or since < 0:
        raise ValueError(f"sizes are non-negative, not {since} and {covered}")
    deleted: list[str] = []
    level = 0
    while covered >> (TILE_HEIGHT * level) >= TILE_WIDTH:
        shift = TILE_HEIGHT * level
        first, end = (since >> shift) >> TILE_HEIGHT, (covered >> shift) >> TILE_HEIGHT
        for n in range(first, end):
            fulls: list[Tile | Bundle] = [Tile(level, n)] + ([Bundle(n)] if level == 0 else [])
            for full in fulls:
                partials = storage.list(full.path + ".p")
                if not partials:
                    continue
                data = storage.read(full.path)
                if data is None or (isinstance(full, Tile) and len(data) != TILE_WIDTH * HASH_SIZE):
                    continue  # no durable full replacement: keep the partials
                for path in partials:
                    storage.delete(path)
                    deleted.append(path)
        level += 1
    return deleted


# --- The store ---------------------------------------------------------------------------------


#: Level-0 positions beyond the durable size where :meth:`TileLog.drop_leftovers` looks for a
#: lost batch's files: a batch of up to 1,048,576 entries (a replicated slot holds at most
#: 262,144; a catch-up can append more at once, whose leftovers beyond this are not dropped).
LEFTOVER_SPAN: Final = 4096


class TileLog:
    """A log's tiles and entry bundles in a :class:`Storage`, appended in durable batches.

    Open with :meth:`open`. After a failed append (a write or sync raised) the object refuses
    further appends: what is on disk is then only known by reopening.
    """

    def __init__(self, storage: Storage, origin: str, frontier: Frontier) -> None:
        self.storage = storage
        self.origin = origin
        self._frontier = frontier
        self._reader = TileReader(self._fetch, frontier.size)
        self._tails: list[list[bytes]] = []
        self._bundle_tail: list[bytes] = []
        self._failed = False
        self._pruned = 0

    @classmethod
    def open(cls, storage: Storage, origin: str) -> TileLog:
        """Open the log in ``storage`` (empty if new) and check its tiles against its state record."""
        record = storage.read(STATE_PATH)
        if record is None:
            Checkpoint(origin, 0, EMPTY_ROOT)  # checks the origin
            return cls(storage, origin, Frontier())
        try:
            state = Checkpoint.parse(record.decode("utf-8"))
        except (UnicodeDecodeError, LogDecodeError) as exc:
            raise CorruptStoreError(f"{STATE_PATH} is not a tree head: {exc}") from None
        if state.origin != origin:
            raise CorruptStoreError(f"the store holds the log {state.origin!r}, not {origin!r}")
        log = cls(storage, origin, Frontier(state.size))
        try:
            log._frontier = Frontier.from_reader(log._reader, state.size)
            log._tails = log._read_tails(state.size)
            log._bundle_tail = log._read_bundle_tail(state.size)
        except LogDecodeError as exc:
            raise CorruptStoreError(f"the stored log of size {state.size} is damaged: {exc}") from None
        if log._frontier.root() != state.root:
            raise CorruptStoreError(f"the stored tiles do not give the recorded root of size {state.size}")
        return log

    def _fetch(self, tile: Tile) -> bytes:
        data = self.storage.read(tile.path)
        if data is None:
            raise CorruptStoreError(f"{tile.path} is missing")
        if len(data) != tile.width * HASH_SIZE:
            raise CorruptStoreError(f"{tile.path} is {len(data)} bytes, not {tile.width} hashes")
        return data

    def _read_tails(self, size: int) -> list[list[bytes]]:
        tails = []
        level = 0
        while count := size >> (TILE_HEIGHT * level):
            width = count % TILE_WIDTH
            tile = Tile(level, count >> TILE_HEIGHT, width) if width else None
            tails.append(list(self._reader.hashes(tile)) if tile else [])
            level += 1
        return tails

    def _read_bundle_tail(self, size: int) -> list[bytes]:
        width = size % TILE_WIDTH
        if not width:
            return []
        entries = self.read_entries(size - width, size)
        if [leaf_hash(e) for e in entries] != self._tails[0]:
            raise CorruptStoreError(f"{Bundle(size >> TILE_HEIGHT, width).path} does not match its tile")
        return entries

    # --- The tree ---

    @property
    def size(self) -> int:
        return self._frontier.size

    def root(self) -> bytes:
        return self._frontier.root()

    def root_after(self, entries: Sequence[bytes]) -> bytes:
        """The root the tree would have with ``entries`` appended (nothing is written)."""
        frontier = self._frontier.copy()
        for entry in entries:
            frontier.append(leaf_hash(bytes(entry)))
        return frontier.root()

    def checkpoint(self) -> Checkpoint:
        """The unsigned checkpoint body of the current (durable) size."""
        return Checkpoint(self.origin, self.size, self.root())

    def node_hash(self, level: int, index: int) -> bytes:
        return self._reader.node_hash(level, index)

    def root_at(self, size: int) -> bytes:
        self._check_size(size)
        return root_hash(self._reader, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        self._check_size(size)
        return inclusion_proof(self._reader, index, size)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        new_size = self.size if new_size is None else new_size
        self._check_size(new_size)
        return consistency_proof(self._reader, old_size, new_size)

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"the log has {self.size} entries, not {size}")

    def read_entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)`` from the entry bundles."""
        if not 0 <= start <= end <= self._reader.size:
            raise ValueError(f"entries [{start}, {end}) are not in a log of {self._reader.size}")
        entries: list[bytes] = []
        if start == end:
            return entries
        for n in range(start >> TILE_HEIGHT, ((end - 1) >> TILE_HEIGHT) + 1):
            width = min(TILE_WIDTH, self._reader.size - (n << TILE_HEIGHT))
            bundle = Bundle(n, width)
            data = self.storage.read(bundle.path)
            if data is None:
                raise CorruptStoreError(f"{bundle.path} is missing")
            try:
                decoded = decode_bundle(bundle, data)
            except LogDecodeError as exc:
                raise CorruptStoreError(str(exc)) from None
            first = n << TILE_HEIGHT
            entries.extend(decoded[max(start, first) - first : end - first])
        return entries

    # --- Repairing ---

    def rewrite(self, files: Mapping[str, bytes]) -> None:
        """Replace damaged tiles and entry bundles with their right content (a repair, see
        :mod:`appliance.apps.log.repair`): bundles first, each file atomically, then sync; the
        cached tiles are dropped. Only tile and bundle paths (LogDecodeError otherwise, nothing
        written); the state record and the tree in memory do not change."""
        for path in files:
            parse_path(path)
        for path in sorted(files, key=lambda p: (not p.startswith("tile/entries/"), p)):
            self.storage.write(path, files[path])
        self.storage.sync()
        self._reader._cache.clear()

    # --- Pruning ---

    def prune(self, covered: int) -> list[str]:
        """Delete the partial files superseded by full ones that the durable size ``covered``
        has (:func:`prune_partials`); positions an earlier call covered are skipped, so the
        first call after opening looks at the whole log once. Returns the deleted paths."""
        self._check_size(covered)
        deleted = prune_partials(self.storage, covered, self._pruned)
        self._pruned = max(self._pruned, covered)
        return deleted

    def drop_leftovers(self, span: int = LEFTOVER_SPAN) -> list[str]:
        """Delete what a batch lost in a crash left beyond the durable size: at each level, the
        widths at the size's position wider than its own, and every tile and bundle, full or
        partial, at the positions after it (a full one at the size's position too), for
        ``span`` level-0 positions (the files of a batch of ``256 * span`` entries) and as
        many as cover them at the levels above. A crash leaves them; a power cut can keep any
        subset of them (renames not yet synced), so a position without a file does not end the
        search. A partial left there is wrong under a width the tree may later pass without
        ending at it, which the server's audit of older partials would take for tampering; a
        full one could stand in for a missing partial of the signed size. The server calls
        this once at its start, as the log's one writer (never a reader of a live log: the
        writer's newer files are beyond the size a reader opened). Deletions are not synced (a
        lost one is found again next time). Returns the deleted paths."""
        deleted: list[str] = []
        level = 0
        while level <= 2 or self.size >> (TILE_HEIGHT * (level - 1)):
            count = self.size >> (TILE_HEIGHT * level)
            first, keep = count >> TILE_HEIGHT, count % TILE_WIDTH
            for bundles in (False, True) if level == 0 else (False,):
                for n in range(first, first + (span >> (TILE_HEIGHT * level)) + 2):
                    full = Bundle(n).path if bundles else Tile(level, n).path
                    for path in self.storage.list(full + ".p"):
                        width = path.rsplit("/", 1)[1]
                        if n > first or not width.isdigit() or int(width) > keep:
                            self.storage.delete(path)
                            deleted.append(path)
                    if self.storage.read(full) is not None:
                        self.storage.delete(full)
                        deleted.append(full)
            level += 1
        return deleted

    # --- Appending ---

    def append(self, entries: Sequence[bytes]) -> int:
        """Append a batch; returns the new size once every entry is durable.

        Entries ``[old size, new size)`` are the batch, in order. Raises
        :class:`EntryTooLargeError` (nothing written) for an entry over 65,535 bytes.
        """
        if self._failed:
            raise LogError("an earlier append failed: reopen the log to learn what is durable")
        for entry in entries:
            if not isinstance(entry, bytes | bytearray):
                raise TypeError("log entries are bytes")
            if len(entry) > MAX_ENTRY_SIZE:
                raise EntryTooLargeError(f"an entry is at most {MAX_ENTRY_SIZE} bytes, not {len(entry)}")
        if not entries:
            return self.size
        old_size = self.size
        frontier = self._frontier.copy()
        tails = [list(t) for t in self._tails]
        bundle_tail = list(self._bundle_tail)
        writes: dict[str, bytes] = {}
        batch = [bytes(entry) for entry in entries]
        leaves = [leaf_hash(entry) for entry in batch]

        def completed(nodes: list[tuple[int, int, bytes]]) -> None:
            for level, index, digest in nodes:
                tile_level, rest = divmod(level, TILE_HEIGHT)
                if rest:
                    continue
                while tile_level >= len(tails):
                    tails.append([])
                tails[tile_level].append(digest)
                if len(tails[tile_level]) == TILE_WIDTH:
                    writes[Tile(tile_level, index >> TILE_HEIGHT).path] = b"".join(tails[tile_level])
                    tails[tile_level] = []

        i = 0
        while i < len(batch):
            if not bundle_tail and len(batch) - i >= TILE_WIDTH:
                # A whole level-0 tile and bundle at once: its leaves are the tile, its root
                # enters the frontier as one subtree of height 8.
                chunk = leaves[i : i + TILE_WIDTH]
                n = frontier.size >> TILE_HEIGHT
                writes[Tile(0, n).path] = b"".join(chunk)
                writes[Bundle(n).path] = encode_bundle(batch[i : i + TILE_WIDTH])
                if not tails:
                    tails.append([])
                completed(frontier.append_subtree(TILE_HEIGHT, _perfect_root(chunk)))
                i += TILE_WIDTH
                continue
            completed(frontier.append(leaves[i]))
            bundle_tail.append(batch[i])
            if len(bundle_tail) == TILE_WIDTH:
                writes[Bundle((frontier.size - 1) >> TILE_HEIGHT).path] = encode_bundle(bundle_tail)
                bundle_tail = []
            i += 1
        new_size = frontier.size
        for tile_level, tail in enumerate(tails):
            shift = TILE_HEIGHT * tile_level
            if tail and old_size >> shift != new_size >> shift:
                tile = Tile(tile_level, new_size >> (shift + TILE_HEIGHT), len(tail))
                writes[tile.path] = b"".join(tail)
        if bundle_tail:
            writes[Bundle(new_size >> TILE_HEIGHT, len(bundle_tail)).path] = encode_bundle(bundle_tail)
        state = Checkpoint(self.origin, new_size, frontier.root()).text().encode("utf-8")
        try:
            if isinstance(self.storage, PosixStorage):
                self.storage.write_all(writes)
            else:
                for path, data in writes.items():
                    self.storage.write(path, data)
            self.storage.sync()
            self.storage.write(STATE_PATH, state)
            self.storage.sync()
        except BaseException:
            self._failed = True
            raise
        self._frontier, self._tails, self._bundle_tail = frontier, tails, bundle_tail
        self._reader.size = new_size
        return new_size
