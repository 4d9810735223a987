"""The data model of the storage API (paper §5.2, Table 4; issue 14), and the rules every server runs.

Theory of operation
-------------------
Every server holds the same :class:`StoreState`: records keyed by ``(application, data id)``,
each with its type, owner, version and either a public value or secret ciphertexts under the
network's store key (:mod:`appliance.crypto.tdh2`; the key is a long-lived secret of C, refreshed
with the others, so a million stored secrets cost a refresh what one does). Writes are applied in
the same order at every server (the agreement engine orders them: :mod:`.service`); each server
checks the write itself with :meth:`StoreState.apply_write`.

Who asks (:data:`Requester`), as the API models applications today (``appliance.api``):

* :class:`Client`: one client of a *centralized* registration ``(name, unique_id)``, vouched
  for by the server whose API authenticated its handle;
* :class:`Quorum`: a *distributed* application's request approved by a strict majority of the
  servers' clients: the approvals certificate of :mod:`appliance.protocols.approvals` (the
  request's digest, the ticket HMAC(verifier, period, digest), and > n/2 period-key votes on the
  request id). A server checks the votes against its KeyTable and the ticket against its own
  client's verifier (:class:`ServerView`).

The types (:class:`DataType`) and their rules, each a clear refusal (:class:`Refused`) otherwise;
everything not allowed below is refused (deny by default), and nobody reaches another
application's data (the application is part of the key, of the label and of the evidence):

=====================  ==========================  =============================  ==============
type                   created by                  changed by                     read by
=====================  ==========================  =============================  ==============
``public-once``        a client or a quorum        nobody (write-once)            the app
``public-rw``          a quorum                    a quorum (next version)        the app
``secret-single``      a client (the owner)        nobody                         the owner only
``secret-sw-dr``       a client                    nobody                         a quorum
``secret-dw-dr``       a quorum                    a quorum (next version)        a quorum
``store-until``        a client or a quorum        nobody                         the app, from
                                                                                  the date on
``joint-secret``       a quorum (t+1 servers'      nobody                         a quorum
                       sealed contributions, or
                       one value it specifies)
=====================  ==========================  =============================  ==============

A secret is read by threshold decryption: each server runs :meth:`StoreState.read_share`, which
authorizes the request against its own state and clock, checks the ciphertext and returns its
decryption share sealed to the reader key named in the request (for ``secret-single`` it must be
the owner's key fixed in the label at write time, so a share is useless to anyone else even if a
faulty server forged the request). The label binds application, id, version, type and reader,
so a ciphertext cannot be replayed under another id. StoreUntil is enforced by every honest
server's own clock: before the date at most t (faulty) servers contribute, which is not enough.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

import nacl.public
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.crypto import encoding, tdh2
from appliance.crypto.errors import DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import ScalarSource
from appliance.protocols import approvals
from appliance.protocols._core import ed25519_verify
from appliance.protocols.state import KeyTable

E = TypeVar("E")

LABEL_DOMAIN: Final = "pst/store/label/v1"
READ_DOMAIN: Final = "pst/store/read/v1"
WRITE_DOMAIN: Final = "pst/store/write/v1"
FORMAT_VERSION: Final = 1
MAX_APP_LENGTH: Final = approvals.MAX_APP_LENGTH
MAX_UNIQUE_ID: Final = 64
MAX_VOTERS: Final = 1024


class DataType(enum.Enum):
    PUBLIC_ONCE = "public-once"
    PUBLIC_RW = "public-rw"
    SECRET_SINGLE = "secret-single"
    SECRET_SW_DR = "secret-sw-dr"
    SECRET_DW_DR = "secret-dw-dr"
    STORE_UNTIL = "store-until"
    JOINT_SECRET = "joint-secret"

    @property
    def secret(self) -> bool:
        return self not in (DataType.PUBLIC_ONCE, DataType.PUBLIC_RW)

    @property
    def writable(self) -> bool:
        """Read/write types: changed by a quorum, one version at a time."""
        return self in (DataType.PUBLIC_RW, DataType.SECRET_DW_DR)


class Refused(Exception):
    """A request this server will not serve; ``code`` is machine-readable, the message says why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


NOT_PERMITTED: Final = "not-permitted"
NOT_FOUND: Final = "not-found"
EXISTS: Final = "exists"
QUOTA: Final = "quota"
BAD_REQUEST: Final = "bad-request"
TOO_EARLY: Final = "too-early"
STALE: Final = "stale-version"


@dataclass(frozen=True)
class Quotas:
    """Limits per application (sizes in bytes); a request over one is refused naming it."""

    max_id_length: int = 128
    max_value_size: int = 64 * 1024
    max_records: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    #: Latest release date accepted for StoreUntil, in seconds from now.
    max_until: float = 100 * 365.25 * 86400


# Requesters -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """One client of a centralized registration ``(app, unique_id)``."""

    app: str
    unique_id: bytes


@dataclass(frozen=True)
class Quorum:
    """A distributed application's approvals certificate for one request (see the module doc)."""

    app: str
    digest: bytes
    ticket: bytes
    votes: Mapping[int, bytes]

    def to_obj(self) -> dict[str, Any]:
        return {"app": self.app, "digest": self.digest, "ticket": self.ticket, "votes": dict(self.votes)}

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Quorum:
        what = "store quorum evidence"
        f = encoding.expect_map(
            encoding.decode(data, max_size=64 * 1024, what=what),
            {"app": str, "digest": bytes, "ticket": bytes, "votes": dict},
            what,
        )
        if not f["app"] or len(f["app"]) > MAX_APP_LENGTH:
            raise DecodeError(f"{what}: the application name must have 1 to {MAX_APP_LENGTH} characters")
        if len(f["digest"]) != approvals.DIGEST_SIZE or len(f["ticket"]) != approvals.DIGEST_SIZE:
            raise DecodeError(f"{what}: digest and ticket have {approvals.DIGEST_SIZE} bytes")
        if len(f["votes"]) > MAX_VOTERS:
            raise DecodeError(f"{what}: more than {MAX_VOTERS} votes")
        votes: dict[int, bytes] = {}
        for voter, sig in f["votes"].items():
            if isinstance(voter, bool) or not isinstance(voter, int) or not 1 <= voter <= MAX_VOTERS:
                raise DecodeError(f"{what}: bad voter id")
            if not isinstance(sig, bytes) or len(sig) != approvals.VOTE_SIZE:
                raise DecodeError(f"{what}: the vote of server {voter} is not {approvals.VOTE_SIZE} bytes")
            votes[voter] = sig
        return cls(f["app"], f["digest"], f["ticket"], votes)


Requester = Client | Quorum


class ServerView(Protocol):
    """What the server contributing a decision knows: its clock, its client's verifier, its KeyTable."""

    @property
    def period(self) -> int: ...

    @property
    def majority(self) -> int:
        """Votes a quorum needs: more than n/2."""
        ...

    def now(self) -> float:
        """This server's clock (Unix seconds)."""
        ...

    def verifier(self, app: str) -> bytes | None:
        """The password verifier of this server's client of distributed application ``app``."""
        ...

    def vote_valid(self, voter: int, rid: bytes, sig: bytes) -> bool:
        """Is ``sig`` server ``voter``'s vote on ``rid`` under this period's KeyTable?"""
        ...


@dataclass(frozen=True)
class TableView:
    """A :class:`ServerView` from this period's KeyTable, the verifiers of this server's clients of
    distributed applications (``appliance.api`` keeps them) and this server's clock."""

    n: int
    table: KeyTable
    verifiers: Mapping[str, bytes]
    clock: Callable[[], float]

    @property
    def period(self) -> int:
        return self.table.period

    @property
    def majority(self) -> int:
        return self.n // 2 + 1

    def now(self) -> float:
        return self.clock()

    def verifier(self, app: str) -> bytes | None:
        return self.verifiers.get(app)

    def vote_valid(self, voter: int, rid: bytes, sig: bytes) -> bool:
        entry = self.table.entries.get(voter)
        payload = approvals.vote_payload(self.table.period, voter, rid)
        return entry is not None and ed25519_verify(entry.verify_key, payload, sig)


def _check_quorum(view: ServerView, q: Quorum, app: str, digest: bytes, what: str) -> None:
    if q.app != app:
        raise Refused(NOT_PERMITTED, f"{what}: a quorum of application {q.app!r} cannot act for {app!r}")
    if not hmac.compare_digest(q.digest, digest):
        raise Refused(NOT_PERMITTED, f"{what}: the quorum approved another request")
    verifier = view.verifier(app)
    if verifier is None:
        raise Refused(NOT_PERMITTED, f"{what}: no client of {app!r} is registered at this server")
    if not hmac.compare_digest(q.ticket, approvals.ticket(verifier, view.period, digest)):
        raise Refused(NOT_PERMITTED, f"{what}: the ticket is not our client's (another password or period)")
    rid = approvals.request_id(digest, q.ticket)
    good = {v for v, sig in q.votes.items() if view.vote_valid(v, rid, sig)}
    if len(good) < view.majority:
        raise Refused(
            NOT_PERMITTED,
            f"{what}: {len(good)} valid votes of the application's clients, a quorum is {view.majority}",
        )


# Labels, requests -------------------------------------------------------------------------------


def label(
    app: str, data_id: str, version: int, dtype: DataType, reader: bytes, until_ms: int, part: int
) -> bytes:
    """What a stored ciphertext is bound to: application, id, version, type, reader, date, contribution."""
    return encoding.encode(
        {
            "dom": LABEL_DOMAIN,
            "app": app,
            "id": data_id,
            "v": version,
            "type": dtype.value,
            "reader": reader,
            "until": until_ms,
            "part": part,
        }
    )


@dataclass(frozen=True)
class WriteRequest:
    """StoreData / Write / StoreUntil / GenerateJointSecret, as the network applies it.

    ``value`` for public types; ``sealed`` (encoded :class:`tdh2.Sealed`, keyed by contribution:
    0 for the writer's value, server ids for a random joint secret's contributions) for secrets;
    ``reader`` the owner's X25519 key for ``secret-single``; ``until_ms`` for StoreUntil.
    """

    app: str
    data_id: str
    dtype: DataType
    version: int
    value: bytes = b""
    sealed: Mapping[int, bytes] = field(default_factory=dict)
    reader: bytes = b""
    until_ms: int = 0

    def to_obj(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "id": self.data_id,
            "type": self.dtype.value,
            "v": self.version,
            "value": self.value,
            "sealed": dict(self.sealed),
            "reader": self.reader,
            "until": self.until_ms,
        }

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    def digest(self) -> bytes:
        """What a quorum approves (SHA-256 of the canonical request)."""
        return hashlib.sha256(encoding.encode({"dom": WRITE_DOMAIN, **self.to_obj()})).digest()

    @classmethod
    def decode(cls, data: bytes) -> WriteRequest:
        what = "store write request"
        f = encoding.expect_map(encoding.decode(data, max_size=MAX_REQUEST, what=what), _WRITE_FIELDS, what)
        dtype, sealed = _content(f, what)
        return cls(f["app"], f["id"], dtype, f["v"], f["value"], sealed, f["reader"], f["until"])


@dataclass(frozen=True)
class ReadRequest:
    """Retrieve(DataID): the version read and the X25519 key the shares are sealed to."""

    app: str
    data_id: str
    version: int
    reader: bytes

    def to_obj(self) -> dict[str, Any]:
        return {"app": self.app, "id": self.data_id, "v": self.version, "reader": self.reader}

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    def digest(self) -> bytes:
        return hashlib.sha256(encoding.encode({"dom": READ_DOMAIN, **self.to_obj()})).digest()

    @classmethod
    def decode(cls, data: bytes) -> ReadRequest:
        what = "store read request"
        f = encoding.expect_map(
            encoding.decode(data, max_size=1024, what=what),
            {"app": str, "id": str, "v": int, "reader": bytes},
            what,
        )
        _names(f, what)
        if f["v"] < 1 or len(f["reader"]) != tdh2.READER_KEY_SIZE:
            raise DecodeError(f"{what}: bad version or reader key ({tdh2.READER_KEY_SIZE} bytes)")
        return cls(f["app"], f["id"], f["v"], f["reader"])


_WRITE_FIELDS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "app": str,
    "id": str,
    "type": str,
    "v": int,
    "value": bytes,
    "sealed": dict,
    "reader": bytes,
    "until": int,
}
#: Largest encoded write request: a value, or t+1 sealed contributions of one, with room to spare.
MAX_REQUEST: Final = 64 * (tdh2.MAX_PLAINTEXT + tdh2.MAX_LABEL + 2048)
MAX_PARTS: Final = 256
MAX_ID_LENGTH: Final = 1024


def _names(f: Mapping[str, Any], what: str) -> None:
    if not f["app"] or len(f["app"]) > MAX_APP_LENGTH:
        raise DecodeError(f"{what}: the application name must have 1 to {MAX_APP_LENGTH} characters")
    if not f["id"] or len(f["id"].encode()) > MAX_ID_LENGTH:
        raise DecodeError(f"{what}: a data id has 1 to {MAX_ID_LENGTH} bytes")


def _content(f: Mapping[str, Any], what: str, record: bool = False) -> tuple[DataType, dict[int, bytes]]:
    """The checks a record and a write request share: names, type, version, date, reader, parts.
    A StoreUntil *record* may also hold its value: the network released it at the date."""
    _names(f, what)
    try:
        dtype = DataType(f["type"])
    except ValueError:
        raise DecodeError(f"{what}: unknown data type {f['type']!r}") from None
    if f["v"] < 1 or f["until"] < 0:
        raise DecodeError(f"{what}: bad version or date")
    if len(f["reader"]) not in (0, tdh2.READER_KEY_SIZE):
        raise DecodeError(f"{what}: a reader key has {tdh2.READER_KEY_SIZE} bytes")
    if len(f["sealed"]) > MAX_PARTS:
        raise DecodeError(f"{what}: more than {MAX_PARTS} sealed parts")
    sealed: dict[int, bytes] = {}
    for part, blob in f["sealed"].items():
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < 2**16:
            raise DecodeError(f"{what}: bad contribution number")
        if not isinstance(blob, bytes):
            raise DecodeError(f"{what}: contribution {part} is not bytes")
        sealed[part] = blob
    released = record and dtype == DataType.STORE_UNTIL
    if dtype.secret != bool(sealed) or (dtype.secret and f["value"] and not released):
        raise DecodeError(f"{what}: a {dtype.value} item with the wrong kind of content")
    return dtype, sealed


# Records ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One stored item, the same at every server."""

    app: str
    data_id: str
    dtype: DataType
    owner: bytes  # unique_id of the writing client; empty when a quorum wrote it
    version: int
    value: bytes = b""
    sealed: Mapping[int, bytes] = field(default_factory=dict)
    reader: bytes = b""
    until_ms: int = 0

    @property
    def size(self) -> int:
        return len(self.value) + sum(len(s) for s in self.sealed.values())

    def label(self, part: int) -> bytes:
        return label(self.app, self.data_id, self.version, self.dtype, self.reader, self.until_ms, part)

    def to_obj(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "id": self.data_id,
            "type": self.dtype.value,
            "owner": self.owner,
            "v": self.version,
            "value": self.value,
            "sealed": dict(self.sealed),
            "reader": self.reader,
            "until": self.until_ms,
        }

    @classmethod
    def from_obj(cls, obj: Any, what: str) -> Record:
        f = encoding.expect_map(obj, {**_WRITE_FIELDS, "owner": bytes}, what)
        if len(f["owner"]) > MAX_UNIQUE_ID:
            raise DecodeError(f"{what}: owner of more than {MAX_UNIQUE_ID} bytes")
        dtype, sealed = _content(f, what, record=True)
        return cls(f["app"], f["id"], dtype, f["owner"], f["v"], f["value"], sealed, f["reader"], f["until"])


def _join(app: str, data_id: str) -> str:
    return f"{app}/{data_id}"


#: Buckets of :meth:`StoreState.tree_digest`.
DIGEST_BUCKETS: Final = 1024
#: Ciphertext checks remembered (:meth:`StoreState._check_sealed`).
MAX_CHECKED: Final = 65536


def _bucket(key: tuple[str, str]) -> int:
    h = hashlib.sha256(encoding.encode(list(key))).digest()
    return int.from_bytes(h[:4], "big") % DIGEST_BUCKETS


class StoreState(Generic[E]):
    """What every server holds: the records, their checks, and the rule before a decryption share.

    ``group``/``public_key``/``t``: the store key of C (its group, public key and threshold).
    """

    def __init__(self, group: Group[E], public_key: E, t: int, quotas: Quotas | None = None) -> None:
        self.group = group
        self.public_key = public_key
        self.t = t
        self.quotas = quotas or Quotas()
        #: The records by (application, data id); changed only through :meth:`put`, which keeps
        #: the per-application usage and the digest's buckets up to date with them.
        self.records: dict[tuple[str, str], Record] = {}
        self._usage: dict[str, tuple[int, int]] = {}
        self._buckets: list[dict[tuple[str, str], bytes]] = [{} for _ in range(DIGEST_BUCKETS)]
        self._bucket_digests: list[bytes | None] = [None] * DIGEST_BUCKETS
        #: StoreUntil items not released yet (what the network may have to release).
        self.unreleased: set[tuple[str, str]] = set()
        #: Ciphertexts (with their labels) that passed TDH2's check here, most recent last: the
        #: check is a function of them alone, so the origin's check of a write before it is sent
        #: is not done again when the write is applied (bounded by MAX_CHECKED).
        self._checked: dict[bytes, None] = {}

    # Queries ----------------------------------------------------------------------------------

    def get(self, app: str, data_id: str) -> Record:
        record = self.records.get((app, data_id))
        if record is None:
            raise Refused(NOT_FOUND, f"no data {data_id!r} in application {app!r}")
        return record

    def usage(self, app: str) -> tuple[int, int]:
        """(records, bytes) of application ``app`` (kept by :meth:`put`: O(1))."""
        return self._usage.get(app, (0, 0))

    def put(self, record: Record) -> None:
        """Store ``record`` (new, or replacing the one of its id): the only way records change."""
        key = (record.app, record.data_id)
        old = self.records.get(key)
        count, used = self.usage(record.app)
        if old is None:
            count += 1
        else:
            used -= old.size
        self._usage[record.app] = (count, used + record.size)
        self.records[key] = record
        b = _bucket(key)
        self._buckets[b][key] = hashlib.sha256(encoding.encode(record.to_obj())).digest()
        self._bucket_digests[b] = None
        if record.dtype == DataType.STORE_UNTIL and not record.value:
            self.unreleased.add(key)
        else:
            self.unreleased.discard(key)

    # Writes -----------------------------------------------------------------------------------

    def apply_write(self, request: WriteRequest, requester: Requester, view: ServerView) -> Record:
        """Check ``request`` against this state and apply it; Refused (nothing changes) otherwise."""
        record = self.check_write(request, requester, view)
        self.put(record)
        return record

    def check_write(self, request: WriteRequest, requester: Requester, view: ServerView) -> Record:
        """The record ``request`` would make, or Refused naming the rule it breaks."""
        r = request
        where = f"write of {_join(r.app, r.data_id)}"
        self._check_shape(r, where, view)
        if requester.app != r.app:
            raise Refused(
                NOT_PERMITTED, f"{where}: a client of {requester.app!r} cannot write {r.app!r}'s data"
            )
        current = self.records.get((r.app, r.data_id))
        if current is None:
            if r.version != 1:
                raise Refused(STALE, f"{where}: new data starts at version 1, not {r.version}")
        else:
            if current.dtype != r.dtype:
                raise Refused(EXISTS, f"{where}: the data exists as {current.dtype.value}")
            if not r.dtype.writable:
                raise Refused(EXISTS, f"{where}: {r.dtype.value} data is write-once and exists")
            if r.version != current.version + 1:
                raise Refused(STALE, f"{where}: version {r.version}, the next is {current.version + 1}")
        quorum_only = r.dtype in (DataType.PUBLIC_RW, DataType.SECRET_DW_DR, DataType.JOINT_SECRET)
        client_only = r.dtype in (DataType.SECRET_SINGLE, DataType.SECRET_SW_DR)
        if isinstance(requester, Quorum):
            if client_only:
                raise Refused(
                    NOT_PERMITTED, f"{where}: {r.dtype.value} data has a single writer, not a quorum"
                )
            _check_quorum(view, requester, r.app, r.digest(), where)
            owner = b""
        else:
            if quorum_only:
                raise Refused(
                    NOT_PERMITTED,
                    f"{where}: {r.dtype.value} data is written only by a quorum of the application's clients",
                )
            owner = requester.unique_id
        record = Record(
            r.app, r.data_id, r.dtype, owner, r.version, r.value, dict(r.sealed), r.reader, r.until_ms
        )
        self._check_sealed(record, where)
        self._check_quotas(record, current, where)
        return record

    def _check_shape(self, r: WriteRequest, where: str, view: ServerView) -> None:
        q = self.quotas
        if not r.app or len(r.app) > MAX_APP_LENGTH:
            raise Refused(
                BAD_REQUEST, f"{where}: the application name must be 1 to {MAX_APP_LENGTH} characters"
            )
        if not r.data_id or len(r.data_id.encode()) > q.max_id_length:
            raise Refused(QUOTA, f"{where}: a data id has 1 to {q.max_id_length} bytes")
        if r.dtype.secret:
            if r.value or not r.sealed:
                raise Refused(
                    BAD_REQUEST, f"{where}: secret data is sent sealed under the store key, never in clear"
                )
        elif r.sealed or r.reader or r.until_ms:
            raise Refused(BAD_REQUEST, f"{where}: public data has a value only")
        if len(r.value) > q.max_value_size:
            raise Refused(QUOTA, f"{where}: {len(r.value)} bytes exceeds the limit of {q.max_value_size}")
        if (r.dtype == DataType.SECRET_SINGLE) != bool(r.reader):
            raise Refused(BAD_REQUEST, f"{where}: a reader key goes with secret-single data, and only there")
        if r.reader and len(r.reader) != tdh2.READER_KEY_SIZE:
            raise Refused(BAD_REQUEST, f"{where}: a reader key has {tdh2.READER_KEY_SIZE} bytes")
        if r.dtype == DataType.STORE_UNTIL:
            if r.until_ms <= 0:
                raise Refused(BAD_REQUEST, f"{where}: StoreUntil needs a release date")
            if r.until_ms / 1000 > view.now() + q.max_until:
                raise Refused(
                    QUOTA, f"{where}: the release date is beyond the limit of {q.max_until:.0f} s from now"
                )
        elif r.until_ms:
            raise Refused(BAD_REQUEST, f"{where}: a release date goes with StoreUntil only")

    def _check_sealed(self, record: Record, where: str) -> None:
        """Every ciphertext decodes on the store group, fits the quota and passes TDH2's check
        under the label this record gives it (so it cannot have come from another id)."""
        if not record.dtype.secret:
            return
        parts = set(record.sealed)
        if record.dtype == DataType.JOINT_SECRET:
            contributed = parts - {0}
            if parts != {0} and (0 in parts or len(contributed) < self.t + 1):
                raise Refused(
                    BAD_REQUEST,
                    f"{where}: a joint secret is one specified value (part 0) or contributions of at least "
                    f"{self.t + 1} servers",
                )
        elif parts != {0}:
            raise Refused(BAD_REQUEST, f"{where}: one sealed value (part 0) expected")
        for part, blob in sorted(record.sealed.items()):
            lbl = record.label(part)
            memo = hashlib.sha256(encoding.encode([blob, lbl])).digest()
            if memo in self._checked:  # this process checked this sealed value under this label
                continue
            try:
                sealed = tdh2.Sealed.decode(self.group, blob)
            except DecodeError as exc:
                raise Refused(BAD_REQUEST, f"{where}: part {part}: {exc}") from None
            if len(sealed.body) - 16 > self.quotas.max_value_size:
                raise Refused(
                    QUOTA, f"{where}: part {part} exceeds the limit of {self.quotas.max_value_size} bytes"
                )
            try:
                tdh2.check_ciphertext(self.group, sealed.kem, lbl)
            except tdh2.InvalidCiphertext as exc:
                raise Refused(BAD_REQUEST, f"{where}: part {part}: {exc}") from None
            self._checked[memo] = None
            while len(self._checked) > MAX_CHECKED:
                del self._checked[next(iter(self._checked))]

    def _check_quotas(self, record: Record, current: Record | None, where: str) -> None:
        count, used = self.usage(record.app)
        if current is None:
            count += 1
        used += record.size - (current.size if current is not None else 0)
        if count > self.quotas.max_records:
            raise Refused(QUOTA, f"{where}: {record.app!r} already holds {self.quotas.max_records} items")
        if used > self.quotas.max_bytes:
            raise Refused(
                QUOTA,
                f"{where}: {record.app!r} would hold {used} bytes, the limit is {self.quotas.max_bytes}",
            )

    # Reads ------------------------------------------------------------------------------------

    def read_public(self, app: str, data_id: str, requester: Requester, view: ServerView) -> Record:
        """Retrieve of public data: any client or quorum of the same application."""
        record = self.get(app, data_id)
        where = f"read of {_join(app, data_id)}"
        if requester.app != app:
            raise Refused(NOT_PERMITTED, f"{where}: a client of {requester.app!r} cannot read {app!r}'s data")
        if record.dtype.secret:
            raise Refused(BAD_REQUEST, f"{where}: secret data is read by threshold decryption (read_share)")
        if isinstance(requester, Quorum):
            _check_quorum(
                view, requester, app, ReadRequest(app, data_id, record.version, b"").digest(), where
            )
        return record

    def authorize_read(self, request: ReadRequest, requester: Requester, view: ServerView) -> Record:
        """The rule a server runs before contributing a decryption share: the record, or Refused."""
        r = request
        where = f"read of {_join(r.app, r.data_id)}"
        if requester.app != r.app:
            raise Refused(
                NOT_PERMITTED, f"{where}: a client of {requester.app!r} cannot read {r.app!r}'s data"
            )
        record = self.get(r.app, r.data_id)
        if not record.dtype.secret:
            raise Refused(BAD_REQUEST, f"{where}: public data needs no decryption")
        if r.version != record.version:
            raise Refused(STALE, f"{where}: version {r.version}, the stored one is {record.version}")
        if len(r.reader) != tdh2.READER_KEY_SIZE:
            raise Refused(BAD_REQUEST, f"{where}: a reader key has {tdh2.READER_KEY_SIZE} bytes")
        dtype = record.dtype
        if dtype == DataType.SECRET_SINGLE:
            if not isinstance(requester, Client) or requester.unique_id != record.owner:
                raise Refused(NOT_PERMITTED, f"{where}: only its owner may read secret-single data")
            if not hmac.compare_digest(r.reader, record.reader):
                raise Refused(
                    NOT_PERMITTED, f"{where}: shares go only to the owner's key fixed at write time"
                )
            return record
        if dtype == DataType.STORE_UNTIL:
            now = view.now()
            if now * 1000 < record.until_ms:
                raise Refused(
                    TOO_EARLY, f"{where}: kept secret until {record.until_ms / 1000:.3f}, it is {now:.3f}"
                )
            if isinstance(requester, Quorum):
                _check_quorum(view, requester, r.app, r.digest(), where)
            return record
        if dtype in (DataType.SECRET_SW_DR, DataType.SECRET_DW_DR, DataType.JOINT_SECRET):
            if not isinstance(requester, Quorum):
                raise Refused(
                    NOT_PERMITTED,
                    f"{where}: {dtype.value} data is read only by a quorum of the application's clients",
                )
            _check_quorum(view, requester, r.app, r.digest(), where)
            return record
        raise Refused(NOT_PERMITTED, f"{where}: no rule allows reading {dtype.value} data")  # deny by default

    def read_share(
        self,
        request: ReadRequest,
        requester: Requester,
        view: ServerView,
        key: KeyShare[E],
        rand: ScalarSource,
    ) -> dict[int, bytes]:
        """This server's decryption share of every part, each sealed to the request's reader key."""
        record = self.authorize_read(request, requester, view)
        out: dict[int, bytes] = {}
        for part, blob in sorted(record.sealed.items()):
            sealed = tdh2.Sealed.decode(self.group, blob)
            share = tdh2.decryption_share(self.group, key, sealed.kem, rand, record.label(part))
            out[part] = tdh2.share_for_reader(self.group, share, request.reader)
        return out

    # Encoding ---------------------------------------------------------------------------------

    def to_obj(self) -> dict[str, Any]:
        return state_obj(self.group.name, self.records)

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: equal at every server that applied the same writes."""
        return hashlib.sha256(self.encode()).digest()

    def tree_digest(self) -> bytes:
        """A digest of the records that costs O(records changed since the last call), not
        O(records): a two-level hash tree with SHA-256. Each record is hashed (its canonical
        encoding) when it is put; the records fall into :data:`DIGEST_BUCKETS` buckets by
        SHA-256 of their (application, id); a bucket's digest is SHA-256 of the canonical
        encoding of its sorted ``[application, id, record hash]`` triples (recomputed only when
        the bucket changed), and the result is SHA-256 of the canonical encoding of the group
        and the bucket digests. Equal states give equal digests, and (SHA-256 being collision
        resistant) different states different ones, as :meth:`digest`."""
        digests: list[bytes] = []
        for b, cached in enumerate(self._bucket_digests):
            if cached is None:
                bucket = self._buckets[b]
                triples = [[app, data_id, bucket[(app, data_id)]] for app, data_id in sorted(bucket)]
                cached = self._bucket_digests[b] = hashlib.sha256(encoding.encode(triples)).digest()
            digests.append(cached)
        top = {"v": FORMAT_VERSION, "g": self.group.name, "buckets": b"".join(digests)}
        return hashlib.sha256(encoding.encode(top)).digest()

    @classmethod
    def decode(
        cls,
        group: Group[E],
        public_key: E,
        t: int,
        data: bytes,
        quotas: Quotas | None = None,
        max_size: int = encoding.MAX_ENCODED_SIZE,
    ) -> StoreState[E]:
        """The state encoded in ``data`` (at most ``max_size`` bytes: a server's own snapshot
        may be larger than the default limit of a message)."""
        what = "store state"
        f = encoding.expect_map(
            encoding.decode(data, max_size=max_size, what=what), {"v": int, "g": str, "records": list}, what
        )
        if f["v"] != FORMAT_VERSION:
            raise DecodeError(f"{what}: format version {f['v']}, this server reads {FORMAT_VERSION}")
        if f["g"] != group.name:
            raise DecodeError(f"{what}: made on group {f['g']!r}, expected {group.name!r}")
        state = cls(group, public_key, t, quotas)
        for index, obj in enumerate(f["records"]):
            record = Record.from_obj(obj, f"{what}: record {index}")
            key = (record.app, record.data_id)
            if key in state.records:
                raise DecodeError(f"{what}: record {index} repeats {_join(*key)}")
            state.put(record)
        if list(state.records) != sorted(state.records):
            raise DecodeError(f"{what}: records out of order")
        return state


def state_obj(group: str, records: Mapping[tuple[str, str], Record]) -> dict[str, Any]:
    """The canonical form of a state of ``records`` on ``group`` (:meth:`StoreState.to_obj`;
    also for a copy of the records, encoded while the state goes on changing)."""
    return {"v": FORMAT_VERSION, "g": group, "records": [records[k].to_obj() for k in sorted(records)]}


# The client's side --------------------------------------------------------------------------------


def seal_value(
    group: Group[E], public_key: E, request: WriteRequest, plaintext: bytes, rand: ScalarSource, part: int = 0
) -> bytes:
    """``plaintext`` sealed under the store key with the label ``request`` will give it (part ``part``)."""
    lbl = label(
        request.app, request.data_id, request.version, request.dtype, request.reader, request.until_ms, part
    )
    return tdh2.seal(group, public_key, lbl, plaintext, rand).encode(group)


def open_value(
    group: Group[E],
    public: PublicSharing[E],
    record: Record,
    part: int,
    boxed: Mapping[int, bytes],
    reader: nacl.public.PrivateKey,
) -> bytes:
    """The reader's side: open the servers' sealed shares, keep the valid ones, decrypt part ``part``.

    Raises NotEnoughSharesError (naming the servers whose shares were bad) with fewer than t+1 valid.
    """
    sealed = tdh2.Sealed.decode(group, record.sealed[part])
    tdh2.check_ciphertext(group, sealed.kem, record.label(part))
    return tdh2.open_sealed(sealed, combine_shares(group, public, sealed, boxed, reader))


def combine_shares(
    group: Group[E],
    public: PublicSharing[E],
    sealed: tdh2.Sealed[E],
    boxed: Mapping[int, bytes],
    reader: nacl.public.PrivateKey,
) -> bytes:
    """The data key from the servers' decryption shares ``boxed`` (server -> share sealed to
    ``reader``), from t+1 valid ones; NotEnoughSharesError naming the servers whose shares were bad."""
    shares: dict[int, tdh2.DecryptionShare[E]] = {}
    bad: dict[int, str] = {}
    for server, blob in sorted(boxed.items()):
        try:
            shares[server] = tdh2.open_share(group, reader, blob)
        except DecodeError as exc:
            bad[server] = str(exc)
    good, wrong = tdh2.sort_shares(group, public, sealed.kem, shares)
    bad.update(wrong)
    if len(good) < public.t + 1:
        named = "; ".join(f"server {i}: {why}" for i, why in sorted(bad.items()))
        raise NotEnoughSharesError(
            f"{len(good)} valid shares, need {public.t + 1}" + (f" ({named})" if named else "")
        )
    return tdh2.combine(group, public, sealed.kem, good)


def joint_value(contributions: Mapping[int, bytes]) -> bytes:
    """A random joint secret from the servers' contributions (HKDF over them, in server order):
    unknown to anyone while one contribution is, i.e. to any t servers."""
    ikm = encoding.encode({i: v for i, v in sorted(contributions.items())})
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pst/store/joint/v1").derive(ikm)
