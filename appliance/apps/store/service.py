"""The store in one server, sans-IO: the agreed writes applied in order, and the read protocol.

Theory of operation
-------------------
**Writes.** A server that takes a write from its local API (StoreData, Write, StoreUntil,
GenerateJointSecret) encodes it as an :class:`Operation`: the :class:`~.model.WriteRequest`,
the client that asked (as this server's API authenticated it) and this server's clock in ms.
The operations are ordered by the agreement engine exactly like the secure log's entries: they
are the entries of a second replicated sequence (:class:`appliance.apps.log.replication.Replica`
on its own :class:`~appliance.apps.log.tiles.TileLog`, in ``appliance.apps.store.node``), so
every server gets the same operations in the same order, each held durably by a quorum before
it is applied. Every server then runs :meth:`StoreService.apply` on each operation in that
order: :meth:`~.model.StoreState.apply_write` checks it against the state and applies it, or
refuses it (nothing changes). The check must give the same answer at every server, so it sees
only what the operation carries: the write's own clock (``at``) stands for "now" (the
StoreUntil date limit), never the applying server's clock. The state and the number of
operations applied are saved together (:meth:`StoreService.encode`), so a restart resumes.

A distributed application's quorum writes (``public-rw``, ``secret-dw-dr``, ``joint-secret``)
carry their approvals certificate in the operation (:class:`~.model.Quorum`: the votes with the
signed KeyTable of their period). Applying checks it against the group key and n only
(:attr:`StoreService.authority`), which every server holds alike, so the verdict is the same
everywhere and in every period (docs/store.md "Quorum requests").

**Reads of secrets.** The reader's server sends a :class:`ReadAsk` (the
:class:`~.model.ReadRequest`, the client, the number of operations it has applied) to every
server. Each one waits until it has applied as many operations, then runs :meth:`StoreService.authorize`:
:meth:`~.model.StoreState.authorize_read` against its own state and its own clock (deny by
default), and TDH2's ciphertext check of every part; its key-holder then makes the decryption
shares, sealed to the reader's X25519 key, which go back in a :class:`ReadAnswer`. A refusal
goes back too (with the model's code), and a policy refusal (``not-permitted``, ``too-early``)
is an alert on the refusing server naming the requester. The reader's server cannot open the
sealed shares; the client opens and combines them (:func:`~.model.open_value`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from appliance.apps.store import model
from appliance.apps.store.attest import Attestation, Attested, Verifier
from appliance.apps.store.model import (
    Client,
    Quotas,
    ReadRequest,
    Record,
    Refused,
    StoreState,
    WriteRequest,
)
from appliance.crypto import encoding, tdh2
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import Group
from appliance.protocols.state import KeyTable

E = TypeVar("E")

#: The name of the store key among the secrets of C.
STORE_SECRET: Final = "store"
FORMAT_VERSION: Final = 1
#: The largest operation: one entry of the replicated sequence (tiles.MAX_ENTRY_SIZE).
MAX_OPERATION: Final = 0xFFFF
#: The network's quotas: a value and its sealed form fit in one operation.
NETWORK_QUOTAS: Final = Quotas(max_value_size=16 * 1024)
#: Outcomes of recent operations kept for the servers' API callers waiting on them.
MAX_OUTCOMES: Final = 65536
RID_SIZE: Final = 16
#: The largest saved state a server opens (its own snapshot, from its disk): ~2 million items of
#: the benchmark's size (the default limit of a decoded message, 16 MiB, held ~33,000).
MAX_SNAPSHOT: Final = 1 << 30
MAX_ANSWER_PARTS: Final = model.MAX_PARTS
#: Codes whose refusal at a server is an alert there (the request broke a rule, it did not lag).
ALERT_CODES: Final = frozenset({model.NOT_PERMITTED, model.TOO_EARLY})
#: A quorum's certificate is applied while the store's sequence is at most this many periods
#: past the certificate's period (:attr:`StoreService.period`: agreed, never a clock), and
#: refused after (``not-permitted``). The origin admits only one of the previous period or
#: later, so this leaves an ordering two more periods.
MAX_QUORUM_AGE: Final = 3
#: The largest KeyTable a period mark carries (as a quorum's certificate).
MAX_MARK_TABLE: Final = model.MAX_TABLE


def _client_obj(client: Client) -> dict[str, Any]:
    return {"app": client.app, "uid": client.unique_id}


def _client_from(obj: Any, what: str) -> Client:
    f = encoding.expect_map(obj, {"app": str, "uid": bytes}, what)
    if not f["app"] or len(f["app"]) > model.MAX_APP_LENGTH or len(f["uid"]) > model.MAX_UNIQUE_ID:
        raise DecodeError(f"{what}: bad client name or unique id")
    return Client(f["app"], f["uid"])


@dataclass(frozen=True)
class Operation:
    """One write as the network orders it: the request, the client, the origin's clock (ms),
    and for a quorum's write its certificate (the requester is then the quorum)."""

    request: WriteRequest
    client: Client
    at_ms: int
    quorum: model.Quorum | None = None

    @property
    def requester(self) -> model.Requester:
        return self.quorum if self.quorum is not None else self.client

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "op": "write",
            "w": self.request.to_obj(),
            "by": _client_obj(self.client),
            "at": self.at_ms,
        }
        if self.quorum is not None:
            obj["q"] = self.quorum.to_obj()
        return encoding.encode(obj)

    @classmethod
    def decode(cls, data: bytes) -> Operation:
        return cls.from_obj(encoding.decode(data, max_size=MAX_OPERATION, what="store operation"))

    @classmethod
    def from_obj(cls, obj: Any) -> Operation:
        what = "store operation"
        fields: dict[str, type] = {"op": str, "w": dict, "by": dict, "at": int}
        if isinstance(obj, dict) and "q" in obj:
            fields["q"] = dict
        f = encoding.expect_map(obj, fields, what)
        if f["op"] != "write":
            raise DecodeError(f"{what}: unknown kind {f['op']!r}")
        if f["at"] < 0:
            raise DecodeError(f"{what}: negative time")
        request = WriteRequest.from_obj(f["w"])  # decoded with the operation, canonical like it
        quorum = model.Quorum.from_obj(f["q"]) if "q" in f else None
        return cls(request, _client_from(f["by"], f"{what}: client"), f["at"], quorum)


@dataclass(frozen=True)
class Release:
    """StoreUntil's release by the network: the data key of a StoreUntil item, which a server
    derived from t+1 servers' decryption shares once their clocks passed the date. Every server
    checks that it opens the item's sealed value (the AEAD authenticates it) and keeps the value
    in the record from then on: the item reads as public data of its application."""

    app: str
    data_id: str
    version: int
    key: bytes
    at_ms: int

    def encode(self) -> bytes:
        return encoding.encode(
            {
                "op": "release",
                "app": self.app,
                "id": self.data_id,
                "v": self.version,
                "key": self.key,
                "at": self.at_ms,
            }
        )

    @classmethod
    def from_obj(cls, obj: Any) -> Release:
        what = "store release"
        f = encoding.expect_map(
            obj, {"op": str, "app": str, "id": str, "v": int, "key": bytes, "at": int}, what
        )
        if f["op"] != "release" or f["v"] < 1 or f["at"] < 0 or len(f["key"]) != 32:
            raise DecodeError(f"{what}: bad kind, version, time or key")
        if (
            not f["app"]
            or len(f["app"]) > model.MAX_APP_LENGTH
            or not f["id"]
            or len(f["id"]) > model.MAX_ID_LENGTH
        ):
            raise DecodeError(f"{what}: bad application or data id")
        return cls(f["app"], f["id"], f["v"], f["key"], f["at"])


@dataclass(frozen=True)
class PeriodMark:
    """The store's sequence reached ``period``: the period's KeyTable with the group key's
    signature (encoded), which exists only once the network made it. Every server checks the
    signature against Vcert alike and moves :attr:`StoreService.period` forward (never back):
    the agreed period a quorum certificate's age is measured against."""

    table: bytes

    def encode(self) -> bytes:
        return encoding.encode({"op": "period", "table": self.table})

    @classmethod
    def from_obj(cls, obj: Any) -> PeriodMark:
        what = "store period mark"
        f = encoding.expect_map(obj, {"op": str, "table": bytes}, what)
        if f["op"] != "period" or not f["table"] or len(f["table"]) > MAX_MARK_TABLE:
            raise DecodeError(f"{what}: bad kind, or a KeyTable missing or over {MAX_MARK_TABLE} bytes")
        return cls(f["table"])


Entry = Operation | Release | PeriodMark | Attestation


def decode_entry(data: bytes) -> Entry:
    """An entry of the store's sequence: a write, a release, a period mark or a server's
    signed digest (:mod:`.attest`)."""
    obj = encoding.decode(data, max_size=MAX_OPERATION, what="store operation")
    kind = obj.get("op") if isinstance(obj, dict) else None
    if kind == "release":
        return Release.from_obj(obj)
    if kind == "period":
        return PeriodMark.from_obj(obj)
    if kind == "attest":
        return Attestation.from_obj(obj)
    return Operation.from_obj(obj)  # decoded once: the entry's CBOR was checked canonical above


@dataclass(frozen=True)
class FixedClock:
    """The view a write is checked under: the operation's own time and the group's authority
    (deterministic: the same at every server, whenever it applies the operation), and the
    oldest period of a certificate taken (at apply: MAX_QUORUM_AGE before the sequence's
    ``period``)."""

    at: float
    authority: model.Authority | None = None
    oldest_period: int = 0

    def now(self) -> float:
        return self.at


@dataclass(frozen=True)
class ClockView:
    """This server's own view for reads: its clock, the authority, the oldest period it takes."""

    clock: Callable[[], float]
    authority: model.Authority | None = None
    oldest_period: int = 0

    def now(self) -> float:
        return self.clock()


@dataclass(frozen=True)
class Marked:
    """The outcome of a period mark: the store's sequence is now at ``period`` (``table``: the
    mark's KeyTable, which the group key signed)."""

    period: int
    table: KeyTable = dataclasses.field(compare=False, repr=False)


Outcome = Record | Refused | Marked | Attested


class StoreService(Generic[E]):
    """This server's copy of the store: the operations applied so far and their outcomes."""

    def __init__(self, group: Group[E], public_key: E, t: int, quotas: Quotas = NETWORK_QUOTAS) -> None:
        self.state: StoreState[E] = StoreState(group, public_key, t, quotas)
        #: Operations applied (the index of the next one in the agreed sequence).
        self.applied = 0
        #: Index -> outcome of the last MAX_OUTCOMES operations (for the callers waiting on them).
        self.outcomes: OrderedDict[int, Outcome] = OrderedDict()
        #: The group key and n, which a quorum's certificate is checked against (None: quorums
        #: are refused). The node sets it from its key-holder; it is the same at every server.
        self.authority: model.Authority | None = None
        #: The latest period the agreed sequence has shown (a period mark, or a quorum's
        #: certificate applied; both carry a KeyTable the group key signed): a function of the
        #: operations applied, so the same at every server after the same operations. A
        #: certificate more than MAX_QUORUM_AGE periods older is refused at apply.
        self.period = 0
        #: The signed digests of this state at the period marks (:mod:`.attest`): local
        #: knowledge (verified, damaged), not part of the replicated state or its digest.
        self.verifier = Verifier(t)

    @property
    def group(self) -> Group[E]:
        return self.state.group

    def apply(self, index: int, entry: bytes) -> Outcome:
        """Apply the agreed operation number ``index`` (the next one: ``index == applied``)."""
        if index != self.applied:
            raise ValueError(f"store: operation {index} applied out of order (next is {self.applied})")
        try:
            op = decode_entry(entry)
        except DecodeError as exc:
            # A faulty origin can put any bytes in the sequence: every server refuses them alike.
            outcome: Outcome = Refused(model.BAD_REQUEST, f"operation {index}: {exc}")
        else:
            outcome = self._apply(op)
        self.applied += 1
        if isinstance(outcome, Marked):  # our digest after the mark, what the servers sign
            self.verifier.marked(self.applied, outcome.table, self.digest())
        self.outcomes[index] = outcome
        while len(self.outcomes) > MAX_OUTCOMES:
            self.outcomes.popitem(last=False)
        return outcome

    def _apply(self, op: Entry) -> Outcome:
        if isinstance(op, Release):
            try:
                return self._release(op)
            except Refused as exc:
                return exc
        if isinstance(op, PeriodMark):
            return self._mark(op)
        if isinstance(op, Attestation):
            try:
                self.verifier.check(op)
            except Refused as exc:
                return exc
            return self.verifier.take(op)
        try:
            oldest = max(0, self.period - MAX_QUORUM_AGE)
            view = FixedClock(op.at_ms / 1000, self.authority, oldest)
            record = self.state.apply_write(op.request, op.requester, view)
        except Refused as exc:
            return exc
        if op.quorum is not None:  # its KeyTable passed the group key's check
            self.period = max(self.period, op.quorum.period)
        return record

    def _mark(self, op: PeriodMark) -> Outcome:
        where = "period mark"
        if self.authority is None:
            return Refused(model.NOT_PERMITTED, f"{where}: this server cannot check it (no group key)")
        table = model.signed_table(op.table, self.authority.vcert)
        if table is None:
            return Refused(model.NOT_PERMITTED, f"{where}: a KeyTable the group key did not sign")
        if table.period <= self.period:
            return Refused(model.STALE, f"{where}: period {table.period}, the sequence is at {self.period}")
        self.period = table.period
        return Marked(table.period, table)

    def _release(self, op: Release) -> Record:
        record = self.state.get(op.app, op.data_id)
        where = f"release of {op.app}/{op.data_id}"
        if record.dtype != model.DataType.STORE_UNTIL or record.version != op.version:
            raise Refused(model.BAD_REQUEST, f"{where}: not that StoreUntil item")
        if record.value:
            raise Refused(model.EXISTS, f"{where}: released already")
        if op.at_ms < record.until_ms:
            raise Refused(model.TOO_EARLY, f"{where}: asked before the date")
        sealed = tdh2.Sealed.decode(self.group, record.sealed[0])
        try:
            value = tdh2.open_sealed(sealed, op.key)
        except tdh2.InvalidCiphertext:
            raise Refused(model.BAD_REQUEST, f"{where}: the key does not open the sealed value") from None
        released = dataclasses.replace(record, value=value)
        self.state.put(released)
        return released

    def due_releases(self, now: float) -> list[Record]:
        """StoreUntil items whose date ``now`` has passed and that are not released yet."""
        records = (self.state.records[key] for key in sorted(self.state.unreleased))
        return [r for r in records if r.until_ms <= now * 1000]

    def authorize(
        self,
        request: ReadRequest,
        requester: model.Requester,
        clock: Callable[[], float],
        oldest_period: int = 0,
    ) -> list[tuple[int, bytes, bytes]]:
        """The rule before a decryption share, at this server with its own clock (and a quorum's
        certificate of ``oldest_period`` or later): each part's (number, encoded KEM ciphertext,
        label), checked; Refused otherwise."""
        view = ClockView(clock, self.authority, oldest_period)
        record = self.state.authorize_read(request, requester, view)
        parts = []
        for part, blob in sorted(record.sealed.items()):
            lbl = record.label(part)
            try:
                sealed = tdh2.decode_checked(self.group, blob, lbl)
            except (DecodeError, tdh2.InvalidCiphertext) as exc:
                raise Refused(model.BAD_REQUEST, f"part {part}: {exc}") from None
            parts.append((part, sealed.kem.encode(self.group), lbl))
        return parts

    # Persistence -----------------------------------------------------------------------------

    def encode(self) -> bytes:
        return encode_snapshot(
            self.group.name, self.state.records, self.applied, self.period, self.verifier.to_obj()
        )

    def digest(self) -> bytes:
        """SHA-256 of the state's digest and the number of operations applied: equal at every
        server that applied the same prefix of the agreed sequence. The state's part is
        :meth:`~.model.StoreState.tree_digest` (a hash tree over the records), so that this
        costs O(records changed since the last call), not O(stored bytes)."""
        obj = {"v": FORMAT_VERSION, "applied": self.applied, "state": self.state.tree_digest()}
        if self.period:  # the sequence's period (absent while 0: the digest of before it existed)
            obj["period"] = self.period
        return hashlib.sha256(encoding.encode(obj)).digest()

    @classmethod
    def decode(
        cls, group: Group[E], public_key: E, t: int, data: bytes, quotas: Quotas = NETWORK_QUOTAS
    ) -> StoreService[E]:
        what = "store service state"
        obj = encoding.decode(data, max_size=MAX_SNAPSHOT, what=what)
        fields: dict[str, type] = {"v": int, "applied": int, "state": bytes}
        if isinstance(obj, dict) and "period" in obj:
            fields["period"] = int
        if isinstance(obj, dict) and "mark" in obj:
            fields["mark"] = dict
        f = encoding.expect_map(obj, fields, what)
        if f["v"] != FORMAT_VERSION:
            raise DecodeError(f"{what}: format version {f['v']}, this server reads {FORMAT_VERSION}")
        if f["applied"] < 0 or f.get("period", 0) < 0:
            raise DecodeError(f"{what}: negative count or period")
        service = cls(group, public_key, t, quotas)
        service.state = StoreState.decode(group, public_key, t, f["state"], quotas, max_size=MAX_SNAPSHOT)
        service.applied = f["applied"]
        service.period = f.get("period", 0)
        if "mark" in f:
            service.verifier.restore(f["mark"], what, service.applied, service.digest)
        return service


def encode_snapshot(
    group: str,
    records: Mapping[tuple[str, str], Record],
    applied: int,
    period: int = 0,
    mark: Mapping[str, Any] | None = None,
) -> bytes:
    """:meth:`StoreService.encode` of a state of ``records`` after ``applied`` operations, the
    sequence at ``period`` (left out while 0), the latest period mark (count, KeyTable, our
    digest then: :mod:`.attest`; left out while none)."""
    state = encoding.encode(model.state_obj(group, records))
    obj: dict[str, Any] = {"v": FORMAT_VERSION, "applied": applied, "state": state}
    if period:
        obj["period"] = period
    if mark is not None:
        obj["mark"] = dict(mark)
    return encoding.encode(obj)


# The read protocol's messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReadAsk:
    """A reader's server asks for decryption shares: ``after`` operations must be applied first."""

    rid: bytes
    request: ReadRequest
    client: Client
    after: int
    quorum: model.Quorum | None = None

    @property
    def requester(self) -> model.Requester:
        return self.quorum if self.quorum is not None else self.client

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "store": "read",
            "rid": self.rid,
            "req": self.request.to_obj(),
            "by": _client_obj(self.client),
            "after": self.after,
        }
        if self.quorum is not None:
            obj["q"] = self.quorum.to_obj()
        return encoding.encode(obj)

    @classmethod
    def from_obj(cls, obj: Any) -> ReadAsk:
        what = "store read ask"
        fields: dict[str, type] = {"store": str, "rid": bytes, "req": dict, "by": dict, "after": int}
        if isinstance(obj, dict) and "q" in obj:
            fields["q"] = dict
        f = encoding.expect_map(obj, fields, what)
        if f["store"] != "read" or len(f["rid"]) != RID_SIZE or f["after"] < 0:
            raise DecodeError(f"{what}: bad kind, id or count")
        request = ReadRequest.decode(encoding.encode(f["req"]))
        quorum = model.Quorum.from_obj(f["q"]) if "q" in f else None
        return cls(f["rid"], request, _client_from(f["by"], f"{what}: client"), f["after"], quorum)


@dataclass(frozen=True)
class ReadAnswer:
    """A server's answer: its period, its store key's public sharing (Feldman commitment,
    encoded) and the shares sealed to the reader, by part; or a refusal (code, reason)."""

    rid: bytes
    period: int = 0
    commitment: tuple[bytes, ...] = ()
    shares: Mapping[int, bytes] | None = None
    code: str = ""
    reason: str = ""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"store": "share", "rid": self.rid}
        if self.shares is not None:
            obj.update(period=self.period, commitment=list(self.commitment), shares=dict(self.shares))
        else:
            obj.update(code=self.code, reason=self.reason)
        return encoding.encode(obj)

    @classmethod
    def from_obj(cls, obj: Any, t: int) -> ReadAnswer:
        what = "store read answer"
        if not isinstance(obj, dict):
            raise DecodeError(f"{what}: not a map")
        if "shares" in obj:
            f = encoding.expect_map(
                obj,
                {"store": str, "rid": bytes, "period": int, "commitment": list, "shares": dict},
                what,
            )
            if len(f["commitment"]) != t + 1 or not all(
                isinstance(c, bytes) and len(c) <= 512 for c in f["commitment"]
            ):
                raise DecodeError(f"{what}: a commitment has t+1 = {t + 1} points")
            if len(f["shares"]) > MAX_ANSWER_PARTS:
                raise DecodeError(f"{what}: too many parts")
            shares: dict[int, bytes] = {}
            for part, blob in f["shares"].items():
                if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < 2**16:
                    raise DecodeError(f"{what}: bad part number")
                if not isinstance(blob, bytes) or len(blob) > 1024:
                    raise DecodeError(f"{what}: a sealed share is at most 1024 bytes")
                shares[part] = blob
            if f["period"] < 0:
                raise DecodeError(f"{what}: negative period")
            cls._rid(f["store"], f["rid"], what)
            return cls(f["rid"], f["period"], tuple(f["commitment"]), shares)
        f = encoding.expect_map(obj, {"store": str, "rid": bytes, "code": str, "reason": str}, what)
        cls._rid(f["store"], f["rid"], what)
        if not f["code"] or len(f["code"]) > 32 or len(f["reason"]) > 1000:
            raise DecodeError(f"{what}: a refusal has a code and a reason of at most 1000 characters")
        return cls(f["rid"], code=f["code"], reason=f["reason"])

    @staticmethod
    def _rid(kind: str, rid: bytes, what: str) -> None:
        if kind != "share" or len(rid) != RID_SIZE:
            raise DecodeError(f"{what}: bad kind or id")


@dataclass(frozen=True)
class ContributeAsk:
    """The origin of a random joint secret asks every server for its contribution to item
    ``(app, data_id)`` at ``version``."""

    rid: bytes
    app: str
    data_id: str
    version: int

    def encode(self) -> bytes:
        return encoding.encode(
            {"store": "contribute", "rid": self.rid, "app": self.app, "id": self.data_id, "v": self.version}
        )

    @classmethod
    def from_obj(cls, obj: Any) -> ContributeAsk:
        what = "store contribution ask"
        f = encoding.expect_map(obj, {"store": str, "rid": bytes, "app": str, "id": str, "v": int}, what)
        if len(f["rid"]) != RID_SIZE or f["v"] < 1:
            raise DecodeError(f"{what}: bad id or version")
        if (
            not 0 < len(f["app"]) <= model.MAX_APP_LENGTH
            or not 0 < len(f["id"].encode()) <= model.MAX_ID_LENGTH
        ):
            raise DecodeError(f"{what}: bad application or data id")
        return cls(f["rid"], f["app"], f["id"], f["v"])


@dataclass(frozen=True)
class Contributed:
    """A server's contribution (sealed value and proof, :func:`~.model.contribute`), or its
    refusal (code, reason)."""

    rid: bytes
    sealed: bytes = b""
    proof: bytes = b""
    code: str = ""
    reason: str = ""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"store": "contributed", "rid": self.rid}
        if self.sealed:
            obj.update(sealed=self.sealed, proof=self.proof)
        else:
            obj.update(code=self.code, reason=self.reason)
        return encoding.encode(obj)

    @classmethod
    def from_obj(cls, obj: Any) -> Contributed:
        what = "store contribution"
        if isinstance(obj, dict) and "sealed" in obj:
            f = encoding.expect_map(obj, {"store": str, "rid": bytes, "sealed": bytes, "proof": bytes}, what)
            if (
                len(f["rid"]) != RID_SIZE
                or not f["sealed"]
                or len(f["sealed"]) > 1024
                or len(f["proof"]) > 4096
            ):
                raise DecodeError(f"{what}: bad id, sealed value or proof")
            return cls(f["rid"], f["sealed"], f["proof"])
        f = encoding.expect_map(obj, {"store": str, "rid": bytes, "code": str, "reason": str}, what)
        if len(f["rid"]) != RID_SIZE or not 0 < len(f["code"]) <= 32 or len(f["reason"]) > 1000:
            raise DecodeError(f"{what}: bad id, or a refusal without a code and a short reason")
        return cls(f["rid"], code=f["code"], reason=f["reason"])


def decode_read_message(data: bytes, t: int) -> ReadAsk | ReadAnswer | ContributeAsk | Contributed:
    """A read-protocol frame's body (without its tag byte): an ask or an answer, for a read or
    for a random joint secret's contributions."""
    obj = encoding.decode(data, max_size=64 * 1024, what="store read message")
    kind = obj.get("store") if isinstance(obj, dict) else None
    if kind == "read":
        return ReadAsk.from_obj(obj)
    if kind == "share":
        return ReadAnswer.from_obj(obj, t)
    if kind == "contribute":
        return ContributeAsk.from_obj(obj)
    if kind == "contributed":
        return Contributed.from_obj(obj)
    raise DecodeError("store read message: neither an ask nor an answer")
