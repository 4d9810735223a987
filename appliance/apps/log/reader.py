"""The read side of a log: what its latest signed checkpoint covers, read back from its storage.

Theory of operation
-------------------
The server writes the log's latest signed checkpoint (a c2sp.org/signed-note) to the storage
path :data:`CHECKPOINT_PATH` (``checkpoint``), beside the tiles, after the tiles it covers are
durable. :func:`read_checkpoint` reads it and verifies it with the log's verifier key;
:class:`LogReader` answers every question of the HTTP read side from that checkpoint and the
tiles and bundles, never from the store's unsigned state record:

* a *full* tile or bundle is served only if the signed size covers it: after a crash, files
  written for a lost batch may remain beyond the durable size (``TileLog``'s docstring), and
  they are wrong until the log grows over them;
* a *partial* tile or bundle only if it is no wider than what the signed size has at that
  position, and its bytes are a prefix of the tile or bundle of the signed size (so a partial
  file left by a lost batch, which later appends do not rewrite, is never served; the one of
  the signed size itself is served as it is);
* proofs, entries and searches only within the signed size, read through a
  :class:`~appliance.apps.log.tiles.TileReader` of the signed size; each proof is checked
  against the signed root (and the root computed for the other size) before it is returned,
  so that a damaged store answers :class:`~appliance.apps.log.errors.CorruptStoreError`
  instead of a proof that fails at the client.

Everything a client receives still has to be checked by the client against the signed
checkpoint (``pst log verify`` does): this module only avoids serving what it knows is wrong.

Searching (:meth:`LogReader.search`) goes backwards from the end of the signed tree (or from
``before``), reading at most :data:`MAX_SCAN` entries per call; a call that stops at the bound
says where to continue. The full bundles the search index covers
(:mod:`appliance.apps.log.index`) are searched through it: only the bundles whose record may
match are read, and each is checked against its record's digest. The rest (the newest
entries) is a linear scan. Receive times grow along the log (each server stamps what it
receives, in order), so the time bounds are found by binary search (O(log n) bundle reads) and
the scan covers only the entries between them: it starts at the first entry received at least
:data:`TIME_SLACK_US` after ``until`` and stops at the last one received that long before
``since``. Receive times are the receiving servers' clocks, which can step back: an entry more
than a minute out of order may be missed by a time-bounded scan (a search without time
bounds scans everything; the index's records have each bundle's exact time range).

Reads go through the :class:`~appliance.apps.log.tiles.Storage` protocol only; the files the
server replaces (the checkpoint) are replaced atomically, so a reader sees the old or the new.
Not thread-safe by itself beyond that: the cache of the opened checkpoint is a single slot,
replaced whole.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from appliance.apps.log import merkle
from appliance.apps.log.checkpoint import Checkpoint, Verifier, open_checkpoint
from appliance.apps.log.errors import CorruptStoreError, LogDecodeError, LogError, ProofError
from appliance.apps.log.index import BundleRecord, LogIndex, app_key, bundle_digest, host_key
from appliance.apps.log.syslog import Entry
from appliance.apps.log.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    Bundle,
    Storage,
    Tile,
    TileReader,
    decode_bundle,
    encode_bundle,
    parse_path,
)

__all__ = [
    "CHECKPOINT_PATH",
    "MAX_ENTRIES",
    "MAX_SCAN",
    "MAX_SEARCH_RESULTS",
    "LogReader",
    "NotCoveredError",
    "SearchQuery",
    "SignedCheckpoint",
    "entry_document",
    "read_checkpoint",
]

#: Where the server keeps the latest signed checkpoint, in the log's storage.
CHECKPOINT_PATH: Final = "checkpoint"
#: Most entries one :meth:`LogReader.entries` call returns.
MAX_ENTRIES: Final = 1000
#: Most entries one :meth:`LogReader.search` call decodes (64 bundles).
MAX_SCAN: Final = 16_384
#: How far out of order (a clock stepped back) receive times may be and still be found by a
#: search with time bounds, in microseconds.
TIME_SLACK_US: Final = 60_000_000
#: Most index records one search walks (bundles it skips without reading them: 64M entries).
MAX_WALK: Final = 262_144
#: Most matches one search returns.
MAX_SEARCH_RESULTS: Final = 1000
#: A message's text in a JSON document is cut to this many characters.
MAX_TEXT: Final = 4096


class _Rewritten(Exception):
    """A bundle a search read is not the one its index record was made from."""

    def __init__(self, bundle: int) -> None:
        super().__init__(bundle)
        self.bundle = bundle


class NotCoveredError(LogError, ValueError):
    """An index or size the latest signed checkpoint does not cover (yet), or no checkpoint."""


@dataclass(frozen=True)
class SignedCheckpoint:
    """The note as stored (served byte for byte) and the checkpoint it verified to."""

    note: bytes
    checkpoint: Checkpoint


def read_checkpoint(storage: Storage, origin: str, verifiers: Iterable[Verifier]) -> SignedCheckpoint | None:
    """The latest signed checkpoint in ``storage``, verified; None if the server wrote none yet.

    Raises :class:`LogDecodeError` (or :class:`NoteVerificationError`) if the stored note does
    not open with ``verifiers`` or is for another origin.
    """
    note = storage.read(CHECKPOINT_PATH)
    if note is None:
        return None
    return SignedCheckpoint(note, open_checkpoint(note, origin, verifiers))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encoded(fields: dict[str, Any]) -> dict[str, Any]:
    """A JSON document of ``fields``: hashes (bytes) and lists of hashes in base64."""
    return {
        key: _b64(value)
        if isinstance(value, bytes)
        else [_b64(v) for v in value]
        if isinstance(value, list)
        else value
        for key, value in fields.items()
    }


def _text(data: bytes) -> str:
    return data[:MAX_TEXT].decode("utf-8", errors="replace")


def entry_document(index: int, data: bytes) -> dict[str, Any]:
    """An entry as JSON: its bytes (base64, what the leaf hash is over) and what they decode to."""
    doc: dict[str, Any] = {"index": index, "data": _b64(data), "leaf_hash": _b64(merkle.leaf_hash(data))}
    try:
        entry = Entry.decode(data)
    except LogDecodeError as exc:
        return doc | {"entry": None, "decode_error": str(exc)[:200]}
    m = entry.message
    doc["entry"] = {
        "received": entry.received,
        "transport": entry.transport,
        "peer": entry.peer,
        "size": entry.size,
        "truncated": entry.truncated,
        "error": entry.error,
        "syslog": None
        if m is None
        else {
            "format": m.format,
            "facility": m.facility,
            "severity": m.severity,
            "timestamp": m.timestamp,
            "hostname": m.hostname,
            "app_name": m.app_name,
            "procid": m.procid,
            "msgid": m.msgid,
        },
        "msg": _text(entry.msg),
    }
    return doc


@dataclass(frozen=True)
class SearchQuery:
    """Entries received in ``[since, until)`` (microseconds), from ``host`` by ``app`` (exact)."""

    since: int | None = None
    until: int | None = None
    host: str | None = None
    app: str | None = None
    limit: int = 100
    before: int | None = None

    def matches(self, entry: Entry) -> bool:
        if self.since is not None and entry.received < self.since:
            return False
        if self.until is not None and entry.received >= self.until:
            return False
        m = entry.message
        if self.host is not None and (m is None or m.hostname != self.host):
            return False
        return self.app is None or (m is not None and m.app_name == self.app)

    @functools.cached_property
    def _needles(self) -> tuple[bytes, ...]:
        return tuple(s.encode("utf-8") for s in (self.host, self.app) if s is not None)

    def may_match(self, data: bytes) -> bool:
        """A cheap test before decoding: a hostname or app-name is in the entry's bytes."""
        return all(needle in data for needle in self._needles)


def _check(what: str, latest: Checkpoint, size: int, root: bytes, verify: Callable[[], None]) -> None:
    """A proof made from our tiles must verify, and at the signed size lead to the signed root."""
    try:
        verify()
        if size == latest.size and root != latest.root:
            raise ProofError("the tiles do not give the signed root")
    except ProofError as exc:
        raise CorruptStoreError(f"the stored log does not prove {what}: {exc}") from None


class LogReader:
    """A log's read side over its storage: checkpoint, tiles, bundles, proofs, entries, search.

    ``verifiers`` are the log's verifier keys: the stored checkpoint must open with one of
    them (its origin is ``origin``). A server learns the key from its key-holder after it has
    started: ``verifiers`` may be a callable, and while it gives none the log has no signed
    checkpoint to serve yet.
    """

    def __init__(
        self, storage: Storage, origin: str, verifiers: Sequence[Verifier] | Callable[[], Sequence[Verifier]]
    ) -> None:
        if not callable(verifiers) and not verifiers:
            raise ValueError("a log reader needs the log's verifier key")
        self.storage = storage
        self.origin = origin
        fixed = None if callable(verifiers) else tuple(verifiers)
        self._verifiers = verifiers if callable(verifiers) else (lambda: fixed or ())
        self._cached: SignedCheckpoint | None = None
        #: The index over host, app and time of the full bundles (see :mod:`~appliance.apps.log.index`).
        self.index = LogIndex(storage, origin)

    @property
    def verifiers(self) -> tuple[Verifier, ...]:
        return tuple(self._verifiers())

    # --- The checkpoint ---

    def latest(self) -> SignedCheckpoint | None:
        """The latest signed checkpoint (verified), or None if there is none yet."""
        note = self.storage.read(CHECKPOINT_PATH)
        verifiers = self.verifiers
        if note is None or not verifiers:
            return None
        cached = self._cached
        if cached is not None and cached.note == note:
            return cached
        signed = SignedCheckpoint(note, open_checkpoint(note, self.origin, verifiers))
        self._cached = signed
        return signed

    def _checkpoint(self) -> Checkpoint:
        signed = self.latest()
        if signed is None:
            raise NotCoveredError("the log has no signed checkpoint yet")
        return signed.checkpoint

    def _read(self, path: str) -> bytes:
        data = self.storage.read(path)
        if data is None:
            raise CorruptStoreError(f"{path} is missing")
        return data

    def _tiles(self, size: int) -> TileReader:
        def fetch(tile: Tile) -> bytes:
            data = self.storage.read(tile.path)
            if data is None and tile.width < TILE_WIDTH:
                # Pruned once the full tile existed (tiles.prune_partials): its prefix.
                full = self.storage.read(Tile(tile.level, tile.index).path)
                if full is not None and len(full) == TILE_WIDTH * merkle.HASH_SIZE:
                    data = full[: tile.width * merkle.HASH_SIZE]
            if data is None:
                raise CorruptStoreError(f"{tile.path} is missing")
            return data

        return TileReader(fetch, size)

    # --- Tiles and bundles ---

    def resource(self, path: str) -> tuple[bytes, bool] | None:
        """A tile or bundle at its C2SP ``path`` (``tile/...``) and whether it is full.

        None (a 404) for a path that is not one spelling of a tile or bundle, for one the signed
        size does not cover, and for a partial file that disagrees with the signed size's.
        """
        try:
            what = parse_path(path)
        except LogDecodeError:
            return None
        signed = self.latest()
        if signed is None:
            return None
        level = what.level if isinstance(what, Tile) else 0
        count = signed.checkpoint.size >> (TILE_HEIGHT * level)
        first = what.index << TILE_HEIGHT
        if first + what.width > count:
            return None
        data = self.storage.read(what.path)
        if data is None or not self._well_formed(what, data):
            return None
        if what.width == TILE_WIDTH:
            return data, True
        # The tile (or bundle) at this position in the signed tree: full, or the signed partial.
        width = min(TILE_WIDTH, count - first)
        if width == what.width:
            return data, False
        covering = Tile(level, what.index, width) if isinstance(what, Tile) else Bundle(what.index, width)
        whole = self.storage.read(covering.path)
        if whole is None or not whole.startswith(data):
            return None
        return data, False

    @staticmethod
    def _well_formed(what: Tile | Bundle, data: bytes) -> bool:
        if isinstance(what, Tile):
            return len(data) == what.width * merkle.HASH_SIZE
        try:
            decode_bundle(what, data)
        except LogDecodeError:
            return False
        return True

    # --- Proofs ---

    def _size(self, size: int | None, latest: Checkpoint) -> int:
        if size is None:
            return latest.size
        if size > latest.size:
            raise NotCoveredError(f"the latest signed checkpoint has {latest.size} entries, not {size}")
        return size

    def inclusion(self, index: int, size: int | None = None) -> dict[str, Any]:
        """Leaf ``index``'s audit path in the tree of ``size`` (default: the signed size), its entry."""
        latest = self._checkpoint()
        size = self._size(size, latest)
        if index >= size:
            raise NotCoveredError(f"entry {index} is not in a tree of {size} entries")
        tiles = self._tiles(latest.size)
        data = self._entries(tiles, index, index + 1)[0]
        leaf = merkle.leaf_hash(data)
        proof = merkle.inclusion_proof(tiles, index, size)
        root = merkle.root_hash(tiles, size)
        _check(
            f"entry {index}",
            latest,
            size,
            root,
            lambda: merkle.verify_inclusion(index, size, leaf, proof, root),
        )
        document = _encoded({"index": index, "size": size, "root": root, "leaf_hash": leaf, "proof": proof})
        return document | {"entry": entry_document(index, data)}

    def consistency(self, old: int, new: int | None = None) -> dict[str, Any]:
        """The consistency proof from the tree of ``old`` entries to ``new`` (default: signed)."""
        latest = self._checkpoint()
        new = self._size(new, latest)
        if old > new:
            raise ValueError(f"old size {old} is larger than new size {new}")
        tiles = self._tiles(latest.size)
        proof = merkle.consistency_proof(tiles, old, new)
        old_root, new_root = merkle.root_hash(tiles, old), merkle.root_hash(tiles, new)
        _check(
            f"{old} -> {new}",
            latest,
            new,
            new_root,
            lambda: merkle.verify_consistency(old, new, old_root, new_root, proof),
        )
        return _encoded({"old": old, "new": new, "old_root": old_root, "new_root": new_root, "proof": proof})

    # --- Entries ---

    def _entries(self, tiles: TileReader, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)`` of the signed tree from its bundles (full or the signed partial)."""
        out: list[bytes] = []
        for n in range(start >> TILE_HEIGHT, ((end - 1) >> TILE_HEIGHT) + 1):
            bundle = Bundle(n, min(TILE_WIDTH, tiles.size - (n << TILE_HEIGHT)))
            try:
                data = self.storage.read(bundle.path)
                if data is None and bundle.width < TILE_WIDTH:
                    # Pruned once the full bundle existed (tiles.prune_partials): its first entries.
                    full = self.storage.read(Bundle(n).path)
                    if full is not None:
                        data = encode_bundle(decode_bundle(Bundle(n), full)[: bundle.width])
                if data is None:
                    raise CorruptStoreError(f"{bundle.path} is missing")
                entries = decode_bundle(bundle, data)
            except LogDecodeError as exc:
                raise CorruptStoreError(str(exc)) from None
            first = n << TILE_HEIGHT
            out.extend(entries[max(start, first) - first : end - first])
        return out

    def entries(self, start: int, end: int | None = None) -> dict[str, Any]:
        """Entries ``[start, end)``, at most :data:`MAX_ENTRIES` (``end`` defaults to that many)."""
        latest = self._checkpoint()
        if start > latest.size:
            raise NotCoveredError(f"the latest signed checkpoint has {latest.size} entries, not {start}")
        if end is None:
            end = min(latest.size, start + MAX_ENTRIES)
        if start > end:
            raise ValueError(f"start {start} is after end {end}")
        if end - start > MAX_ENTRIES:
            raise ValueError(f"at most {MAX_ENTRIES} entries at a time, not {end - start}")
        if end > latest.size:
            raise NotCoveredError(f"the latest signed checkpoint has {latest.size} entries, not {end}")
        data = self._entries(self._tiles(latest.size), start, end) if end > start else []
        return {
            "size": latest.size,
            "start": start,
            "end": end,
            "entries": [entry_document(start + i, d) for i, d in enumerate(data)],
        }

    def update_index(self, max_bundles: int = 1024) -> int:
        """Index up to ``max_bundles`` more full bundles of the signed tree (each authenticated
        against the signed root); returns how many. The server calls it in the background."""
        signed = self.latest()
        if signed is None:
            return 0
        return self.index.update(
            signed.checkpoint, self._read, self._tiles(signed.checkpoint.size), max_bundles=max_bundles
        )

    def search(self, query: SearchQuery) -> dict[str, Any]:
        """Matching entries, newest first, reading at most :data:`MAX_SCAN` entries a call.

        The part of the signed tree the index covers is searched through it (only the bundles
        it names as candidates are read); the rest is scanned. ``next_before`` is where to
        continue (pass it as ``before``), or None once nothing older can match.
        """
        latest = self._checkpoint()
        end = latest.size if query.before is None else query.before
        if end > latest.size:
            raise NotCoveredError(f"the latest signed checkpoint has {latest.size} entries, not {end}")
        tiles = self._tiles(latest.size)
        for _attempt in range(3):
            records = self.index.records(latest.size >> TILE_HEIGHT)
            try:
                return self._search(query, latest, end, tiles, records)
            except _Rewritten as exc:
                # A candidate bundle is not what was indexed: the index is cut back to it.
                self.index.cut(exc.bundle)
        return self._search(query, latest, end, tiles, [])

    def _search(
        self, query: SearchQuery, latest: Checkpoint, end: int, tiles: TileReader, records: list[BundleRecord]
    ) -> dict[str, Any]:
        indexed = len(records) << TILE_HEIGHT
        found: list[dict[str, Any]] = []
        budget = MAX_SCAN
        top = end
        position = end
        if position > indexed:
            # The part the index does not cover: time bounds by binary search, then a scan;
            # below ``stop`` nothing can match.
            stop = indexed
            if query.since is not None:
                stop = self._received_before(tiles, indexed, end, query.since - TIME_SLACK_US)
            if query.until is not None:
                top = position = max(
                    stop, self._received_before(tiles, indexed, end, query.until + TIME_SLACK_US)
                )
            floor = max(stop, position - budget)
            position = self._scan(query, tiles, floor, position, found)
            budget -= top - position
            if position > indexed or stop > indexed or len(found) == query.limit:
                more = position > stop or (stop == indexed and position > 0)
                return self._found(latest, position, top, position if more else None, found)
        # The part the index covers: only candidate bundles are read.
        keys = [host_key(query.host)] if query.host is not None else []
        if query.app is not None:
            keys.append(app_key(query.app))
        walked = 0
        while position > 0 and len(found) < query.limit and budget >= TILE_WIDTH and walked < MAX_WALK:
            n = (position - 1) >> TILE_HEIGHT
            first = n << TILE_HEIGHT
            walked += 1
            record = records[n]
            if not record.may_match(query.since, query.until, keys):
                position = first
                continue
            bundle = Bundle(n, TILE_WIDTH)
            data = self._read(bundle.path)
            if bundle_digest(data) != record.digest:
                raise _Rewritten(n)
            try:
                chunk = decode_bundle(bundle, data)
            except LogDecodeError as exc:
                raise CorruptStoreError(str(exc)) from None
            budget -= TILE_WIDTH
            position = self._match(query, first, chunk[: position - first], found)
        return self._found(latest, position, top, position if position > 0 else None, found)

    @staticmethod
    def _found(
        latest: Checkpoint, position: int, top: int, next_before: int | None, found: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {"size": latest.size, "scanned": [position, top], "next_before": next_before, "entries": found}

    def _match(self, query: SearchQuery, first: int, chunk: list[bytes], found: list[dict[str, Any]]) -> int:
        """Add the matches among ``chunk`` (entries from ``first``), newest first, up to the
        query's limit; returns where the scan stopped (``first`` when it read them all)."""
        for i in range(len(chunk) - 1, -1, -1):
            data = chunk[i]
            if query.may_match(data):
                try:
                    matched = query.matches(Entry.decode(data))
                except LogDecodeError:
                    matched = False
                if matched:
                    found.append(entry_document(first + i, data))
                    if len(found) == query.limit:
                        return first + i
        return first

    def _scan(
        self, query: SearchQuery, tiles: TileReader, floor: int, position: int, found: list[dict[str, Any]]
    ) -> int:
        """Scan ``[floor, position)`` backwards for matches; returns where it stopped."""
        while position > floor and len(found) < query.limit:
            start = max(floor, ((position - 1) >> TILE_HEIGHT) << TILE_HEIGHT)
            position = self._match(query, start, self._entries(tiles, start, position), found)
        return position

    def _received_before(self, tiles: TileReader, lo: int, end: int, when: int) -> int:
        """The first index in ``[lo, end]`` from which entries were received at or after ``when``
        (microseconds), by binary search: receive times grow along the log. An entry that does
        not decode counts as received before (it cannot match a time-bounded search anyway)."""
        cache: dict[int, list[bytes]] = {}

        def received(index: int) -> int | None:
            start = (index >> TILE_HEIGHT) << TILE_HEIGHT
            if start not in cache:
                cache[start] = self._entries(tiles, start, min(tiles.size, start + TILE_WIDTH))
            try:
                return Entry.decode(cache[start][index - start]).received
            except LogDecodeError:
                return None

        hi = end
        while lo < hi:
            mid = (lo + hi) // 2
            t = received(mid)
            if t is None or t < when:
                lo = mid + 1
            else:
                hi = mid
        return lo
