"""One period's refresh (Table 1, with PushM of Table 2), safe under any message timing.

Theory of operation
-------------------
The clock only *starts* a period's refresh; every step proceeds as soon as it has the
messages it needs, and the period's data changes only by a **decision** of the agreement
engine (:mod:`appliance.protocols.agreement`), never by a timeout. Until the decision
every server keeps everything it had; at the decision it erases its old shares and keys.

=========  ====================================================================================
PUSHM      Table 2. M is checked with Vstart from ROM. Operational servers send everyone M,
           the newest KeyTable (signed with Scert), the public sharings and the transcript of
           the last decision, so that a server that lost data or missed a period catches up.
ANNOUNCE   Table 1 steps 1-3. Fresh period keys (V_i, S_i), (E_i, D_i), saved before they
           are sent. K_i is signed with the previous period key (authenticated) or, by a
           recovering server, with the new S_i (clear). Receivers forward each authenticated
           announcement once (so all honest servers get it, and two different ones are
           transferable evidence: rule (i)). A clear announcement counts only with t+1
           attestations by servers that received it on the author's own connection, so no
           relayer can invent one (rules (ii)-(iii)). A server with an announcement key in M
           (its ROM is a TPM) has every announcement signed by that key too, over the previous
           KeyTable's digest; a clear one so signed needs no attestations (issue 8).
KEYTABLE   Agreement 1: the leader proposes the KeyTable with every announcement (and
           attestation) inline; members of the previous KeyTable vote after checking every
           entry and their own evidence. The agreed sharing digest is the one t+1
           authenticated announcements report; those servers are the dealers (operational).
DEAL       Every operational server deals, for each long-lived secret, a sharing of zero
           (HJKY refresh) and, for each recovering server r, a blinding polynomial vanishing
           at r (HJKY recovery): commitments plus every recipient's sub-shares encrypted to
           its new E_k (:mod:`appliance.crypto.vdec`), one self-contained signed dealing,
           saved before it is sent and forwarded by every receiver.
COMPLAIN   A recipient whose sub-shares do not decrypt or fail the commitments publishes a
           complaint anyone can judge (a Chaum-Pedersen reveal of its decryption key for that
           one ciphertext): the dealer or the accuser is convicted, never an honest server.
DEALINGS   Agreement 2 among the new KeyTable's members: the set S of at least t+1 dealings.
           A member votes only if it holds every dealing in S and its own sub-shares in all
           of them verify, so a decision means at least t+1 honest servers can compute the
           new sharing. DECISION: new shares s' = s + sum f_i(k), the recovery values owed to
           recovering servers, persisted; the old shares and period keys erased.
SIGN       After the decision: the KeyTable is signed with Scert by FROST with the *new*
           shares (so a signed KeyTable proves the decision). Attempt a is led by the a-th
           operational server, whose signed request fixes the signer set; shares for any
           other set are refused; two requests for one attempt are equivocation.
RECOVER    Each operational server sends each recovering server r its blinded new share
           s'_k + sum g_(i,r)(k), encrypted to E_r; r checks each against public data,
           interpolates t+1 of them at r, and is operational.
=========  ====================================================================================

The steps from DEAL to the decision (and the same-period repair of a bad sub-share in a decided
dealing) live in :class:`DealingStage`, which the initialization (``protocols/init.py``) shares;
FROST signing is :class:`_FrostState`, parameterized by what it signs.

Invariants (docs/design.md proves them): the group key is never lost; at most one KeyTable
is decided per period; old shares are gone after the decision; no honest server is accused
of anything but silence. Nothing here reads a clock, a socket or a random source.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from nacl.signing import SigningKey

from appliance.crypto import annkey, dkg, encoding, frost, pss, vdec
from appliance.crypto.errors import CheatingError, DecodeError
from appliance.crypto.groups import ED25519, Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import SecretScalar
from appliance.crypto.shamir import interpolate
from appliance.protocols._core import (
    EVERYONE,
    Alert,
    AlertKind,
    LocalProtocolError,
    Outgoing,
    RemoteProtocolError,
    Signer,
    ed25519_verify,
)
from appliance.protocols._signed import BadSignature, decode_signed, open_signed, sign
from appliance.protocols.agreement import (
    ACCEPT,
    WAIT,
    Committee,
    Decision,
    Engine,
    Instance,
    QuorumCert,
    SafetyData,
    SafetyRules,
    Verdict,
    digest,
    reject,
    safety_from_bytes,
    safety_to_bytes,
)
from appliance.protocols.messages import (
    MAX_LIST,
    Agree,
    Attestation,
    Checked,
    Message,
    Phase2,
    PushM,
    Repair,
    RepairRequest,
    Signed,
    Want,
)
from appliance.protocols.messages import parse as parse_message
from appliance.protocols.state import (
    SCERT,
    Constants,
    InvariantInfo,
    KeyEntry,
    KeyTable,
    encryption_key_payload,
    sharing_digest,
    sharing_from_obj,
    sharing_to_obj,
)

RandomBytes = Callable[[int], bytes]
CONTEXT = "pst/refresh"
#: No refresh message is larger (checked before decoding).
MAX_MESSAGE = 512 * 1024
#: Bytes one peer may send us in one period's refresh; beyond, its messages are dropped.
PEER_BUDGET = 16 * 1024 * 1024
#: Messages per peer held until we can judge them (before M or the KeyTable is known).
MAX_HELD = 128


class Status(enum.Enum):
    OPERATIONAL = "operational"
    RECOVERING = "recovering"


# Data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transcript:
    """The decided record of one period's refresh: anyone holding the previous KeyTable checks it."""

    period: int
    kt_value: bytes
    kt_qc: QuorumCert
    s_value: bytes
    s_qc: QuorumCert
    dealings: Mapping[int, bytes]

    def encode(self) -> bytes:
        return encoding.encode(
            {
                "period": self.period,
                "kt": [self.kt_value, self.kt_qc.to_obj()],
                "s": [self.s_value, self.s_qc.to_obj()],
                "dealings": dict(self.dealings),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Transcript:
        f = encoding.expect_map(
            encoding.decode(data, max_size=8 * MAX_MESSAGE, what="transcript"),
            {"period": int, "kt": list, "s": list, "dealings": dict},
            "transcript",
        )
        if f["period"] < 1:
            raise DecodeError("transcript: period must be at least 1")
        pairs = []
        for name in ("kt", "s"):
            x = f[name]
            if len(x) != 2 or not isinstance(x[0], bytes):
                raise DecodeError(f"transcript: malformed {name} decision")
            pairs.append((x[0], QuorumCert.from_obj(x[1])))
        dealings: dict[int, bytes] = {}
        for d, raw in f["dealings"].items():
            if type(d) is not int or not isinstance(raw, bytes):
                raise DecodeError("transcript: dealings must map dealer ids to bytes")
            dealings[d] = raw
        return cls(f["period"], pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1], dealings)


@dataclass
class PublicData:
    """What a server stores in public: M, the newest signed KeyTable, the sharings, the last decision."""

    m: InvariantInfo | None = None
    key_table: KeyTable | None = None
    sharings: dict[str, PublicSharing[Any]] = field(default_factory=dict)
    transcript: Transcript | None = None

    @property
    def decided_period(self) -> int:
        """The last period whose refresh this server decided (or whose KeyTable it holds)."""
        kt = self.key_table.period if self.key_table is not None else -1
        return max(kt, self.transcript.period if self.transcript is not None else -1)

    @property
    def complete(self) -> bool:
        """False while the last decision's KeyTable is not yet signed (SIGN/RECOVER running)."""
        return self.transcript is None or (
            self.key_table is not None and self.key_table.period >= self.transcript.period
        )


@dataclass(repr=False)
class PrivateData:
    """What a server stores in private: period key seeds, shares, values owed to recovering servers."""

    period: int
    signing_seed: bytes
    encryption_seed: bytes
    shares: dict[str, SecretScalar] = field(default_factory=dict)
    #: Blinded new shares owed to recovering servers: r -> secret id -> value.
    rpoints: dict[int, dict[str, int]] = field(default_factory=dict)
    #: Same-period repair in progress: dealer -> our complaint about its decided dealing. While
    #: it is not empty, ``shares`` holds s + the good sub-shares only (not yet a share), and
    #: ``rpoints`` the good blinding values only.
    repair: dict[int, bytes] = field(default_factory=dict)

    def wipe(self) -> None:
        for s in self.shares.values():
            s.wipe()
        self.rpoints.clear()

    def __repr__(self) -> str:
        return f"PrivateData(period={self.period}, secrets={sorted(self.shares)}, <hidden>)"


@dataclass
class Outcome:
    status: Status
    public: PublicData
    private: PrivateData | None
    alerts: list[Alert]
    failure: str | None = None
    #: The network decided a later period without us: the private data held until now (shares of
    #: a sharing that no longer exists) is to be erased, not kept.
    superseded: bool = False


class Durable(Protocol):
    """Small durable records of a refresh in progress (private: they hold seeds)."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None:
        """Return only once ``value`` is durable: a restart must find it."""

    def forget(self, period: int) -> None:
        """Erase every record of ``period`` and earlier (overwritten, not just unlinked)."""


class MemoryDurable:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def forget(self, period: int) -> None:
        for k in [k for k in self.data if int(k.split("/")[0]) <= period]:
            del self.data[k]


class CodeCheck(Protocol):
    """The node's check of the installed code (I/O lives outside the protocol).

    ``chain`` is our upgrade chain (pushed with M). ``check`` gets M and the chains peers
    pushed, applies the longest valid one to M's C (keeping it if it is longer than ours) and
    returns None if the installed code matches the C in force, else why not. The protocol never
    calls ``check``: it asks its owner for it (:class:`CodeCheckRequest`), and the owner runs it
    off its event loop and hands the result back as an event (``code_checked``)."""

    def chain(self) -> bytes | None: ...

    def check(self, m: InvariantInfo, chains: list[bytes]) -> str | None: ...


@dataclass(frozen=True, eq=False)
class CodeCheckRequest:
    """A recovering server's code check, asked of the owner: run ``CodeCheck.check(m, chains)``
    (it hashes the installed code: 0.2 s warm, many seconds cold) off the event loop, then hand
    the result to ``code_checked(request, problem, now)``. ``m`` is the M we verified (ours, or
    the one a peer pushed), so the result is checked against the pushed M's C."""

    period: int
    m: InvariantInfo
    chains: tuple[bytes, ...]


class _DurableSafety:
    def __init__(self, durable: Durable, period: int) -> None:
        self.durable = durable
        self.period = period

    def load(self, inst: Instance) -> SafetyData | None:
        raw = self.durable.get(f"{self.period}/safety/{inst.name}")
        if raw is None:
            return None
        try:
            return safety_from_bytes(raw)
        except DecodeError:  # pragma: no cover - our own file; the node checks its integrity
            raise LocalProtocolError(f"safety data of {inst.name} is corrupt") from None

    def save(self, inst: Instance, data: SafetyData) -> None:
        self.durable.put(f"{self.period}/safety/{inst.name}", safety_to_bytes(data))


# Announcements ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ann:
    server: int
    entry: KeyEntry
    sharings: Mapping[str, bytes]
    clear: bool
    raw: bytes
    #: Signed by the author's announcement key (its TPM) too: see ann_tpm_payload.
    bound: bool = False

    @property
    def digest(self) -> bytes:
        return digest(self.raw)


def ann_tpm_payload(period: int, server: int, prev: bytes, entry: KeyEntry) -> bytes:
    """What a server's announcement key signs: its new K_i for ``period``, bound to the digest
    ``prev`` of the previous KeyTable, which nobody knew before that KeyTable was decided (so no
    announcement can have been signed in advance, by an attacker that was inside before)."""
    return encoding.signing_payload(
        "ann-tpm", 1, "pst/refresh/ann-tpm", period, {"server": server, "prev": prev, "K": entry.to_obj()}
    )


def keytable_digest(table: KeyTable | None) -> bytes:
    """The digest of a KeyTable's signed content (empty without one)."""
    return digest(table.payload()) if table is not None else b""


class UnboundAnnouncement(BadSignature):
    """An announcement for a server with an announcement key, without a valid TPM signature."""

    def __init__(self, server: int, why: str) -> None:
        super().__init__(f"announcement of server {server} {why}")
        self.server = server
        self.why = why


def parse_ann(
    raw: Any,
    period: int,
    old_keys: Mapping[int, bytes],
    ann_keys: Mapping[int, bytes] | None = None,
    prev: bytes = b"",
) -> Ann:
    """An announcement from untrusted bytes: decoded, its signatures checked (DecodeError/BadSignature).

    Every announcement of a server that has an announcement key in M (``ann_keys``), clear or
    authenticated, must carry that key's signature over :func:`ann_tpm_payload` with ``prev``, the
    digest of the previous KeyTable (UnboundAnnouncement otherwise): a stolen period key is not
    enough to announce for such a server."""
    s = decode_signed(raw, "announce", period, max_size=16 * 1024)
    fields: dict[str, type] = {"server": int, "K": dict, "sharings": dict, "clear": bool}
    if isinstance(s.body, dict) and "tpm" in s.body:
        fields["tpm"] = bytes
    f = encoding.expect_map(s.body, fields, "announcement")
    entry = KeyEntry.from_obj(f["K"], "announcement")
    sharings: dict[str, bytes] = {}
    for k, v in f["sharings"].items():
        if not isinstance(k, str) or not isinstance(v, bytes) or len(v) != 32:
            raise DecodeError("announcement: sharings must map secret ids to 32-byte digests")
        sharings[k] = v
    server = f["server"]
    if not ed25519_verify(
        entry.verify_key, encryption_key_payload(server, period, entry.encryption_key), entry.signature
    ):
        raise BadSignature("announcement: E_i is not signed with the new V_i")
    try:
        vdec.decode_public_key(entry.encryption_key)
    except DecodeError as exc:
        raise DecodeError(f"announcement: E_i is not a valid key: {exc}") from None
    key = entry.verify_key if f["clear"] else old_keys.get(server)
    if key is None or not s.verify(key):
        raise BadSignature(
            f"announcement of server {server} not signed with its {'new' if f['clear'] else 'period'} key"
        )
    if f["clear"] and sharings:
        raise DecodeError("announcement: a clear announcement holds no sharings")
    ann_key = (ann_keys or {}).get(server)
    if ann_key is None:
        if "tpm" in f:
            raise DecodeError(
                f"announcement of server {server}: a TPM signature, but no announcement key in M"
            )
        return Ann(server, entry, sharings, f["clear"], raw)
    kind = "clear" if f["clear"] else "authenticated"
    if "tpm" not in f:
        raise UnboundAnnouncement(server, f"({kind}) lacks the signature of its announcement key (its TPM)")
    if not annkey.verify(ann_key, ann_tpm_payload(period, server, prev, entry), f["tpm"]):
        raise UnboundAnnouncement(
            server, f"({kind}) has a TPM signature that does not verify with its announcement key in M"
        )
    return Ann(server, entry, sharings, f["clear"], raw, bound=True)


@dataclass(frozen=True)
class KeyTableCandidate:
    """A decoded, checked KeyTable proposal: the table, its announcements, who deals, who recovers."""

    value: bytes
    table: KeyTable
    anns: Mapping[int, Ann]
    operational: tuple[int, ...]
    recovering: tuple[int, ...]


class InvalidProposal(Exception):
    pass


def judge_keytable(
    value: bytes,
    period: int,
    c: Constants,
    old_keys: Mapping[int, bytes],
    parse: Callable[[Any, int, Mapping[int, bytes]], Ann] | None = None,
    *,
    ann_keys: Mapping[int, bytes] | None = None,
    prev: bytes = b"",
) -> KeyTableCandidate:
    """Table 1's judgment applied to a proposed KeyTable, from the value alone (pure).

    Every entry is an authenticated announcement (signed with the author's key of the
    previous KeyTable), a clear one of a server with an announcement key signed by that key
    over the previous KeyTable's digest ``prev`` (bound), or a clear one of a server without
    such a key with t+1 attestations from distinct members of the previous KeyTable (at least
    one honest server received it from the author itself).
    The sharing digest of each secret must be reported by t+1 authenticated entries; those
    entries are the operational servers (at least t+1), all others recover.
    """
    try:
        f = encoding.expect_map(
            encoding.decode(value, what="KeyTable proposal"),
            {"period": int, "entries": dict, "sharings": dict},
            "KeyTable proposal",
        )
    except DecodeError as exc:
        raise InvalidProposal(str(exc)) from None
    if f["period"] != period:
        raise InvalidProposal(f"KeyTable proposal for period {f['period']}")

    def read(raw: Any) -> Ann:
        if parse is not None:
            return parse(raw, period, old_keys)
        return parse_ann(raw, period, old_keys, ann_keys, prev)

    anns: dict[int, Ann] = {}
    for i, e in f["entries"].items():
        if type(i) is not int or i not in c.ids or not isinstance(e, dict):
            raise InvalidProposal("KeyTable proposal: entries must be keyed by server ids")
        try:
            g = encoding.expect_map(e, {"ann": bytes, "attest": dict}, "KeyTable entry")
            ann = read(g["ann"])
        except (DecodeError, BadSignature) as exc:
            raise InvalidProposal(f"entry {i}: {exc}") from None
        if ann.server != i:
            raise InvalidProposal(f"entry {i} holds server {ann.server}'s announcement")
        if ann.clear and ann.bound:
            if g["attest"]:
                raise InvalidProposal(f"entry {i}: attestations on a TPM-signed announcement")
        elif ann.clear:
            good = sum(
                1
                for j, att in g["attest"].items()
                if type(j) is int and j != i and check_attestation(att, period, j, i, ann.digest, old_keys)
            )
            if good < c.t + 1:
                raise InvalidProposal(f"entry {i}: clear announcement with {good} attestations, need t+1")
        elif g["attest"]:
            raise InvalidProposal(f"entry {i}: attestations on an authenticated announcement")
        anns[i] = ann
    sharings: dict[str, bytes] = {}
    for sid, d in f["sharings"].items():
        if sid not in c.secrets or not isinstance(d, bytes):
            raise InvalidProposal("KeyTable proposal: unknown secret")
        sharings[sid] = d
    if set(sharings) != set(c.secrets):
        raise InvalidProposal("KeyTable proposal: a sharing digest per secret")
    operational = tuple(
        sorted(
            i
            for i, a in anns.items()
            if not a.clear and all(a.sharings.get(s) == d for s, d in sharings.items())
        )
    )
    if len(operational) < c.t + 1:
        raise InvalidProposal(f"only {len(operational)} servers hold the agreed sharing, need t+1")
    recovering = tuple(sorted(set(anns) - set(operational)))
    table = KeyTable(period, {i: a.entry for i, a in anns.items()}, sharings, frozenset(recovering))
    return KeyTableCandidate(value, table, anns, operational, recovering)


def attestation(period: int, author: int, ann_digest: bytes, signer: Signer) -> bytes:
    return sign("attest", period, {"server": author, "ann": ann_digest}, signer)


def check_attestation(
    raw: Any, period: int, by: int, author: int, ann_digest: bytes, old_keys: Mapping[int, bytes]
) -> bool:
    key = old_keys.get(by)
    if key is None:
        return False
    try:
        s = open_signed(raw, "attest", period, key, max_size=1024)
    except (DecodeError, BadSignature):
        return False
    return bool(s.body == {"server": author, "ann": ann_digest})


# Dealings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dealing:
    dealer: int
    zero: Mapping[str, pss.ZeroDealing[Any]]
    recover: Mapping[str, Mapping[int, pss.RecoveryDealing[Any]]]
    ephemeral: bytes
    ciphertexts: Mapping[int, bytes]
    raw: bytes
    #: At initialization: a random sharing (Feldman commitments with a proof of possession of
    #: the constant term) per secret, instead of a sharing of zero and blinding polynomials.
    full: Mapping[str, dkg.Dealing[Any]] = field(default_factory=dict)

    @property
    def digest(self) -> bytes:
        return digest(self.raw)


def deal_context(period: int, dealer: int, kt_digest: bytes) -> bytes:
    return encoding.encode(["pst/refresh/deal", period, dealer, kt_digest])


def open_dealing(
    raw: Any, period: int, kt: KeyTableCandidate, c: Constants, context: Callable[[int], bytes]
) -> tuple[int, dict[str, Any]]:
    """The dealer and fields of a dealing from untrusted bytes (init's and the refresh's): signed
    by an operational member of the decided KeyTable with its key there, for that KeyTable, its
    ephemeral key valid in the dealer's ``context``, one commitment set per secret and one
    ciphertext per member. DecodeError/BadSignature otherwise."""
    s = decode_signed(raw, "deal", period, max_size=MAX_MESSAGE)
    f = encoding.expect_map(
        s.body, {"dealer": int, "kt": bytes, "eph": bytes, "commit": dict, "ct": dict}, "dealing"
    )
    d = f["dealer"]
    if d not in kt.operational:
        raise DecodeError(f"dealing by server {d}, which is not an operational member")
    if not s.verify(kt.table.entries[d].verify_key):
        raise BadSignature(f"dealing of server {d} not signed with its key of period {period}")
    if f["kt"] != digest(kt.value):
        raise DecodeError("dealing for another KeyTable")
    vdec.check_ephemeral(f["eph"], context(d))
    if set(f["commit"]) != set(c.secrets):
        raise DecodeError("dealing: one commitment set per secret")
    if set(f["ct"]) != set(kt.table.entries) or not all(isinstance(x, bytes) for x in f["ct"].values()):
        raise DecodeError("dealing: one ciphertext per member of the KeyTable")
    return d, f


def parse_dealing(raw: Any, period: int, kt: KeyTableCandidate, c: Constants) -> Dealing:
    """A dealing from untrusted bytes, checked against the decided KeyTable (DecodeError/BadSignature)."""
    d, f = open_dealing(raw, period, kt, c, lambda dealer: deal_context(period, dealer, digest(kt.value)))
    zero: dict[str, pss.ZeroDealing[Any]] = {}
    recover: dict[str, dict[int, pss.RecoveryDealing[Any]]] = {}
    for sid, obj in f["commit"].items():
        group = c.group(sid)
        g = encoding.expect_map(obj, {"zero": list, "rec": dict}, "dealing commitments")
        zero[sid] = pss.ZeroDealing.decode(
            group, encoding.encode({"dealer": d, "points": g["zero"]}), c.n, c.t
        )
        if set(g["rec"]) != set(kt.recovering):
            raise DecodeError("dealing: one blinding polynomial per recovering server")
        recover[sid] = {
            r: pss.RecoveryDealing.decode(
                group, encoding.encode({"dealer": d, "lost": r, "points": pts}), c.n, c.t
            )
            for r, pts in g["rec"].items()
        }
    return Dealing(d, zero, recover, f["eph"], dict(f["ct"]), raw)


def parse_subshares(
    plain: bytes, dealing: Dealing, me: int, helper: bool, c: Constants
) -> dict[str, tuple[int, dict[int, int]]]:
    """Our sub-shares from a decrypted plaintext, each checked against the dealing (CheatingError)."""
    try:
        obj = encoding.decode(plain, what="sub-shares")
        if not isinstance(obj, dict) or set(obj) != set(c.secrets):
            raise DecodeError("sub-shares: one entry per secret")
        out: dict[str, tuple[int, dict[int, int]]] = {}
        for sid, e in obj.items():
            g = encoding.expect_map(e, {"z": int, "g": dict}, "sub-shares")
            rec = {r: v for r, v in g["g"].items() if type(r) is int and type(v) is int}
            if len(rec) != len(g["g"]):
                raise DecodeError("sub-shares: malformed blinding values")
            out[sid] = (g["z"], rec)
    except DecodeError as exc:
        raise CheatingError(dealing.dealer, f"sub-shares for server {me} malformed: {exc}") from None
    for sid, (z, rec) in out.items():
        group = c.group(sid)
        full = dealing.full.get(sid)
        good = (
            0 <= z < group.order and dkg.check_share(group, full, me, z)
            if full is not None
            else dealing.zero[sid].check_subshare(group, me, z)
        )
        if not good:
            raise CheatingError(dealing.dealer, f"sub-share of {sid!r} for server {me} fails the commitments")
        expected = set(dealing.recover[sid]) if helper else set()
        if set(rec) != expected:
            raise CheatingError(dealing.dealer, f"wrong set of blinding values for server {me}")
        for r, v in rec.items():
            if not dealing.recover[sid][r].check_subshare(group, me, v):
                raise CheatingError(dealing.dealer, f"blinding value for server {r} fails the commitments")
    return out


def subshare_ok(group: Group[Any], dealing: Dealing, sid: str, x: int, value: int) -> bool:
    """Is ``value`` the point at ``x`` of ``dealing``'s polynomial for secret ``sid``?"""
    if type(value) is not int or not 0 <= value < group.order:
        return False
    full = dealing.full.get(sid)
    if full is not None:
        return dkg.check_share(group, full, x, value)
    return dealing.zero[sid].check_subshare(group, x, value)


# The refresh ---------------------------------------------------------------------------------


def base_timeout(c: Constants) -> float:
    """The first view's timeout; later views double it, so no round length has to be right."""
    return max(0.5, 8 * c.delta)


class DealingStage:
    """What the refresh and the initialization share once their KeyTable is decided: the
    dealings (self-contained, sub-shares encrypted to each member's period key), the checks
    and complaints anyone can judge, and agreement 2 on the set of dealings.

    A subclass provides the attributes annotated here, :meth:`_parse_dealing`,
    :meth:`_parse_subshares`, :meth:`_make_dealing` and :meth:`_decide`.
    """

    context = CONTEXT
    me: int
    period: int
    rand: RandomBytes
    durable: Durable
    status: Status
    signer: Signer
    my_ann: bytes
    encryption_seed: bytes
    encryption_public: bytes
    alerts: list[Alert]
    rejected: list[RemoteProtocolError]
    decided: bool
    kt: KeyTableCandidate | None
    _kt_qc: QuorumCert
    s_engine: Engine | None
    dealings: dict[int, Dealing]
    _other_dealings: dict[bytes, bytes]
    _raw_dealings: dict[bytes, bytes]
    my_subshares: dict[int, dict[str, tuple[int, dict[int, int]]]]
    convicted: dict[int, str]
    _complaints: dict[tuple[int, int], bytes]
    _checked: dict[bytes, set[int]]
    _s_ready_since: float | None
    _want_sent: float
    _now: float
    _out: list[Outgoing]
    _held: dict[int, list[Message]]
    new_keys: dict[str, KeyShare[Any]]
    new_sharings: dict[str, PublicSharing[Any]]

    @property
    def c(self) -> Constants:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @property
    def timeout(self) -> float:
        return base_timeout(self.c)

    def _inject(self, sender: int, msg: Message, now: float) -> None:
        """A typed message (just arrived, held, or our own): handled; a peer's fault is recorded."""
        raise NotImplementedError  # pragma: no cover

    def _parse_dealing(self, raw: Any) -> Dealing:
        assert self.kt is not None
        return parse_dealing(raw, self.period, self.kt, self.c)

    def _parse_subshares(
        self, plain: bytes, dealing: Dealing, who: int
    ) -> dict[str, tuple[int, dict[int, int]]]:
        assert self.kt is not None
        return parse_subshares(plain, dealing, who, who in self.kt.operational, self.c)

    def _deal_context(self, dealer: int) -> bytes:
        assert self.kt is not None
        return deal_context(self.period, dealer, digest(self.kt.value))

    def _make_dealing(self) -> bytes:
        raise NotImplementedError  # pragma: no cover

    def _decide(self, transcript: Transcript, dealings: Mapping[int, Dealing]) -> None:
        raise NotImplementedError  # pragma: no cover

    def _alert(self, kind: AlertKind, server: int, detail: str, evidence: tuple[bytes, ...] = ()) -> None:
        if all((a.kind, a.server, a.detail) != (kind, server, detail) for a in self.alerts):
            self.alerts.append(Alert(kind, server, self.period, detail, evidence))

    def _send(self, to: int, phase: str, body: Any) -> None:
        self._out.append(Outgoing(to, encoding.encode({"period": self.period, "phase": phase, "body": body})))

    def _scalar(self, group: Group[Any]) -> int:
        size = (group.order.bit_length() + 7) // 8 + 16
        return int.from_bytes(self.rand(size), "big") % (group.order - 1) + 1

    def _hold(self, sender: int, msg: Message) -> None:
        held = self._held.setdefault(sender, [])
        if len(held) >= MAX_HELD:
            raise RemoteProtocolError(sender, "too many early messages; dropped")
        held.append(msg)

    def _replay(self, now: float) -> None:
        if not self._held:
            return
        held, self._held = self._held, {}
        for sender, items in held.items():
            for msg in items:
                self._inject(sender, msg, now)

    def _collect(self, engine: Engine) -> None:
        self.rejected.extend(engine.rejected)
        engine.rejected.clear()
        for a in engine.alerts:
            self._alert(a.kind, a.server, a.detail, a.evidence)
        engine.alerts.clear()

    @property
    def _is_member(self) -> bool:
        return (
            self.kt is not None
            and self.kt.anns.get(self.me) is not None
            and self.kt.anns[self.me].raw == self.my_ann
        )

    def _deal(self) -> None:
        """Our dealing: zero sharings and blinding polynomials, every sub-share encrypted to its recipient."""
        assert self.kt is not None
        key = f"{self.period}/deal"
        raw = self.durable.get(key)
        if raw is None:
            raw = self._make_dealing()
            self.durable.put(key, raw)
        self._send(EVERYONE, "deal", raw)
        self._on_deal(self.me, Signed("deal", raw), self._now)

    def _on_deal(self, sender: int, msg: Signed, now: float) -> None:
        if self.kt is None:
            self._hold(sender, msg)
            return
        body = msg.data
        h = digest(body)
        if h in self._raw_dealings or h in self._other_dealings:
            return
        dealing = self._parse_dealing(body)
        d = dealing.dealer
        known = self.dealings.get(d)
        if known is not None and known.raw == body:
            return
        if known is not None:
            self._other_dealings[h] = body
            self.convicted.setdefault(d, "two different signed dealings")
            self._alert(
                AlertKind.EQUIVOCATION, d, "two different signed dealings", evidence=(known.raw, body)
            )
            self._send(EVERYONE, "deal", body)
            return
        self.dealings[d] = dealing
        self._raw_dealings[h] = body
        if sender != self.me:
            self._send(EVERYONE, "deal", body)  # forwarded once: every honest server gets it
        self._check_my_subshares(dealing)
        self._replay(now)  # complaints about this dealing may have come first
        self._try_finish_decision()

    def _check_my_subshares(self, dealing: Dealing) -> None:
        assert self.kt is not None
        if not self._is_member or self.me not in dealing.ciphertexts:
            return
        complaint = self._complaint_about(dealing)
        self._send(EVERYONE, "checked", {"dealing": dealing.digest, "complaint": complaint})
        self._checked.setdefault(dealing.digest, set()).add(self.me)

    def _complaint_about(self, dealing: Dealing) -> bytes | None:
        """None if our sub-shares in ``dealing`` are good (they are kept), else our complaint."""
        assert self.kt is not None
        context = self._deal_context(dealing.dealer)
        e = vdec.secret_from_seed(self.encryption_seed)
        try:
            plain = vdec.decrypt(
                e, self.encryption_public, self.me, dealing.ephemeral, dealing.ciphertexts[self.me], context
            )
            self.my_subshares[dealing.dealer] = self._parse_subshares(plain, dealing, self.me)
            return None
        except vdec.DecryptionError:
            reason = f"our sub-shares from server {dealing.dealer} do not decrypt"
        except CheatingError as exc:
            reason = exc.reason
        raw = self.complaint(dealing)
        self._judge(self.me, raw, reason)
        return raw

    def complaint(self, dealing: Dealing) -> bytes:
        """Our signed complaint about ``dealing``: the key of our ciphertext, with its proof."""
        assert self.kt is not None
        context = self._deal_context(dealing.dealer)
        e = vdec.secret_from_seed(self.encryption_seed)
        rev = vdec.reveal(
            e, self.encryption_public, self.me, dealing.ephemeral, context, lambda: self._scalar(ED25519)
        )
        body = {
            "accuser": self.me,
            "dealer": dealing.dealer,
            "dealing": dealing.digest,
            "reveal": rev.to_bytes(),
        }
        return sign("complain", self.period, body, self.signer)

    def _on_checked(self, sender: int, msg: Checked, now: float) -> None:
        """A member checked its sub-shares in a dealing: fine, or here is its complaint."""
        if self.kt is None:
            self._hold(sender, msg)
            return
        if sender not in self.kt.table.entries:
            raise RemoteProtocolError(sender, "checked: not a member")
        if msg.complaint is not None:
            self._judge(sender, msg.complaint, None)
        known = msg.dealing in self._raw_dealings or msg.dealing in self._other_dealings
        if known or len(self._checked) < 4 * self.c.n:
            self._checked.setdefault(msg.dealing, set()).add(sender)

    def _judge(self, sender: int, raw: bytes, own_reason: str | None) -> None:
        """A complaint, judged from public data: the dealer or the accuser is convicted."""
        assert self.kt is not None
        s = decode_signed(raw, "complain", self.period, max_size=4096)
        f = encoding.expect_map(
            s.body, {"accuser": int, "dealer": int, "dealing": bytes, "reveal": bytes}, "complaint"
        )
        accuser, d = f["accuser"], f["dealer"]
        entry = self.kt.table.entries.get(accuser)
        if entry is None or not s.verify(entry.verify_key):
            raise RemoteProtocolError(sender, "complaint not signed by a member's new key")
        if (accuser, d) in self._complaints:
            return
        dealing_raw = self._raw_dealings.get(f["dealing"]) or self._other_dealings.get(f["dealing"])
        if dealing_raw is None:
            if len(self._complaints) < 4 * self.c.n:
                self._hold(sender, Checked(f["dealing"], raw))
            return
        self._complaints[(accuser, d)] = raw
        dealing = self._parse_dealing(dealing_raw)
        context = self._deal_context(d)
        try:
            rev = vdec.Reveal.from_bytes(f["reveal"])
            plain = vdec.open_revealed(
                entry.encryption_key,
                accuser,
                dealing.ephemeral,
                rev,
                dealing.ciphertexts.get(accuser, b""),
                context,
            )
        except (DecodeError, vdec.InvalidRevealError):
            self._convict(accuser, AlertKind.FALSE_COMPLAINT, "complaint with an invalid reveal", raw)
            return
        if plain is None:
            self._convict(d, AlertKind.BAD_SHARE, f"sub-shares for server {accuser} do not decrypt", raw)
            return
        try:
            self._parse_subshares(plain, dealing, accuser)
        except CheatingError as exc:
            self._convict(d, AlertKind.BAD_SHARE, exc.reason, raw)
            return
        self._convict(accuser, AlertKind.FALSE_COMPLAINT, f"false complaint against server {d}", raw)

    def _on_repair_request(self, sender: int, msg: RepairRequest, now: float) -> None:
        """A member whose sub-shares in decided dealings were bad asks for ours in those dealings
        (same-period repair). We answer only for a dealer its complaint convicts (judged here from
        public data): a convicted server is Byzantine, so the polynomials it dealt are known to
        the adversary already, and our points on them reveal nothing it does not know."""
        if self.kt is None:
            self._hold(sender, msg)
            return
        for raw in msg.complaints:
            self._judge(sender, raw, None)
            f = decode_signed(raw, "complain", self.period, max_size=4096).body
            d = f["dealer"]
            if f["accuser"] != sender or d not in self.convicted or d not in self.dealings:
                continue
            dealing = self.dealings[d]
            if self.me not in dealing.ciphertexts or self.me == sender:
                continue
            try:
                plain = vdec.decrypt(
                    vdec.secret_from_seed(self.encryption_seed),
                    self.encryption_public,
                    self.me,
                    dealing.ephemeral,
                    dealing.ciphertexts[self.me],
                    self._deal_context(d),
                )
                ours = self._parse_subshares(plain, dealing, self.me)
            except (vdec.DecryptionError, CheatingError):
                continue  # bad for us too: we have nothing to give
            values = {sid: [z, dict(g)] for sid, (z, g) in ours.items()}
            self._send(sender, "repair", {"dealer": d, "values": values})

    def _convict(self, who: int, kind: AlertKind, reason: str, evidence: bytes) -> None:
        self.convicted.setdefault(who, reason)
        self._alert(kind, who, reason, evidence=(evidence,))

    def _on_want(self, sender: int, msg: Want, now: float) -> None:
        for h in msg.digests:
            raw = self._raw_dealings.get(h)
            if raw is not None:
                self._send(sender, "deal", raw)

    def _want_missing(self, now: float) -> None:
        """Ask everyone for dealings a proposal or the decision names and we lack (lost messages)."""
        if self.s_engine is None or now - self._want_sent < self.timeout:
            return
        wanted: set[bytes] = set()
        decision = getattr(self, "_s_decision", None)
        if decision is not None:
            decided = _decode_s_value(decision.value, self.period).values()
            wanted |= {h for h in decided if h not in self._raw_dealings}
        for p in self._s_values_seen():
            wanted |= {h for h in p.values() if h not in self._raw_dealings}
        if wanted:
            self._want_sent = now
            self._send(EVERYONE, "want", sorted(wanted)[: self.c.n])

    def _s_values_seen(self) -> list[dict[int, bytes]]:
        assert self.s_engine is not None
        out = []
        for value in list(self.s_engine._values.values())[-4:]:
            try:
                out.append(_decode_s_value(value, self.period))
            except DecodeError:
                continue
        return out

    def _open_s_engine(self, now: float) -> None:
        assert self.kt is not None
        inst = Instance(self.context, self.period, "dealings")
        # Only operational members vote on the dealings: a vote then means "I hold my old share
        # and valid sub-shares of every dealing", so a decision leaves q-t >= t+1 honest servers
        # that compute the new sharing themselves (a recovering member could not).
        keys = {i: self.kt.table.entries[i].verify_key for i in self.kt.operational}
        committee = Committee(self.c.n, self.c.t, keys, rotation=self.period + 1)
        safety = (
            SafetyRules(inst, self.signer, _DurableSafety(self.durable, self.period))
            if self._is_member and self.status == Status.OPERATIONAL and self.me in self.kt.operational
            else None
        )
        self.s_engine = Engine(
            me=self.me,
            inst=inst,
            committee=committee,
            safety=safety,
            app=_DealingsApp(self),
            base_timeout=self.timeout,
            now=now,
            on_decide=self._s_decided,
        )

    def _on_agree_s(self, sender: int, msg: Agree, now: float) -> None:
        if self.s_engine is None:
            self._hold(sender, msg)
            return
        self.s_engine.deliver(sender, msg.msg, now)
        self._collect(self.s_engine)

    def _usable(self, d: int) -> bool:
        return d in self.dealings and d not in self.convicted

    def propose_dealings(self) -> bytes | None:
        assert self.kt is not None
        # A dealing is proposed once n-t members said whether their sub-shares in it are good
        # (or complained): a bad dealing is then convicted before it can be proposed.
        enough = self.c.n - self.c.t
        good = [
            d
            for d in self.kt.operational
            if self._usable(d)
            and (d in self.my_subshares or not self._is_member)
            and len(self._checked.get(self.dealings[d].digest, ())) >= min(enough, len(self.kt.table.entries))
        ]
        if len(good) < self.c.t + 1:
            return None
        members = len(self.kt.table.entries)
        everyone = len(good) == len(self.kt.operational) and all(
            len(self._checked.get(self.dealings[d].digest, ())) >= members for d in good
        )  # every member has spoken about every dealing: no complaint can still be on its way
        if self._s_ready_since is None:
            self._s_ready_since = self._now
        if not everyone and self._now < self._s_ready_since + self.timeout / 4:
            return None
        return encoding.encode(
            {"period": self.period, "dealings": {d: self.dealings[d].digest for d in good}}
        )

    def validate_dealings(self, value: bytes) -> Verdict:
        assert self.kt is not None
        try:
            chosen = _decode_s_value(value, self.period)
        except DecodeError as exc:
            return reject(str(exc))
        if len(chosen) < self.c.t + 1:
            return reject(f"only {len(chosen)} dealings, need t+1")
        for d, h in chosen.items():
            if d not in self.kt.operational:
                return reject(f"server {d} is not an operational member")
            if d in self.convicted:
                return reject(f"server {d} was convicted: {self.convicted[d]}")
            if h not in self._raw_dealings:
                return reject(f"server {d} signed two dealings") if h in self._other_dealings else WAIT
            if self.dealings[d].digest != h:
                return reject(f"server {d}: another dealing than ours")
            if self._is_member and d not in self.my_subshares:
                return reject(f"our sub-shares from server {d} are bad")
        return ACCEPT

    def _s_decided(self, decision: Decision) -> None:
        self._s_decision = decision
        self._try_finish_decision()

    def _try_finish_decision(self) -> None:
        """The decision of S: compute the new sharing and shares, persist, erase the old ones."""
        decision = getattr(self, "_s_decision", None)
        if decision is None or self.decided or self.kt is None:
            return
        chosen = _decode_s_value(decision.value, self.period)
        for d, h in chosen.items():
            if h not in self._raw_dealings and h in self._other_dealings:
                # The dealer signed two dealings and the decision names the one we saw second:
                # it replaces the first; our sub-shares are taken from it if they are good.
                dealing = self._parse_dealing(self._other_dealings.pop(h))
                self._raw_dealings[h] = dealing.raw
                self.dealings[d] = dealing
                self.my_subshares.pop(d, None)
                if self._is_member and self.me in dealing.ciphertexts:
                    self._complaint_about(dealing)
        if any(h not in self._raw_dealings for h in chosen.values()):
            return  # the bodies arrive (or are asked for) later
        dealings = {d: self.dealings[d] for d in chosen}
        transcript = Transcript(
            self.period,
            self.kt.value,
            self._kt_qc,
            decision.value,
            decision.qc,
            {d: x.raw for d, x in dealings.items()},
        )
        self._decide(transcript, dealings)


#: The handler of each phase of the refresh, by method name ("": nothing to do).
_HANDLERS = {
    "ann": "_on_ann",
    "attest": "_on_attest",
    "agree/keytable": "_on_agree_kt",
    "deal": "_on_deal",
    "want": "_on_want",
    "checked": "_on_checked",
    "agree/dealings": "_on_agree_s",
    "catchup": "_on_catchup",
    "undecided": "",
    "signed-kt": "_on_signed_kt",
    "nonce": "_frost_message",
    "signreq": "_frost_message",
    "sigshare": "_frost_message",
    "kt-sig": "_on_kt_sig",
    "rpoint": "_on_rpoint",
    "phase2": "_on_phase2",
    "repair-req": "_on_repair_request",
    "repair": "_on_repair",
}


class PeriodRefresh(DealingStage):
    """The refresh of ``period`` at server ``me`` (sans-IO): from the clock's start to completion."""

    def __init__(
        self,
        *,
        me: int,
        period: int,
        vstart: bytes,
        public: PublicData,
        private: PrivateData | None,
        rand: RandomBytes,
        durable: Durable,
        now: float,
        code: CodeCheck | None = None,
        ann_key: annkey.AnnouncementSigner | None = None,
    ) -> None:
        self.me = me
        self.my_ann = b""
        self.code = code
        #: Our announcement key (the TPM's), if our ROM is a TPM: signs our clear announcements.
        self.ann_key = ann_key
        self._anns_parsed: dict[tuple[bytes, tuple[tuple[int, bytes], ...]], Ann] = {}
        self._chains: list[bytes] = []
        self.period = period
        self.vstart = vstart
        self.rand = rand
        self.durable = durable
        self.alerts: list[Alert] = []
        self.rejected: list[RemoteProtocolError] = []
        self.outcome: Outcome | None = None
        self.outcome_version = 0
        self.decided = False
        self.complete = False
        self._now = now
        self._out: list[Outgoing] = []
        self._held: dict[int, list[Message]] = {}
        self._spent: dict[int, int] = {}
        self._old_public = public
        self._old_private = private
        # Table 2: M and the newest KeyTable we know (ours, or pushed by a peer).
        self.m: InvariantInfo | None = None
        self.old_table: KeyTable | None = None
        self._prev: tuple[KeyTable | None, bytes] | None = None  # old_table and its digest
        self._timeout: tuple[InvariantInfo | None, float] | None = None  # M and its base timeout
        self.status = Status.RECOVERING
        self.keys: dict[str, KeyShare[Any]] = {}
        self._pushed_sharings: dict[str, dict[bytes, PublicSharing[Any]]] = {}
        self._check_m(public.m)
        table = public.key_table
        if table is not None and self.m is not None and table.period < period and table.verify(self.m.vcert):
            self.old_table = table
        for sid, sh in public.sharings.items():
            self._remember_sharing(sid, sh)
        # Agreement state.
        self.kt_engine: Engine | None = None
        self.kt: KeyTableCandidate | None = None
        self.s_engine: Engine | None = None
        self.anns: dict[int, dict[bytes, Ann]] = {}
        #: TPM-signed clear announcements (two per author at most: the evidence), forwarded once.
        self.bound: dict[int, dict[bytes, Ann]] = {}
        #: Announcements the author's TPM did not sign, received on the author's connection.
        self._unbound: dict[int, list[bytes]] = {}
        self.clear: dict[int, dict[bytes, dict[int, bytes]]] = {}
        self._clear_anns: dict[bytes, Ann] = {}
        self.conflicts: set[int] = set()
        self._forwarded: set[bytes] = set()
        self._ready_since: float | None = None
        self.dealings: dict[int, Dealing] = {}
        self._other_dealings: dict[bytes, bytes] = {}
        self._raw_dealings: dict[bytes, bytes] = {}
        self.my_subshares: dict[int, dict[str, tuple[int, dict[int, int]]]] = {}
        self.convicted: dict[int, str] = {}
        self._complaints: dict[tuple[int, int], bytes] = {}
        self._checked: dict[bytes, set[int]] = {}
        self._s_ready_since: float | None = None
        self._want_sent = -1.0
        self._ann_sent = now
        self._late_answered: dict[int, float] = {}
        self._phase2_answered: dict[int, float] = {}
        self._pushed_to: dict[int, float] = {}
        self._undecided_sent = now
        # Phase II.
        self.transcript: Transcript | None = None
        self.new_keys: dict[str, KeyShare[Any]] = {}
        self.new_sharings: dict[str, PublicSharing[Any]] = {}
        self.rpoints: dict[int, dict[str, int]] = {}
        self.signed_table: KeyTable | None = None
        self._frost = _FrostState(self._kt_payload, self._kt_signed, lambda: self.signed_table is not None)
        self._rpoint_values: dict[str, dict[int, int]] = {}
        self._rpoints_sent = False
        self._pinged = -1e9
        self._repair: dict[int, dict[str, dict[int, tuple[int, dict[int, int] | None]]]] = {}
        self._repair_request: list[bytes] = []
        self._repair_sent = -1e9
        self._partial: dict[str, int] = {}
        self._partial_rpoints: dict[int, dict[str, int]] = {}
        if (
            public.transcript is not None
            and public.transcript.period == period
            and not public.complete
            and private is not None
            and private.period == period
        ):
            self._resume(public.transcript, private)
            return
        self._new_period_keys()
        if self.m is not None:
            self._start(now)

    # Small helpers ------------------------------------------------------------------------------

    @property
    def ann_keys(self) -> Mapping[int, bytes]:
        """The announcement keys in M (servers whose ROM is a TPM)."""
        return self.m.ann_keys if self.m is not None else {}

    @property
    def prev(self) -> bytes:
        """The digest of the previous KeyTable, which a TPM-signed announcement is bound to."""
        table = self.old_table
        if self._prev is None or self._prev[0] is not table:  # KeyTables are immutable
            self._prev = (table, keytable_digest(table))
        return self._prev[1]

    def _judge_kt(self, value: bytes) -> KeyTableCandidate:
        return judge_keytable(value, self.period, self.c, self.old_keys, self._parse_ann)

    def _parse_ann(self, raw: Any, period: int, old_keys: Mapping[int, bytes]) -> Ann:
        """parse_ann, once per distinct announcement (every copy is forwarded n times)."""
        prev = self.prev
        key = (raw + prev, tuple(sorted(old_keys.items()))) if isinstance(raw, bytes) else None
        if key is not None:
            hit = self._anns_parsed.get(key)
            if hit is not None:
                return hit
        ann = parse_ann(raw, period, old_keys, self.ann_keys, prev)
        if key is not None and len(self._anns_parsed) < 8 * 64:
            self._anns_parsed[key] = ann
        return ann

    @property
    def c(self) -> Constants:
        if self.m is None:
            raise LocalProtocolError("constants not known yet")
        return self.m.constants

    @property
    def timeout(self) -> float:
        m = self.m  # read at every tick and message: computed once per M (M is immutable)
        if self._timeout is None or self._timeout[0] is not m:
            self._timeout = (m, base_timeout(self.c))
        return self._timeout[1]

    def _check_m(self, m: InvariantInfo | None) -> None:
        if m is None:
            return
        problem = m.check(self.me, self.vstart)
        if problem is not None:
            self._alert(AlertKind.INVALID_M, self.me, f"own copy of M rejected: {problem}")
            return
        self.m = m

    def _remember_sharing(self, sid: str, sharing: PublicSharing[Any]) -> None:
        if self.m is None or sid not in self.c.secrets:
            return
        got = self._pushed_sharings.setdefault(sid, {})
        if len(got) < 2 * self.c.n:
            got.setdefault(sharing_digest(self.c.group(sid), sharing), sharing)

    def _new_period_keys(self) -> None:
        """Fresh period keys, saved before anything that carries them is sent (a restart reuses them)."""
        raw = self.durable.get(f"{self.period}/keys")
        if raw is None:
            raw = self.rand(32) + self.rand(32)
            self.durable.put(f"{self.period}/keys", raw)
        self.signing_seed, self.encryption_seed = raw[:32], raw[32:]
        self.signer = Signer(SigningKey(self.signing_seed))
        self.encryption_public = vdec.public_from_seed(self.encryption_seed)
        self.my_entry = KeyEntry(
            self.signer.public,
            self.encryption_public,
            self.signer.sign(encryption_key_payload(self.me, self.period, self.encryption_public)),
        )

    # Driving ---------------------------------------------------------------------------------------

    def receive(self, sender: int, phase: str, body: Any, size: int, now: float) -> None:
        """A message whose envelope the caller decoded (once): its body is typed here, at the
        boundary (messages.parse), then handled; bad input is recorded, never raised."""
        self._now = now
        spent = self._spent.get(sender, 0) + size
        self._spent[sender] = spent
        if spent > PEER_BUDGET:
            if spent - size <= PEER_BUDGET:
                self.rejected.append(RemoteProtocolError(sender, "sent more than its byte budget; ignored"))
            return
        try:
            # Lists are bounded by n; a server that lost M (hence C) holds such messages until
            # PushM, with the bound every network fits in.
            msg = parse_message(phase, body, self.m.constants.n if self.m is not None else MAX_LIST)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{phase}: {exc}"))
            return
        self._inject(sender, msg, now)

    def _inject(self, sender: int, msg: Message, now: float) -> None:
        self._now = now
        phase = msg.phase
        try:
            self._dispatch(sender, msg, now)
        except DecodeError as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{phase}: {exc}"))
        except BadSignature as exc:
            self.rejected.append(RemoteProtocolError(sender, f"{phase}: {exc}"))
        except RemoteProtocolError as exc:
            self.rejected.append(exc)

    def tick(self, now: float) -> list[Outgoing]:
        self._now = now
        if self._code_pending == 2:
            self._ask_code_check()
        self._advance(now)
        out, self._out = self._out, []
        if self._code_pending == 1 and self._started:
            self._code_pending = 2  # our announcement leaves with this tick's messages
        return out

    #: 0: no code check due (or it passed); 1: due once our announcement has left; 2: due at the
    #: next tick; 3: asked of the owner (:attr:`code_request`), its result not in yet.
    _code_pending = 0
    #: The code check asked of the owner and not yet taken by it (:meth:`take_code_request`).
    code_request: CodeCheckRequest | None = None
    #: The code check whose result we wait for (an older one's result is ignored).
    _code_asked: CodeCheckRequest | None = None
    #: A decision that waits for our code check's OK.
    _deferred: tuple[Transcript, Mapping[int, Dealing]] | None = None

    def _ask_code_check(self) -> None:
        """A recovering server's code check (``code.check``: it hashes the installed code, about
        0.2 s warm and many seconds cold on a loaded machine), asked of the owner, which runs it
        off its event loop: until the result comes back (:meth:`code_checked`) we go on with the
        refresh (announce, relay, vote, catch up) but rebuild nothing (``_decide`` waits for it).
        Asked after our clear announcement has left, never before it: run before (and on the
        loop), it made the announcement late beyond the first leader's grace, and the KeyTable
        went on without us, period after period (issue 8, docs/tsa.md)."""
        if self.code is None or self.m is None:
            self._code_pending = 0
            return
        self._code_pending = 3
        self.code_request = self._code_asked = CodeCheckRequest(self.period, self.m, tuple(self._chains))

    def take_code_request(self) -> CodeCheckRequest | None:
        """The code check the owner must run now (once), if any."""
        request, self.code_request = self.code_request, None
        return request

    def code_checked(self, request: CodeCheckRequest, problem: str | None, now: float) -> None:
        """The result of ``request`` (None: the installed code is the code in force). OK, a
        decision that waited for it goes ahead; otherwise a code-mismatch alert, and we stay
        recovering with nothing rebuilt."""
        self._now = now
        if request is not self._code_asked or self._code_pending != 3 or self.complete:
            return  # a check asked before we restarted as recovering (a newer one is due)
        self._code_asked = None
        self._code_pending = 0
        if problem is None:
            deferred, self._deferred = self._deferred, None
            if deferred is not None and not self.decided:
                self._decide(*deferred)
            return
        self._deferred = None
        self._alert(AlertKind.CODE_MISMATCH, self.me, f"refusing recovery: {problem}")
        self.complete = True
        failure = f"the installed code is not the code in force: {problem}"
        self._set_outcome(Outcome(Status.RECOVERING, self._old_public, None, list(self.alerts), failure))

    def next_wakeup(self, now: float) -> float | None:
        times = [e.next_wakeup(now) for e in (self.kt_engine, self.s_engine) if e is not None]
        if self.m is not None and not self.complete:
            times.append(now + self.timeout / 4)
        return min((t for t in times if t is not None), default=None)

    def take_held(self) -> dict[int, list[Message]]:
        """Messages held for a later step (the owner hands them to the engine that resumes us)."""
        held, self._held = self._held, {}
        return held

    def give_held(self, held: Mapping[int, list[Message]], now: float) -> None:
        self._now = now
        for sender, items in held.items():
            for msg in items:
                self._inject(sender, msg, now)

    def _dispatch(self, sender: int, msg: Message, now: float) -> None:
        if self.complete and not self.resumed:
            return  # overtaken, or refused to recover: this engine has nothing more to do or say
        phase = msg.phase
        if isinstance(msg, PushM):
            self._on_pushm(sender, msg, now)
            return
        if self.m is None or (self.old_table is None and phase != "catchup"):
            self._hold(sender, msg)
            return
        if self.resumed and phase in _PHASE_ONE:
            self._answer_late(sender, msg, now)
            return
        name = _HANDLERS.get(phase)
        if name is None:
            raise RemoteProtocolError(sender, f"unknown refresh phase {phase!r}")
        if name:
            handler: Callable[[int, Any, float], None] = getattr(self, name)  # a subclass's, if any
            handler(sender, msg, now)

    def _answer_late(self, sender: int, msg: Message, now: float) -> None:
        """A peer still deciding a period we decided: the transcript lets it decide too."""
        assert self.transcript is not None
        if isinstance(msg, Want):
            for raw in self.transcript.dealings.values():
                if digest(raw) in msg.digests:
                    self._send(sender, "deal", raw)
            return
        if now - self._late_answered.get(sender, -1e9) < self.timeout:
            return
        self._late_answered[sender] = now
        self._send(sender, "catchup", self.transcript.encode())
        if self.signed_table is not None:
            self._send(sender, "signed-kt", self.signed_table.encode())

    def _advance(self, now: float) -> None:
        if self.m is None:
            return
        if self.old_table is not None and not self._started:
            self._start(now)
        for engine, name in ((self.kt_engine, "agree/keytable"), (self.s_engine, "agree/dealings")):
            if engine is not None:
                for to, obj in engine.tick(now):
                    self._send(to, name, obj)
        if self.kt is None and self.my_ann and not self.complete and now - self._ann_sent >= self.timeout:
            # Until the KeyTable is decided our announcement is sent again now and then: it may
            # have been lost (connections still coming up after a restart, a partition).
            self._ann_sent = now
            self._send(EVERYONE, "ann", self.my_ann)
        if self.kt is not None and not self.decided:
            self._want_missing(now)
        waiting = self._started and not self.decided and not self.complete
        if waiting and now - self._undecided_sent >= self.timeout:
            # Still undecided after a timeout: a peer that decided answers with the transcript and
            # the signed KeyTable. Sent at a steady pace (the engines' own timeouts double), so a
            # server whose messages were lost learns the decision within a timeout of reconnecting.
            self._undecided_sent = now
            self._send(EVERYONE, "undecided", None)
        if self.resumed and not self.complete:
            self._phase_two(now)

    _started = False
    _started_at = 0.0
    resumed = False

    # PushM (Table 2) ---------------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        """Once M and the previous KeyTable are known: decide our status, push, announce."""
        if self._started or self.m is None:
            return
        if self.old_table is None:
            return
        self._started = True
        self._started_at = now
        self._decide_status()
        if self.status != Status.OPERATIONAL and self.code is not None:
            # A recovering server checks its code against the C in force (M's, after the upgrade
            # chain its peers pushed) before it accepts anything that rebuilds its shares: asked
            # at the tick after the one that sends our announcement (see _ask_code_check).
            self._code_pending = 1
        if self.status == Status.OPERATIONAL:
            self._push()
        self._announce(now)
        self._open_kt_engine(now)
        self._replay(now)

    def _push_again(self, to: int, now: float) -> None:
        """A recovering server announced itself, or a server announced itself with a key not in
        our KeyTable: it may have missed our PushM (sent once, at the start, while it may have
        been catching up or restarting, and a retiring key-holder child drops what it held),
        and with an older KeyTable it can verify nothing of this period. Send it again, at most
        once per timeout per server."""
        if self.status != Status.OPERATIONAL or not self._started or self.complete:
            return
        if now - self._pushed_to.get(to, -1e9) < self.timeout:
            return
        self._pushed_to[to] = now
        self._push(to)

    def _push(self, to: int = EVERYONE) -> None:
        assert self.m is not None and self.old_table is not None
        pub = self._old_public
        body = {
            "M": self.m.encode(),
            "keytable": self.old_table.encode(),
            "sharings": {sid: sharing_to_obj(self.c.group(sid), k.public) for sid, k in self.keys.items()},
            "transcript": pub.transcript.encode() if pub.transcript is not None else None,
            "upgrades": self.code.chain() if self.code is not None else None,
        }
        self._send(to, "pushm", body)

    def _on_pushm(self, sender: int, msg: PushM, now: float) -> None:
        upgrades = msg.upgrades
        if upgrades is not None and upgrades not in self._chains and len(self._chains) < 64:
            self._chains.append(upgrades)
        m = InvariantInfo.decode(msg.m)
        if self.m is None:
            problem = m.check(self.me, self.vstart)
            if problem is not None:
                raise RemoteProtocolError(sender, f"PushM: M not verifiable with our Vstart: {problem}")
            self.m = m
        table = KeyTable.decode(msg.keytable)
        if not table.verify(self.m.vcert):
            raise RemoteProtocolError(sender, "PushM: KeyTable not signed with Scert")
        for sid, obj in msg.sharings.items():
            if isinstance(sid, str) and sid in self.c.secrets:
                self._remember_sharing(sid, sharing_from_obj(self.c.group(sid), obj))
        if table.period >= self.period:
            return
        if self.old_table is None or table.period > self.old_table.period:
            if self._started and self.kt is None:
                # A newer KeyTable than the one we started with: we missed a period, so our data
                # is stale and we take part as a recovering server from now on.
                self._restart_recovering(table, now)
                return
            if not self._started:
                self.old_table = table
        self._start(now)

    def _decide_status(self) -> None:
        """Operational iff we hold the newest KeyTable's key for us and shares matching its sharing."""
        self.status = Status.RECOVERING
        self.keys = {}
        self.old_signer: Signer | None = None
        pub, priv, table = self._old_public, self._old_private, self.old_table
        if table is None or priv is None or priv.period != table.period:
            return
        key = SigningKey(priv.signing_seed)
        entry = table.entries.get(self.me)
        if entry is None or bytes(key.verify_key) != entry.verify_key:
            return
        keys: dict[str, KeyShare[Any]] = {}
        for sid in self.c.secrets:
            sharing = pub.sharings.get(sid)
            share = priv.shares.get(sid)
            if sharing is None or share is None or share.wiped:
                return
            k = KeyShare(self.me, SecretScalar(share.value, self.c.group(sid).order), sharing)
            if sharing.n != self.c.n or sharing.t != self.c.t or not k.check(self.c.group(sid)):
                return
            keys[sid] = k
        self.keys = keys
        self.old_signer = Signer(key)
        self.status = Status.OPERATIONAL

    def _restart_recovering(self, table: KeyTable, now: float) -> None:
        """A pushed KeyTable newer than ours: we missed a period and take part as recovering."""
        self.old_table = table
        self.status = Status.RECOVERING
        self.keys = {}
        self.old_signer = None
        self.bound.clear()  # bound to the older KeyTable's digest: no peer takes them any more
        if self.code is not None:
            self._code_pending = 1  # now a recovering server: its code is checked too
        self._announce(now)
        self._open_kt_engine(now)

    # Announce (Table 1 steps 1-3) ----------------------------------------------------------------

    @property
    def old_keys(self) -> dict[int, bytes]:
        return {i: e.verify_key for i, e in self.old_table.entries.items()} if self.old_table else {}

    def _announce(self, now: float) -> None:
        clear = self.status != Status.OPERATIONAL
        key = f"{self.period}/ann/{'clear' if clear else 'auth'}"
        raw = self.durable.get(key)
        if raw is not None and self.me in self.ann_keys:
            try:
                self._parse_ann(raw, self.period, self.old_keys)
            except (DecodeError, BadSignature):
                raw = None  # bound to an older KeyTable than the one we now hold: sign again
        if raw is None:
            sharings = (
                {}
                if clear
                else {
                    sid: sharing_digest(self.c.group(sid), k.public) for sid, k in sorted(self.keys.items())
                }
            )
            body = {"server": self.me, "K": self.my_entry.to_obj(), "sharings": sharings, "clear": clear}
            if self.me in self.ann_keys:
                tpm = self._tpm_signature()
                if tpm is not None:
                    body["tpm"] = tpm
            signer = self.signer if clear or self.old_signer is None else self.old_signer
            raw = sign("announce", self.period, body, signer)
            self.durable.put(key, raw)
        self.my_ann = raw
        try:
            ann = self._parse_ann(raw, self.period, self.old_keys)
        except UnboundAnnouncement:
            # Our announcement key is unusable (said by an alert): peers discard this announcement,
            # and we stay recovering until the TPM signs again.
            self._send(EVERYONE, "ann", raw)
            return
        if ann.clear and ann.bound:
            self._send(EVERYONE, "ann", raw)
            self._learn_bound(ann)
        elif ann.clear:
            self._send(EVERYONE, "ann", raw)
            self._on_ann(self.me, Signed("ann", raw), now)
        else:
            self._learn(ann)

    def _tpm_signature(self) -> bytes | None:
        """Our announcement key's signature over our new K_i and the previous KeyTable's digest."""
        mine = self.ann_keys[self.me]
        if self.ann_key is None:
            self._alert(
                AlertKind.RECOVERY_FAILED,
                self.me,
                "M holds an announcement key for this server but none was given (is the ROM's TPM "
                "configured?): its announcements will be discarded",
            )
            return None
        try:
            if self.ann_key.public != mine:
                self._alert(
                    AlertKind.RECOVERY_FAILED,
                    self.me,
                    "this server's TPM holds another announcement key than M: its announcements "
                    "will be discarded",
                )
                return None
            return self.ann_key.sign(ann_tpm_payload(self.period, self.me, self.prev, self.my_entry))
        except annkey.SigningUnavailable as exc:
            self._alert(AlertKind.RECOVERY_FAILED, self.me, f"the announcement key cannot sign: {exc}")
            return None

    def _on_ann(self, sender: int, msg: Signed, now: float) -> None:
        body = msg.data
        try:
            ann = self._parse_ann(body, self.period, self.old_keys)
        except UnboundAnnouncement as exc:
            if exc.server == sender != self.me:
                # On the author's own connection, an announcement the author's TPM did not sign:
                # someone else speaks for it (an impostor: a thief of its period or transport
                # keys). Discarded; named once the KeyTable is decided, when our previous
                # KeyTable is surely the network's (a stale one makes a genuine one look unbound),
                # or at once if it is decided already (the impostor spoke late).
                unbound = self._unbound.setdefault(sender, [])
                if body not in unbound and len(unbound) < 4:
                    unbound.append(body)
                if self.kt is not None:
                    self._name_impostors()
                self._push_again(sender, now)
                return
            raise
        except (DecodeError, BadSignature, RemoteProtocolError):
            # Not signed with a key of our KeyTable: the sender may hold an older one (it was
            # down for a refresh and missed our PushM, sent once, at the start). Push again.
            self._push_again(sender, now)
            raise
        if not ann.clear:
            self._learn(ann)
            return
        if ann.clear and ann.bound:
            self._learn_bound(ann)
            if sender == ann.server:
                self._push_again(sender, now)
            return
        if ann.clear:
            if sender != ann.server:
                return  # a clear announcement counts only from the author's own connection
            got = self.clear.setdefault(ann.server, {})
            if ann.digest not in got and len(got) >= 2:
                return
            self._clear_anns[ann.digest] = ann
            self._push_again(sender, now)
            atts = got.setdefault(ann.digest, {})
            if self.old_signer is not None and self.me not in atts and self.me in self.old_keys:
                att = attestation(self.period, ann.server, ann.digest, self.old_signer)
                atts[self.me] = att
                self._send(EVERYONE, "attest", {"ann": ann.raw, "attest": att, "by": self.me})

    def _learn(self, ann: Ann) -> None:
        """An authenticated announcement: kept (two per author at most: the evidence), forwarded once."""
        seen = self.anns.setdefault(ann.server, {})
        if ann.digest in seen or len(seen) >= 2:
            return
        seen[ann.digest] = ann
        if len(seen) == 2:
            first, second = list(seen.values())
            self.conflicts.add(ann.server)
            self._alert(
                AlertKind.CONFLICTING_ANNOUNCEMENTS,
                ann.server,
                "two different authenticated key announcements (rule i: both discarded; stolen period key?)",
                evidence=(first.raw, second.raw),
            )
        self._stolen_period_key(ann.server)
        if ann.digest not in self._forwarded:
            self._forwarded.add(ann.digest)
            self._send(EVERYONE, "ann", ann.raw)

    def _learn_bound(self, ann: Ann) -> None:
        """A TPM-signed clear announcement: it needs no attestation and counts from any relayer,
        so it is kept (two per author at most: the evidence) and forwarded once, like an
        authenticated one. Two different ones mean the TPM signed twice for one period: whoever
        holds the server's TPM now is not the server we knew (rule i applies)."""
        seen = self.bound.setdefault(ann.server, {})
        if ann.digest in seen or len(seen) >= 2:
            return
        seen[ann.digest] = ann
        if len(seen) == 2:
            first, second = list(seen.values())
            self._alert(
                AlertKind.CONFLICTING_ANNOUNCEMENTS,
                ann.server,
                "two different TPM-signed clear announcements (both discarded; someone uses its TPM?)",
                evidence=(first.raw, second.raw),
            )
        self._stolen_period_key(ann.server)
        if ann.digest not in self._forwarded:
            self._forwarded.add(ann.digest)
            self._send(EVERYONE, "ann", ann.raw)

    def _name_impostors(self) -> None:
        """At the decision: each announcement received on its author's own connection that its
        TPM did not sign for the previous KeyTable (now surely the network's) names an impostor."""
        for server, raws in sorted(self._unbound.items()):
            for raw in raws:
                try:
                    self._parse_ann(raw, self.period, self.old_keys)
                except UnboundAnnouncement as exc:
                    self._alert(
                        AlertKind.CONFLICTING_ANNOUNCEMENTS,
                        server,
                        f"an impostor: an announcement on this server's connection {exc.why} (discarded)",
                        evidence=(raw,),
                    )
                except (DecodeError, BadSignature):
                    pass
        self._unbound.clear()

    def _bound_ann(self, i: int) -> Ann | None:
        """Server i's one TPM-signed clear announcement (None: none, or two)."""
        got = list(self.bound.get(i, {}).values())
        return got[0] if len(got) == 1 else None

    def _stolen_period_key(self, i: int) -> None:
        """Both a TPM-signed clear announcement (server i lost its keys) and one signed with its
        previous period key (TPM-signed too where i has an announcement key: it lost its data
        after announcing, or someone uses its TPM). The clear one counts: its keys are the ones
        the server holds now."""
        bound, auth = self._bound_ann(i), list(self.anns.get(i, {}).values())
        if bound is not None and auth:
            self._alert(
                AlertKind.CONFLICTING_ANNOUNCEMENTS,
                i,
                "an authenticated and a clear announcement, both TPM-signed (lost its data after "
                "announcing, or someone uses its TPM); the clear one counts",
                evidence=(auth[0].raw, bound.raw),
            )

    def _on_attest(self, sender: int, msg: Attestation, now: float) -> None:
        if msg.by != sender:
            raise RemoteProtocolError(sender, "attestation signed for another server")
        ann = self._parse_ann(msg.ann, self.period, self.old_keys)
        if not ann.clear or ann.bound:
            raise RemoteProtocolError(sender, "attestation of an authenticated or TPM-signed announcement")
        if not check_attestation(msg.attest, self.period, sender, ann.server, ann.digest, self.old_keys):
            raise RemoteProtocolError(sender, "attestation does not verify")
        got = self.clear.setdefault(ann.server, {})
        if ann.digest not in got and len(got) >= 2:
            return
        self._clear_anns[ann.digest] = ann
        got.setdefault(ann.digest, {})[sender] = msg.attest

    # Agreement 1: the KeyTable ------------------------------------------------------------------------

    def _open_kt_engine(self, now: float) -> None:
        assert self.old_table is not None
        inst = Instance(CONTEXT, self.period, "keytable")
        committee = Committee(self.c.n, self.c.t, self.old_keys, rotation=self.period)
        member = self.status == Status.OPERATIONAL and self.old_signer is not None
        safety = (
            SafetyRules(inst, self.old_signer, _DurableSafety(self.durable, self.period))
            if member and self.old_signer
            else None
        )
        self.kt_engine = Engine(
            me=self.me,
            inst=inst,
            committee=committee,
            safety=safety,
            app=_KeyTableApp(self),
            base_timeout=self.timeout,
            now=now,
            on_decide=self._kt_decided,
        )

    def _on_agree_kt(self, sender: int, msg: Agree, now: float) -> None:
        if self.kt_engine is None:
            self._hold(sender, msg)
            return
        self.kt_engine.deliver(sender, msg.msg, now)
        self._collect(self.kt_engine)

    def _attested_clear(self) -> list[int]:
        """Recovering servers whose one clear announcement we hold with t+1 attestations, and
        nothing that counts over it (an authenticated or TPM-signed one, two keys)."""
        out = []
        for i, got in self.clear.items():
            if self.anns.get(i) or self.bound.get(i) or i in self.conflicts:
                continue
            if len([d for d, atts in got.items() if len(atts) >= self.c.t + 1]) == 1:
                out.append(i)
        return out

    def _kt_candidate_entries(self) -> dict[int, dict[str, Any]] | None:
        entries: dict[int, dict[str, Any]] = {}
        for i in self.c.ids:
            bound = self._bound_ann(i)
            if bound is not None:
                entries[i] = {"ann": bound.raw, "attest": {}}
                continue
            if self.bound.get(i):
                continue  # two TPM-signed announcements: none counts (rule i)
            if i in self.conflicts:
                continue
            auth = list(self.anns.get(i, {}).values())
            if len(auth) == 1:
                entries[i] = {"ann": auth[0].raw, "attest": {}}
                continue
            if auth:
                continue
            attested = [(d, atts) for d, atts in self.clear.get(i, {}).items() if len(atts) >= self.c.t + 1]
            if len(attested) == 1:
                d, atts = attested[0]
                entries[i] = {"ann": self._clear_anns[d].raw, "attest": dict(atts)}
        return entries

    def propose_keytable(self) -> bytes | None:
        entries = self._kt_candidate_entries()
        if entries is None:
            return None
        agreed: dict[str, bytes] = {}
        for sid in self.c.secrets:
            counts: dict[bytes, int] = {}
            for i, e in entries.items():
                a = self.anns.get(i, {}).get(digest(e["ann"]))
                if a is not None and sid in a.sharings:
                    counts[a.sharings[sid]] = counts.get(a.sharings[sid], 0) + 1
            best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            if not best or best[0][1] < self.c.t + 1:
                return None
            agreed[sid] = best[0][0]
        everyone = len(entries) == self.c.n
        if len(entries) < self.c.n - self.c.t and not everyone:
            return None
        if self._ready_since is None:
            self._ready_since = self._now
        if not everyone and self._now < self._ready_since + self.timeout / 4:
            return None  # a short grace for the stragglers' announcements
        if self._now < self._ready_since + self.timeout / 2 and any(
            i not in entries and self.clear.get(i) for i in self.c.ids
        ):
            # ... longer for a recovering server whose clear announcement we hold but whose
            # attestations are still on their way (one more message delay than an operational
            # server's; left out, it stays recovering for a whole period).
            return None
        value = encoding.encode({"period": self.period, "entries": entries, "sharings": agreed})
        try:
            self._judge_kt(value)
        except InvalidProposal:
            return None
        return value

    def validate_keytable(self, value: bytes, view: int) -> Verdict:
        try:
            cand = self._judge_kt(value)
        except InvalidProposal as exc:
            return reject(str(exc))
        for i, ann in cand.anns.items():
            if ann.clear and ann.bound:
                self._learn_bound(ann)
                if self._bound_ann(i) is None:
                    return reject(f"server {i}'s TPM signed two different announcements")
                continue
            if self.bound.get(i):
                return reject(f"server {i} has a TPM-signed announcement, which counts over this one")
            if i in self.conflicts:
                return reject(f"server {i} announced two different keys")
            if not ann.clear:
                self._learn(ann)  # another key for i than the one we hold is evidence (rule i)
                if i in self.conflicts:
                    return reject(f"server {i} announced two different keys")
            elif self.anns.get(i):
                return reject(f"server {i} has an authenticated announcement (rule ii)")
        if view == 0:
            # The first leader must include every announcement we hold: otherwise a Byzantine
            # first leader could leave honest servers out of the KeyTable at will. A later view
            # (after a timeout) may leave out what its leader has not received.
            if len(cand.anns) < self.c.n and self._now < self._started_at + self.timeout / 2:
                # ... and we give the announcements a moment to arrive before we judge: a
                # Byzantine first leader that proposes at once could otherwise leave out honest
                # servers whose announcements are merely a little late, making the KeyTable's
                # operational members exactly a quorum with itself among them (then silent, it
                # would stop the dealings agreement for good).
                return WAIT
            for i, got in self.anns.items():
                if i not in cand.anns and i not in self.conflicts and len(got) == 1:
                    return reject(f"view 0 leaves out server {i}, whose announcement we hold")
            for i in self.bound:
                if i not in cand.anns and self._bound_ann(i) is not None:
                    return reject(f"view 0 leaves out server {i}, whose TPM-signed announcement we hold")
            for i in self._attested_clear():
                if i not in cand.anns:
                    return reject(f"view 0 leaves out server {i}, whose attested clear announcement we hold")
        mine = cand.anns.get(self.me)
        if mine is not None and mine.raw != self.my_ann:
            self._alert(
                AlertKind.CONFLICTING_ANNOUNCEMENTS,
                self.me,
                "a KeyTable proposal holds a key announcement for us that we did not make",
                evidence=(mine.raw,),
            )
            return reject("the proposal holds an announcement for us that we did not make")
        return ACCEPT

    def _kt_decided(self, decision: Decision) -> None:
        cand = self._judge_kt(decision.value)
        self.kt = cand
        self._kt_qc = decision.qc
        self._name_impostors()
        if cand.anns.get(self.me) is None or cand.anns[self.me].raw != self.my_ann:
            self._alert(
                AlertKind.OWN_KEY_MISSING,
                self.me,
                "own key announcement is missing from the decided KeyTable",
            )
        self._open_s_engine(self._now)
        if self.me in cand.operational and self.status == Status.OPERATIONAL and self._is_member:
            self._deal()
        self._replay(self._now)

    # Deal ---------------------------------------------------------------------------------------------

    def _make_dealing(self) -> bytes:
        assert self.kt is not None
        c, kt = self.c, self.kt
        commit: dict[str, Any] = {}
        plain: dict[int, dict[str, Any]] = {k: {} for k in kt.table.entries}
        for sid in sorted(c.secrets):
            group = c.group(sid)
            draw = scalar_source(self.rand, group)
            zero, subs = pss.refresh_deal(group, self.me, c.n, c.t, draw)
            rec: dict[int, Any] = {}
            blind: dict[int, dict[int, int]] = {k: {} for k in kt.operational}
            for r in kt.recovering:
                rd, rsubs = pss.recovery_deal(group, self.me, r, list(kt.operational), c.t, draw)
                rec[r] = rd.to_obj(group)["points"]
                for k in kt.operational:
                    blind[k][r] = rsubs[k]
            commit[sid] = {"zero": zero.to_obj(group)["points"], "rec": rec}
            for k in kt.table.entries:
                plain[k][sid] = {"z": subs[k], "g": blind.get(k, {})}
        kt_digest = digest(kt.value)
        context = deal_context(self.period, self.me, kt_digest)
        recipients = {k: e.encryption_key for k, e in kt.table.entries.items()}
        eph, cts = vdec.encrypt_to(
            recipients, {k: encoding.encode(p) for k, p in plain.items()}, self._scalar(ED25519), context
        )
        body = {"dealer": self.me, "kt": kt_digest, "eph": eph, "commit": commit, "ct": cts}
        return sign("deal", self.period, body, self.signer)

    # Agreement 2: the set of dealings -----------------------------------------------------------------

    def _decide(self, transcript: Transcript, dealings: Mapping[int, Dealing]) -> None:
        assert self.kt is not None
        if self._code_pending:
            # A recovering server rebuilds nothing before its code check's OK: the decision
            # waits for it (code_checked), and a failed check refuses it.
            if self._code_pending in (1, 2):
                self._ask_code_check()
            if self._code_pending:
                self._deferred = (transcript, dealings)
                return
        c = self.c
        new_sharings: dict[str, PublicSharing[Any]] = {}
        for sid in c.secrets:
            group = c.group(sid)
            old = self._pushed_sharings.get(sid, {}).get(self.kt.table.sharings[sid])
            if (
                sid in self.keys
                and sharing_digest(group, self.keys[sid].public) == self.kt.table.sharings[sid]
            ):
                old = self.keys[sid].public
            if old is None:
                continue
            new_sharings[sid] = pss.refresh_public(group, old, {d: x.zero[sid] for d, x in dealings.items()})
        helper = self.me in self.kt.operational and self.status == Status.OPERATIONAL and self._is_member
        new_keys: dict[str, KeyShare[Any]] = {}
        rpoints: dict[int, dict[str, int]] = {}
        bad = [d for d in dealings if d not in self.my_subshares]
        repair = {d: self._complaints[(self.me, d)] for d in bad if (self.me, d) in self._complaints}
        partial: dict[str, SecretScalar] = {}
        if helper and bad and len(repair) == len(bad) and len(new_sharings) == len(c.secrets):
            # Same-period repair: the decided set holds dealings whose sub-shares for us are bad
            # (our complaint came too late to keep them out). We keep s + the good sub-shares and
            # ask the others for their points on the convicted dealers' polynomials.
            for sid in c.secrets:
                q = c.group(sid).order
                good = [d for d in dealings if d in self.my_subshares]
                total = (self.keys[sid].share.value + sum(self.my_subshares[d][sid][0] for d in good)) % q
                partial[sid] = SecretScalar(total, q)
                for r in self.kt.recovering:
                    blind = sum(self.my_subshares[d][sid][1][r] for d in good) % q
                    rpoints.setdefault(r, {})[sid] = blind
        elif helper and not bad and len(new_sharings) == len(c.secrets):
            for sid in c.secrets:
                group = c.group(sid)
                q = group.order
                total = (self.keys[sid].share.value + sum(self.my_subshares[d][sid][0] for d in dealings)) % q
                k = KeyShare(self.me, SecretScalar(total, q), new_sharings[sid])
                if not k.check(group):
                    self._alert(AlertKind.RECOVERY_FAILED, self.me, f"new share of {sid!r} does not check")
                    new_keys = {}
                    break
                new_keys[sid] = k
                for r in self.kt.recovering:
                    blind = sum(self.my_subshares[d][sid][1][r] for d in dealings) % q
                    rpoints.setdefault(r, {})[sid] = (total + blind) % q
        elif helper:
            self._alert(
                AlertKind.RECOVERY_FAILED, self.me, "cannot compute new shares from the decided dealings"
            )
        for k in self.keys.values():
            k.wipe()
        self.keys = {}
        self.my_subshares = {}
        self.decided = True
        self.transcript = transcript
        self.new_sharings = new_sharings
        self.new_keys = new_keys
        self.rpoints = rpoints
        status = Status.OPERATIONAL if new_keys else Status.RECOVERING
        private = PrivateData(
            self.period,
            self.signing_seed,
            self.encryption_seed,
            partial if partial else {sid: k.share for sid, k in new_keys.items()},
            rpoints,
            repair if partial else {},
        )
        public = PublicData(self.m, self.old_table, dict(new_sharings), transcript)
        # The owner persists this, forgets this engine (and the old shares with it) and resumes
        # from what it persisted: SIGN and RECOVER run in a new engine (a new key-holder child).
        self._set_outcome(Outcome(status, public, private, list(self.alerts)))

    def _set_outcome(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.outcome_version += 1

    # Catching up from a transcript -------------------------------------------------------------------

    def _on_catchup(self, sender: int, msg: Signed, now: float) -> None:
        """The decided transcript of this period (from a peer that moved on): check it and decide."""
        if self.decided or self.old_table is None:
            return
        tr = Transcript.decode(msg.data)
        if tr.period != self.period:
            return
        check_transcript(tr, self.c, self.old_keys, ann_keys=self.ann_keys, prev=self.prev)
        if self.kt is None:
            self.kt = self._judge_kt(tr.kt_value)
            self._name_impostors()
            self._kt_qc = tr.kt_qc
            self._open_s_engine(now)
        for raw in tr.dealings.values():
            if digest(raw) not in self._raw_dealings:
                self._on_deal(sender, Signed("deal", raw), now)
        self._s_decision = Decision(tr.s_value, tr.s_qc)
        self._try_finish_decision()

    # Phase II: sign the KeyTable, recover the recovering servers ----------------------------------------

    def _resume(self, transcript: Transcript, private: PrivateData) -> None:
        """Continue a decided period after a restart (a new key-holder child): SIGN and RECOVER."""
        if self.m is None:
            return
        self.signing_seed, self.encryption_seed = private.signing_seed, private.encryption_seed
        self.signer = Signer(SigningKey(self.signing_seed))
        self.encryption_public = vdec.public_from_seed(self.encryption_seed)
        table = self._old_public.key_table
        self.old_table = table if table is not None and table.period < self.period else None
        self.kt = self._judge_kt(transcript.kt_value)
        self.my_ann = self.kt.anns[self.me].raw if self.me in self.kt.anns else b""
        mine = self.kt.anns.get(self.me)
        if mine is None or mine.entry.verify_key != self.signer.public:
            self.my_ann = b""
        self._started = True
        self.decided = True
        self.resumed = True
        self.transcript = transcript
        self.new_sharings = dict(self._old_public.sharings)
        self.rpoints = {r: dict(v) for r, v in private.rpoints.items()}
        if private.repair:
            self._repair = {d: {} for d in private.repair}
            self._repair_request = list(private.repair.values())
            self._partial = {sid: share.value for sid, share in private.shares.items()}
            self._partial_rpoints, self.rpoints = self.rpoints, {}
        for sid, share in private.shares.items():
            if private.repair:
                break
            sharing = self.new_sharings.get(sid)
            if sharing is not None:
                self.new_keys[sid] = KeyShare(
                    self.me, SecretScalar(share.value, self.c.group(sid).order), sharing
                )
        self.dealings = {
            d: parse_dealing(raw, self.period, self.kt, self.c) for d, raw in transcript.dealings.items()
        }
        self._raw_dealings = {digest(raw): raw for raw in transcript.dealings.values()}
        self._begin_phase_two()

    def _kt_payload(self) -> bytes:
        assert self.kt is not None
        return self.kt.table.payload()

    def _kt_signed(self, sig: bytes) -> None:
        assert self.kt is not None
        self.signed_table = self.kt.table.signed(sig)
        self._send(EVERYONE, "kt-sig", sig)

    def _begin_phase_two(self) -> None:
        assert self.kt is not None
        if not self._is_member:
            # Not in the decided KeyTable: nothing to sign, nobody to recover; we recover next period.
            self._complete(Status.RECOVERING, None)
            return
        self._frost.start(self, self._now)

    def _phase_two(self, now: float) -> None:
        assert self.kt is not None
        if self._repair and now - self._repair_sent >= self.timeout / 2:
            self._repair_sent = now
            self._send(EVERYONE, "repair-req", self._repair_request)
        if self.rpoints and not self._rpoints_sent:
            self._rpoints_sent = True
            self._send_rpoints()
        if self.new_keys and self.signed_table is None:
            self._frost.step(self, now)
        self._maybe_complete()
        if not self.complete and now - self._pinged >= self.timeout / 4:
            # Messages may have been lost while the key-holder changed (frames sent while the
            # peers' connections were being re-made at the rekey are dropped): ask for what we
            # lack, soon, since phase two is short. Peers answer one sender at most every
            # timeout / 2 (_on_phase2), so a ping that did arrive is not answered twice.
            self._pinged = now
            body = {"sig": self.signed_table is None, "rpoint": not self.new_keys}
            self._send(EVERYONE, "phase2", body)

    def _on_phase2(self, sender: int, msg: Phase2, now: float) -> None:
        """A peer in SIGN/RECOVER lacks the KeyTable signature or its recovery value."""
        if not self.resumed:
            return
        if now - self._phase2_answered.get(sender, -1e9) < self.timeout / 2:
            return
        self._phase2_answered[sender] = now
        if msg.sig and self.signed_table is not None:
            self._send(sender, "kt-sig", self.signed_table.signature)
        if msg.rpoint and sender in self.rpoints:
            self._send_rpoints(only=sender)
        if self._frost.started:
            self._frost.republish(self, sender)

    def _on_repair(self, sender: int, msg: Repair, now: float) -> None:
        """A member's points on a convicted dealer's polynomials (same-period repair), each
        checked against that dealing's commitments; t+1 of them give ours by interpolation."""
        if not self._repair or not self.resumed or self.kt is None:
            return
        d = msg.dealer
        if d not in self._repair or sender == d or d not in self.dealings:
            return
        dealing = self.dealings[d]
        values = msg.values
        if set(values) != set(self.c.secrets):
            raise RemoteProtocolError(sender, "repair: one value per secret")
        got: dict[str, tuple[int, dict[int, int] | None]] = {}
        for sid, v in values.items():
            group = self.c.group(sid)
            if not subshare_ok(group, dealing, sid, sender, v[0]):
                raise RemoteProtocolError(
                    sender, f"repair: its point of {sid!r} fails server {d}'s commitments"
                )
            blinds: dict[int, int] | None = None
            if sender in self.kt.operational:
                rec = dealing.recover[sid]
                ok = set(v[1]) == set(rec) and all(
                    type(x) is int and rec[r].check_subshare(group, sender, x) for r, x in v[1].items()
                )
                if not ok:
                    raise RemoteProtocolError(
                        sender, f"repair: its blinding points of {sid!r} fail the commitments"
                    )
                blinds = dict(v[1])
            got[sid] = (v[0], blinds)
        for sid, point in got.items():
            self._repair[d].setdefault(sid, {})[sender] = point
        self._try_repair(now)

    def _try_repair(self, now: float) -> None:
        assert self.kt is not None
        c, need = self.c, self.c.t + 1
        for points in self._repair.values():
            for sid in c.secrets:
                have = points.get(sid, {})
                if len(have) < need or sum(1 for _z, b in have.values() if b is not None) < need:
                    return
        rpoints = {r: dict(v) for r, v in self._partial_rpoints.items()}
        for points in self._repair.values():
            for sid in c.secrets:
                q = c.group(sid).order
                have = points[sid]
                zs = dict(sorted((j, z) for j, (z, _b) in have.items())[:need])
                self._partial[sid] = (self._partial[sid] + interpolate(zs, q, x=self.me)) % q
                helpers = sorted(j for j, (_z, b) in have.items() if b is not None)[:need]
                for r in self.kt.recovering:
                    pts = {j: have[j][1][r] for j in helpers}  # type: ignore[index]
                    blind = interpolate(pts, q, x=self.me)
                    rpoints.setdefault(r, {})[sid] = (rpoints.get(r, {}).get(sid, 0) + blind) % q
        keys: dict[str, KeyShare[Any]] = {}
        for sid in c.secrets:
            group = c.group(sid)
            k = KeyShare(self.me, SecretScalar(self._partial[sid], group.order), self.new_sharings[sid])
            if not k.check(group):  # pragma: no cover - every point was checked against commitments
                raise LocalProtocolError(f"repaired share of {sid!r} does not match its verification share")
            keys[sid] = k
        for r in rpoints:
            for sid in rpoints[r]:
                rpoints[r][sid] = (rpoints[r][sid] + keys[sid].share.value) % c.group(sid).order
        self._repair, self._partial, self._partial_rpoints = {}, {}, {}
        self.new_keys = keys
        self.rpoints = rpoints
        self._frost.started = False
        self._frost.start(self, now)

    def _maybe_complete(self) -> None:
        if self.complete or self.signed_table is None:
            return
        if len(self.new_keys) == len(self.c.secrets):
            self._complete(Status.OPERATIONAL, self.signed_table)

    def _on_signed_kt(self, sender: int, msg: Signed, now: float) -> None:
        """A peer's signed KeyTable (with a late answer): the decision itself, verifiable by anyone
        holding M. Undecided, a table of a later period, or of this one when our KeyTable is older
        than the previous period's (we cannot check this period's transcript), means the network
        decided without us: we recover. Decided, it is the signature we wait for."""
        body = msg.data
        if self.m is None:
            return
        if not self.decided:
            table = KeyTable.decode(body)
            current = self.old_table is not None and self.old_table.period == self.period - 1
            if table.period == self.period and current:
                return  # we can check this period's transcript: we decide from it, keeping our shares
            self.overtaken(body)
            return
        if self.resumed and self.kt is not None and self.signed_table is None:
            table = KeyTable.decode(body)
            if table.payload() != self.kt.table.payload():
                raise RemoteProtocolError(sender, "signed KeyTable is not the decided one")
            self._on_kt_sig(sender, Signed("kt-sig", table.signature), now)

    def overtaken(self, table_bytes: bytes) -> bool:
        """A peer shows a signed KeyTable of this period or later while we have not decided:
        the network decided without us (a KeyTable is signed only with shares of a decided
        sharing), so our old shares are no longer needed. We stop, erase them, and recover."""
        if self.decided or self.complete or self.m is None:
            return False
        try:
            table = KeyTable.decode(table_bytes)
        except DecodeError:
            return False
        if table.period < self.period or not table.verify(self.m.vcert):
            return False
        for k in self.keys.values():
            k.wipe()
        self.keys = {}
        self.status = Status.RECOVERING
        self.complete = True
        public = PublicData(self.m, table, {}, None)
        failure = f"the network decided period {table.period} without us: recovering"
        outcome = Outcome(Status.RECOVERING, public, None, list(self.alerts), failure, superseded=True)
        self._set_outcome(outcome)
        return True

    def superseded(self, table_bytes: bytes) -> bool:
        """Decided, not complete, holding new shares: a peer shows a signed KeyTable of a *later*
        period. The network decided that period, so a later sharing exists with t+1 honest
        holders and ours are no longer needed (a server cut off between its decision and the
        KeyTable's signature otherwise waited for that signature forever). We erase them and
        recover, as :meth:`overtaken` does for an undecided refresh."""
        if not self.decided or self.complete or self.m is None:
            return False
        try:
            table = KeyTable.decode(table_bytes)
        except DecodeError:
            return False
        if table.period <= self.period or not table.verify(self.m.vcert):
            return False
        for k in self.new_keys.values():
            k.wipe()
        self.new_keys = {}
        self.status = Status.RECOVERING
        self.complete = True
        public = PublicData(self.m, table, {}, None)
        failure = f"the network decided period {table.period} while we finished {self.period}: recovering"
        outcome = Outcome(Status.RECOVERING, public, None, list(self.alerts), failure, superseded=True)
        self._set_outcome(outcome)
        return True

    def give_up(self, now: float) -> None:
        """The next period is due and this one is decided but not complete.

        A server holding new shares never gives up: the KeyTable must be signed with them (t+1
        honest holders exist, so it will be once messages flow), and the next period waits.
        A server still without shares (recovering) stops waiting for recovery values and
        recovers again in the next period."""
        if not self.decided or self.complete or self.new_keys:
            return
        self._complete(Status.RECOVERING, self.signed_table)

    def _complete(self, status: Status, table: KeyTable | None) -> None:
        assert self.transcript is not None
        self.complete = True
        newest = table if table is not None else self.old_table
        # Given up without the signed KeyTable: the transcript goes too (it would mark this
        # period unfinished); a peer's PushM brings the signed KeyTable next period.
        public = PublicData(self.m, newest, dict(self.new_sharings), self.transcript if table else None)
        private = PrivateData(
            self.period,
            self.signing_seed,
            self.encryption_seed,
            {sid: k.share for sid, k in self.new_keys.items()}
            if status == Status.OPERATIONAL or self.new_keys
            else {},
            {},
        )
        failure = None if status == Status.OPERATIONAL else "recovering: no usable shares for this period"
        if status == Status.OPERATIONAL and table is not None:
            self._missed(table)
        self._set_outcome(Outcome(status, public, private, list(self.alerts), failure))

    def _missed(self, table: KeyTable) -> None:
        """Name every configured server the completed refresh went without (not in its KeyTable)."""
        old = self.old_table
        for j in sorted(set(self.c.ids) - set(table.entries)):
            member = f"a member of period {old.period}'s KeyTable, " if old and j in old.entries else ""
            self._alert(
                AlertKind.MISSED_REFRESH,
                j,
                f"{member}not in the KeyTable of period {table.period}: the refresh completed "
                "without it (down, unreachable, or its data lost); it recovers at the next refresh it joins",
            )

    def _on_kt_sig(self, sender: int, msg: Signed, now: float) -> None:
        if self.kt is None or not self.resumed:
            self._hold(sender, msg)
            return
        if self.m is None or self.signed_table is not None:
            return
        body = msg.data
        candidate = self.kt.table.signed(body)
        if not candidate.verify(self.m.vcert):
            raise RemoteProtocolError(sender, "forwarded KeyTable signature does not verify with Vcert")
        self.signed_table = candidate
        self._send(EVERYONE, "kt-sig", body)
        self._maybe_complete()

    def _frost_message(self, sender: int, msg: Signed, now: float) -> None:
        if self.kt is None or not self.resumed:
            self._hold(sender, msg)
            return
        if msg.phase == "nonce":
            self._frost.on_nonce(self, sender, msg.data)
        elif msg.phase == "signreq":
            self._frost.on_request(self, sender, msg.data, now)
        else:
            self._frost.on_share(self, sender, msg.data)
        self._maybe_complete()

    # Recovery values ------------------------------------------------------------------------------------

    def _send_rpoints(self, only: int | None = None) -> None:
        assert self.kt is not None
        for r, values in sorted(self.rpoints.items()):
            if only is not None and r != only:
                continue
            entry = self.kt.table.entries[r]
            context = encoding.encode(["pst/refresh/rpoint", self.period, self.me, r])
            eph, cts = vdec.encrypt_to(
                {r: entry.encryption_key}, {r: encoding.encode(values)}, self._scalar(ED25519), context
            )
            raw = sign(
                "rpoint", self.period, {"helper": self.me, "r": r, "eph": eph, "ct": cts[r]}, self.signer
            )
            self._send(r, "rpoint", raw)

    def _on_rpoint(self, sender: int, msg: Signed, now: float) -> None:
        if self.kt is None or not self.resumed:
            self._hold(sender, msg)
            return
        body = msg.data
        if self.me not in self.kt.recovering or self.new_keys or not self._is_member:
            return
        s = decode_signed(body, "rpoint", self.period, max_size=8192)
        f = encoding.expect_map(
            s.body, {"helper": int, "r": int, "eph": bytes, "ct": bytes}, "recovery value"
        )
        k = f["helper"]
        if k != sender or k not in self.kt.operational or f["r"] != self.me:
            raise RemoteProtocolError(
                sender, "recovery value from a server that is not a helper, or not for us"
            )
        if not s.verify(self.kt.table.entries[k].verify_key):
            raise RemoteProtocolError(sender, "recovery value not signed with the helper's new key")
        context = encoding.encode(["pst/refresh/rpoint", self.period, k, self.me])
        try:
            plain = vdec.decrypt(
                vdec.secret_from_seed(self.encryption_seed),
                self.encryption_public,
                self.me,
                f["eph"],
                f["ct"],
                context,
            )
            values = encoding.decode(plain, what="recovery value")
        except (vdec.DecryptionError, DecodeError):
            self._alert(AlertKind.BAD_SHARE, k, "recovery value does not decrypt", evidence=(body,))
            return
        if not isinstance(values, dict) or set(values) != set(self.c.secrets):
            self._alert(AlertKind.BAD_SHARE, k, "malformed recovery value", evidence=(body,))
            return
        assert self.transcript is not None
        chosen = {d: self.dealings[d] for d in self.transcript.dealings if d in self.dealings}
        for sid, y in values.items():
            group = self.c.group(sid)
            sharing = self.new_sharings.get(sid)
            if sharing is None:
                return  # we lack the public sharing ourselves: no fault of the helper
            if type(y) is not int or not 0 <= y < group.order:
                self._alert(AlertKind.BAD_SHARE, k, f"malformed recovery value for {sid!r}", evidence=(body,))
                return
            expected = group.add(
                sharing.verification_share(group, k),
                pss.blinding_commitment(group, {d: x.recover[sid][self.me] for d, x in chosen.items()}, k),
            )
            if group.mul_base(y) != expected:
                self._alert(
                    AlertKind.BAD_SHARE,
                    k,
                    f"recovery value for {sid!r} fails the commitments",
                    evidence=(body,),
                )
                return
            self._rpoint_values.setdefault(sid, {})[k] = y
        if all(len(self._rpoint_values.get(sid, {})) >= self.c.t + 1 for sid in self.c.secrets):
            for sid in self.c.secrets:
                group = self.c.group(sid)
                pts = dict(sorted(self._rpoint_values[sid].items())[: self.c.t + 1])
                share = interpolate(pts, group.order, x=self.me)
                key = KeyShare(self.me, SecretScalar(share, group.order), self.new_sharings[sid])
                if not key.check(group):  # pragma: no cover - t+1 checked values determine it
                    raise LocalProtocolError("recovered share does not match its verification share")
                self.new_keys[sid] = key
            self._frost.start(self, now)
            self._maybe_complete()


# SIGN: FROST on the decided KeyTable --------------------------------------------------------------------


class _FrostState:
    """Signing the decided KeyTable with Scert (FROST, the new shares), attempt by attempt.

    Attempt a is led by the a-th operational member (rotated by the period); the leader's
    signed request names the signer set and each signer's signed nonce commitment. A share
    counts only for the set of the request it answers, so nobody can disown honest signers
    by naming another set; two requests for one attempt are equivocation. An attempt that
    does not finish within its (doubling) timeout gives way to the next leader.
    """

    MAX_ATTEMPTS = 64
    NONCES = 2

    def __init__(
        self,
        payload: Callable[[], bytes],
        on_signature: Callable[[bytes], None],
        done: Callable[[], bool],
        prefix: str = "",
    ) -> None:
        #: What is signed, what to do with the signature, whether we hold it already; ``prefix``
        #: names the phases, so that two signings (M and KeyTable(0) at init) run side by side.
        self.payload = payload
        self.on_signature = on_signature
        self.done = done
        self.prefix = prefix
        self.started = False
        self.attempt = 0
        self.deadline = 0.0
        self.nonces: dict[int, frost.SigningNonces] = {}
        self.commitments: dict[int, dict[int, bytes]] = {}
        self.used: set[tuple[int, int]] = set()
        self.requests: dict[int, tuple[bytes, dict[int, frost.SigningCommitment]]] = {}
        self.shares: dict[int, dict[int, tuple[frost.SignatureShare, bytes]]] = {}
        self.failed: set[int] = set()
        self.requested: set[int] = set()
        self.pending: list[tuple[int, Any]] = []

    def leader(self, r: DealingStage, attempt: int) -> int:
        assert r.kt is not None
        ops = list(r.kt.operational)
        return ops[(r.period + attempt) % len(ops)]

    def start(self, r: DealingStage, now: float) -> None:
        if self.started:
            return
        self.started = True
        self.deadline = now + r.timeout
        if SCERT in r.new_keys:
            for _ in range(self.NONCES):
                self._publish_nonce(r)
        pending, self.pending = self.pending, []
        for sender, body in pending:
            r._inject(sender, Signed(self.prefix + "sigshare", body), now)

    def republish(self, r: DealingStage, to: int) -> None:
        """Our unused nonce commitments and our current request again, to a peer that may have
        missed them; a fresh commitment when none of ours is free any more."""
        mine = self.commitments.get(r.me, {})
        free = [i for i in mine if i in self.nonces and (r.me, i) not in self.used]
        if not free and SCERT in r.new_keys and len(self.nonces) < 4 * self.MAX_ATTEMPTS:
            self._publish_nonce(r)
        for idx, raw in self.commitments.get(r.me, {}).items():
            if idx in self.nonces:
                r._send(to, self.prefix + "nonce", raw)
        request = self.requests.get(self.attempt)
        if request is not None and self.leader(r, self.attempt) == r.me:
            r._send(to, self.prefix + "signreq", request[0])

    def _package(self, r: DealingStage) -> frost.KeyPackage:
        key = r.new_keys[SCERT]
        return frost.KeyPackage(r.me, key.share.value, key.public_key, r.c.t + 1)

    def _publish_nonce(self, r: DealingStage) -> None:
        idx = int.from_bytes(r.rand(4), "big")  # random: a restarted signer never reuses an index
        nonces = frost.commit(self._package(r), r.rand(64))
        self.nonces[idx] = nonces
        raw = sign(
            self.prefix + "nonce",
            r.period,
            {"server": r.me, "idx": idx, "c": nonces.commitment.to_bytes()},
            r.signer,
        )
        r._send(EVERYONE, self.prefix + "nonce", raw)
        self.commitments.setdefault(r.me, {})[idx] = raw

    def step(self, r: DealingStage, now: float) -> None:
        if not self.started:
            self.start(r, now)
        if now >= self.deadline:
            self.attempt += 1
            # Linear growth: enough for progress once messages flow, without the long waits
            # doubling would add after a stretch of bad timing.
            self.deadline = now + r.timeout * (1 + min(self.attempt, 8))
        a = self.attempt
        if self.leader(r, a) != r.me or a in self.requested or SCERT not in r.new_keys:
            return
        assert r.kt is not None
        chosen: dict[int, bytes] = {}
        for j in [r.me] + [j for j in r.kt.operational if j != r.me]:
            if j in self.failed and j != r.me:
                continue
            free = sorted(i for i in self.commitments.get(j, {}) if (j, i) not in self.used)
            if free:
                chosen[j] = self.commitments[j][free[0]]
            if len(chosen) == r.c.t + 1:
                break
        if len(chosen) < r.c.t + 1:
            return
        self.requested.add(a)
        raw = sign(self.prefix + "signreq", r.period, {"attempt": a, "signers": chosen}, r.signer)
        r._send(EVERYONE, self.prefix + "signreq", raw)
        r._inject(r.me, Signed(self.prefix + "signreq", raw), now)

    def parse_nonce(self, r: DealingStage, sender: int, raw: Any) -> tuple[int, frost.SigningCommitment]:
        assert r.kt is not None
        entry = r.kt.table.entries.get(sender)
        if entry is None:
            raise RemoteProtocolError(sender, "nonce commitment from a non-member")
        s = open_signed(raw, self.prefix + "nonce", r.period, entry.verify_key, max_size=1024)
        f = encoding.expect_map(s.body, {"server": int, "idx": int, "c": bytes}, "nonce commitment")
        com = frost.SigningCommitment.from_bytes(f["c"])
        if f["server"] != sender or com.identifier != sender or not 0 <= f["idx"] < 1 << 32:
            raise RemoteProtocolError(sender, "nonce commitment under another id")
        return f["idx"], com

    def on_nonce(self, r: DealingStage, sender: int, raw: Any) -> None:
        idx, _com = self.parse_nonce(r, sender, raw)
        got = self.commitments.setdefault(sender, {})
        if len(got) < 4 * self.MAX_ATTEMPTS:
            got.setdefault(idx, raw)

    def on_request(self, r: DealingStage, sender: int, raw: Any, now: float) -> None:
        assert r.kt is not None
        s = decode_signed(raw, self.prefix + "signreq", r.period, max_size=64 * 1024)
        f = encoding.expect_map(s.body, {"attempt": int, "signers": dict}, "sign request")
        a = f["attempt"]
        if not 0 <= a <= self.attempt + self.MAX_ATTEMPTS or self.leader(r, a) != sender:
            raise RemoteProtocolError(
                sender, f"sign request for attempt {a} from a server that does not lead it"
            )
        if not s.verify(r.kt.table.entries[sender].verify_key):
            raise RemoteProtocolError(sender, "sign request not signed with the leader's new key")
        known = self.requests.get(a)
        if known is not None:
            if known[0] != raw:
                r._alert(
                    AlertKind.EQUIVOCATION, sender, f"two sign requests for attempt {a}", (known[0], raw)
                )
            return
        signers = f["signers"]
        if len(signers) != r.c.t + 1:
            raise RemoteProtocolError(sender, f"sign request for attempt {a} names {len(signers)} signers")
        commitments: dict[int, frost.SigningCommitment] = {}
        indices: dict[int, int] = {}
        for j, nraw in signers.items():
            if type(j) is not int or j not in r.kt.operational:
                raise RemoteProtocolError(sender, f"sign request for attempt {a} names an invalid signer")
            try:
                idx, com = self.parse_nonce(r, j, nraw)
            except (RemoteProtocolError, DecodeError, BadSignature):
                raise RemoteProtocolError(
                    sender, f"sign request names a bad commitment of server {j}"
                ) from None
            commitments[j] = com
            indices[j] = idx
        # Only a request that is valid as a whole uses up the nonces it names.
        self.used.update(indices.items())
        my_idx = indices.get(r.me, -1)
        self.requests[a] = (raw, commitments)
        if r.me in commitments and SCERT in r.new_keys and not self.done():
            nonces = self.nonces.pop(my_idx, None)
            if nonces is None or nonces.used:
                return
            share = frost.sign(
                self._package(r), nonces, self.payload(), [commitments[j] for j in sorted(commitments)]
            )
            body = {"attempt": a, "share": share.to_bytes()}
            sraw = sign(self.prefix + "sigshare", r.period, body, r.signer)
            r._send(EVERYONE, self.prefix + "sigshare", sraw)
            self._publish_nonce(r)
            self.on_share(r, r.me, sraw)

    def on_share(self, r: DealingStage, sender: int, raw: Any) -> None:
        assert r.kt is not None
        entry = r.kt.table.entries.get(sender)
        if entry is None:
            raise RemoteProtocolError(sender, "signature share from a non-member")
        s = open_signed(raw, self.prefix + "sigshare", r.period, entry.verify_key, max_size=1024)
        f = encoding.expect_map(s.body, {"attempt": int, "share": bytes}, "signature share")
        a = f["attempt"]
        request = self.requests.get(a)
        if request is None:
            if len(self.pending) < 4 * r.c.n:
                self.pending.append((sender, raw))
            return
        commitments = request[1]
        if sender not in commitments:
            raise RemoteProtocolError(
                sender, f"signature share for attempt {a}, whose request does not name it"
            )
        share = frost.SignatureShare.from_bytes(f["share"])
        if share.identifier != sender:
            raise RemoteProtocolError(sender, "signature share carries another signer's id")
        got = self.shares.setdefault(a, {})
        got.setdefault(sender, (share, raw))
        if len(got) == len(commitments) and not self.done():
            self._aggregate(r, a)

    def _aggregate(self, r: DealingStage, a: int) -> None:
        assert r.kt is not None
        commitments = self.requests[a][1]
        sharing = r.new_sharings.get(SCERT)
        if sharing is None:
            return
        public = frost.PublicKeyPackage(
            sharing.public_key, {i: sharing.verification_share(ED25519, i) for i in commitments}, r.c.t + 1
        )
        got = self.shares[a]
        try:
            sig = frost.aggregate_and_identify(
                public,
                [commitments[j] for j in sorted(commitments)],
                self.payload(),
                [got[j][0] for j in sorted(got)],
            )
        except CheatingError as exc:
            self.failed.add(exc.party)
            evidence = (got[exc.party][1],) if exc.party in got else ()
            r._alert(
                AlertKind.BAD_SIGNATURE_SHARE,
                exc.party,
                f"bad FROST share for the KeyTable: {exc.reason}",
                evidence,
            )
            return
        if not ed25519_verify(sharing.public_key, self.payload(), sig):  # pragma: no cover
            return  # aggregate_and_identify verified it
        self.on_signature(sig)


# Applications of the agreement engine ------------------------------------------------------------------


_PHASE_ONE = frozenset(
    {"ann", "attest", "agree/keytable", "deal", "want", "checked", "agree/dealings", "undecided"}
)


class _KeyTableApp:
    def __init__(self, r: PeriodRefresh) -> None:
        self.r = r

    def propose(self) -> bytes | None:
        return self.r.propose_keytable()

    def validate(self, value: bytes, view: int) -> Verdict:
        return self.r.validate_keytable(value, view)


class _DealingsApp:
    def __init__(self, r: DealingStage) -> None:
        self.r = r

    def propose(self) -> bytes | None:
        return self.r.propose_dealings()

    def validate(self, value: bytes, view: int) -> Verdict:
        return self.r.validate_dealings(value)


def _decode_s_value(value: bytes, period: int) -> dict[int, bytes]:
    f = encoding.expect_map(
        encoding.decode(value, what="dealing set"), {"period": int, "dealings": dict}, "dealing set"
    )
    if f["period"] != period:
        raise DecodeError(f"dealing set for period {f['period']}")
    out: dict[int, bytes] = {}
    for d, h in f["dealings"].items():
        if type(d) is not int or not isinstance(h, bytes) or len(h) != 32:
            raise DecodeError("dealing set: dealer ids to 32-byte digests")
        out[d] = h
    return out


def check_transcript(
    tr: Transcript,
    c: Constants,
    old_keys: Mapping[int, bytes],
    *,
    ann_keys: Mapping[int, bytes] | None = None,
    prev: bytes = b"",
) -> KeyTableCandidate:
    """A transcript checked from the previous KeyTable's keys (and its digest ``prev``, with M's
    announcement keys) alone (DecodeError naming the fault)."""
    from appliance.protocols.agreement import COMMIT, BadCertificate

    committee = Committee(c.n, c.t, old_keys)
    try:
        if tr.kt_qc.phase != COMMIT or tr.kt_qc.digest != digest(tr.kt_value):
            raise DecodeError("transcript: the KeyTable's certificate does not match it")
        committee.verify_qc(Instance(CONTEXT, tr.period, "keytable"), tr.kt_qc)
        kt = judge_keytable(tr.kt_value, tr.period, c, old_keys, ann_keys=ann_keys, prev=prev)
        members = Committee(c.n, c.t, {i: kt.table.entries[i].verify_key for i in kt.operational})
        if tr.s_qc.phase != COMMIT or tr.s_qc.digest != digest(tr.s_value):
            raise DecodeError("transcript: the dealing set's certificate does not match it")
        members.verify_qc(Instance(CONTEXT, tr.period, "dealings"), tr.s_qc)
    except (BadCertificate, InvalidProposal) as exc:
        raise DecodeError(f"transcript: {exc}") from None
    chosen = _decode_s_value(tr.s_value, tr.period)
    if {d: digest(raw) for d, raw in tr.dealings.items()} != chosen:
        raise DecodeError("transcript: its dealings are not the decided ones")
    return kt


def current_table(public: PublicData) -> KeyTable | None:
    """The KeyTable of the last decided period: the signed one, or the decided one not yet signed.

    Our own persisted data, so the decided table is read without re-checking the certificates
    (they were checked before it was persisted). The channels use its keys from the decision on.
    """
    tr = public.transcript
    table = public.key_table
    if tr is None or (table is not None and table.period >= tr.period):
        return table
    obj = encoding.decode(tr.kt_value, what="decided KeyTable")
    entries: dict[int, KeyEntry] = {}
    for i, e in obj["entries"].items():
        body = encoding.decode(e["ann"], what="announcement")["body"]
        entries[i] = KeyEntry.from_obj(body["K"], "announcement")
    return KeyTable(tr.period, entries, dict(obj["sharings"]), frozenset())


def scalar_source(rand: RandomBytes, group: Group[Any]) -> Callable[[], int]:
    size = (group.order.bit_length() + 7) // 8 + 16
    return lambda: int.from_bytes(rand(size), "big") % (group.order - 1) + 1


def initial_public(
    m: InvariantInfo, table: KeyTable, sharings: Mapping[str, PublicSharing[Any]]
) -> PublicData:
    return PublicData(m, table, dict(sharings))
