"""Verifiable secret sharing: Feldman and Pedersen, with complaint evidence.

Theory of operation
-------------------
A dealer shares a secret with a random degree-t polynomial f and publishes
commitments to its coefficients:

* Feldman: A_k = a_k * G. Share s_i = f(i) is correct iff s_i * G == sum_k i^k A_k.
  The commitment to the secret (A_0) is public: right for keys, whose public key is A_0.
* Pedersen: C_k = a_k * G + b_k * H with a second polynomial g of blinding values and
  a generator H whose discrete log nobody knows (``hash_to_element``). Shares are
  (f(i), g(i)); commitments hide the secret unconditionally.

The dealer sends each share privately inside a :class:`ShareMessage` that it *signs*
(the signature is made by the caller with the dealer's period key; the crypto core
only defines the bytes). A recipient whose share fails verification broadcasts a
:class:`Complaint` carrying the signed message. Anyone can then judge it with
:func:`judge_complaint`: a valid signature on a share that fails the commitments
convicts the dealer; a share that verifies (or a forged signature) convicts the
accuser. No interaction and no trust in the accuser is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import Group
from appliance.crypto.secret import ScalarSource
from appliance.crypto.shamir import check_parameters, evaluate, random_polynomial

E = TypeVar("E")

#: Domain separation tag of the second Pedersen generator H.
PEDERSEN_H_DST = b"pst/vss/pedersen-h/v1"
SHARE_MESSAGE_TYPE = "vss-share"


@dataclass(frozen=True)
class Commitment(Generic[E]):
    """Commitments to the coefficients of a sharing polynomial (Feldman or Pedersen)."""

    points: tuple[E, ...]

    @property
    def degree(self) -> int:
        return len(self.points) - 1

    def evaluate(self, group: Group[E], x: int) -> E:
        """sum_k x^k * points[k]: the commitment to the share of server x."""
        q = group.order
        if len(self.points) == 1:
            return self.points[0]
        scalars = [pow(x, k, q) for k in range(1, len(self.points))]
        return group.add(self.points[0], group.multi_mul(scalars, list(self.points[1:])))

    def add(self, group: Group[E], other: Commitment[E]) -> Commitment[E]:
        if len(other.points) != len(self.points):
            raise ValueError("cannot add commitments of different degrees")
        return Commitment(tuple(group.add(a, b) for a, b in zip(self.points, other.points, strict=True)))

    def encode(self, group: Group[E], *, wide: bool = False) -> list[bytes]:
        """The points' encodings (``wide``: the group's wide form, see ``Group.encode_wide``)."""
        enc = group.encode_wide if wide else group.encode
        return [enc(p) for p in self.points]

    @classmethod
    def decode(
        cls, group: Group[E], obj: Any, degree: int, what: str = "commitment", *, wide: bool = False
    ) -> Commitment[E]:
        if not isinstance(obj, list):
            raise DecodeError(f"{what}: expected a list of {degree + 1} group elements")
        if len(obj) != degree + 1:
            raise DecodeError(f"{what}: expected {degree + 1} elements, got {len(obj)}")
        points = []
        for k, item in enumerate(obj):
            if not isinstance(item, bytes):
                raise DecodeError(f"{what}: element {k} is not a byte string")
            try:
                points.append(group.decode_wide(item) if wide else group.decode(item))
            except DecodeError as exc:
                raise DecodeError(f"{what}: element {k}: {exc}") from None
        return cls(tuple(points))


def sum_commitments(group: Group[E], commitments: Sequence[Commitment[E]]) -> Commitment[E]:
    if not commitments:
        raise ValueError("no commitments to add")
    acc = commitments[0]
    for c in commitments[1:]:
        acc = acc.add(group, c)
    return acc


# Feldman -------------------------------------------------------------------


def feldman_commit(group: Group[E], coefficients: Sequence[int]) -> Commitment[E]:
    return Commitment(tuple(group.mul_base(a) for a in coefficients))


def feldman_deal(
    group: Group[E], secret: int, n: int, t: int, rand: ScalarSource
) -> tuple[Commitment[E], dict[int, int]]:
    """Share ``secret`` among servers 1..n with threshold t; returns (commitment, shares)."""
    check_parameters(n, t)
    f = random_polynomial(secret, t, group.order, rand)
    shares = {i: evaluate(f, i, group.order) for i in range(1, n + 1)}
    commitment = feldman_commit(group, f)
    return commitment, shares


def feldman_verify(group: Group[E], commitment: Commitment[E], i: int, share: int) -> bool:
    if not 0 <= share < group.order:
        return False
    return group.mul_base(share) == commitment.evaluate(group, i)


# Pedersen ------------------------------------------------------------------


def pedersen_generator(group: Group[E]) -> E:
    """H: a generator with unknown discrete log to G, derived in public from a fixed tag."""
    return group.hash_to_element(PEDERSEN_H_DST, group.name.encode())


def pedersen_deal(
    group: Group[E], secret: int, n: int, t: int, rand: ScalarSource
) -> tuple[Commitment[E], dict[int, tuple[int, int]]]:
    """Pedersen VSS: returns (commitment, {i: (f(i), g(i))})."""
    check_parameters(n, t)
    q = group.order
    h = pedersen_generator(group)
    f = random_polynomial(secret, t, q, rand)
    g = random_polynomial(rand(), t, q, rand)
    commitment = Commitment(
        tuple(group.add(group.mul_base(a), group.mul(b, h)) for a, b in zip(f, g, strict=True))
    )
    shares = {i: (evaluate(f, i, q), evaluate(g, i, q)) for i in range(1, n + 1)}
    return commitment, shares


def pedersen_verify(group: Group[E], commitment: Commitment[E], i: int, share: tuple[int, int]) -> bool:
    s, s_blind = share
    if not (0 <= s < group.order and 0 <= s_blind < group.order):
        return False
    h = pedersen_generator(group)
    return group.add(group.mul_base(s), group.mul(s_blind, h)) == commitment.evaluate(group, i)


# Signed share messages and complaints ---------------------------------------


@dataclass(frozen=True, repr=False)
class ShareMessage:
    """The private message from ``dealer`` to ``recipient`` in dealing ``session``.

    ``values`` holds the share (one scalar for Feldman, two for Pedersen). The dealer
    signs :meth:`payload`; the signature is what makes a complaint checkable by anyone.
    """

    session: bytes
    dealer: int
    recipient: int
    values: tuple[int, ...]

    def payload(self, context: str, period: int) -> bytes:
        return encoding.signing_payload(
            SHARE_MESSAGE_TYPE,
            1,
            context,
            period,
            {
                "session": self.session,
                "dealer": self.dealer,
                "recipient": self.recipient,
                "values": list(self.values),
            },
        )

    def __repr__(self) -> str:
        return (
            f"ShareMessage(session={self.session.hex()}, dealer={self.dealer}, "
            f"recipient={self.recipient}, <hidden>)"
        )


@dataclass(frozen=True)
class Complaint:
    """A recipient's public accusation: the dealer's signed message with a bad share."""

    accuser: int
    message: ShareMessage
    signature: bytes


Verifier = Callable[[int, bytes, bytes], bool]
"""verify(party, payload, signature) -> bool with that party's period key (supplied by the caller)."""


@dataclass(frozen=True)
class Verdict:
    guilty: int
    reason: str


def judge_complaint(
    group: Group[E],
    commitment: Commitment[E],
    complaint: Complaint,
    verify: Verifier,
    *,
    context: str,
    period: int,
    pedersen: bool = False,
) -> Verdict:
    """Decide a complaint from public data alone: who cheated, the dealer or the accuser."""
    msg = complaint.message
    if msg.recipient != complaint.accuser:
        return Verdict(complaint.accuser, "complaint about a share addressed to another server")
    if not verify(msg.dealer, msg.payload(context, period), complaint.signature):
        return Verdict(complaint.accuser, "complaint evidence does not carry the dealer's signature")
    expected = 2 if pedersen else 1
    if len(msg.values) != expected:
        return Verdict(msg.dealer, "signed share message has the wrong number of values")
    if pedersen:
        ok = pedersen_verify(group, commitment, msg.recipient, (msg.values[0], msg.values[1]))
    else:
        ok = feldman_verify(group, commitment, msg.recipient, msg.values[0])
    if ok:
        return Verdict(complaint.accuser, "false complaint: the signed share matches the commitments")
    return Verdict(msg.dealer, f"signed a share for server {msg.recipient} that fails the commitments")


def verify_shares(group: Group[E], commitment: Commitment[E], shares: Mapping[int, int]) -> dict[int, bool]:
    """Feldman-verify several shares against one commitment."""
    return {i: feldman_verify(group, commitment, i, s) for i, s in shares.items()}
