"""Repairing a damaged copy of the log from what the audit found and from the peers (sans-IO).

Theory of operation
-------------------
A server's audit (:meth:`appliance.apps.log.node.LogNode.audit`) recomputes its copy of the log
up to the latest *signed* checkpoint and says what differs
(:class:`~appliance.apps.log.verify.AuditReport`). The signed root is the only thing trusted
here; whatever is rewritten is first recomputed and must give it.

* **The entries give the signed root** (only tiles were changed): every tile of the signed size
  is recomputed from the local entries (:func:`rebuild`) and the ones that differ are rewritten.
  No peer is needed.
* **Some bundles are wrong** (or missing, or may be wrong: see
  :attr:`~appliance.apps.log.verify.AuditReport.bad_bundles`): :class:`Repair` asks one peer at
  a time for those bundles' entries (``repair-req``: a range of at most
  :data:`~appliance.apps.log.replication.MAX_BATCH_ENTRIES` entries; the answer, ``repair``,
  holds at most :data:`~appliance.apps.log.replication.MAX_BATCH_BYTES` of entries and at
  least one, so a bundle may take several). Once it has them all from that peer it rebuilds the
  tree of the signed size with them in place of its own: if the root is the signed root, the
  bundles and tiles that differ from the disk are the repair; if not, the peer sent bad data
  (or holds a damaged copy itself): it is named in :attr:`Repair.bad_peers` and the next peer is
  asked from scratch. When the tiles too were damaged, the audit may not have located every
  wrong bundle, so a failed rebuild only casts doubt on the peer; once every peer has failed,
  the repair asks for *every* bundle of the signed size (at most :data:`MAX_REPAIR_BUNDLES`),
  and a doubted peer is named only if its entries differ from the ones that were accepted. A
  peer that does not answer within ``timeout`` seconds, or answers that it lacks the entries,
  is passed over too. When no peer will do, :attr:`Repair.failure` says why.

Nothing here writes to the log: the result is a map of paths to their right content, which the
caller writes with :meth:`~appliance.apps.log.tiles.TileLog.rewrite` (atomically, file by file,
under the node's lock). Files are compared, not trusted: a rebuilt file equal to the one on disk
is not rewritten. The module never imports trio or sockets; :meth:`Repair.receive` and
:meth:`Repair.start` hash up to the whole signed tree, so the caller runs them in a worker thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from appliance.apps.log.errors import LogDecodeError, LogError
from appliance.apps.log.merkle import HASH_SIZE, Frontier
from appliance.apps.log.replication import MAX_BATCH_BYTES, MAX_BATCH_ENTRIES
from appliance.apps.log.tiles import (
    MAX_ENTRY_SIZE,
    TILE_HEIGHT,
    TILE_WIDTH,
    Bundle,
    Storage,
    Tile,
    TileLog,
    decode_bundle,
    encode_bundle,
    new_bundles,
    tiles_for_size,
)
from appliance.crypto.errors import DecodeError

if TYPE_CHECKING:  # verify.py reads over HTTP; this module does no I/O of its own
    from appliance.apps.log.checkpoint import Checkpoint
    from appliance.apps.log.verify import AuditReport, LogVerifier

__all__ = [
    "MAX_REPAIR_BUNDLES",
    "REPAIR_TIMEOUT",
    "Repair",
    "answer_request",
    "audit_copy",
    "older_partials",
    "rebuild",
    "rebuild_at",
]

#: Seconds a peer has to answer one request before the next peer is asked.
REPAIR_TIMEOUT: Final = 10.0
#: The most bundles one repair fetches (256 Ki entries at most 64 KiB each: 16 GiB at worst).
MAX_REPAIR_BUNDLES: Final = 1024


def _digest(entries: Sequence[bytes]) -> bytes:
    return hashlib.sha256(encode_bundle(entries)).digest()


class _Compare:
    """A Storage that writes nothing: it keeps the writes of ``wanted`` paths that differ from
    what ``storage`` holds."""

    def __init__(self, storage: Storage, wanted: set[str]) -> None:
        self.storage = storage
        self.wanted = wanted
        self.changed: dict[str, bytes] = {}

    def read(self, path: str) -> bytes | None:
        return self.storage.read(path)

    def write(self, path: str, data: bytes) -> None:
        if path in self.wanted and path not in self.changed and self.storage.read(path) != data:
            self.changed[path] = bytes(data)

    def sync(self) -> None:
        pass

    def list(self, directory: str) -> list[str]:
        return self.storage.list(directory)

    def delete(self, path: str) -> None:
        raise LogError(f"a rebuild deletes nothing ({path})")


def rebuild(
    storage: Storage,
    origin: str,
    size: int,
    replace: Mapping[int, Sequence[bytes]] | None = None,
) -> tuple[bytes, dict[str, bytes]]:
    """The tree of ``size`` entries recomputed from the bundles in ``storage``, bundle ``n``
    taken from ``replace[n]`` where given: its root, and every tile and bundle of that size whose
    content differs from the file in ``storage`` (nothing is written). Raises LogError if a
    bundle not replaced is missing or malformed."""
    root, _, files = rebuild_at(storage, origin, size, replace, at=size)
    return root, files


def rebuild_at(
    storage: Storage,
    origin: str,
    size: int,
    replace: Mapping[int, Sequence[bytes]] | None = None,
    *,
    at: int,
) -> tuple[bytes, bytes, dict[str, bytes]]:
    """:func:`rebuild`, with the root of the tree at the smaller size ``at`` too: (root of
    ``size``, root at ``at``, files that differ)."""
    replace = replace or {}
    if not 0 <= at <= size:
        raise ValueError(f"a size from 0 to {size}, not {at}")
    wanted = {t.path for t in tiles_for_size(size)} | {b.path for b in new_bundles(0, size)}
    compare = _Compare(storage, wanted)
    tree = TileLog(compare, origin, Frontier())
    at_root = tree.root() if at == 0 else b""
    for bundle in new_bundles(0, size):
        entries = replace.get(bundle.index)
        if entries is None:
            data = storage.read(bundle.path)
            if data is None:
                raise LogError(f"{bundle.path} is missing")
            entries = decode_bundle(bundle, data)
        if len(entries) != bundle.width:
            raise LogError(f"{bundle.path}: {len(entries)} entries, not {bundle.width}")
        first = bundle.index << TILE_HEIGHT
        if first < at < first + bundle.width:  # the tree at ``at``, within this bundle
            tree.append(list(entries[: at - first]))
            at_root = tree.root()
            tree.append(list(entries[at - first :]))
        else:
            tree.append(list(entries))
        if tree.size == at:
            at_root = tree.root()
    return tree.root(), at_root, compare.changed


def older_partials(
    storage: Storage,
    size: int,
    signed: int,
    files: Mapping[str, bytes] | None = None,
    skip: Collection[str] = (),
) -> tuple[dict[str, bytes], list[str]]:
    """The partial tiles and bundles of sizes older than ``size`` kept in ``storage`` (those
    of the signed size ``signed`` and of earlier checkpoints, until a full one supersedes them
    and they are pruned), checked against the file of the tree of ``size`` at their position
    (taken from ``files`` where given: a repair's right content), whose prefix they must be.

    Returns the right content of each one that differs, and a line saying why for each. A
    missing one is wrong only if it is of the signed size (the read side serves it) and the
    full file at its position is not there to take its prefix from (then it was pruned); the
    others may be missing (pruned, or never written). Widths at or beyond ``size``'s at their
    position are not looked at (the tree's own, checked by the audit, or appends since), nor
    is a position whose file of ``size`` is in ``skip`` (found wrong by the audit itself; the
    repair checks again from its right content) or cannot be read."""
    files = files or {}
    fixes: dict[str, bytes] = {}
    lines: list[str] = []
    level = 0
    while count := size >> (TILE_HEIGHT * level):
        signed_count = signed >> (TILE_HEIGHT * level)
        for bundles in (False, True) if level == 0 else (False,):
            for n in range((count + TILE_WIDTH - 1) >> TILE_HEIGHT):
                width = min(TILE_WIDTH, count - (n << TILE_HEIGHT))
                current: Tile | Bundle = Bundle(n, width) if bundles else Tile(level, n, width)
                base = Bundle(n).path if bundles else Tile(level, n).path
                listed = storage.list(base + ".p")
                need = signed_count - (n << TILE_HEIGHT)
                required = {f"{base}.p/{need}"} if 0 < need < width else set()
                if not listed and not required:
                    continue
                if current.path in skip:
                    continue
                data = files.get(current.path) or storage.read(current.path)
                if data is None:
                    continue
                if isinstance(current, Bundle):
                    try:
                        right = decode_bundle(current, data)
                    except LogDecodeError:
                        continue
                elif len(data) == width * HASH_SIZE:
                    right = [data[k : k + HASH_SIZE] for k in range(0, len(data), HASH_SIZE)]
                else:
                    continue
                for path in sorted(set(listed) | required):
                    w = path.rsplit("/", 1)[1]
                    if not w.isdigit() or not 0 < int(w) < width:
                        continue
                    want = encode_bundle(right[: int(w)]) if bundles else b"".join(right[: int(w)])
                    have = storage.read(path)
                    if have == want:
                        continue
                    if have is None:
                        full = storage.read(base)
                        if path not in required or (
                            full is not None and (bundles or len(full) == TILE_WIDTH * HASH_SIZE)
                        ):
                            continue
                        why = "is missing"
                    else:
                        why = f"is not the first {w} {'entries' if bundles else 'hashes'} of {current.path}"
                    what = "the signed size's" if path in required else "an older size's"
                    fixes[path] = want
                    lines.append(f"{path} ({what} partial {'bundle' if bundles else 'tile'}) {why}")
        level += 1
    return fixes, lines


def answer_request(log: TileLog, obj: Any) -> dict[str, Any]:
    """Our answer to a peer's ``repair-req`` (``start``, ``end``): the entries from ``start``,
    at most :data:`MAX_BATCH_ENTRIES` and :data:`MAX_BATCH_BYTES` of them but at least one, or
    none if we do not have them (beyond our size, or our own copy cannot be read)."""
    start, end = obj.get("start"), obj.get("end")
    if (
        not isinstance(start, int)
        or not isinstance(end, int)
        or isinstance(start, bool)
        or isinstance(end, bool)
        or not 0 <= start < end
    ):
        raise DecodeError("repair-req: start and end")
    end = min(end, log.size, start + MAX_BATCH_ENTRIES)
    entries: list[bytes] = []
    if start < end:
        try:
            entries = log.read_entries(start, end)
        except LogError:
            entries = []  # our copy is damaged there too: let the requester ask another
        total = 0
        for k, e in enumerate(entries):
            total += len(e)
            if total > MAX_BATCH_BYTES and k:
                entries = entries[:k]
                break
    return {"log": "repair", "start": start, "entries": entries}


def audit_copy(
    checker: LogVerifier, storage: Storage, latest: Checkpoint, tip: Checkpoint | None = None
) -> AuditReport:
    """A server's audit of its own copy (``checker`` reads ``storage``): the tree of ``tip``
    (its own, beyond the signed ``latest``; :meth:`LogVerifier.audit_report`) and the partial
    files of older sizes beside it (:func:`older_partials`; those at a position whose file the
    first part found wrong are left for after the repair)."""
    report = checker.audit_report(latest, tip)
    wrong = {t.path for t in report.bad_tiles} | {b.path for b in report.bad_bundles}
    fixes, lines = older_partials(storage, report.size, report.signed_size, skip=wrong)
    if not lines:
        return report
    return dataclasses.replace(report, lines=report.lines + tuple(lines), bad_partials=tuple(fixes))


class Repair:
    """One repair of this server's copy of the signed tree the audit ``report`` is about.

    Drive it with :meth:`start`, then :meth:`receive` (the peers' ``repair`` frames) and
    :meth:`tick` until :attr:`done`; send what it puts in :attr:`out` (``(peer, message)``).
    Then :attr:`files` (paths to their right content) and :attr:`source` (the peer whose
    entries were used; None if none was needed) on success, :attr:`failure` otherwise.
    """

    def __init__(
        self,
        *,
        me: int,
        n: int,
        storage: Storage,
        origin: str,
        report: AuditReport,
        timeout: float = REPAIR_TIMEOUT,
    ) -> None:
        self.storage, self.origin, self.report = storage, origin, report
        self.timeout = timeout
        self.peers = [(me + k - 1) % n + 1 for k in range(1, n)]  # the next servers, in turn
        self._remaining = list(self.peers)
        self.out: list[tuple[int, dict[str, Any]]] = []
        #: (peer, what was wrong): the peers whose entries did not give the signed root.
        self.bad_peers: list[tuple[int, str]] = []
        #: Why each other peer was passed over (no answer, or it lacks the entries).
        self.passed: list[str] = []
        self.files: dict[str, bytes] | None = None
        self.source: int | None = None
        self.failure: str | None = None
        self.peer: int | None = None
        #: The bundles to fetch: those the audit names, then (escalated) every one.
        self.wanted: list[Bundle] = list(report.bad_bundles)
        self.escalated = False
        #: Peers whose entries did not give the root while the audit's list may be incomplete,
        #: with a digest of each bundle they sent.
        self._doubts: dict[int, dict[int, bytes]] = {}
        self._got: dict[int, list[bytes]] = {}
        self._asked: tuple[int, float] | None = None  # (start, when)

    @property
    def done(self) -> bool:
        return self.files is not None or self.failure is not None

    def start(self, now: float) -> None:
        report = self.report
        if report.ok:
            self.files = {}
        elif report.entries_ok:
            self._try(None, {})
            if self.files is None and self.failure is None:
                self.failure = "the entries give the signed root but their rebuild does not"
        elif not report.bad_bundles:
            self.failure = "the audit names no bundle to fetch"
        elif len(report.bad_bundles) > MAX_REPAIR_BUNDLES:
            self.failure = (
                f"{len(report.bad_bundles)} bundles are wrong or may be (more than the {MAX_REPAIR_BUNDLES} "
                "a repair fetches): restore the log directory from a peer's copy"
            )
        else:
            self._next_peer(now)

    def _try(self, peer: int | None, replace: Mapping[int, Sequence[bytes]]) -> None:
        """Rebuild with ``replace``: the repair if it gives the signed root."""
        report = self.report
        try:
            root, at_root, files = rebuild_at(
                self.storage, self.origin, report.size, replace, at=report.signed_size
            )
        except LogError as exc:
            self.failure = f"the local copy could not be rebuilt: {exc}"
            return
        if root == report.root and (report.signed is None or at_root == report.signed[1]):
            # The partial files of older sizes: prefixes of the (repaired) files of the tree.
            fixes, _ = older_partials(self.storage, report.size, report.signed_size, files)
            self.files, self.source = files | fixes, peer
            self._settle_doubts(replace)
        elif peer is not None:
            if self.report.tiles_ok or self.escalated:  # the list was complete: the peer is wrong
                self._doubts.pop(peer, None)
                self.bad_peers.append((peer, self._wrong(list(replace))))
            else:
                self._doubts[peer] = {n: _digest(e) for n, e in replace.items()}

    def _wrong(self, bundles: list[int]) -> str:
        paths = ", ".join(b.path for b in self.wanted if b.index in bundles[:4])
        more = len(bundles) - 4
        paths += f" and {more} more" if more > 0 else ""
        report = self.report
        if report.signed is None or report.signed[0] == report.size:
            return f"its entries for {paths} do not give the signed root of size {report.size}"
        return (
            f"its entries for {paths} do not give the signed root of size {report.signed[0]} "
            f"and this server's root of size {report.size}"
        )

    def _settle_doubts(self, accepted: Mapping[int, Sequence[bytes]]) -> None:
        """A doubted peer whose entries differ from the accepted ones sent bad data."""
        for peer, digests in self._doubts.items():
            differ = sorted(n for n, d in digests.items() if n in accepted and _digest(accepted[n]) != d)
            if differ:
                self.bad_peers.append((peer, self._wrong(differ)))
        self._doubts = {}

    def _next_peer(self, now: float) -> None:
        self._got = {}
        every = new_bundles(0, self.report.size)
        if not self._remaining and self._doubts and not self.escalated and len(every) <= MAX_REPAIR_BUNDLES:
            # No peer's entries gave the root: more bundles may be wrong than the audit located.
            self.escalated = True
            self.wanted = every
            self._remaining = list(self._doubts)
        if not self._remaining:
            tried = [f"server {p}: {why}" for p, why in self.bad_peers] + self.passed
            tried += [
                f"server {p}: {self._wrong(sorted(d))} (or more bundles are damaged than were located)"
                for p, d in self._doubts.items()
            ]
            self.failure = "no peer sent entries that give the signed root (" + "; ".join(tried) + ")"
            self.peer = self._asked = None
            return
        self.peer = self._remaining.pop(0)
        self._ask(now)

    def _missing(self) -> tuple[int, int] | None:
        """The next range of entries to ask for: ``(start, end)`` within one bundle."""
        for bundle in self.wanted:
            have = len(self._got.get(bundle.index, []))
            if have < bundle.width:
                first = bundle.index << TILE_HEIGHT
                return first + have, first + bundle.width
        return None

    def _ask(self, now: float) -> None:
        wanted = self._missing()
        assert wanted is not None and self.peer is not None
        self._asked = (wanted[0], now)
        self.out.append((self.peer, {"log": "repair-req", "start": wanted[0], "end": wanted[1]}))

    def receive(self, sender: int, obj: Any, now: float) -> None:
        """A ``repair`` message from a peer (a malformed one passes the peer over)."""
        if self.done or sender != self.peer or self._asked is None:
            return
        start, entries = obj.get("start"), obj.get("entries")
        if start != self._asked[0]:
            return  # an answer to an earlier request
        if (
            not isinstance(entries, list)
            or len(entries) > MAX_BATCH_ENTRIES
            or not all(isinstance(e, bytes) and len(e) <= MAX_ENTRY_SIZE for e in entries)
        ):
            self.bad_peers.append((sender, "it sent a malformed repair message"))
            self._next_peer(now)
            return
        if not entries:
            self.passed.append(f"server {sender} does not have entries from {start}")
            self._next_peer(now)
            return
        n = start >> TILE_HEIGHT
        bundle = next(b for b in self.wanted if b.index == n)
        got = self._got.setdefault(n, [])
        got.extend(entries[: bundle.width - len(got)])
        if self._missing() is not None:
            self._ask(now)
            return
        self._try(sender, self._got)
        if not self.done:
            self._next_peer(now)

    def tick(self, now: float) -> None:
        """Pass over a peer that did not answer in time."""
        if self.done or self._asked is None or now - self._asked[1] < self.timeout:
            return
        self.passed.append(f"server {self.peer} did not answer in {self.timeout:g} s")
        self._next_peer(now)

    def summary(self) -> str:
        """What was repaired (after success), for the log."""
        assert self.files is not None
        bundles = sorted(p for p in self.files if p.startswith("tile/entries/"))
        tiles = sorted(p for p in self.files if not p.startswith("tile/entries/"))
        size = self.report.size
        own = {t.path for t in tiles_for_size(size)} | {b.path for b in new_bundles(0, size)}
        older = [p for p in bundles + tiles if p not in own]
        if older:
            bundles = [p for p in bundles if p not in older]
            tiles = [p for p in tiles if p not in older]
        parts = []
        if bundles:
            listed = ", ".join(bundles[:8])
            parts.append(f"{len(bundles)} entry bundle(s) ({listed}) from server {self.source}")
        if tiles:
            parts.append(f"{len(tiles)} tile(s) ({', '.join(tiles[:8])}) recomputed from the entries")
        if older:
            listed = ", ".join(older[:8])
            parts.append(f"{len(older)} partial file(s) of older sizes ({listed}) from the tree's")
        return " and ".join(parts) or "nothing differed any more"
