"""Replication of the log: every server holds the same entries in the same order (sans-IO).

Theory of operation
-------------------
Any server accepts syslog. What it receives it groups into **batches** (origin, seq,
entries): ``seq`` counts the origin's batches from 0, and a batch is named by its digest,
SHA-256 of its canonical CBOR. The origin makes a batch durable in its own store, then sends
it to every other server (again every ``resend`` seconds until it is in the log); a server
that receives a batch stores it durably before anything else.

The order is decided **slot by slot**, one Byzantine agreement per slot
(:class:`~appliance.protocols.agreement.Engine`, the engine of the refresh, with the leader
rotating with the slot number). A slot's value names batches by reference and says which
period's committee runs the next slot::

    {"period": p', "batches": [[origin, seq, digest], ...]}

A server votes for a proposal only if (a) it has applied every earlier slot, (b) each
origin's batches in it are exactly the next ones of that origin (no gap, no repeat), (c) it
holds every batch named, durably (otherwise it answers WAIT and fetches them from the
leader), and (d) ``p'`` is not before this slot's period and not after its own. An empty
value is refused unless it moves the committee to a later period. A decided slot is applied
by appending its batches' entries to the :class:`~appliance.apps.log.tiles.TileLog` in one
durable batch.

So a decision carries the votes of a quorum, ceil((n+t+1)/2) servers, each of which held
every batch durably: at least t+1 honest servers hold the entries, and the origin
acknowledges its batch (RELP ``rsp 200``, :attr:`Replica.acknowledged`) once the slot that
holds it is applied locally. Every honest server applies the same slots in the same order,
so their trees are equal at every slot boundary, which is what the checkpoint guard
(:mod:`appliance.apps.log.guard`) then checks before it signs.

Periods. A slot's committee is the servers' **vote keys** of one period (the host gives them:
each server's channel key of that period, certified by its period key). The period of slot
s+1 is written in slot s's value, so every server agrees on it. When a server moves to a
new period it proposes (when it leads) a value that moves the committee forward, with or
without batches; it keeps the previous period's vote key until that happens. Safety never
depends on timing: at most one value is decided per slot (the engine's quorum
intersection), whatever the periods of the servers.

What is durable, and when (all in the replica's :class:`~appliance.apps.log.tiles.Storage`):

=============================  ===========================================================
``replica/pending/<digest>``   a batch, before it is voted on or sent (deleted once applied)
``replica/safety/<p>-<s>``     the engine's safety data, before each vote leaves
``replica/slots/<s>``          a decided slot (its commit QC, value, first index and the
                               number of entries taken from each batch), before it is applied
``replica/applied``            the last applied slot, the tree size after it, each origin's
                               next seq and the next slot's period
``replica/rebuild``            while a tree started afresh in place of a damaged one is
                               rebuilt (``rebuild``): the slot reached before (no vote
                               before it) and our next seq
=============================  ===========================================================

A crash between the tree's append and ``replica/applied`` is repaired at the next start (the
tree's size then equals the size after the next recorded slot).

Catching up. A server that hears of a slot beyond the one it is on asks the sender for the
decided slots it missed (``sync``); the answer carries each slot's commit QC, value and
entries, verified against the QC and the batch digests before they are applied. This needs
the vote keys of those slots' periods; a server further behind than that takes the state of a
slot that t+1 servers report identically, fetches its entries and checks them against it
(:meth:`_catch_up`; docs/log.md, Replication).

Messages are CBOR maps ``{"log": kind, ...}``; a batch travels inside them as the bytes of its
canonical CBOR (``{"log": "batch", "b": <bytes>}``), which the receiver checks, stores and names
as they arrived (:meth:`Batch.from_bytes`). A peer's malformed or unjustified message is
a :class:`~appliance.protocols._core.RemoteProtocolError` in :attr:`Replica.rejected`, never
an exception out of :meth:`Replica.receive`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from appliance.apps.log.errors import CorruptStoreError, TreeSizeError
from appliance.apps.log.tiles import MAX_ENTRY_SIZE, Storage, TileLog
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import EVERYONE, Alert, AlertKind, RemoteProtocolError, Signer
from appliance.protocols.agreement import (
    ACCEPT,
    COMMIT,
    WAIT,
    BadCertificate,
    Committee,
    Decision,
    Engine,
    Instance,
    QuorumCert,
    SafetyData,
    SafetyRules,
    UncheckableCertificate,
    Verdict,
    digest,
    reject,
    safety_from_bytes,
    safety_to_bytes,
)

__all__ = [
    "MAX_BATCH_ENTRIES",
    "Batch",
    "Replica",
    "VoteKeys",
]

#: Entries in one batch, batches named in one slot, batches one origin may have waiting.
MAX_BATCH_ENTRIES = 4096
MAX_SLOT_BATCHES = 64
MAX_PENDING_PER_ORIGIN = 64
#: The bytes of a batch's entries (a batch travels in one frame of at most 4 MiB).
MAX_BATCH_BYTES = 1 << 20
#: Resend intervals after which a catch-up that has no t+1 matching reports is begun again.
CATCH_UP_RESTART = 6
#: Decided slots sent in one answer to ``sync``.
SYNC_CHUNK = 8
#: Decided slots kept to answer ``sync`` and ``fetch`` (a server further behind catches up
#: from signed checkpoints).
RETAIN = 1024

APPLIED_PATH = "replica/applied"
#: While a tree started afresh is rebuilt from the peers: the slot the replica had reached
#: (it votes again only from there) and our next batch seq (never reused).
REBUILD_PATH = "replica/rebuild"
Send = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class Batch:
    """Entries one server received, in its order: the unit that is sent, stored and ordered."""

    origin: int
    seq: int
    entries: tuple[bytes, ...]

    def to_obj(self) -> dict[str, Any]:
        return {"origin": self.origin, "seq": self.seq, "entries": list(self.entries)}

    @functools.cached_property
    def encoded(self) -> bytes:
        """The batch's canonical CBOR (computed once: it is stored, hashed and sent)."""
        return encoding.encode(self.to_obj())

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(self.encoded).digest()

    @classmethod
    def from_bytes(cls, raw: Any, n: int, digest: bytes | None = None) -> Batch:
        """The batch whose canonical CBOR is ``raw`` (as stored, and as it travels: kept as the
        bytes that arrived, so that nobody encodes it again to store or name it). ``digest``:
        SHA-256 of ``raw`` if the caller computed it already."""
        if not isinstance(raw, bytes):
            raise DecodeError("a batch travels as the bytes of its canonical CBOR")
        if len(raw) > MAX_BATCH_BYTES + 64 * 1024:
            raise DecodeError(f"batch: {len(raw)} bytes exceeds the limit of {MAX_BATCH_BYTES + 64 * 1024}")
        fields = _read_batch(raw)
        obj = (
            {"origin": fields[0], "seq": fields[1], "entries": fields[2]}
            if fields is not None
            else encoding.decode(raw, max_size=MAX_BATCH_BYTES + 64 * 1024, what="batch")
        )
        batch = cls.from_obj(obj, n)
        # decode() checked that raw is the canonical encoding of the object it decoded to, and
        # from_obj() that the object is exactly a batch's fields: raw is what encoded gives.
        batch.__dict__["encoded"] = raw
        if digest is not None:
            batch.__dict__["digest"] = digest
        return batch

    @classmethod
    def from_obj(cls, obj: Any, n: int) -> Batch:
        f = encoding.expect_map(obj, {"origin": int, "seq": int, "entries": list}, "batch")
        if not 1 <= f["origin"] <= n or f["seq"] < 0:
            raise DecodeError(f"batch of origin {f['origin']}, seq {f['seq']}")
        entries = f["entries"]
        if not 1 <= len(entries) <= MAX_BATCH_ENTRIES:
            raise DecodeError(f"a batch has 1 to {MAX_BATCH_ENTRIES} entries, not {len(entries)}")
        for e in entries:
            if not isinstance(e, bytes) or len(e) > MAX_ENTRY_SIZE:
                raise DecodeError("a batch entry is bytes of at most 65,535")
        if sum(map(len, entries)) > MAX_BATCH_BYTES:
            raise DecodeError(f"a batch holds at most {MAX_BATCH_BYTES} bytes of entries")
        return cls(f["origin"], f["seq"], tuple(entries))


def _read_batch(raw: bytes) -> tuple[int, int, list[bytes]] | None:
    """(origin, seq, entries) if ``raw`` is exactly the canonical CBOR of a batch's map
    ``{"seq": uint, "origin": uint, "entries": [bytes, ...]}`` (keys in canonical order, every
    head in its shortest form, nothing after it), else None: the generic decoder then reads it
    (and says what is wrong). A peer's batch of 4,096 entries is read here in one pass over the
    entries' heads, not prescanned, decoded, re-encoded and compared (fuzzed against it)."""
    if raw[:5] != b"\xa3\x63seq":
        return None
    seq, pos = _read_uint(raw, 5, 0x00)
    if seq is None or raw[pos : pos + 7] != b"\x66origin":
        return None
    origin, pos = _read_uint(raw, pos + 7, 0x00)
    if origin is None or raw[pos : pos + 8] != b"\x67entries":
        return None
    count, pos = _read_uint(raw, pos + 8, 0x80)
    if count is None or count > len(raw):
        return None
    entries = []
    size = len(raw)
    for _ in range(count):
        if pos >= size:
            return None
        head = raw[pos]
        if 0x40 <= head <= 0x57:
            length, pos = head - 0x40, pos + 1
        elif head == 0x59:  # the usual entry: 256 to 65,535 bytes
            length = (raw[pos + 1] << 8) | raw[pos + 2] if pos + 2 < size else 0
            if length < 0x100:
                return None
            pos += 3
        elif head == 0x58:
            length = raw[pos + 1] if pos + 1 < size else 0
            if length < 24:
                return None
            pos += 2
        else:
            return None  # longer entries than a batch holds, or not a byte string
        end = pos + length
        if end > size:
            return None
        entries.append(raw[pos:end])
        pos = end
    return (origin, seq, entries) if pos == size else None


def _read_uint(raw: bytes, pos: int, major: int) -> tuple[int | None, int]:
    """The argument of the CBOR head of major type ``major`` (shifted) at ``pos`` if it is there
    in its shortest form (at most 8 bytes), and where the head ends; (None, pos) otherwise."""
    if pos >= len(raw) or raw[pos] & 0xE0 != major:
        return None, pos
    info = raw[pos] & 0x1F
    if info < 24:
        return info, pos + 1
    if info > 27:
        return None, pos
    width = 1 << (info - 24)
    end = pos + 1 + width
    if end > len(raw):
        return None, pos
    value = int.from_bytes(raw[pos + 1 : end], "big")
    if value < (24 if width == 1 else 1 << (4 * width)):
        return None, pos
    return value, end


@dataclass(frozen=True)
class SlotValue:
    """What a slot decides: the next slot's period and the batches, by reference, in order."""

    period: int
    refs: tuple[tuple[int, int, bytes], ...]

    def encode(self) -> bytes:
        return encoding.encode({"period": self.period, "batches": [list(r) for r in self.refs]})

    @classmethod
    def decode(cls, raw: bytes, n: int) -> SlotValue:
        f = encoding.expect_map(
            encoding.decode(raw, what="slot value"), {"period": int, "batches": list}, "slot value"
        )
        refs = []
        if len(f["batches"]) > MAX_SLOT_BATCHES:
            raise DecodeError(f"a slot names at most {MAX_SLOT_BATCHES} batches")
        for r in f["batches"]:
            if (
                not isinstance(r, list)
                or len(r) != 3
                or not isinstance(r[0], int)
                or not isinstance(r[1], int)
                or not isinstance(r[2], bytes)
                or not 1 <= r[0] <= n
                or r[1] < 0
                or len(r[2]) != 32
            ):
                raise DecodeError("a batch reference is [origin, seq, 32-byte digest]")
            refs.append((r[0], r[1], r[2]))
        if f["period"] < 0:
            raise DecodeError("negative period")
        return cls(f["period"], tuple(refs))


class VoteKeys(Mapping[int, bytes]):
    """The committee of one period: every server 1..n is a member; keys become known as the
    host verifies them (a member whose key is unknown yet has no signature that verifies)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.known: dict[int, bytes] = {}

    def __getitem__(self, server: int) -> bytes:
        return self.known[server]

    def get(self, server: int, default: Any = None) -> Any:
        return self.known.get(server, default)

    def __contains__(self, server: object) -> bool:
        return isinstance(server, int) and 1 <= server <= self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, self.n + 1))

    def __len__(self) -> int:
        return self.n


class _Safety:
    """The engine's SafetyStore in the replica's storage (each save durable on return)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @staticmethod
    def path(inst: Instance) -> str:
        return f"replica/safety/{inst.period}-{inst.name.removeprefix('slot-')}"

    def load(self, inst: Instance) -> SafetyData | None:
        raw = self.storage.read(self.path(inst))
        if raw is None:
            return None
        try:
            return safety_from_bytes(raw)
        except DecodeError as exc:
            raise CorruptStoreError(f"{self.path(inst)}: {exc}") from None

    def save(self, inst: Instance, data: SafetyData) -> None:
        self.storage.write(self.path(inst), safety_to_bytes(data))
        self.storage.sync()


@dataclass
class _CatchUp:
    """A catch-up in progress: the slot whose state we ask for, the reports, then the entries."""

    slot: int
    asked_at: float
    #: When this catch-up began (one that gets no t+1 matching reports is begun again).
    started: float = 0.0
    reports: dict[tuple[int, tuple[tuple[int, int], ...], int, bytes], set[int]] = field(default_factory=dict)
    target: tuple[int, tuple[tuple[int, int], ...], int, bytes] | None = None
    backers: list[int] = field(default_factory=list)
    source: int = 0
    entries: list[bytes] = field(default_factory=list)


class _App:
    """The engine's Application for one slot."""

    def __init__(self, replica: Replica, slot: int) -> None:
        self.r = replica
        self.slot = slot

    def propose(self) -> bytes | None:
        return self.r._propose(self.slot)

    def validate(self, value: bytes, view: int) -> Verdict:
        return self.r._validate(self.slot, value, view)


class Replica:
    """One server's copy of the log and its part in ordering it (see the module docstring)."""

    def __init__(
        self,
        *,
        me: int,
        n: int,
        t: int,
        log: TileLog,
        storage: Storage,
        now: float,
        period: int = 0,
        genesis_period: int = 0,
        base_timeout: float = 0.5,
        resend: float = 2.0,
        rand: Callable[[int], bytes] = os.urandom,
        rebuild: bool = False,
    ) -> None:
        """``rebuild``: ``log`` was started afresh in place of a damaged tree (the host moved
        that aside): see :meth:`_start_rebuild`."""
        self.me, self.n, self.t = me, n, t
        self.log = log
        self.storage = storage
        self.base_timeout = base_timeout
        self.resend = resend
        self._rand = rand
        #: The server's own period now (the host moves it with :meth:`set_period`).
        self.period = period
        #: The period of slot 0's committee: the same on every server (the log's constant).
        self.genesis_period = genesis_period
        #: Seqs of this server's own batches now in the log (the host acknowledges their entries).
        #: Each as (seq, index of its first entry; None if it was logged while we were far behind).
        self.acknowledged: list[tuple[int, int | None]] = []
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self._keys: dict[int, VoteKeys] = {}
        self._signers: dict[int, Signer] = {}
        self._safety = _Safety(storage)
        self._engine: Engine | None = None
        self._pending: dict[bytes, Batch] = {}
        self._by_seq: dict[tuple[int, int], bytes] = {}
        self._sent: dict[bytes, float] = {}  # digest of a batch of ours -> when we last sent it
        self._out: list[Send] = []
        self._last_resend = now
        self._now = now
        self._asked: dict[int, float] = {}
        self._fetched_at = -1e18
        self._decided: tuple[int, int, bytes, QuorumCert] | None = None  # slot, period, value, qc
        #: Batches of the last RETAIN slots: digest -> (origin, seq, first index, entries).
        self._applied: dict[bytes, tuple[int, int, int, int]] = {}
        #: Where the others say they are (``at``), and when we last applied a slot.
        self._peer_slots: dict[int, int] = {}
        self._progress_at = now
        #: A catch-up from far behind in progress (see :meth:`_catch_up`).
        self._catchup: _CatchUp | None = None
        #: Catch-ups completed (for tests and the status page).
        self.caught_up = 0
        #: While rebuilding a tree started afresh: the slot this replica had reached before.
        self.floor = 0
        if rebuild:
            self._start_rebuild()
        self._load(now)

    # --- State ---------------------------------------------------------------------------------

    @property
    def rebuilding(self) -> bool:
        """Applying again what a tree started afresh lost (the slots before :attr:`floor`): no
        engine runs, so this server votes in no slot it may have voted in before (the safety
        data of applied slots is deleted); decided slots come with their commit QCs (``sync``)
        or from the state t+1 servers report (the catch-up), as for any server behind."""
        return self.slot < self.floor

    def _start_rebuild(self) -> None:
        """The tree is empty in place of a damaged one: move back to slot 0 (the state of the
        slots comes again from the peers), but remember, durably, where we were."""
        raw = self.storage.read(APPLIED_PATH)
        if raw is None or self.log.size:
            return  # nothing was applied (or the tree is not a fresh one): nothing to rebuild
        rec = self._applied_record(raw)
        old = self._rebuild_record()
        floor = max(rec["slot"] + 1, old[0] if old else 0)
        seqs = {int(k): int(v) for k, v in rec["seqs"].items()}
        seq = max(seqs.get(self.me, 0), old[1] if old else 0)
        self.storage.write(REBUILD_PATH, encoding.encode({"slot": floor, "seq": seq}))
        self.storage.sync()
        self.storage.delete(APPLIED_PATH)  # the rebuild record says where we were

    def _rebuild_record(self) -> tuple[int, int] | None:
        raw = self.storage.read(REBUILD_PATH)
        if raw is None:
            return None
        try:
            f = encoding.expect_map(
                encoding.decode(raw, what=REBUILD_PATH), {"slot": int, "seq": int}, REBUILD_PATH
            )
        except DecodeError as exc:
            raise CorruptStoreError(f"{REBUILD_PATH}: {exc}") from None
        return f["slot"], f["seq"]

    def _applied_record(self, raw: bytes) -> dict[str, Any]:
        try:
            return encoding.expect_map(
                encoding.decode(raw, what=APPLIED_PATH),
                {"slot": int, "size": int, "seqs": dict, "period": int},
                APPLIED_PATH,
            )
        except DecodeError as exc:
            raise CorruptStoreError(f"{APPLIED_PATH}: {exc}") from None

    def _load(self, now: float) -> None:
        raw = self.storage.read(APPLIED_PATH)
        self.slot = 0
        self.slot_period = self.genesis_period
        self.next_seq: dict[int, int] = {}
        if raw is not None:
            f = self._applied_record(raw)
            self.slot, self.slot_period = f["slot"] + 1, f["period"]
            self.next_seq = {int(k): int(v) for k, v in f["seqs"].items()}
            size = f["size"]
        else:
            size = 0
        if self.log.size != size:
            self._repair_applied(size)
        for path in self.storage.list("replica/pending"):
            raw = self.storage.read(path)
            try:
                batch = Batch.from_bytes(raw or b"", self.n)
            except DecodeError as exc:
                raise CorruptStoreError(f"{path}: {exc}") from None
            if batch.seq < self.next_seq.get(batch.origin, 0):
                self.storage.delete(path)  # applied before a crash; its deletion was lost
            else:
                self._keep(batch)
        for path in self.storage.list("replica/votekeys"):
            seed = self.storage.read(path)
            name = path.rsplit("/", 1)[1]
            if seed is None or len(seed) != 32 or not name.isdigit():
                raise CorruptStoreError(f"{path}: not a vote key")
            self._signers[int(name)] = Signer(SigningKey(seed))
        for slot in range(max(0, self.slot - RETAIN), self.slot):
            raw = self.storage.read(f"replica/slots/{slot}")
            if raw is not None:
                self._index(self._slot_record(raw, slot))
        own = [b.seq for b in self._pending.values() if b.origin == self.me]
        self.my_seq = max([self.next_seq.get(self.me, 0), *(s + 1 for s in own)])
        rebuild = self._rebuild_record()
        if rebuild is not None:
            self.floor, self.my_seq = rebuild[0], max(self.my_seq, rebuild[1])
            self._rebuilt()

    def _repair_applied(self, size: int) -> None:
        """The tree grew past ``replica/applied``: a crash came between the append and its record."""
        raw = self.storage.read(f"replica/slots/{self.slot}")
        rec = self._slot_record(raw, self.slot) if raw is not None else None
        if rec is None or rec["start"] != size or size + sum(rec["counts"]) != self.log.size:
            raise TreeSizeError(f"the log holds {self.log.size} entries, the replica's record says {size}")
        self.next_seq = {int(k): int(v) for k, v in rec["seqs"].items()}
        self._record_applied(SlotValue.decode(rec["value"], self.n).period)

    def _record_applied(self, next_period: int) -> None:
        self.storage.write(
            APPLIED_PATH,
            encoding.encode(
                {
                    "slot": self.slot,
                    "size": self.log.size,
                    "seqs": {k: v for k, v in sorted(self.next_seq.items())},
                    "period": next_period,
                }
            ),
        )
        self.storage.sync()
        self.slot += 1
        self.slot_period = next_period
        self._progress_at = self._now
        self._rebuilt()
        for period in [p for p in self._signers if p < next_period]:
            # The committee moved on: this period's vote key signs nothing any more.
            del self._signers[period]
            self.storage.delete(f"replica/votekeys/{period}")

    def _slot_record(self, raw: bytes, slot: int) -> dict[str, Any]:
        try:
            return encoding.expect_map(
                encoding.decode(raw, what=f"slot {slot}"),
                {"period": int, "qc": dict, "value": bytes, "start": int, "counts": list, "seqs": dict},
                f"replica/slots/{slot}",
            )
        except DecodeError as exc:
            raise CorruptStoreError(f"replica/slots/{slot}: {exc}") from None

    def _index(self, rec: dict[str, Any]) -> None:
        """Remember where a decided slot's batches are in the log (to answer ``fetch``)."""
        pos = rec["start"]
        for (origin, seq, d), count in zip(
            SlotValue.decode(rec["value"], self.n).refs, rec["counts"], strict=True
        ):
            if count:
                self._applied[d] = (origin, seq, pos, count)
                pos += count

    def _keep(self, batch: Batch) -> None:
        d = batch.digest
        self._pending[d] = batch
        self._by_seq.setdefault((batch.origin, batch.seq), d)  # the first one seen is proposed

    def _waiting(self, origin: int) -> int:
        return sum(1 for b in self._pending.values() if b.origin == origin)

    def _holds(self, origin: int, seq: int, d: bytes) -> bool:
        b = self._pending.get(d)
        return b is not None and (b.origin, b.seq) == (origin, seq)

    def _drop(self, d: bytes) -> None:
        b = self._pending.pop(d)
        self._sent.pop(d, None)
        if self._by_seq.get((b.origin, b.seq)) == d:
            del self._by_seq[(b.origin, b.seq)]
        self.storage.delete(f"replica/pending/{d.hex()}")

    # --- The host's side -----------------------------------------------------------------------

    def vote_key(self, period: int) -> bytes:
        """Our vote key for ``period`` (made and stored on first use): the host certifies it
        with this period's channel key and gives it to the others. It is kept, on disk, until
        the committee has moved past ``period``, so that a restart does not stall a slot."""
        signer = self._signers.get(period)
        if signer is None:
            if period < self.slot_period:
                raise ValueError(f"period {period} is over for the log's committee")
            seed = self._rand(32)
            self.storage.write(f"replica/votekeys/{period}", seed)
            self.storage.sync()
            signer = self._signers[period] = Signer(SigningKey(seed))
        self._keys.setdefault(period, VoteKeys(self.n)).known[self.me] = signer.public
        return signer.public

    def set_period(self, period: int, keys: Mapping[int, bytes] | None = None) -> None:
        """This server entered ``period`` (it votes there once it has a :meth:`vote_key`); the
        verified vote keys of the others known so far (more come with :meth:`add_vote_key`)."""
        vk = self._keys.setdefault(period, VoteKeys(self.n))
        if period in self._signers:
            vk.known[self.me] = self._signers[period].public
        for server, key in (keys or {}).items():
            if 1 <= server <= self.n and server != self.me:
                vk.known[server] = key
        self.period = max(self.period, period)

    def add_vote_key(self, period: int, server: int, key: bytes) -> None:
        """A verified vote key of ``server`` for ``period``."""
        if 1 <= server <= self.n and server != self.me:
            self._keys.setdefault(period, VoteKeys(self.n)).known[server] = key

    def submit(self, entries: Sequence[bytes]) -> int | None:
        """Make ``entries`` a batch of ours (durable when this returns) and send it; its seq, or
        None when too many of our batches wait already (the caller should slow down)."""
        if not entries:
            raise ValueError("a batch has at least one entry")
        if len(entries) > MAX_BATCH_ENTRIES or sum(map(len, entries)) > MAX_BATCH_BYTES:
            raise ValueError(f"a batch has at most {MAX_BATCH_ENTRIES} entries and {MAX_BATCH_BYTES} bytes")
        if self._waiting(self.me) >= MAX_PENDING_PER_ORIGIN:
            return None
        batch = Batch(self.me, self.my_seq, tuple(bytes(e) for e in entries))
        self._store(batch)
        self.my_seq += 1
        self._sent[batch.digest] = self._now
        self._out.append((EVERYONE, {"log": "batch", "b": batch.encoded}))
        return batch.seq

    def _store(self, batch: Batch) -> None:
        self.storage.write(f"replica/pending/{batch.digest.hex()}", batch.encoded)
        self.storage.sync()
        self._keep(batch)

    def peers_heard(self) -> bool:
        """Whether a peer has said where it is (``at``) since the start."""
        return bool(self._peer_slots)

    def unacknowledged(self) -> list[int]:
        """Our batches not in the log yet (after a restart: the host re-delivers none of them,
        they are sent again and acknowledged when ordered)."""
        return sorted(b.seq for b in self._pending.values() if b.origin == self.me)

    # --- Driving -------------------------------------------------------------------------------

    def receive(self, sender: int, obj: Any, now: float) -> None:
        """A message from ``sender``; a peer's fault is recorded in :attr:`rejected`."""
        self._now = now
        try:
            if not isinstance(obj, dict) or not isinstance(obj.get("log"), str):
                raise DecodeError("not a log message")
            kind = obj["log"]
            if kind == "batch":
                batch = self._new_batch(obj.get("b"))
                if batch is not None:
                    self._on_batch(sender, batch, fetched=False)
            elif kind == "batches":
                got = obj.get("b")
                if not isinstance(got, list) or len(got) > MAX_SLOT_BATCHES:
                    raise DecodeError("batches: a list of at most 64")
                for b in got:
                    batch = self._new_batch(b)
                    if batch is not None:
                        self._on_batch(sender, batch, fetched=True)
            elif kind == "fetch":
                self._on_fetch(sender, obj.get("d"))
            elif kind == "slot":
                self._on_slot(sender, obj, now)
            elif kind == "sync":
                self._on_sync(sender, obj.get("from"), now)
            elif kind == "decided":
                self._on_decided(sender, obj.get("slots"))
            elif kind == "state-req":
                self._on_state_request(sender, obj.get("slot"))
            elif kind == "state":
                self._on_state(sender, obj)
            elif kind == "entries-req":
                self._on_entries_request(sender, obj.get("start"), obj.get("end"))
            elif kind == "entries":
                self._on_entries(sender, obj.get("start"), obj.get("entries"))
            elif kind == "at":
                slot = obj.get("slot")
                if not isinstance(slot, int) or slot < 0:
                    raise DecodeError("at: slot")
                self._peer_slots[sender] = slot
                if slot > self.slot:
                    self._ask_sync(sender, now)
                elif slot < self.slot:
                    self._answer_sync(sender, slot, now)
            else:
                raise DecodeError(f"unknown log message {kind!r}")
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, f"log replication: {exc}"))
        except RemoteProtocolError as exc:
            self.rejected.append(exc)
        self._advance(now)

    def tick(self, now: float) -> list[Send]:
        self._now = now
        self._advance(now)
        self._catch_up(now)
        if now - self._last_resend >= self.resend:
            self._last_resend = now
            # Where we are, so that whoever is behind asks, and whoever is ahead answers.
            self._out.append((EVERYONE, {"log": "at", "slot": self.slot}))
            for b in sorted(self._pending.values(), key=lambda b: b.seq):
                # Ours, sent at least ``resend`` seconds ago (one sent since the last round is
                # on its way: sending it again only costs every peer a hash).
                if b.origin == self.me and now - self._sent.get(b.digest, -math.inf) >= self.resend:
                    self._sent[b.digest] = now
                    self._out.append((EVERYONE, {"log": "batch", "b": b.encoded}))
        out, self._out = self._out, []
        return out

    def next_wakeup(self, now: float) -> float:
        wake = self._last_resend + self.resend
        if self._decided is not None:
            wake = min(wake, now + self.base_timeout / 2)  # ask again for the batches it names
        if self._engine is not None and self._engine.decided is None:
            w = self._engine.next_wakeup(now)
            if w is not None:
                wake = min(wake, w)
        return max(wake, now + 1e-3)

    def _advance(self, now: float) -> None:
        """Apply what is decided; start the current slot's engine when there is work for it."""
        while True:
            if self._decided is not None and not self._apply_decided():
                break
            if self._decided is not None:
                continue
            if self._engine is None and self._work_to_do():
                self._start_engine(now)
            if self._engine is None:
                break
            out = self._engine.tick(now)
            self._drain_engine(out)
            if self._engine.decided is None:
                break
        return

    def _drain_engine(self, out: list[tuple[int, dict[str, Any]]]) -> None:
        engine = self._engine
        assert engine is not None
        for to, msg in out:
            self._out.append((to, {"log": "slot", "s": self.slot, "p": engine.inst.period, "m": msg}))
        self.alerts.extend(engine.alerts)
        engine.alerts.clear()
        self.rejected.extend(engine.rejected)
        engine.rejected.clear()

    def _work_to_do(self) -> bool:
        return bool(self._eligible()) or (
            self.period > self.slot_period and self.slot_period in self._signers
        )

    def _instance(self, period: int, slot: int) -> Instance:
        return Instance("log", period, f"slot-{slot}")

    def _start_engine(self, now: float) -> Engine | None:
        keys = self._keys.get(self.slot_period)
        if keys is None or self.rebuilding:
            return None
        inst = self._instance(self.slot_period, self.slot)
        signer = self._signers.get(self.slot_period)
        safety = SafetyRules(inst, signer, self._safety) if signer is not None else None
        slot = self.slot

        def decided(d: Decision) -> None:
            self._on_decision(slot, inst.period, d.value, d.qc)

        self._engine = Engine(
            me=self.me,
            inst=inst,
            committee=Committee(self.n, self.t, keys, rotation=self.slot),
            safety=safety,
            app=_App(self, self.slot),
            base_timeout=self.base_timeout,
            now=now,
            on_decide=decided,
        )
        return self._engine

    # --- The slot's value ----------------------------------------------------------------------

    def _eligible(self) -> list[tuple[int, int, bytes]]:
        """The batches we hold that could go into the current slot, in a deterministic order."""
        refs: list[tuple[int, int, bytes]] = []
        for origin in range(1, self.n + 1):
            seq = self.next_seq.get(origin, 0)
            while len(refs) < MAX_SLOT_BATCHES and (origin, seq) in self._by_seq:
                refs.append((origin, seq, self._by_seq[(origin, seq)]))
                seq += 1
        return refs

    def _propose(self, slot: int) -> bytes | None:
        if slot != self.slot:
            return None
        refs = self._eligible()
        period = self.period if self.period in self._keys else self.slot_period
        if not refs and period == self.slot_period:
            return None
        return SlotValue(period, tuple(refs)).encode()

    def _validate(self, slot: int, raw: bytes, view: int) -> Verdict:
        if slot != self.slot:
            return WAIT
        try:
            value = SlotValue.decode(raw, self.n)
        except DecodeError as exc:
            return reject(f"slot {slot}: {exc}")
        if value.period < self.slot_period:
            return reject(f"slot {slot}: period {value.period} is before the slot's {self.slot_period}")
        if not value.refs and value.period == self.slot_period:
            return reject(f"slot {slot}: an empty value that does not change the period")
        expect = dict(self.next_seq)
        missing: list[bytes] = []
        for origin, seq, d in value.refs:
            if seq != expect.get(origin, 0):
                return reject(f"slot {slot}: batch {seq} of server {origin} is not its next one")
            expect[origin] = seq + 1
            if not self._holds(origin, seq, d):
                missing.append(d)  # also when its origin sent us another batch of that seq
        if value.period > self.period:
            return WAIT  # we are not in that period yet
        if missing:
            if self._engine is not None:
                self._fetch([self._engine.committee.leader(view)], missing)
            return WAIT
        return ACCEPT

    def _fetch(self, servers: list[int], digests: list[bytes]) -> None:
        """Ask ``servers`` for batches (at most every half base timeout)."""
        if self._now - self._fetched_at < self.base_timeout / 2:
            return
        self._fetched_at = self._now
        for server in servers:
            if server != self.me:
                self._out.append((server, {"log": "fetch", "d": digests[:MAX_SLOT_BATCHES]}))

    # --- Deciding and applying -----------------------------------------------------------------

    def _on_decision(self, slot: int, period: int, value: bytes, qc: QuorumCert) -> None:
        if slot == self.slot and self._decided is None:
            self._decided = (slot, period, value, qc)

    def _apply_decided(self) -> bool:
        """Apply the decided current slot if we hold its batches (else ask for them)."""
        assert self._decided is not None
        slot, period, raw, qc = self._decided
        value = SlotValue.decode(raw, self.n)  # it passed a quorum's validation: well formed
        missing = [d for (o, s, d) in value.refs if s >= self.next_seq.get(o, 0) and not self._holds(o, s, d)]
        if missing:
            self._fetch(list(range(1, self.n + 1)), missing)
            return False
        entries: list[bytes] = []
        counts: list[int] = []
        for origin, seq, d in value.refs:
            if seq == self.next_seq.get(origin, 0):
                batch = self._pending[d]
                entries.extend(batch.entries)
                counts.append(len(batch.entries))
                self.next_seq[origin] = seq + 1
            else:
                counts.append(0)  # cannot happen after a quorum's validation; kept total
        start = self.log.size
        record: dict[str, Any] = {
            "period": period,
            "qc": qc.to_obj(),
            "value": raw,
            "start": start,
            "counts": counts,
            "seqs": dict(sorted(self.next_seq.items())),
        }
        self.storage.write(f"replica/slots/{slot}", encoding.encode(record))
        self.storage.sync()
        self._index(record)
        if entries:
            self.log.append(entries)
        self._record_applied(value.period)
        pos = start
        for (origin, seq, _d), count in zip(value.refs, counts, strict=True):
            if count and origin == self.me:
                self.acknowledged.append((seq, pos))
            pos += count
        # The batches applied, and any other batch behind its origin's next seq, are done.
        for d, b in list(self._pending.items()):
            if b.seq < self.next_seq.get(b.origin, 0):
                self._drop(d)
        # What only older slots needed: their safety data, and records beyond RETAIN.
        self.storage.delete(_Safety.path(self._instance(period, slot)))
        old = slot - RETAIN
        if old >= 0:
            raw_old = self.storage.read(f"replica/slots/{old}")
            if raw_old is not None:
                rec = self._slot_record(raw_old, old)
                for _o, _s, d in SlotValue.decode(rec["value"], self.n).refs:
                    self._applied.pop(d, None)
                self.storage.delete(f"replica/slots/{old}")
        self._decided = None
        self._engine = None
        return True

    # --- Handlers ------------------------------------------------------------------------------

    def _new_batch(self, raw: Any) -> Batch | None:
        """The batch in ``raw``, or None if we hold it already (named by the digest of the bytes,
        before they are decoded: an origin sends its batches again until they are in the log,
        and a batch we hold or applied recently costs a hash, not a decode)."""
        if not isinstance(raw, bytes):
            raise DecodeError("a batch travels as the bytes of its canonical CBOR")
        d = hashlib.sha256(raw).digest()
        if d in self._pending or d in self._applied:
            return None
        return Batch.from_bytes(raw, self.n, d)

    def _on_batch(self, sender: int, batch: Batch, *, fetched: bool) -> None:
        if not fetched and batch.origin != sender:
            raise RemoteProtocolError(sender, f"log replication: sent a batch of server {batch.origin}")
        if batch.seq < self.next_seq.get(batch.origin, 0):
            return  # already in the log
        d = batch.digest
        if d in self._pending:
            return
        if fetched and not self._wanted(d):
            return  # from a third party, only what a slot names is taken
        first = self._by_seq.get((batch.origin, batch.seq))
        if first is not None and not fetched:
            self._alert(
                AlertKind.EQUIVOCATION,
                batch.origin,
                f"two different batches {batch.seq} of the log",
                (first, d),
            )
        if self._waiting(batch.origin) >= MAX_PENDING_PER_ORIGIN:
            raise RemoteProtocolError(
                sender, f"log replication: over {MAX_PENDING_PER_ORIGIN} batches waiting"
            )
        self._store(batch)

    def _wanted(self, d: bytes) -> bool:
        values: list[bytes] = []
        if self._decided is not None:
            values.append(self._decided[2])
        if self._engine is not None:
            values.extend(self._engine.proposals())
        for raw in values:
            try:
                if any(r[2] == d for r in SlotValue.decode(raw, self.n).refs):
                    return True
            except DecodeError:
                continue
        return False

    def _on_fetch(self, sender: int, digests: Any) -> None:
        if not isinstance(digests, list) or len(digests) > MAX_SLOT_BATCHES:
            raise DecodeError("fetch: a list of at most 64 digests")
        for d in digests:
            batch = self._pending.get(d) if isinstance(d, bytes) else None
            if batch is None and isinstance(d, bytes) and d in self._applied:
                origin, seq, start, count = self._applied[d]
                batch = Batch(origin, seq, tuple(self.log.read_entries(start, start + count)))
            if batch is not None:  # one batch per message: each fits in a frame
                self._out.append((sender, {"log": "batches", "b": [batch.encoded]}))

    def _on_slot(self, sender: int, obj: dict[str, Any], now: float) -> None:
        slot, period, msg = obj.get("s"), obj.get("p"), obj.get("m")
        if not isinstance(slot, int) or not isinstance(period, int) or not isinstance(msg, dict):
            raise DecodeError("slot: s, p and m")
        if slot > self.slot:
            self._ask_sync(sender, now)
            return
        if slot < self.slot:
            self._answer_sync(sender, slot, now)
            return
        if period != self.slot_period:
            raise RemoteProtocolError(
                sender, f"log replication: slot {slot} runs in period {self.slot_period}, not {period}"
            )
        keys = self._keys.get(period)
        if keys is None or keys.get(sender) is None:
            return  # its vote key is not here yet: what it says is lost, as on a broken link
        engine = self._engine or self._start_engine(now)
        if engine is None:
            return  # no vote keys of that period (yet)
        engine.receive(sender, msg, now)
        self._drain_engine(engine.tick(now))

    def _ask_sync(self, server: int, now: float) -> None:
        last = self._asked.get(server)
        if last is not None and now - last < self.base_timeout:
            return
        self._asked[server] = now
        self._out.append((server, {"log": "sync", "from": self.slot}))

    def _on_sync(self, sender: int, start: Any, now: float) -> None:
        if not isinstance(start, int) or start < 0:
            raise DecodeError("sync: from")
        self._answer_sync(sender, start, now)

    def _answer_sync(self, sender: int, start: int, now: float) -> None:
        key = -sender  # rate-limited per asker, apart from our own questions
        last = self._asked.get(key)
        if last is not None and now - last < self.base_timeout:
            return
        self._asked[key] = now
        slots = []
        for s in range(max(start, self.slot - RETAIN), min(start + SYNC_CHUNK, self.slot)):
            raw = self.storage.read(f"replica/slots/{s}")
            if raw is None:
                break
            rec = self._slot_record(raw, s)
            slots.append({"slot": s, "period": rec["period"], "qc": rec["qc"], "value": rec["value"]})
        if slots:
            self._out.append((sender, {"log": "decided", "slots": slots}))

    def _on_decided(self, sender: int, slots: Any) -> None:
        """Decided slots a peer sent us: each taken once its commit QC verifies; its batches are
        then fetched by digest like any other."""
        if not isinstance(slots, list) or len(slots) > SYNC_CHUNK:
            raise DecodeError(f"decided: a list of at most {SYNC_CHUNK} slots")
        for obj in slots:
            f = encoding.expect_map(
                obj, {"slot": int, "period": int, "qc": dict, "value": bytes}, "decided slot"
            )
            if f["slot"] != self.slot or self._decided is not None:
                continue
            if f["period"] != self.slot_period:
                raise RemoteProtocolError(
                    sender,
                    f"log replication: slot {f['slot']} is in period {self.slot_period}, not {f['period']}",
                )
            keys = self._keys.get(self.slot_period)
            if keys is None:
                return  # we cannot check it (yet)
            qc = QuorumCert.from_obj(f["qc"])
            if qc.phase != COMMIT or digest(f["value"]) != qc.digest:
                raise RemoteProtocolError(
                    sender, f"log replication: slot {f['slot']}: not a commit QC of its value"
                )
            try:
                Committee(self.n, self.t, keys).verify_qc(self._instance(self.slot_period, self.slot), qc)
            except UncheckableCertificate:
                # We lack the vote keys of too many of its signers to check it: not the sender's
                # fault (we catch up from the state t+1 servers report, or once we learn them).
                return
            except BadCertificate as exc:
                raise RemoteProtocolError(sender, f"log replication: slot {f['slot']}: {exc}") from None
            SlotValue.decode(f["value"], self.n)
            self._decided = (self.slot, self.slot_period, f["value"], qc)
            if not self._apply_decided():
                return

    def _rebuilt(self) -> None:
        """Past the slot a rebuild had to reach: the replica votes again."""
        if self.floor and self.slot >= self.floor:
            self.floor = 0
            self.storage.delete(REBUILD_PATH)

    # --- Catching up from far behind -----------------------------------------------------------

    def _catch_up(self, now: float) -> None:
        """Too far behind for ``sync`` (the others no longer keep our slot, or we lack the vote
        keys of its period): take the state of a slot that t+1 servers report identically (one
        of them is honest), fetch the entries up to it, check them against that state's root,
        and carry on from there."""
        c = self._catchup
        if c is not None and (
            self.slot > c.slot or (c.target is None and now - c.started >= CATCH_UP_RESTART * self.resend)
        ):
            # Overtaken: we applied that slot ourselves (decisions we could check came in the
            # meantime), so its state is behind us. Or no t+1 servers reported one state of it
            # (they no longer keep it, or the reports were lost): begin again from where the
            # others are now. A catch-up kept past either point never ended and blocked every
            # later one (the store's sequence stayed behind for good, docs/store.md).
            self._catchup = c = None
        if c is None:
            ahead = sorted((s for s in self._peer_slots.values() if s > self.slot), reverse=True)
            if len(ahead) <= self.t or now - self._progress_at < 3 * self.resend:
                return
            self._catchup = c = _CatchUp(slot=ahead[self.t] - 1, asked_at=now, started=now)
            self._broadcast_state_request(c)
            return
        if c.target is None:
            if now - c.asked_at >= 2 * self.resend:
                c.asked_at = now
                self._broadcast_state_request(c)
            return
        if now - c.asked_at >= 2 * self.resend:  # the peer we asked went quiet: try the next
            c.source = self._next_source(c, c.source)
            self._ask_entries(c, now)

    def _broadcast_state_request(self, c: _CatchUp) -> None:
        self._out.append((EVERYONE, {"log": "state-req", "slot": c.slot}))

    def _on_state_request(self, sender: int, slot: Any) -> None:
        if not isinstance(slot, int) or slot < 0:
            raise DecodeError("state-req: slot")
        raw = self.storage.read(f"replica/slots/{slot}") if slot < self.slot else None
        if raw is None:
            return
        rec = self._slot_record(raw, slot)
        size = rec["start"] + sum(rec["counts"])
        state = {
            "slot": slot,
            "period": SlotValue.decode(rec["value"], self.n).period,
            "seqs": rec["seqs"],
            "size": size,
            "root": self.log.root_at(size),
        }
        self._out.append((sender, {"log": "state", **state}))

    def _on_state(self, sender: int, obj: dict[str, Any]) -> None:
        f = encoding.expect_map(
            obj,
            {"log": str, "slot": int, "period": int, "seqs": dict, "size": int, "root": bytes},
            "state",
        )
        c = self._catchup
        if c is None or c.target is not None or f["slot"] != c.slot:
            return
        seqs = f["seqs"]
        if not all(
            isinstance(k, int) and 1 <= k <= self.n and isinstance(v, int) and v >= 0 for k, v in seqs.items()
        ):
            raise DecodeError("state: seqs")
        key = (f["period"], tuple(sorted(seqs.items())), f["size"], f["root"])
        c.reports.setdefault(key, set()).add(sender)
        backers = c.reports[key]
        if len(backers) >= self.t + 1:
            if f["size"] < self.log.size:
                return  # we hold more than that already: nothing to fetch (begun again later)
            c.target = key
            c.backers = sorted(backers)
            c.source = c.backers[0]
            if f["size"] == self.log.size:
                # The slots we missed added no entries (a committee moving to a new period, the
                # store's sequence when idle): nothing to fetch, only the state to take. Asking
                # for an empty range of entries got no answer, ever.
                self._finish_catch_up(c, None)
            else:
                self._ask_entries(c, self._now)

    def _next_source(self, c: _CatchUp, bad: int) -> int:
        others = [i for i in range(1, self.n + 1) if i != self.me and i != bad]
        later = [i for i in others if i > bad] or others
        return later[0] if later else bad

    def _ask_entries(self, c: _CatchUp, now: float) -> None:
        assert c.target is not None
        start = self.log.size + len(c.entries)
        end = min(c.target[2], start + MAX_BATCH_ENTRIES)
        c.asked_at = now
        self._out.append((c.source, {"log": "entries-req", "start": start, "end": end}))

    def _on_entries_request(self, sender: int, start: Any, end: Any) -> None:
        if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start < end:
            raise DecodeError("entries-req: start and end")
        end = min(end, self.log.size, start + MAX_BATCH_ENTRIES)
        if start >= end:
            return
        entries = self.log.read_entries(start, end)
        total = 0
        for k, e in enumerate(entries):  # at most one frame's worth
            total += len(e)
            if total > MAX_BATCH_BYTES and k:
                entries = entries[:k]
                break
        self._out.append((sender, {"log": "entries", "start": start, "entries": entries}))

    def _on_entries(self, sender: int, start: Any, entries: Any) -> None:
        c = self._catchup
        if c is None or c.target is None or sender != c.source:
            return
        if not isinstance(entries, list) or not all(
            isinstance(e, bytes) and len(e) <= MAX_ENTRY_SIZE for e in entries
        ):
            raise DecodeError("entries: a list of entries")
        if start != self.log.size + len(c.entries) or not entries:
            return
        _period, _seqs, size, _root = c.target
        c.entries.extend(entries[: size - start])
        if self.log.size + len(c.entries) < size:
            self._ask_entries(c, self._now)
            return
        self._finish_catch_up(c, sender)

    def _finish_catch_up(self, c: _CatchUp, sender: int | None) -> None:
        """Take the state t+1 servers reported, with the entries ``sender`` sent (None: there
        were none to fetch), if they give its root."""
        assert c.target is not None
        period, seqs, size, root = c.target
        if self.slot > c.slot:
            self._catchup = None  # overtaken meanwhile: taking it would move us back
            return
        if self.log.root_after(c.entries) != root:
            if sender is None:
                # Our own tree is not a prefix of the log: no source will do (its audit says
                # so); this catch-up is begun again later.
                self._catchup = None
                return
            # t+1 servers vouched for the root: the entries were wrong (or our own tree is not
            # a prefix of the log; then no source will do, and we say so each round).
            self.rejected.append(
                RemoteProtocolError(
                    sender, f"log replication: entries up to {size} do not give the log's root"
                )
            )
            c.entries.clear()
            c.source = self._next_source(c, sender)
            self._ask_entries(c, self._now)
            return
        if c.entries:
            self.log.append(c.entries)
        self.next_seq = {int(k): int(v) for k, v in seqs}
        self.my_seq = max(self.my_seq, self.next_seq.get(self.me, 0))  # never a seq the log has
        self.slot = c.slot
        self._record_applied(period)  # records slot c.slot as applied, moves to the next
        for d, b in list(self._pending.items()):
            if b.seq < self.next_seq.get(b.origin, 0):
                if b.origin == self.me:
                    self.acknowledged.append((b.seq, None))
                self._drop(d)
        self._engine = None
        self._decided = None
        self._catchup = None
        self.caught_up += 1

    def _alert(self, kind: AlertKind, server: int, detail: str, evidence: tuple[bytes, ...]) -> None:
        if all((a.kind, a.server) != (kind, server) for a in self.alerts):
            self.alerts.append(Alert(kind, server, self.period, detail, evidence))
