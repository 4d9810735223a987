"""An index over the log's full entry bundles for search by time, host and app (derived data).

Theory of operation
-------------------
The index says, for each *full* entry bundle (256 entries) of the signed tree, which hosts and
applications appear in it and between which receive times. A search reads only the bundles
the index names as candidates, decodes them, and filters their entries exactly as a scan
would: the index can only make a search skip bundles, never add an entry to an answer.

One record per bundle: the bundle's digest (SHA-256 of its bytes, 16 bytes), the smallest and
largest receive time of its entries that decode, and the sorted set of its *keys*: an 8-byte
BLAKE2b of ``h`` + HOSTNAME and of ``a`` + APP-NAME of each entry that has them. Two names
with the same key only make a bundle a candidate for nothing (the entries are filtered after
decoding); a bundle holds at most 256 entries, so a record is at most 512 keys.

**Never trusted over the tiles.** A record is made only from a bundle whose entries are
authenticated against the latest signed checkpoint: their leaf hashes give the bundle's
subtree hash, and that hash with the audit path read from the tiles gives the signed root
(:meth:`LogIndex.update`). A bundle that fails stops the indexing there (a damaged store:
the audit and repair of the server fix it, the next update goes on). When a search reads a
candidate bundle, its bytes must have the record's digest; if they do not, the bundle was
rewritten since (a repair), and the index is cut back to before it and rebuilt from there.
The index is never used beyond the signed size, and what it does not cover yet (bundles not
indexed, the partial last bundle) is scanned as before.

**On disk** (through the log's :class:`~appliance.apps.log.tiles.Storage`, beside the tiles,
each file written atomically): ``index/seg/<k>`` holds the records of bundles
``[256 k, 256 k + 256)`` (written once, when complete) and ``index/tail`` those of the next,
incomplete segment. Each file is ``SHA-256(body) || body``, the body canonical CBOR
``{"v": 1, "origin": ..., "first": <bundle>, "records": [[digest, min, max, keys], ...]}``.
A crash leaves the old or the new file (atomic writes); a missing, short or damaged file, a
file of another origin, or a gap in the bundle numbers ends the index at the first bad file,
and the rest is rebuilt from the tiles (:meth:`LogIndex.update`). The in-memory copy is
reloaded when the files change (another object over the same directory, such as a repair,
calling :func:`drop_index_from`).

**Audited.** Someone who can write the log's directory can write an index file with a good
digest that leaves out a bundle (a record without a host's key, or with a time range that
misses it), and a search then skips it: the tiles and the checkpoint are still right, and
``pst log verify --audit`` (a client's audit of what is served) does not read the index. The
server's own audit (``pst log audit``, and every ``[log] audit_interval``) therefore checks
the index too, once the bundles have been checked against the signed root
(:func:`audit_index`): every file must decode, and every record must be the one the bundle
gives (its digest, receive times and keys, recomputed). A difference is alerted
(``log-store-damaged``), and the index is dropped from the first wrong record and rebuilt from
the authenticated bundles. Deleting ``index/`` makes the server rebuild it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from appliance.apps.log import merkle
from appliance.apps.log.checkpoint import Checkpoint
from appliance.apps.log.errors import CorruptStoreError, LogDecodeError, ProofError
from appliance.apps.log.tiles import (
    MAX_ENTRY_SIZE,
    TILE_HEIGHT,
    TILE_WIDTH,
    Bundle,
    Storage,
    TileReader,
    decode_bundle,
)
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

__all__ = [
    "INDEX_DIR",
    "SEGMENT",
    "BundleRecord",
    "LogIndex",
    "app_key",
    "audit_index",
    "bundle_digest",
    "drop_index_from",
    "host_key",
    "record_for",
]

INDEX_DIR: Final = "index"
TAIL_PATH: Final = "index/tail"
SEGMENT_DIR: Final = "index/seg"
#: Bundles per segment file.
SEGMENT: Final = 256
KEY_SIZE: Final = 8
DIGEST_SIZE: Final = 16
#: Largest index file read (256 records of 512 keys and change).
MAX_FILE: Final = 2 * 1024 * 1024
_VERSION: Final = 1


def _key(tag: bytes, name: str) -> bytes:
    return hashlib.blake2b(tag + name.encode("utf-8"), digest_size=KEY_SIZE, person=b"pst-log-index").digest()


def host_key(host: str) -> bytes:
    return _key(b"h", host)


def app_key(app: str) -> bytes:
    return _key(b"a", app)


def bundle_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:DIGEST_SIZE]


@dataclass(frozen=True)
class BundleRecord:
    """What the index knows of one full bundle. ``low > high`` when no entry decodes.

    ``keys`` are the 8-byte keys concatenated (sorted); a key is looked for as a substring, so
    one found across two keys' bytes only makes the bundle a candidate (a read, never a wrong
    answer), and a record costs its bytes in memory rather than a set's."""

    digest: bytes
    low: int
    high: int
    keys: bytes

    def may_match(self, since: int | None, until: int | None, keys: Sequence[bytes]) -> bool:
        if self.low > self.high:
            return False
        if since is not None and self.high < since:
            return False
        if until is not None and self.low >= until:
            return False
        return all(k in self.keys for k in keys)

    def encoded(self) -> list[Any]:
        return [self.digest, self.low, self.high, self.keys]


def _fields(raw: bytes) -> tuple[int, Any, Any] | None:
    """Receive time, HOSTNAME and APP-NAME of an entry's bytes, read leniently (no canonical
    check): an entry that :meth:`Entry.decode` accepts gives the same three, and one it refuses
    can only add keys or widen the time range (a search decodes strictly, so that costs a read)."""
    try:
        obj = encoding.decode_lenient(raw, max_size=MAX_ENTRY_SIZE, what="log entry")
    except DecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    when, m = obj.get("time"), obj.get("syslog")
    if not isinstance(when, int) or isinstance(when, bool):
        return None
    if not isinstance(m, dict):
        return when, None, None
    return when, m.get("hostname"), m.get("app_name")


def record_for(data: bytes, entries: Sequence[bytes]) -> BundleRecord:
    """The record of a bundle's bytes ``data`` holding ``entries``."""
    low, high = 2**63, -1
    keys: set[bytes] = set()
    for raw in entries:
        fields = _fields(raw)
        if fields is None:
            continue
        when, host, app = fields
        low, high = min(low, when), max(high, when)
        if isinstance(host, str):
            keys.add(host_key(host))
        if isinstance(app, str):
            keys.add(app_key(app))
    if high < low:
        low, high = 1, 0
    return BundleRecord(bundle_digest(data), low, high, b"".join(sorted(keys)))


def _segment_path(k: int) -> str:
    return f"{SEGMENT_DIR}/{k}"


def _encode_file(origin: str, first: int, records: Sequence[BundleRecord]) -> bytes:
    body = encoding.encode(
        {"v": _VERSION, "origin": origin, "first": first, "records": [r.encoded() for r in records]}
    )
    return hashlib.sha256(body).digest() + body


def _decode_file(data: bytes, origin: str, first: int) -> list[BundleRecord]:
    """The records of an index file, or LogDecodeError saying what is wrong."""
    if len(data) < 33 or hashlib.sha256(data[32:]).digest() != data[:32]:
        raise LogDecodeError("its digest does not match its content")
    try:
        obj = encoding.decode(data[32:], max_size=MAX_FILE, what="log index file")
    except DecodeError as exc:
        raise LogDecodeError(str(exc)) from None
    if not isinstance(obj, dict) or set(obj) != {"v", "origin", "first", "records"}:
        raise LogDecodeError("not an index file")
    if obj["v"] != _VERSION or obj["origin"] != origin or obj["first"] != first:
        raise LogDecodeError(f"not version {_VERSION} of {origin!r} from bundle {first}")
    records = obj["records"]
    if not isinstance(records, list) or len(records) > SEGMENT:
        raise LogDecodeError("bad records")
    out = []
    for r in records:
        if not (
            isinstance(r, list)
            and len(r) == 4
            and isinstance(r[0], bytes)
            and len(r[0]) == DIGEST_SIZE
            and all(isinstance(x, int) and not isinstance(x, bool) for x in r[1:3])
            and isinstance(r[3], bytes)
            and len(r[3]) % KEY_SIZE == 0
            and len(r[3]) <= 2 * TILE_WIDTH * KEY_SIZE
        ):
            raise LogDecodeError("a malformed record")
        out.append(BundleRecord(r[0], r[1], r[2], r[3]))
    return out


def drop_index_from(storage: Storage, bundle: int) -> None:
    """Forget what the index says of bundles ``bundle`` and later (they were rewritten): the
    segment files from the one holding it on, and the tail. A :class:`LogIndex` over the same
    files reloads and rebuilds them."""
    k = bundle // SEGMENT
    storage.delete(TAIL_PATH)
    for path in storage.list(SEGMENT_DIR):
        name = path.rsplit("/", 1)[1]
        if name.isdigit() and int(name) >= k:
            storage.delete(path)
    storage.sync()


#: Lines an index audit names at most (the first bad record is where the index is dropped from).
MAX_AUDIT_LINES: Final = 8


def audit_index(storage: Storage, origin: str, size: int) -> tuple[list[str], int | None]:
    """The index files in ``storage`` against the full bundles of the tree of ``size`` entries
    (whose bundles the caller has checked against the signed root): what is wrong (lines) and
    the bundle the index must be dropped from (None: nothing is wrong). A file that does not
    decode, a gap, records beyond the tree's full bundles, and each record that is not the one
    its bundle gives are wrong; a tail left by a crash between a segment's write and the tail's
    (a tail of an earlier segment, whose digest is right) and bundles not indexed yet are not.
    Reads every indexed bundle once (run it in a worker thread)."""
    lines: list[str] = []
    drop: int | None = None
    more = 0

    def wrong(line: str, bundle: int) -> None:
        nonlocal drop, more
        if len(lines) < MAX_AUDIT_LINES:
            lines.append(line)
        else:
            more += 1
        drop = bundle if drop is None else min(drop, bundle)

    records: list[BundleRecord] = []
    names = sorted(int(name) for p in storage.list(SEGMENT_DIR) if (name := p.rsplit("/", 1)[1]).isdigit())
    for k in names:
        if k != len(records) // SEGMENT:
            wrong(
                f"{_segment_path(k)} follows a gap (no {_segment_path(len(records) // SEGMENT)})",
                len(records),
            )
            break
        try:
            found = _decode_file(storage.read(_segment_path(k)) or b"", origin, k * SEGMENT)
            if len(found) != SEGMENT:
                raise LogDecodeError(f"{len(found)} records, not {SEGMENT}")
        except LogDecodeError as exc:
            wrong(f"{_segment_path(k)} is damaged: {exc}", k * SEGMENT)
            break
        records.extend(found)
    tail = storage.read(TAIL_PATH)
    if drop is None and tail is not None:
        try:
            records.extend(_decode_file(tail, origin, len(records)))
        except LogDecodeError as exc:
            if len(tail) < 33 or hashlib.sha256(tail[32:]).digest() != tail[:32]:
                wrong(f"{TAIL_PATH} is damaged: {exc}", len(records))
    full = size >> TILE_HEIGHT
    if len(records) > full:
        wrong(f"the index has {len(records)} records, the signed tree {full} full bundles", full)
    for n, record in enumerate(records[:full]):
        bundle = Bundle(n, TILE_WIDTH)
        data = storage.read(bundle.path)
        if data is None:
            continue  # (the log's own audit names it)
        try:
            right = record_for(data, decode_bundle(bundle, data))
        except LogDecodeError:
            continue
        if right != record:
            what = [
                name
                for name, differs in (
                    ("digest", right.digest != record.digest),
                    ("receive times", (right.low, right.high) != (record.low, record.high)),
                    ("hosts and apps", right.keys != record.keys),
                )
                if differs
            ]
            wrong(f"the index's record of {bundle.path} is not the bundle's (its {', '.join(what)})", n)
    if more:
        lines.append(f"and {more} more record(s)")
    return lines, drop


class LogIndex:
    """The index of one log's storage; thread-safe (searches and updates run in worker threads).

    ``problem`` says why the index stopped short of the signed tree, if it did.
    """

    def __init__(self, storage: Storage, origin: str) -> None:
        self.storage = storage
        self.origin = origin
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._records: list[BundleRecord] = []
        self._seen: tuple[tuple[str, ...], bytes | None] | None = None

    # --- Loading ---

    def _listing(self) -> tuple[tuple[str, ...], bytes | None]:
        return tuple(self.storage.list(SEGMENT_DIR)), self.storage.read(TAIL_PATH)

    def _load(self) -> None:
        """Reload from the files if they changed since we last read them (under the lock)."""
        seen = self._listing()
        if seen == self._seen:
            return
        names, tail = seen
        segments = sorted(int(p.rsplit("/", 1)[1]) for p in names if p.rsplit("/", 1)[1].isdigit())
        records: list[BundleRecord] = []
        complete = True
        for k in segments:
            if k != len(records) // SEGMENT:
                break
            data = self.storage.read(_segment_path(k))
            try:
                if data is None:
                    raise LogDecodeError("it is missing")
                found = _decode_file(data, self.origin, k * SEGMENT)
                if len(found) != SEGMENT:
                    raise LogDecodeError(f"{len(found)} records, not {SEGMENT}")
            except LogDecodeError as exc:
                self.problem = f"{_segment_path(k)} is damaged ({exc}): rebuilding the index from it"
                complete = False
                break
            records.extend(found)
        if complete and tail is not None:
            with contextlib.suppress(LogDecodeError):  # a tail of an older segment, or damaged: rebuilt
                records.extend(_decode_file(tail, self.origin, len(records)))
        self._records = records
        self._seen = seen

    @property
    def bundles(self) -> int:
        """How many bundles, from bundle 0, the index covers (as last loaded)."""
        with self._lock:
            self._load()
            return len(self._records)

    def records(self, limit_bundles: int) -> list[BundleRecord]:
        """The records of the first ``limit_bundles`` bundles at most (reloaded if the files changed)."""
        with self._lock:
            self._load()
            return self._records[:limit_bundles]

    # --- Writing ---

    def _save(self, records: list[BundleRecord], old_count: int) -> None:
        """Write the segments completed since ``old_count`` records, then the tail (under the lock)."""
        for k in range(old_count // SEGMENT, len(records) // SEGMENT):
            part = records[k * SEGMENT : (k + 1) * SEGMENT]
            self.storage.write(_segment_path(k), _encode_file(self.origin, k * SEGMENT, part))
        first = (len(records) // SEGMENT) * SEGMENT
        self.storage.write(TAIL_PATH, _encode_file(self.origin, first, records[first:]))
        self.storage.sync()
        self._records = records
        self._seen = self._listing()

    def cut(self, bundle: int) -> None:
        """Forget bundles ``bundle`` and later (a search found one rewritten); the records before
        it are kept."""
        with self._lock:
            self._load()
            if bundle >= len(self._records):
                return
            kept = self._records[:bundle]
            drop_index_from(self.storage, bundle)
            self._save(kept, (bundle // SEGMENT) * SEGMENT)

    def update(
        self,
        checkpoint: Checkpoint,
        read: Callable[[str], bytes],
        tiles: TileReader,
        *,
        max_bundles: int = 1024,
    ) -> int:
        """Index up to ``max_bundles`` more full bundles of the signed tree ``checkpoint`` (read
        with ``read(path)``, its tiles with ``tiles``), each authenticated against the signed
        root first. Returns how many were added; a bundle that fails to authenticate stops the
        update and sets :attr:`problem` (nothing after it is indexed)."""
        with self._lock:
            self._load()
            records = list(self._records)
            old = len(records)
            full = checkpoint.size >> TILE_HEIGHT
            if old > full:  # an index of a larger tree: not ours
                self.problem = f"the index covers {old} bundles, the signed tree {full}: rebuilding"
                drop_index_from(self.storage, 0)
                self._seen = None
                self._load()
                records, old = [], 0
            target = min(full, old + max_bundles)
            problem = None
            for n in range(old, target):
                bundle = Bundle(n, TILE_WIDTH)
                try:
                    data = read(bundle.path)
                    entries = decode_bundle(bundle, data)
                    _authenticate(n, entries, checkpoint, tiles)
                except (CorruptStoreError, LogDecodeError, ProofError, ValueError) as exc:
                    problem = f"cannot index {bundle.path}: {exc}"
                    break
                records.append(record_for(data, entries))
            if len(records) > old:
                self._save(records, old)
            self.problem = problem
            return len(records) - old


def _authenticate(n: int, entries: Sequence[bytes], checkpoint: Checkpoint, tiles: TileReader) -> None:
    """The full bundle ``n``'s entries are leaves ``[256 n, 256 n + 256)`` of the signed tree:
    their subtree hash and the audit path above it (from the tiles) give the signed root."""
    tree = merkle.MemoryTree()
    for entry in entries:
        tree.append(entry)
    index = n << TILE_HEIGHT
    proof = merkle.inclusion_proof(tiles, index, checkpoint.size)
    ours = [tree.node_hash(h, 1) for h in range(TILE_HEIGHT)]
    merkle.verify_inclusion(
        index, checkpoint.size, tree.node_hash(0, 0), ours + proof[TILE_HEIGHT:], checkpoint.root
    )
