"""``pst log verify``: check a log from its tiles against its signed checkpoint, trusting nothing else.

Theory of operation
-------------------
The verifier knows one thing for sure, the log's verifier key (``name+keyid+base64``; the
name is the log's origin). It fetches the latest checkpoint from a :class:`Source` (a
server's ``/log/`` over HTTP, :class:`HttpSource`, or a log directory, :class:`DirSource`),
opens it with that key, and from then on uses what it fetches only through a check against
the signed root:

* **inclusion** (:meth:`LogVerifier.inclusion`): the entry at an index (from its entry bundle)
  or given as a file (found by its leaf hash in the level-0 tiles) has an audit path, built
  from the fetched tiles, that leads to the signed root;
* **consistency** (:meth:`LogVerifier.consistency`): an older signed checkpoint (same key) is a
  prefix of the latest: the consistency proof built from the tiles verifies between the two
  signed roots, so the log was neither forked nor truncated between them;
* **audit** (:meth:`LogVerifier.audit`): every entry bundle and tile of the signed tree is
  fetched; leaf hashes are recomputed from the entries, every tile from the level below, and
  the root from the entries. If the entries give the signed root, they are the log, and
  every tile that differs from what they give is named with the hash that differs. If they do
  not, but the tiles are consistent with one another and give the signed root, the tiles are
  the log and every entry whose hash differs from its leaf is named. Otherwise both kinds of
  difference are listed. A missing or malformed bundle or tile is named too, and the audit goes
  on without it. :meth:`LogVerifier.audit_report` gives the same findings as data
  (:class:`AuditReport`: which tiles are wrong, which bundles are or may be), for the server's
  repair (:mod:`appliance.apps.log.repair`). (A tile client that only authenticates the tiles
  on one path, like ``tlog.TileHashReader``, can miss a bad tile: see docs/log.md.)

A check that fails raises :class:`VerificationFailed` naming what (exit status 1 of ``pst log
verify``); what keeps the check from running (no answer, a file that cannot be read, a bad
key) raises :class:`SourceError` (exit status 2). A resource the signed tree needs but the log
does not serve (404) is a failure of the log, not an I/O error.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import httpx

from appliance.apps.log import merkle
from appliance.apps.log.checkpoint import Checkpoint, Verifier, open_checkpoint
from appliance.apps.log.errors import LogDecodeError, LogError, ProofError
from appliance.apps.log.reader import CHECKPOINT_PATH
from appliance.apps.log.tiles import (
    MAX_ENTRY_SIZE,
    TILE_HEIGHT,
    TILE_WIDTH,
    Bundle,
    PosixStorage,
    Tile,
    TileReader,
    _perfect_root,
    decode_bundle,
    encode_bundle,
    parse_path,
    tile_hashes,
)

__all__ = [
    "AuditReport",
    "DirSource",
    "HttpSource",
    "LogVerifier",
    "Source",
    "SourceError",
    "VerificationFailed",
    "load_verifier",
]

#: The largest resource fetched: a full bundle of the largest entries.
MAX_RESOURCE: Final = TILE_WIDTH * (2 + MAX_ENTRY_SIZE)
#: Bundles (and their level-0 tiles) fetched at once during an audit.
AUDIT_BATCH: Final = 32
#: Differences listed in a failed audit's message.
MAX_LISTED: Final = 20


class VerificationFailed(LogError):
    """The log does not verify; the message says what (which tile, which index)."""


class SourceError(LogError):
    """The check could not run: no answer from the server, an unreadable file, a bad key."""


class Source(Protocol):
    """Where the log's files are read: ``checkpoint``, ``tile/...``."""

    def get(self, path: str) -> bytes | None:
        """The resource, or None if the log does not have it; SourceError if it cannot tell."""
        ...


class HttpSource:
    """A server's ``<url>/log/`` (c2sp.org/tlog-tiles), read with httpx."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise SourceError(f"{url!r} is not an http:// or https:// URL")
        self.prefix = url.rstrip("/") + "/log/"
        self.client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)

    def get(self, path: str) -> bytes | None:
        url = self.prefix + path
        try:
            with self.client.stream("GET", url) as answer:
                if answer.status_code == 404:
                    return None
                if answer.status_code != 200:
                    raise SourceError(f"GET {url}: HTTP {answer.status_code}")
                body = bytearray()
                for chunk in answer.iter_bytes():
                    body += chunk
                    if len(body) > MAX_RESOURCE:
                        raise SourceError(f"GET {url}: larger than {MAX_RESOURCE} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise SourceError(f"GET {url}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.client.close()


class DirSource:
    """A log directory on this machine (the server's log storage, or a copy of it)."""

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise SourceError(f"{directory}: not a directory")
        self.storage = PosixStorage(directory)

    def get(self, path: str) -> bytes | None:
        try:
            return self.storage.read(path)
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from None

    def close(self) -> None:
        pass


def load_verifier(key: str) -> Verifier:
    """A verifier key string, or the name of a file holding one (SourceError if neither)."""
    text = key
    if "+" not in key or Path(key).is_file():
        try:
            text = Path(key).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"{key}: not a verifier key and not a readable key file ({exc})") from None
    try:
        return Verifier.parse(text)
    except LogDecodeError as exc:
        raise SourceError(f"bad verifier key: {exc}") from None


def _tile_range(tile: Tile | Bundle, k: int) -> str:
    """The entries hash ``k`` of a tile (or entry ``k`` of a bundle) covers."""
    first, _ = _covered(tile, k)
    span = 1 << (TILE_HEIGHT * (tile.level if isinstance(tile, Tile) else 0))
    return f"entry {first}" if span == 1 else f"entries {first}..{first + span - 1}"


def _covered(tile: Tile | Bundle, k: int) -> tuple[int, int]:
    """``[first, end)``: the entries hash ``k`` of a tile covers (a full span)."""
    level = tile.level if isinstance(tile, Tile) else 0
    span = 1 << (TILE_HEIGHT * level)
    first = ((tile.index << TILE_HEIGHT) + k) * span
    return first, first + span


def _bundles(first: int, end: int, size: int) -> list[Bundle]:
    """The bundles of the tree of ``size`` holding entries ``[first, end)``."""
    end = min(end, size)
    if end <= first:
        return []
    return [
        Bundle(n, min(TILE_WIDTH, size - (n << TILE_HEIGHT)))
        for n in range(first >> TILE_HEIGHT, ((end - 1) >> TILE_HEIGHT) + 1)
    ]


@dataclass(frozen=True)
class AuditReport:
    """What an audit found, as data (:meth:`LogVerifier.audit_report`).

    ``entries_ok``: the entry bundles give the signed root (so they are the log, and every
    tile can be recomputed from them). ``tiles_ok``: the tiles agree with one another and give
    the signed root (so the level-0 tiles hold the log's leaf hashes). ``bad_tiles``: tiles
    found wrong or unreadable. ``bad_bundles``: the bundles that are wrong or unreadable, or,
    when neither the entries nor the tiles give the root, every bundle under a difference
    (every bundle, if no difference explains the wrong root): what a repair must fetch.
    ``lines``: what differs, in words (the failure message of ``pst log verify --audit``).

    ``size`` and ``root`` are the tree audited: the signed checkpoint's, or, for a server's
    audit of its own copy, its tree beyond it (``tip``, whose root is the server's own), in
    which case ``signed`` is the signed checkpoint's (size, root), which the entries and the
    tiles must give too. ``bad_partials``: partial files of older sizes kept beside the
    tree's own (the server's audit, :func:`appliance.apps.log.repair.older_partials`).
    """

    size: int
    root: bytes
    tiles_checked: int
    entries_ok: bool
    tiles_ok: bool
    bad_tiles: tuple[Tile, ...] = ()
    bad_bundles: tuple[Bundle, ...] = ()
    lines: tuple[str, ...] = ()
    signed: tuple[int, bytes] | None = None
    bad_partials: tuple[str, ...] = ()

    @property
    def signed_size(self) -> int:
        return self.size if self.signed is None else self.signed[0]

    @property
    def ok(self) -> bool:
        return not self.lines

    def message(self) -> str:
        if self.ok:
            return f"audit: the {self.size} entries and {self.tiles_checked} tiles give the signed root"
        more = len(self.lines) - MAX_LISTED
        shown = [*self.lines[:MAX_LISTED], *([f"... and {more} more"] if more > 0 else [])]
        return f"audit of {self.what()}:\n  " + "\n  ".join(shown)

    def what(self) -> str:
        if self.signed is None or self.signed[0] == self.size:
            return f"the signed tree of size {self.size}"
        return f"the tree of size {self.size} (signed up to {self.signed[0]})"


@dataclass
class _Audit:
    """The running state of an audit, level by level."""

    size: int
    #: "signed tree", or "tree" for a server's own tree beyond its checkpoint.
    name: str = "signed tree"
    frontier: merkle.Frontier = field(default_factory=merkle.Frontier)
    #: Per tile level: hashes computed from the entries for the tile being filled.
    from_entries: list[list[bytes]] = field(default_factory=list)
    #: Per tile level >= 1: roots of the fetched full tiles below, for the tile being filled.
    from_tiles: list[list[bytes]] = field(default_factory=list)
    #: (tile, hash index) where the fetched tile differs from what the entries give.
    vs_entries: list[tuple[Tile, int]] = field(default_factory=list)
    #: (tile, hash index) where the fetched tile differs from the fetched tile below it.
    vs_below: list[tuple[Tile, int]] = field(default_factory=list)
    tiles_checked: int = 0
    #: Bundles and tiles missing or malformed, with why (the audit goes on without them).
    unreadable: list[tuple[Tile | Bundle, str]] = field(default_factory=list)

    def level(self, level: int) -> None:
        while len(self.from_entries) <= level:
            self.from_entries.append([])
            self.from_tiles.append([])


class LogVerifier:
    """Checks of one log (its verifier key) read from one source."""

    def __init__(
        self, source: Source, verifier: Verifier, *, progress: Callable[[str], None] | None = None
    ) -> None:
        self.source = source
        self.verifier = verifier
        self.progress = progress or (lambda line: None)

    # --- Fetching ---

    def _get(self, path: str, why: str) -> bytes:
        data = self._fetch(path)
        if data is None:
            raise VerificationFailed(f"the log does not serve {path}, which {why}")
        return data

    def _fetch(self, path: str) -> bytes | None:
        """A tile or bundle as served, or a partial one from its full one (None: neither)."""
        data = self.source.get(path)
        return self._from_full(path) if data is None else data

    def _from_full(self, path: str) -> bytes | None:
        """A partial tile or bundle the log does not serve, from the prefix of the full one
        (c2sp.org/tlog-tiles: a log may delete a partial once the full one exists; a server
        prunes them after each checkpoint). None if it is not partial or there is no full one."""
        try:
            what = parse_path(path)
        except LogDecodeError:
            return None
        if what.width == TILE_WIDTH:
            return None
        if isinstance(what, Tile):
            full = self.source.get(Tile(what.level, what.index).path)
            size = what.width * merkle.HASH_SIZE
            return full[:size] if full is not None and len(full) == TILE_WIDTH * merkle.HASH_SIZE else None
        full = self.source.get(Bundle(what.index).path)
        if full is None:
            return None
        try:
            return encode_bundle(decode_bundle(Bundle(what.index), full)[: what.width])
        except LogDecodeError:
            return None

    def _tile(self, tile: Tile, size: int) -> list[bytes]:
        data = self._get(tile.path, f"its signed tree of size {size} has")
        try:
            return tile_hashes(tile, data)
        except LogDecodeError as exc:
            raise VerificationFailed(str(exc)) from None

    def _bundle(self, bundle: Bundle, data: bytes) -> list[bytes]:
        try:
            return decode_bundle(bundle, data)
        except LogDecodeError as exc:
            raise VerificationFailed(f"malformed entry bundle: {exc}") from None

    def _reader(self, size: int) -> TileReader:
        def fetch(tile: Tile) -> bytes:
            return b"".join(self._tile(tile, size))

        return TileReader(fetch, size)

    # --- The checkpoint ---

    def latest(self) -> Checkpoint:
        """The latest checkpoint, once its signature by the log's key verifies."""
        note = self.source.get(CHECKPOINT_PATH)
        if note is None:
            raise VerificationFailed("the log serves no checkpoint")
        return self.open(note, "the latest checkpoint")

    def open(self, note: bytes, what: str) -> Checkpoint:
        try:
            return open_checkpoint(note, self.verifier.name, [self.verifier])
        except LogDecodeError as exc:
            raise VerificationFailed(f"{what} does not verify with {self.verifier.encode()}: {exc}") from None

    # --- Inclusion ---

    def find(self, latest: Checkpoint, entry: bytes) -> int:
        """The index of ``entry`` by its leaf hash in the level-0 tiles (checked by the proof later)."""
        leaf = merkle.leaf_hash(entry)
        count = (latest.size + TILE_WIDTH - 1) >> TILE_HEIGHT
        reader = self._reader(latest.size)
        for n in range(count - 1, -1, -1):  # newest first
            hashes = reader.hashes(reader.tile_for(0, n << TILE_HEIGHT))
            if leaf in hashes:
                return (n << TILE_HEIGHT) + hashes.index(leaf)
        raise VerificationFailed(
            f"the entry is not in the log's signed tree of size {latest.size}: its leaf hash is in none "
            "of the level-0 tiles"
        )

    def inclusion(self, latest: Checkpoint, index: int | None, entry: bytes | None) -> str:
        """Check that the entry (at ``index``, or the bytes ``entry``, or both) is in ``latest``."""
        if index is None:
            if entry is None:
                raise ValueError("an index or an entry is needed")
            index = self.find(latest, entry)
        if index >= latest.size:
            raise VerificationFailed(f"entry {index} is not in the signed tree of size {latest.size}")
        bundle = Bundle(
            index >> TILE_HEIGHT, min(TILE_WIDTH, latest.size - (index >> TILE_HEIGHT << TILE_HEIGHT))
        )
        stored = self._bundle(bundle, self._get(bundle.path, f"holds entry {index}"))[index % TILE_WIDTH]
        if entry is not None and stored != entry:
            raise VerificationFailed(f"entry {index} of the log ({bundle.path}) is not the given entry")
        reader = self._reader(latest.size)
        try:
            proof = merkle.inclusion_proof(reader, index, latest.size)
            merkle.verify_inclusion(index, latest.size, merkle.leaf_hash(stored), proof, latest.root)
        except ProofError as exc:
            raise VerificationFailed(
                f"entry {index} ({bundle.path}) is not proven in the signed tree of size {latest.size}: "
                f"{exc} (the entry or a tile on its path is wrong; --audit names it)"
            ) from None
        return (
            f"entry {index} is in the signed tree of size {latest.size} (audit path of {len(proof)} hashes)"
        )

    # --- Consistency ---

    def consistency(self, latest: Checkpoint, old_note: bytes) -> str:
        """Check that the older signed checkpoint ``old_note`` is a prefix of ``latest``."""
        old = self.open(old_note, "the old checkpoint")
        if old.size > latest.size:
            raise VerificationFailed(
                f"the old checkpoint (size {old.size}) is larger than the latest (size {latest.size}): "
                "the log was truncated or forked"
            )
        try:
            proof = merkle.consistency_proof(self._reader(latest.size), old.size, latest.size)
            merkle.verify_consistency(old.size, latest.size, old.root, latest.root, proof)
        except ProofError as exc:
            raise VerificationFailed(
                f"the latest checkpoint (size {latest.size}) does not extend the old one (size {old.size}): "
                f"{exc}. Both are signed by the log's key: the log forked, unless its tiles do not match "
                "its signed tree (--audit tells)"
            ) from None
        return f"the latest checkpoint (size {latest.size}) extends the old one (size {old.size})"

    # --- Audit ---

    def _fetch_batches(self, size: int) -> Iterator[tuple[Bundle, bytes | None, Tile, bytes | None]]:
        """Every bundle with its level-0 tile (None: not served), in order, fetched
        :data:`AUDIT_BATCH` at a time."""
        count = (size + TILE_WIDTH - 1) >> TILE_HEIGHT

        def pair(n: int) -> tuple[Bundle, bytes | None, Tile, bytes | None]:
            width = min(TILE_WIDTH, size - (n << TILE_HEIGHT))
            bundle, tile = Bundle(n, width), Tile(0, n, width)
            return bundle, self._fetch(bundle.path), tile, self._fetch(tile.path)

        with ThreadPoolExecutor(max_workers=8) as pool:
            for first in range(0, count, AUDIT_BATCH):
                yield from pool.map(pair, range(first, min(count, first + AUDIT_BATCH)))

    def _audit_tile(
        self, state: _Audit, tile: Tile, data: bytes | None, stand_in: list[bytes]
    ) -> list[bytes]:
        """A fetched tile's hashes; if it is missing or malformed, noted, and ``stand_in``."""
        if data is None:
            why = f"the log does not serve {tile.path}, which its {state.name} of size {state.size} has"
            state.unreadable.append((tile, why))
            return stand_in
        try:
            return tile_hashes(tile, data)
        except LogDecodeError as exc:
            state.unreadable.append((tile, str(exc)))
            return stand_in

    def _compare(self, state: _Audit, tile: Tile, fetched: Sequence[bytes]) -> None:
        """Compare a fetched tile with what the entries and the tiles below give; go up a level."""
        state.tiles_checked += 1
        level = tile.level
        state.level(level + 1)
        expected = state.from_entries[level]
        state.vs_entries += [(tile, k) for k, h in enumerate(fetched) if h != expected[k]]
        if level:
            below = state.from_tiles[level]
            state.vs_below += [(tile, k) for k, h in enumerate(fetched) if h != below[k]]
        state.from_entries[level], state.from_tiles[level] = [], []
        if tile.width == TILE_WIDTH:
            state.from_entries[level + 1].append(_perfect_root(list(expected)))
            state.from_tiles[level + 1].append(_perfect_root(list(fetched)))
            if len(state.from_entries[level + 1]) == TILE_WIDTH:
                upper = Tile(level + 1, tile.index >> TILE_HEIGHT)
                data = self._fetch(upper.path)
                fetched_upper = self._audit_tile(state, upper, data, state.from_entries[level + 1])
                self._compare(state, upper, fetched_upper)

    def audit(self, latest: Checkpoint) -> str:
        """Fetch every bundle and tile of ``latest`` and recompute the tree; name what differs
        (:class:`VerificationFailed`)."""
        report = self.audit_report(latest)
        if not report.ok:
            raise VerificationFailed(report.message())
        return report.message()

    def audit_report(self, latest: Checkpoint, tip: Checkpoint | None = None) -> AuditReport:
        """Fetch every bundle and tile of ``latest`` and recompute the tree: what differs, as data.

        With ``tip`` (a larger tree of the same log, unsigned: a server's own tree beyond its
        latest checkpoint), the tree of ``tip`` is audited instead, and must give both roots:
        ``tip``'s and, at the signed size, ``latest``'s."""
        signed = latest
        if tip is not None and tip.size > latest.size:
            latest = tip
        size = latest.size
        state = _Audit(size, "signed tree" if latest is signed else "tree")
        state.level(0)
        signed_root = merkle.EMPTY_ROOT if signed.size == 0 else b""
        last_report = time.monotonic()
        for bundle, data, tile, tile_data in self._fetch_batches(size):
            entries: list[bytes] | None = None
            if data is None:
                why = f"the log does not serve {bundle.path}, which its {state.name} of size {size} has"
                state.unreadable.append((bundle, why))
            else:
                try:
                    entries = decode_bundle(bundle, data)
                except LogDecodeError as exc:
                    state.unreadable.append((bundle, f"malformed entry bundle: {exc}"))
            fetched = self._audit_tile(state, tile, tile_data, [])
            if entries is not None:
                leaves = [merkle.leaf_hash(e) for e in entries]
            else:  # stand-ins, so that the rest of the tree is still checked
                leaves = list(fetched) if fetched else [bytes(merkle.HASH_SIZE)] * bundle.width
            if not fetched:
                fetched = leaves
            for leaf in leaves:
                state.frontier.append(leaf)
                if state.frontier.size == signed.size:
                    signed_root = state.frontier.root()
            state.from_entries[0] = leaves
            self._compare(state, tile, fetched)
            if time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                self.progress(
                    f"audit: {state.frontier.size:,}/{size:,} entries, {state.tiles_checked:,} tiles"
                )
        # The partial tiles above level 0: what is left over at each level.
        for level in range(1, len(state.from_entries)):
            pending = state.from_entries[level]
            if pending:
                upper = Tile(level, (size >> (TILE_HEIGHT * level)) >> TILE_HEIGHT, len(pending))
                data = self._fetch(upper.path)
                self._compare(state, upper, self._audit_tile(state, upper, data, pending))
        self.progress(f"audit: {size:,}/{size:,} entries, {state.tiles_checked:,} tiles")
        return self._conclude(latest, state, signed, signed_root)

    def _conclude(
        self, latest: Checkpoint, state: _Audit, signed: Checkpoint, signed_root: bytes
    ) -> AuditReport:
        size = latest.size
        root = (
            "signed root"
            if signed is latest
            else f"signed root of size {signed.size} and this server's root of size {size}"
        )
        bad_bundles = [b for b, _ in state.unreadable if isinstance(b, Bundle)]
        bad_tiles = [t for t, _ in state.unreadable if isinstance(t, Tile)]
        entries_ok = state.frontier.root() == latest.root and signed_root == signed.root and not bad_bundles
        try:
            reader = self._reader(size)
            tiles_ok = merkle.root_hash(reader, size) == latest.root
            tiles_ok = tiles_ok and merkle.root_hash(reader, signed.size) == signed.root
        except (VerificationFailed, LogError):
            tiles_ok = False
        tiles_ok = tiles_ok and not state.vs_below and not bad_tiles
        lines = [why for _, why in state.unreadable]
        if entries_ok:
            lines += [
                f"{tile.path}: hash {k} ({_tile_range(tile, k)}) is wrong (the entries give the {root})"
                for tile, k in state.vs_entries
            ]
            bad_tiles += [tile for tile, _ in state.vs_entries]
        elif tiles_ok:
            level0 = [(tile, k) for tile, k in state.vs_entries if tile.level == 0]
            lines += [
                f"{Bundle(tile.index, tile.width).path}: {_tile_range(tile, k)} (number {k} in the bundle) "
                f"does not hash to leaf {k} of {tile.path} (the tiles give the {root})"
                for tile, k in level0
            ]
            bad_bundles += [Bundle(tile.index, tile.width) for tile, _ in level0]
        else:
            lines.insert(0, f"neither the entries nor the tiles give the {root}")
            lines += [
                f"{t.path}: hash {k} ({_tile_range(t, k)}) differs from its entries"
                for t, k in state.vs_entries
            ]
            lines += [
                f"{t.path}: hash {k} ({_tile_range(t, k)}) differs from the tile below"
                for t, k in state.vs_below
            ]
            bad_tiles += [t for t, _ in state.vs_entries + state.vs_below]
            for tile, _ in state.unreadable:  # nothing checked the bundles under a lost tile
                if isinstance(tile, Tile):
                    first, _ = _covered(tile, 0)
                    bad_bundles += _bundles(first, _covered(tile, tile.width - 1)[1], size)
            bad_bundles += self._suspects(state, bad_bundles)
        return AuditReport(
            size=size,
            root=latest.root,
            tiles_checked=state.tiles_checked,
            entries_ok=entries_ok,
            tiles_ok=tiles_ok,
            bad_tiles=tuple(dict.fromkeys(bad_tiles)),
            bad_bundles=tuple(sorted(dict.fromkeys(bad_bundles), key=lambda b: b.index)),
            lines=tuple(lines),
            signed=None if signed is latest else (signed.size, signed.root),
        )

    @staticmethod
    def _suspects(state: _Audit, unreadable: list[Bundle]) -> list[Bundle]:
        """When neither the entries nor the tiles give the root: the bundles under a difference
        between a tile and the entries that no difference lower down explains (a bundle edited
        with its level-0 tile recomputed shows first at level 1), or every bundle if none is."""
        size = state.size
        suspects: list[Bundle] = []
        lower = sorted(b.index << TILE_HEIGHT for b in unreadable)  # first entries of what is below
        by_level: dict[int, list[tuple[int, int]]] = {}
        for tile, k in state.vs_entries:
            by_level.setdefault(tile.level, []).append(_covered(tile, k))
        for level in sorted(by_level):
            ranges = by_level[level]
            for first, end in ranges:
                at = bisect.bisect_left(lower, first)
                if at == len(lower) or lower[at] >= end:  # nothing below explains it
                    suspects += _bundles(first, end, size)
            lower = sorted(lower + [first for first, _ in ranges])
        if not suspects and not unreadable:
            suspects = _bundles(0, size, size)
        return suspects


def run(
    key: str,
    *,
    url: str | None = None,
    directory: Path | None = None,
    index: int | None = None,
    entry: Path | None = None,
    old: Path | None = None,
    audit: bool = False,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = print,
) -> int:
    """``pst log verify``: 0 verified, 1 a check failed (``FAILED: ...`` on ``out``), 2 it could not run."""
    source: HttpSource | DirSource | None = None
    try:
        if index is not None and index < 0:
            raise SourceError(f"--index must be 0 or more, not {index}")
        verifier = load_verifier(key)
        entry_bytes = entry.read_bytes() if entry is not None else None
        old_note = old.read_bytes() if old is not None else None
        if url is not None:
            source = HttpSource(url)
        elif directory is not None:
            source = DirSource(directory)
        else:
            raise SourceError("give the log: --url or --dir")
        checks = LogVerifier(source, verifier, progress=err)
        latest = checks.latest()
        out(f"OK: checkpoint of {latest.origin}, size {latest.size}, signed by {verifier.name}")
        if index is not None or entry_bytes is not None:
            out("OK: " + checks.inclusion(latest, index, entry_bytes))
        if old_note is not None:
            out("OK: " + checks.consistency(latest, old_note))
        if audit:
            out("OK: " + checks.audit(latest))
    except VerificationFailed as exc:
        out(f"FAILED: {exc}")
        return 1
    except SourceError as exc:
        err(f"pst log verify: {exc}")
        return 2
    except OSError as exc:
        err(f"pst log verify: {exc.filename}: {exc.strerror}")
        return 2
    finally:
        if source is not None:
            source.close()
    return 0
