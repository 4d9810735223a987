"""The refresh's and the initialization's messages, typed at the boundary (issue 8).

A peer's message is ``{"period" (or "session"), "phase", "body"}``. :func:`parse` checks the body's
shape for its phase once, when the message arrives, and returns one of the frozen types below, or
raises :class:`~appliance.crypto.errors.DecodeError` naming the phase. The engines' handlers take
these types, and messages held for a later step are kept as such (never parsed again); what the
handlers still check is meaning (signatures, membership, commitments), never shape.

Bodies that are one signed byte string with its own decoder (announcements, dealings, transcripts,
FROST messages, M_i) are :class:`Signed`: ``decode_signed`` and friends read them in the handler,
against keys only the engine's state holds. Agreement messages are decoded here by the agreement
package into its own typed messages (:class:`Agree`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols import agreement
from appliance.protocols.agreement._messages import Message as AgreementMessage

#: Phases whose body is one byte string read by its handler (a signed message, a transcript, a
#: signature): the refresh's and the initialization's.
SIGNED_PHASES = frozenset(
    {
        "ann",
        "deal",
        "catchup",
        "signed-kt",
        "kt-sig",
        "rpoint",
        "keys",
        "mi",
        "nonce",
        "signreq",
        "sigshare",
        "m-nonce",
        "m-signreq",
        "m-sigshare",
    }
)
AGREEMENT_PHASES = frozenset({"agree/keytable", "agree/dealings"})
#: The longest list a message may carry when the receiver does not know n yet (it lost M).
MAX_LIST = 256


@dataclass(frozen=True)
class Signed:
    """A byte string with its own signed encoding, read by the phase's handler."""

    phase: str
    data: bytes


@dataclass(frozen=True)
class Agree:
    """A message of one of the two agreements (the KeyTable, the set of dealings)."""

    phase: str
    msg: AgreementMessage


@dataclass(frozen=True)
class Attestation:
    """A server vouches that it received ``ann`` (a clear announcement) from its author."""

    phase: ClassVar[str] = "attest"
    ann: bytes
    attest: bytes
    by: int


@dataclass(frozen=True)
class Want:
    """The digests of dealings the sender lacks (it asks whoever holds them)."""

    phase: ClassVar[str] = "want"
    digests: tuple[bytes, ...]


@dataclass(frozen=True)
class Checked:
    """A member checked its sub-shares in a dealing: fine (no complaint) or a signed complaint."""

    phase: ClassVar[str] = "checked"
    dealing: bytes
    complaint: bytes | None


@dataclass(frozen=True)
class Undecided:
    """A server that could not decide this period's refresh says so (carries nothing)."""

    phase: ClassVar[str] = "undecided"


@dataclass(frozen=True)
class Phase2:
    """A peer in SIGN/RECOVER lacks the KeyTable signature and/or its recovery value."""

    phase: ClassVar[str] = "phase2"
    sig: bool
    rpoint: bool


@dataclass(frozen=True)
class RepairRequest:
    """A member whose sub-shares in decided dealings were bad: its signed complaints."""

    phase: ClassVar[str] = "repair-req"
    complaints: tuple[bytes, ...]


@dataclass(frozen=True)
class Repair:
    """A member's points on a convicted dealer's polynomials: per secret, the point and the
    blinding points (``{recovering server: point}``) its commitments check."""

    phase: ClassVar[str] = "repair"
    dealer: int
    values: Mapping[str, tuple[int, Mapping[Any, Any]]]


@dataclass(frozen=True)
class PushM:
    """The invariant information M, the KeyTable and the public sharings, for a server that
    lacks them (Table 1's PushM), with the decided transcript and the upgrade chain."""

    phase: ClassVar[str] = "pushm"
    m: bytes
    keytable: bytes
    sharings: Mapping[Any, Any]
    transcript: bytes | None
    upgrades: bytes | None


@dataclass(frozen=True)
class KeysRelay:
    """Initialization: key announcements the sender received from their authors."""

    phase: ClassVar[str] = "keys-relay"
    announcements: tuple[bytes, ...]


@dataclass(frozen=True)
class Need:
    """Initialization: the M_i the sender lacks, and whether it lacks the two signatures."""

    phase: ClassVar[str] = "need"
    mi: tuple[int, ...]
    sigs: bool


@dataclass(frozen=True)
class Sigs:
    """Initialization: the signatures of M and of KeyTable(0) under Scert."""

    phase: ClassVar[str] = "sigs"
    m: bytes
    keytable: bytes


Message = (
    Signed
    | Agree
    | Attestation
    | Want
    | Checked
    | Undecided
    | Phase2
    | RepairRequest
    | Repair
    | PushM
    | KeysRelay
    | Need
    | Sigs
)


def _bytes_list(body: Any, n: int, what: str) -> tuple[bytes, ...]:
    if not isinstance(body, list) or len(body) > n or not all(isinstance(x, bytes) for x in body):
        raise DecodeError(f"{what}: expected a list of at most {n} byte strings")
    return tuple(body)


def _repair_values(values: dict[Any, Any]) -> dict[str, tuple[int, Mapping[Any, Any]]]:
    out: dict[str, tuple[int, Mapping[Any, Any]]] = {}
    for sid, v in values.items():
        if not (
            isinstance(sid, str)
            and isinstance(v, list)
            and len(v) == 2
            and type(v[0]) is int
            and isinstance(v[1], dict)
        ):
            raise DecodeError("repair: malformed value")
        out[sid] = (v[0], v[1])
    return out


def parse(phase: str, body: Any, n: int) -> Message:
    """The typed message of ``phase`` from a peer's decoded ``body`` (``n`` bounds lists)."""
    if phase in SIGNED_PHASES:
        if not isinstance(body, bytes):
            raise DecodeError(f"{phase}: expected bytes")
        return Signed(phase, body)
    if phase in AGREEMENT_PHASES:
        return Agree(phase, agreement.decode(body))
    if phase == "attest":
        f = encoding.expect_map(body, {"ann": bytes, "attest": bytes, "by": int}, "attestation")
        return Attestation(f["ann"], f["attest"], f["by"])
    if phase == "want":
        return Want(_bytes_list(body, n, "want"))
    if phase == "checked":
        f = encoding.expect_map(body, {"dealing": bytes, "complaint": (bytes, type(None))}, "checked")
        return Checked(f["dealing"], f["complaint"])
    if phase == "undecided":
        return Undecided()
    if phase == "phase2":
        f = encoding.expect_map(body, {"sig": bool, "rpoint": bool}, "phase2")
        return Phase2(f["sig"], f["rpoint"])
    if phase == "repair-req":
        return RepairRequest(_bytes_list(body, n, "repair request"))
    if phase == "repair":
        f = encoding.expect_map(body, {"dealer": int, "values": dict}, "repair")
        return Repair(f["dealer"], _repair_values(f["values"]))
    if phase == "pushm":
        f = encoding.expect_map(
            body,
            {
                "M": bytes,
                "keytable": bytes,
                "sharings": dict,
                "transcript": (bytes, type(None)),
                "upgrades": (bytes, type(None)),
            },
            "PushM",
        )
        return PushM(f["M"], f["keytable"], f["sharings"], f["transcript"], f["upgrades"])
    if phase == "keys-relay":
        return KeysRelay(_bytes_list(body, n, "keys relay"))
    if phase == "need":
        f = encoding.expect_map(body, {"mi": list, "sigs": bool}, "need")
        if len(f["mi"]) > n or not all(type(j) is int for j in f["mi"]):
            raise DecodeError(f"need: expected a list of at most {n} server ids")
        return Need(tuple(f["mi"]), f["sigs"])
    if phase == "sigs":
        f = encoding.expect_map(body, {"M": bytes, "keytable": bytes}, "signatures")
        return Sigs(f["M"], f["keytable"])
    raise DecodeError(f"unknown phase {phase!r}")
