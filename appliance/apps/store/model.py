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

* :class:`Client`: one client of a registration ``(name, unique_id)``, vouched for by the
  server whose API authenticated its handle (a distributed application's client acting alone
  has the empty unique id);
* :class:`Quorum`: a *distributed* application's request approved by a strict majority of the
  servers' clients: the approvals certificate of :mod:`appliance.protocols.approvals`
  (protocol ``store``: the request's digest, the ticket HMAC(verifier, period, digest), > n/2
  period-key votes on the request id) with the signed KeyTable of its period. Every server
  checks it alike (:func:`check_quorum`: the table's group signature, then the votes against
  it), whatever its own period and clients, so agreed writes apply deterministically.

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
import functools
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

import nacl.public
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.apps.dsskeys import model as dsskeys
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
CONTRIBUTION_DOMAIN: Final = "pst/store/contribution/v1"
FORMAT_VERSION: Final = 1
MAX_APP_LENGTH: Final = approvals.MAX_APP_LENGTH
MAX_UNIQUE_ID: Final = 64
MAX_VOTERS: Final = 1024
#: A quorum certificate's KeyTable (encoded) at most, and the certificate at most.
MAX_TABLE: Final = 256 * 1024
MAX_QUORUM: Final = MAX_TABLE + MAX_VOTERS * 80 + 1024


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
    """A distributed application's approvals certificate for one request, self-contained.

    ``digest`` is SHA-256 of the approved M (:meth:`WriteRequest.digest`, :meth:`ReadRequest.digest`),
    ``ticket`` the password-bound ticket (the votes are on ``rid = H(digest, ticket)``),
    ``votes`` the period-key signatures of the servers whose clients approved, and ``table`` the
    signed KeyTable of ``period`` (encoded), which the votes are checked against. Everything the
    check needs travels with it, except the group public key and n, which are the same at every
    server in every period: the check (:func:`check_quorum`) gives the same answer everywhere.
    """

    app: str
    period: int
    digest: bytes
    ticket: bytes
    votes: Mapping[int, bytes]
    table: bytes

    def to_obj(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "period": self.period,
            "digest": self.digest,
            "ticket": self.ticket,
            "votes": dict(self.votes),
            "table": self.table,
        }

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Quorum:
        return cls.from_obj(encoding.decode(data, max_size=MAX_QUORUM, what="store quorum evidence"))

    @classmethod
    def from_obj(cls, obj: Any) -> Quorum:
        what = "store quorum evidence"
        f = encoding.expect_map(
            obj,
            {"app": str, "period": int, "digest": bytes, "ticket": bytes, "votes": dict, "table": bytes},
            what,
        )
        if not f["app"] or len(f["app"]) > MAX_APP_LENGTH:
            raise DecodeError(f"{what}: the application name must have 1 to {MAX_APP_LENGTH} characters")
        if len(f["digest"]) != approvals.DIGEST_SIZE or len(f["ticket"]) != approvals.DIGEST_SIZE:
            raise DecodeError(f"{what}: digest and ticket have {approvals.DIGEST_SIZE} bytes")
        if f["period"] < 0 or not f["table"] or len(f["table"]) > MAX_TABLE:
            raise DecodeError(f"{what}: bad period, or a KeyTable missing or over {MAX_TABLE} bytes")
        if len(f["votes"]) > MAX_VOTERS:
            raise DecodeError(f"{what}: more than {MAX_VOTERS} votes")
        votes: dict[int, bytes] = {}
        for voter, sig in f["votes"].items():
            if isinstance(voter, bool) or not isinstance(voter, int) or not 1 <= voter <= MAX_VOTERS:
                raise DecodeError(f"{what}: bad voter id")
            if not isinstance(sig, bytes) or len(sig) != approvals.VOTE_SIZE:
                raise DecodeError(f"{what}: the vote of server {voter} is not {approvals.VOTE_SIZE} bytes")
            votes[voter] = sig
        return cls(f["app"], f["period"], f["digest"], f["ticket"], votes, f["table"])


Requester = Client | Quorum


@dataclass(frozen=True)
class Authority:
    """What a quorum is checked against, the same at every server in every period: the group
    public key (Vcert, which signs every KeyTable) and n (a quorum is more than n/2 votes)."""

    vcert: bytes
    n: int

    @property
    def majority(self) -> int:
        return self.n // 2 + 1


class ServerView(Protocol):
    """What a server deciding on a request uses: a clock, the group's authority and how old
    a quorum's period may be."""

    def now(self) -> float:
        """The clock the decision uses (Unix seconds): the operation's own time when applying
        an agreed write, this server's clock for a read."""
        ...

    @property
    def authority(self) -> Authority | None:
        """None: this server cannot check a quorum (it refuses every one)."""
        ...

    @property
    def oldest_period(self) -> int:
        """The earliest period whose certificate is accepted (0 when applying agreed writes:
        the versions make a replay harmless, and the answer must not depend on when it is applied)."""
        ...


@dataclass(frozen=True)
class GroupView:
    """A :class:`ServerView` from an :class:`Authority`, a clock and the oldest period taken."""

    authority: Authority | None
    clock: Callable[[], float]
    oldest_period: int = 0

    def now(self) -> float:
        return self.clock()


@functools.lru_cache(maxsize=64)
def signed_table(raw: bytes, vcert: bytes) -> KeyTable | None:
    """The KeyTable encoded in ``raw`` if the group key signed it (None otherwise); cached, as
    consecutive certificates carry the same table."""
    try:
        table = KeyTable.decode(raw)
    except DecodeError:
        return None
    return table if table.signature and table.verify(vcert) else None


def check_quorum(view: ServerView, q: Quorum, app: str, digest: bytes, what: str) -> KeyTable:
    """Refused unless ``q`` shows more than n/2 servers' clients of ``app`` approved ``digest``.

    Deterministic: it reads only the certificate, the group key and n (and the view's oldest
    period), never this server's own client's verifier or its current KeyTable. Each vote is
    checked against the KeyTable the certificate carries, once that table's group signature
    and period are checked. The password is checked where the votes are made: an honest server
    votes only when its own client's verifier gives the ticket (``approvals``), so the votes
    on ``rid = H(digest, ticket)`` already say "a client with that password approved"."""
    if q.app != app:
        raise Refused(NOT_PERMITTED, f"{what}: a quorum of application {q.app!r} cannot act for {app!r}")
    if not hmac.compare_digest(q.digest, digest):
        raise Refused(NOT_PERMITTED, f"{what}: the quorum approved another request")
    authority = view.authority
    if authority is None:
        raise Refused(NOT_PERMITTED, f"{what}: this server cannot check a quorum (no group key)")
    if q.period < view.oldest_period:
        raise Refused(
            NOT_PERMITTED,
            f"{what}: the quorum's certificate is of period {q.period}, too old here "
            f"(the oldest taken is of period {view.oldest_period})",
        )
    table = signed_table(q.table, authority.vcert)
    if table is None:
        raise Refused(NOT_PERMITTED, f"{what}: the quorum's KeyTable is not one the group key signed")
    if table.period != q.period:
        raise Refused(
            NOT_PERMITTED, f"{what}: the quorum's KeyTable is of period {table.period}, not {q.period}"
        )
    rid = approvals.request_id(digest, q.ticket)
    good = set()
    for voter, sig in q.votes.items():
        entry = table.entries.get(voter)
        if entry is not None and ed25519_verify(
            entry.verify_key, approvals.vote_payload(q.period, voter, rid), sig
        ):
            good.add(voter)
    if len(good) < authority.majority:
        raise Refused(
            NOT_PERMITTED,
            f"{what}: {len(good)} valid votes of the application's clients, a quorum is {authority.majority}",
        )
    return table


def check_contributions(request: WriteRequest, table: KeyTable, what: str) -> None:
    """Each contribution of a random joint secret was sealed by the server it is keyed by:
    its proof is that server's channel signature of the quorum's period (so a faulty origin
    cannot make up the others' contributions and know the secret). Deterministic: the
    certificates are checked against the KeyTable the quorum's certificate carries."""
    from appliance.net._tls import PeerCertificateError, check_channel_signature

    keys = {i: e.verify_key for i, e in table.entries.items()}
    for part, blob in sorted(request.sealed.items()):
        proof = request.proofs.get(part)
        if proof is None:
            raise Refused(BAD_REQUEST, f"{what}: server {part}'s contribution comes without its proof")
        try:
            c = Contribution.decode(proof)
            if c.period != table.period:
                raise Refused(
                    BAD_REQUEST,
                    f"{what}: server {part}'s contribution is of period {c.period}, "
                    f"the quorum's {table.period}",
                )
            payload = contribution_payload(
                request.app, request.data_id, request.version, part, blob, c.period
            )
            check_channel_signature(c.cert, part, c.period, keys, payload, c.sig)
        except (DecodeError, PeerCertificateError, ValueError) as exc:
            raise Refused(BAD_REQUEST, f"{what}: server {part}'s contribution: {exc}") from None


# Labels, requests -------------------------------------------------------------------------------


def _approval_digest(app: str, payload: bytes) -> bytes:
    return hashlib.sha256(approvals.distributed_payload(app, "store", payload)).digest()


def decode_approval_payload(payload: bytes) -> WriteRequest | ReadRequest:
    """The store request a pending approval (protocol ``store``) carries, for the client deciding."""
    what = "store approval payload"
    obj = encoding.decode(payload, max_size=MAX_REQUEST + 1024, what=what)
    f = encoding.expect_map(obj, {"dom": str, "store": str, "req": dict}, what)
    if (f["dom"], f["store"]) == (WRITE_DOMAIN, "write"):
        return WriteRequest.decode(encoding.encode(f["req"]))
    if (f["dom"], f["store"]) == (READ_DOMAIN, "read"):
        return ReadRequest.decode(encoding.encode(f["req"]))
    raise DecodeError(f"{what}: neither a write nor a read")


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
    #: For a random joint secret: each contribution's proof (:class:`Contribution`, encoded),
    #: by server; absent from the encoding when empty.
    proofs: Mapping[int, bytes] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        obj = {
            "app": self.app,
            "id": self.data_id,
            "type": self.dtype.value,
            "v": self.version,
            "value": self.value,
            "sealed": dict(self.sealed),
            "reader": self.reader,
            "until": self.until_ms,
        }
        if self.proofs:
            obj["proofs"] = dict(self.proofs)
        return obj

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    def approval_payload(self) -> bytes:
        """What the application's clients see and approve (``approvals``' payload, protocol
        ``store``): the request, tagged as a write."""
        return encoding.encode({"dom": WRITE_DOMAIN, "store": "write", "req": self.to_obj()})

    def digest(self) -> bytes:
        """What a quorum's certificate names: SHA-256 of M = ``approvals.distributed_payload``
        (app, ``store``, :meth:`approval_payload`)."""
        return _approval_digest(self.app, self.approval_payload())

    @classmethod
    def decode(cls, data: bytes) -> WriteRequest:
        return cls.from_obj(encoding.decode(data, max_size=MAX_REQUEST, what="store write request"))

    @classmethod
    def from_obj(cls, obj: Any) -> WriteRequest:
        """The request of a decoded map (part of an object :func:`encoding.decode` checked)."""
        what = "store write request"
        fields = dict(_WRITE_FIELDS)
        if isinstance(obj, dict) and "proofs" in obj:
            fields["proofs"] = dict
        f = encoding.expect_map(obj, fields, what)
        dtype, sealed = _content(f, what)
        proofs: dict[int, bytes] = {}
        for part, proof in f.get("proofs", {}).items():
            if part not in sealed or part == 0 or not isinstance(proof, bytes) or len(proof) > 4096:
                raise DecodeError(f"{what}: a proof goes with a server's contribution (at most 4096 bytes)")
            proofs[part] = proof
        if "proofs" in f and not proofs:
            raise DecodeError(f"{what}: an empty list of proofs is left out")
        return cls(f["app"], f["id"], dtype, f["v"], f["value"], sealed, f["reader"], f["until"], proofs)


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

    def approval_payload(self) -> bytes:
        """What the application's clients approve: the read (version, reader key), tagged."""
        return encoding.encode({"dom": READ_DOMAIN, "store": "read", "req": self.to_obj()})

    def digest(self) -> bytes:
        return _approval_digest(self.app, self.approval_payload())

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


@dataclass(frozen=True)
class Contribution:
    """Server ``part``'s contribution to a random joint secret: proof that it sealed ``blob``
    itself. ``sig`` is by its channel key of ``period`` (the TLS key its ``cert`` holds, issued
    by its period key in that period's KeyTable), over :func:`contribution_payload`."""

    period: int
    cert: bytes
    sig: bytes

    def encode(self) -> bytes:
        return encoding.encode({"period": self.period, "cert": self.cert, "sig": self.sig})

    @classmethod
    def decode(cls, data: bytes) -> Contribution:
        what = "joint secret contribution"
        f = encoding.expect_map(
            encoding.decode(data, max_size=4096, what=what),
            {"period": int, "cert": bytes, "sig": bytes},
            what,
        )
        if f["period"] < 0 or len(f["sig"]) != 64:
            raise DecodeError(f"{what}: bad period or signature")
        return cls(f["period"], f["cert"], f["sig"])


def contribution_payload(app: str, data_id: str, version: int, part: int, blob: bytes, period: int) -> bytes:
    """What a contributing server signs: the item, its part and the sealed value's digest."""
    return encoding.encode(
        {
            "dom": CONTRIBUTION_DOMAIN,
            "app": app,
            "id": data_id,
            "v": version,
            "part": part,
            "period": period,
            "sealed": hashlib.sha256(blob).digest(),
        }
    )


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
            table = check_quorum(view, requester, r.app, r.digest(), where)
            if r.dtype == DataType.JOINT_SECRET and set(r.sealed) != {0}:
                check_contributions(r, table, where)
            owner = b""
        else:
            if quorum_only:
                raise Refused(
                    NOT_PERMITTED,
                    f"{where}: {r.dtype.value} data is written only by a quorum of the application's clients",
                )
            owner = requester.unique_id
        self._check_dss_key(r, requester, where)
        record = Record(
            r.app, r.data_id, r.dtype, owner, r.version, r.value, dict(r.sealed), r.reader, r.until_ms
        )
        self._check_sealed(record, where)
        self._check_quotas(record, current, where)
        return record

    def _check_dss_key(self, r: WriteRequest, requester: Requester, where: str) -> None:
        """An application DSS key's record (``dss-key/<name>``, appliance.apps.dsskeys): public,
        write-once, made by a client (its owner), a valid name and group, few per application."""
        name = dsskeys.key_name(r.data_id)
        if name is None:
            return
        if r.dtype != DataType.PUBLIC_ONCE or isinstance(requester, Quorum):
            raise Refused(BAD_REQUEST, f"{where}: a DSS key's record is public-once data a client writes")
        keys = sum(1 for (app, other) in self.records if app == r.app and dsskeys.key_name(other) is not None)
        reason = dsskeys.check_key_write(r.app, name, r.value, keys)
        if reason is not None:
            raise Refused(QUOTA if keys >= dsskeys.MAX_KEYS else BAD_REQUEST, f"{where}: {reason}")

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
        if r.proofs and (r.dtype != DataType.JOINT_SECRET or not set(r.proofs) <= set(r.sealed) - {0}):
            raise Refused(BAD_REQUEST, f"{where}: proofs go with a random joint secret's contributions only")
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
                tdh2.decode_checked(self.group, blob, lbl, self.quotas.max_value_size)
            except tdh2.TooLarge:
                raise Refused(
                    QUOTA, f"{where}: part {part} exceeds the limit of {self.quotas.max_value_size} bytes"
                ) from None
            except (DecodeError, tdh2.InvalidCiphertext) as exc:
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
            check_quorum(view, requester, app, ReadRequest(app, data_id, record.version, b"").digest(), where)
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
                check_quorum(view, requester, r.app, r.digest(), where)
            return record
        if dtype in (DataType.SECRET_SW_DR, DataType.SECRET_DW_DR, DataType.JOINT_SECRET):
            if not isinstance(requester, Quorum):
                raise Refused(
                    NOT_PERMITTED,
                    f"{where}: {dtype.value} data is read only by a quorum of the application's clients",
                )
            check_quorum(view, requester, r.app, r.digest(), where)
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


def contribute(
    group: Group[E],
    public_key: E,
    app: str,
    data_id: str,
    version: int,
    part: int,
    value: bytes,
    period: int,
    cert: bytes,
    sign: Callable[[bytes], bytes],
    rand: ScalarSource,
) -> tuple[bytes, bytes]:
    """Server ``part``'s contribution to a random joint secret: ``value`` (its own random bytes)
    sealed under the store key with the item's label, and its proof (:class:`Contribution`)
    signed by ``sign``, its channel key of ``period`` whose certificate is ``cert``."""
    bare = WriteRequest(app, data_id, DataType.JOINT_SECRET, version)
    blob = seal_value(group, public_key, bare, value, rand, part)
    sig = sign(contribution_payload(app, data_id, version, part, blob, period))
    return blob, Contribution(period, cert, sig).encode()


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
    sealed = tdh2.decode_checked(group, record.sealed[part], record.label(part))
    return tdh2.open_sealed(sealed, combine_shares(group, public, sealed, boxed, reader))


def combine_shares(
    group: Group[E],
    public: PublicSharing[E],
    sealed: tdh2.Sealed[E],
    boxed: Mapping[int, bytes],
    reader: nacl.public.PrivateKey,
) -> bytes:
    """The data key from the servers' decryption shares ``boxed`` (server -> share sealed to
    ``reader``), from t+1 valid ones; NotEnoughSharesError naming the servers whose shares were bad.
    ``sealed`` was checked (:func:`tdh2.decode_checked`); the shares are checked in server order
    until t+1 are valid, and not again when they are combined."""
    shares: dict[int, tdh2.DecryptionShare[E]] = {}
    bad: dict[int, str] = {}
    for server, blob in sorted(boxed.items()):
        try:
            shares[server] = tdh2.open_share(group, reader, blob)
        except DecodeError as exc:
            bad[server] = str(exc)
    good, wrong = tdh2.sort_shares(group, public, sealed.kem, shares, enough=public.t + 1)
    bad.update(wrong)
    if len(good) < public.t + 1:
        named = "; ".join(f"server {i}: {why}" for i, why in sorted(bad.items()))
        raise NotEnoughSharesError(
            f"{len(good)} valid shares, need {public.t + 1}" + (f" ({named})" if named else "")
        )
    return tdh2.interpolate(group, public, sealed.kem, good)


def joint_value(contributions: Mapping[int, bytes]) -> bytes:
    """A random joint secret from the servers' contributions (HKDF over them, in server order):
    unknown to anyone while one contribution is, i.e. to any t servers."""
    ikm = encoding.encode({i: v for i, v in sorted(contributions.items())})
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pst/store/joint/v1").derive(ikm)
