"""The agreement's messages: frozen, decoded once at the boundary, verified against a committee.

Every message is a CBOR map with a kind ``k``; :func:`decode` turns an untrusted object into
one of the classes below or raises :class:`~appliance.crypto.errors.DecodeError`, and
nothing else. Signatures are checked by :class:`Committee` (``verify_*``), which raises
:class:`BadCertificate` naming what did not verify. A signature covers
:func:`statement`: the kind, the instance (which binds the protocol, the period and the
value's purpose), the view and the digest; so a vote in one instance, view or phase is
useless in any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import ed25519_verify

PREPARE = 1
COMMIT = 2
CONTEXT = "pst/agreement"
#: A value (a KeyTable proposal, a set of dealing digests) is small; anything bigger is refused.
MAX_VALUE = 256 * 1024
#: Views beyond this are refused outright (timeouts double each view: 2**40 base timeouts is never).
MAX_VIEW = 1 << 40


def digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True)
class Instance:
    """One single-shot agreement: ``name`` (e.g. "keytable") in ``period`` of ``protocol``."""

    protocol: str
    period: int
    name: str


def statement(inst: Instance, kind: str, view: int, body: Mapping[str, Any]) -> bytes:
    return encoding.signing_payload(
        f"agreement/{kind}",
        1,
        f"{CONTEXT}/{inst.protocol}",
        inst.period,
        {"inst": inst.name, "view": view, **body},
    )


class BadCertificate(Exception):
    """A certificate or signature that does not verify; the text says which part."""


class UncheckableCertificate(BadCertificate):
    """A certificate this server cannot judge: the signatures it can check fall short of a quorum,
    but it lacks the keys of enough other members it names to reach one. Not the sender's fault
    (this server missed those keys), so nobody is accused."""


@dataclass(frozen=True)
class QuorumCert:
    """q signatures of distinct committee members on (phase, view, digest)."""

    phase: int
    view: int
    digest: bytes
    sigs: Mapping[int, bytes] = field(hash=False, compare=False)

    def to_obj(self) -> dict[str, Any]:
        return {"phase": self.phase, "view": self.view, "digest": self.digest, "sigs": dict(self.sigs)}

    @classmethod
    def from_obj(cls, obj: Any) -> QuorumCert:
        f = encoding.expect_map(
            obj, {"phase": int, "view": int, "digest": bytes, "sigs": dict}, "quorum certificate"
        )
        if f["phase"] not in (PREPARE, COMMIT):
            raise DecodeError("quorum certificate: unknown phase")
        _check_view(f["view"], "quorum certificate")
        _check_digest(f["digest"], "quorum certificate")
        sigs = _sig_map(f["sigs"], "quorum certificate")
        return cls(f["phase"], f["view"], f["digest"], sigs)


@dataclass(frozen=True)
class TimeoutEntry:
    """One server's signed timeout of a view, with the view and digest of its highest QC."""

    qc_view: int
    qc_digest: bytes
    sig: bytes


@dataclass(frozen=True)
class TimeoutCert:
    """q signed timeouts of one view, and the highest prepare QC among them (if any)."""

    view: int
    entries: Mapping[int, TimeoutEntry] = field(hash=False, compare=False)
    high_qc: QuorumCert | None = field(hash=False, compare=False)

    def to_obj(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "entries": {i: [e.qc_view, e.qc_digest, e.sig] for i, e in self.entries.items()},
            "qc": self.high_qc.to_obj() if self.high_qc is not None else None,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> TimeoutCert:
        f = encoding.expect_map(obj, {"view": int, "entries": dict, "qc": (dict, type(None))}, "timeout cert")
        _check_view(f["view"], "timeout certificate")
        entries: dict[int, TimeoutEntry] = {}
        if len(f["entries"]) > 1024:
            raise DecodeError("timeout certificate: too many entries")
        for i, e in f["entries"].items():
            if type(i) is not int or not (isinstance(e, list) and len(e) == 3):
                raise DecodeError("timeout certificate: malformed entry")
            qv, qd, sig = e
            if type(qv) is not int or not isinstance(qd, bytes) or not isinstance(sig, bytes):
                raise DecodeError("timeout certificate: malformed entry")
            if qv < -1 or qv > MAX_VIEW or len(sig) != 64 or len(qd) not in (0, 32):
                raise DecodeError("timeout certificate: malformed entry")
            entries[i] = TimeoutEntry(qv, qd, sig)
        qc = QuorumCert.from_obj(f["qc"]) if f["qc"] is not None else None
        return cls(f["view"], entries, qc)


@dataclass(frozen=True)
class Proposal:
    view: int
    value: bytes
    justify: TimeoutCert | None
    sig: bytes

    @property
    def digest(self) -> bytes:
        return digest(self.value)


@dataclass(frozen=True)
class Vote:
    phase: int
    view: int
    digest: bytes
    sig: bytes


@dataclass(frozen=True)
class Timeout:
    view: int
    high_qc: QuorumCert | None
    #: The value the high QC certifies, so that the next leader can propose it again.
    value: bytes | None
    sig: bytes

    @property
    def entry(self) -> TimeoutEntry:
        qc = self.high_qc
        return TimeoutEntry(qc.view if qc else -1, qc.digest if qc else b"", self.sig)


@dataclass(frozen=True)
class Decide:
    """A commit QC with its value: anyone who gets it decides (a lagging server catches up)."""

    qc: QuorumCert
    value: bytes


@dataclass(frozen=True)
class Certs:
    """A QC or TC forwarded on its own (view synchronization)."""

    qc: QuorumCert | None
    tc: TimeoutCert | None


Message = Proposal | Vote | Timeout | Decide | Certs


def _check_view(view: int, what: str) -> None:
    if not 0 <= view <= MAX_VIEW:
        raise DecodeError(f"{what}: view {view} out of range")


def _check_digest(d: bytes, what: str) -> None:
    if len(d) != 32:
        raise DecodeError(f"{what}: digest must be 32 bytes")


def _check_sig(sig: bytes, what: str) -> None:
    if len(sig) != 64:
        raise DecodeError(f"{what}: signature must be 64 bytes")


def _sig_map(obj: dict[Any, Any], what: str) -> dict[int, bytes]:
    if len(obj) > 1024:
        raise DecodeError(f"{what}: too many signatures")
    out: dict[int, bytes] = {}
    for i, s in obj.items():
        if type(i) is not int or not isinstance(s, bytes) or len(s) != 64:
            raise DecodeError(f"{what}: signatures must map server ids to 64-byte signatures")
        out[i] = s
    return out


def _value(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) > MAX_VALUE:
        raise DecodeError(f"{what}: value must be at most {MAX_VALUE} bytes")
    return v


def decode(obj: Any) -> Message:
    """An agreement message from untrusted plain data; DecodeError on anything malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("k"), str):
        raise DecodeError("agreement message: expected a map with a kind")
    kind = obj["k"]
    if kind == "propose":
        f = encoding.expect_map(
            obj, {"k": str, "view": int, "value": bytes, "tc": (dict, type(None)), "sig": bytes}, "proposal"
        )
        _check_view(f["view"], "proposal")
        _check_sig(f["sig"], "proposal")
        tc = TimeoutCert.from_obj(f["tc"]) if f["tc"] is not None else None
        return Proposal(f["view"], _value(f["value"], "proposal"), tc, f["sig"])
    if kind == "vote":
        f = encoding.expect_map(
            obj, {"k": str, "phase": int, "view": int, "digest": bytes, "sig": bytes}, "vote"
        )
        if f["phase"] not in (PREPARE, COMMIT):
            raise DecodeError("vote: unknown phase")
        _check_view(f["view"], "vote")
        _check_digest(f["digest"], "vote")
        _check_sig(f["sig"], "vote")
        return Vote(f["phase"], f["view"], f["digest"], f["sig"])
    if kind == "timeout":
        f = encoding.expect_map(
            obj,
            {"k": str, "view": int, "qc": (dict, type(None)), "value": (bytes, type(None)), "sig": bytes},
            "timeout",
        )
        _check_view(f["view"], "timeout")
        _check_sig(f["sig"], "timeout")
        qc = QuorumCert.from_obj(f["qc"]) if f["qc"] is not None else None
        value = _value(f["value"], "timeout") if f["value"] is not None else None
        if (qc is None) != (value is None):
            raise DecodeError("timeout: a QC travels with its value")
        return Timeout(f["view"], qc, value, f["sig"])
    if kind == "decide":
        f = encoding.expect_map(obj, {"k": str, "qc": dict, "value": bytes}, "decision")
        return Decide(QuorumCert.from_obj(f["qc"]), _value(f["value"], "decision"))
    if kind == "certs":
        f = encoding.expect_map(obj, {"k": str, "qc": (dict, type(None)), "tc": (dict, type(None))}, "certs")
        return Certs(
            QuorumCert.from_obj(f["qc"]) if f["qc"] is not None else None,
            TimeoutCert.from_obj(f["tc"]) if f["tc"] is not None else None,
        )
    raise DecodeError(f"agreement message: unknown kind {kind!r}")


def encode(msg: Message) -> dict[str, Any]:
    """The plain-data form of ``msg`` (the owner wraps it in its own envelope)."""
    if isinstance(msg, Proposal):
        tc = msg.justify.to_obj() if msg.justify is not None else None
        return {"k": "propose", "view": msg.view, "value": msg.value, "tc": tc, "sig": msg.sig}
    if isinstance(msg, Vote):
        return {"k": "vote", "phase": msg.phase, "view": msg.view, "digest": msg.digest, "sig": msg.sig}
    if isinstance(msg, Timeout):
        qc = msg.high_qc.to_obj() if msg.high_qc is not None else None
        return {"k": "timeout", "view": msg.view, "qc": qc, "value": msg.value, "sig": msg.sig}
    if isinstance(msg, Decide):
        return {"k": "decide", "qc": msg.qc.to_obj(), "value": msg.value}
    return {
        "k": "certs",
        "qc": msg.qc.to_obj() if msg.qc is not None else None,
        "tc": msg.tc.to_obj() if msg.tc is not None else None,
    }


def proposal_statement(inst: Instance, view: int, d: bytes) -> bytes:
    return statement(inst, "propose", view, {"digest": d})


def vote_statement(inst: Instance, phase: int, view: int, d: bytes) -> bytes:
    return statement(inst, "vote", view, {"phase": phase, "digest": d})


def timeout_statement(inst: Instance, view: int, qc_view: int, qc_digest: bytes) -> bytes:
    return statement(inst, "timeout", view, {"qc_view": qc_view, "qc_digest": qc_digest})


@dataclass(frozen=True)
class Committee:
    """Who may vote: server -> Ed25519 key; ``n`` and ``t`` of the network fix the quorum.

    The quorum is ceil((n+t+1)/2) distinct members: any two quorums share at least t+1
    servers, so at least one honest server (n >= 3t+1 is required; the constants enforce it).
    Counting is over the network's n, not the members present: servers without a key this
    period count among the t.
    """

    n: int
    t: int
    keys: Mapping[int, bytes]
    #: Rotates the leader order (e.g. the period), so that no server leads every first view.
    rotation: int = 0

    def __post_init__(self) -> None:
        if self.n < 3 * self.t + 1:
            raise ValueError(f"agreement needs n >= 3t+1 (n={self.n}, t={self.t})")

    @property
    def quorum(self) -> int:
        return (self.n + self.t + 2) // 2

    @property
    def members(self) -> list[int]:
        return sorted(self.keys)

    def leader(self, view: int) -> int:
        m = self.members
        return m[(self.rotation + view) % len(m)]

    def verify(self, server: int, payload: bytes, sig: bytes) -> bool:
        key = self.keys.get(server)
        return key is not None and ed25519_verify(key, payload, sig)

    def _lacking(self, named: Mapping[int, object]) -> list[int]:
        """The servers (of 1..n) a certificate names whose keys this server does not hold (not in
        ``keys``, or there without a key yet: the log's committee lists every member)."""
        return sorted(i for i in named if 1 <= i <= self.n and self.keys.get(i) is None)

    def _short(self, kind: str, view: int, good: int, named: Mapping[int, object], what: str) -> None:
        """Raise for a certificate of ``good`` valid entries, short of a quorum: uncheckable if the
        members it names whose keys we lack could make up the difference."""
        unknown = self._lacking(named)
        if unknown and good + len(unknown) >= self.quorum:
            raise UncheckableCertificate(
                f"{kind} of view {view}: {good} valid {what}, need {self.quorum}; "
                f"this server lacks the keys of servers {unknown} it names"
            )
        raise BadCertificate(f"{kind} of view {view}: only {good} valid {what}, need {self.quorum}")

    def verify_qc(self, inst: Instance, qc: QuorumCert) -> None:
        signers = [i for i in qc.sigs if self.keys.get(i) is not None]
        if len(signers) + len(self._lacking(qc.sigs)) < self.quorum:
            raise BadCertificate(
                f"QC of view {qc.view} has {len(signers)} member signatures, need {self.quorum}"
            )
        payload = vote_statement(inst, qc.phase, qc.view, qc.digest)
        good = sum(1 for i in signers if self.verify(i, payload, qc.sigs[i]))
        if good < self.quorum:
            self._short("QC", qc.view, good, qc.sigs, "signatures")

    def verify_tc(self, inst: Instance, tc: TimeoutCert) -> None:
        signers = [i for i in tc.entries if self.keys.get(i) is not None]
        if len(signers) + len(self._lacking(tc.entries)) < self.quorum:
            raise BadCertificate(
                f"TC of view {tc.view} has {len(signers)} member timeouts, need {self.quorum}"
            )
        good = 0
        top = -1
        top_digest = b""
        for i in signers:
            e = tc.entries[i]
            if self.verify(i, timeout_statement(inst, tc.view, e.qc_view, e.qc_digest), e.sig):
                good += 1
                if e.qc_view > top:
                    top, top_digest = e.qc_view, e.qc_digest
        if good < self.quorum:
            self._short("TC", tc.view, good, tc.entries, "timeouts")
        if top == -1:
            if tc.high_qc is not None:
                raise BadCertificate("TC carries a QC that none of its timeouts reported")
            return
        qc = tc.high_qc
        if qc is None or qc.phase != PREPARE or qc.view != top or qc.digest != top_digest:
            raise BadCertificate(f"TC of view {tc.view} does not carry the highest reported QC (view {top})")
        self.verify_qc(inst, qc)
