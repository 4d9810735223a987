"""Distributed key generation with no trusted dealer (Pedersen's joint-Feldman DKG
with proofs of possession, complaints with signed evidence and a qualified set).

Theory of operation
-------------------
Round 1 (:func:`deal`): every server i picks a random degree-t polynomial f_i,
broadcasts a :class:`Dealing` (Feldman commitments to f_i and a Schnorr proof of
knowledge of f_i(0), bound to the session context and to i, which stops rogue-key
attacks), and sends f_i(j) privately and signed to every server j.

Round 2: every server j checks each dealing (:func:`check_dealing`) and its share
(:func:`check_share`). A bad share is answered with a :class:`~appliance.crypto.vss.Complaint`
carrying the dealer's signed message; a share that never arrived with a
:class:`MissingShare`.

Round 3: an accused dealer answers each MissingShare with a public :class:`Reveal`.

Decision (:func:`qualify`): from the broadcast data alone, so every honest server
computes the same result, QUAL is the set of dealers with a valid dealing, no upheld
complaint and a valid reveal for every MissingShare. Anyone convicted (dealers of
bad shares, authors of false complaints) is named in ``cheaters``. QUAL must hold
at least t+1 dealers, so at least one honest one.

Finish (:func:`finish`): x_j = sum over QUAL of f_i(j), the group commitment is the
sum of the QUAL commitments, the public key its constant term.

Why this DKG and not GJKR: a rushing adversary can bias the distribution of the
public key of joint-Feldman DKG; Gennaro, Jarecki, Krawczyk and Rabin ("Secure
applications of Pedersen's distributed key generation protocol", CT-RSA 2003) show
that Schnorr-type signatures stay secure under this bias, and FROST's PedPoP (the
DKG analysed for FROST by Crites, Komlo and Maller) is exactly this protocol. It
costs one broadcast round instead of GJKR's two. See docs/design.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from appliance.crypto import encoding
from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import ScalarSource, SecretScalar
from appliance.crypto.shamir import check_parameters
from appliance.crypto.vss import (
    Commitment,
    Complaint,
    Verifier,
    feldman_deal,
    feldman_verify,
    judge_complaint,
    sum_commitments,
)

E = TypeVar("E")

POP_DST = b"pst/dkg/pop/v1"


@dataclass(frozen=True)
class Dealing(Generic[E]):
    """Server ``dealer``'s broadcast in round 1."""

    dealer: int
    commitment: Commitment[E]
    pop_r: E
    pop_z: int

    def to_obj(self, group: Group[E]) -> dict[str, Any]:
        return {
            "dealer": self.dealer,
            "commitment": self.commitment.encode(group),
            "pop": [group.encode(self.pop_r), group.encode_scalar(self.pop_z)],
        }

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(self.to_obj(group))

    @classmethod
    def decode(cls, group: Group[E], data: bytes, n: int, t: int) -> Dealing[E]:
        obj = encoding.decode(data, what="dealing")
        fields = encoding.expect_map(obj, {"dealer": int, "commitment": list, "pop": list}, "dealing")
        dealer = fields["dealer"]
        if not 1 <= dealer <= n:
            raise DecodeError(f"dealing: dealer {dealer} outside 1..{n}")
        commitment = Commitment.decode(group, fields["commitment"], t, what=f"dealing of server {dealer}")
        pop = fields["pop"]
        if len(pop) != 2 or not all(isinstance(x, bytes) for x in pop):
            raise DecodeError(f"dealing of server {dealer}: proof must be [R, z]")
        return cls(dealer, commitment, group.decode(pop[0]), group.decode_scalar(pop[1]))


@dataclass(frozen=True)
class MissingShare:
    """Server ``accuser`` received no share from ``dealer``."""

    accuser: int
    dealer: int


@dataclass(frozen=True, repr=False)
class Reveal:
    """``dealer``'s public answer to a MissingShare: the share for ``recipient``."""

    dealer: int
    recipient: int
    share: int


@dataclass(frozen=True)
class Qualification:
    qual: frozenset[int]
    cheaters: dict[int, str] = field(default_factory=dict)
    revealed: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)


def _pop_challenge(group: Group[E], context: bytes, dealer: int, a0: E, r: E) -> int:
    return group.hash_to_scalar(
        POP_DST, context, dealer.to_bytes(4, "big"), group.encode(a0), group.encode(r)
    )


def deal(
    group: Group[E], context: bytes, dealer: int, n: int, t: int, rand: ScalarSource
) -> tuple[Dealing[E], dict[int, int]]:
    """Round 1 for server ``dealer``: the broadcast dealing and the private shares."""
    check_parameters(n, t)
    secret = rand()
    commitment, shares = feldman_deal(group, secret, n, t, rand)
    k = rand()
    pop_r = group.mul_base(k)
    c = _pop_challenge(group, context, dealer, commitment.points[0], pop_r)
    pop_z = (k + c * secret) % group.order
    return Dealing(dealer, commitment, pop_r, pop_z), shares


def check_dealing(group: Group[E], context: bytes, dealing: Dealing[E], n: int, t: int) -> None:
    """Raise CheatingError(dealer) if the dealing is malformed or its proof is wrong."""
    d = dealing.dealer
    if not 1 <= d <= n:
        raise CheatingError(d, f"dealer id outside 1..{n}")
    if dealing.commitment.degree != t:
        raise CheatingError(d, f"commitment of degree {dealing.commitment.degree}, expected {t}")
    a0 = dealing.commitment.points[0]
    c = _pop_challenge(group, context, d, a0, dealing.pop_r)
    if group.mul_base(dealing.pop_z) != group.add(dealing.pop_r, group.mul(c, a0)):
        raise CheatingError(d, "proof of knowledge of the secret does not verify")


def check_share(group: Group[E], dealing: Dealing[E], recipient: int, share: int) -> bool:
    return feldman_verify(group, dealing.commitment, recipient, share)


def qualify(
    group: Group[E],
    context: bytes,
    n: int,
    t: int,
    dealings: Mapping[int, Dealing[E]],
    complaints: Iterable[Complaint],
    missing: Iterable[MissingShare],
    reveals: Iterable[Reveal],
    verify: Verifier,
    *,
    signing_context: str,
    period: int,
) -> Qualification:
    """The qualified set, decided from broadcast data only (identical at every honest server)."""
    cheaters: dict[int, str] = {}
    candidates: set[int] = set()
    for d in sorted(dealings):
        dealing = dealings[d]
        if dealing.dealer != d:
            cheaters[d] = "dealing carries another dealer's id"
            continue
        try:
            check_dealing(group, context, dealing, n, t)
        except CheatingError as exc:
            cheaters[d] = exc.reason
            continue
        candidates.add(d)
    for complaint in complaints:
        dealer = complaint.message.dealer
        if dealer not in dealings:
            cheaters.setdefault(complaint.accuser, f"complaint against server {dealer}, who dealt nothing")
            continue
        verdict = judge_complaint(
            group,
            dealings[dealer].commitment,
            complaint,
            verify,
            context=signing_context,
            period=period,
        )
        cheaters.setdefault(verdict.guilty, verdict.reason)
    reveal_map: dict[tuple[int, int], int] = {}
    for reveal in reveals:
        reveal_map.setdefault((reveal.dealer, reveal.recipient), reveal.share)
    revealed: dict[tuple[int, int], int] = {}
    for m in missing:
        if m.dealer not in candidates:
            continue
        key = (m.dealer, m.accuser)
        if key not in reveal_map:
            cheaters.setdefault(m.dealer, f"did not reveal the share of server {m.accuser} after a complaint")
        elif not check_share(group, dealings[m.dealer], m.accuser, reveal_map[key]):
            cheaters.setdefault(m.dealer, f"revealed a bad share for server {m.accuser}")
        else:
            revealed[key] = reveal_map[key]
    qual = frozenset(candidates - set(cheaters))
    if len(qual) < t + 1:
        raise NotEnoughSharesError(f"only {len(qual)} qualified dealers, need at least {t + 1}")
    return Qualification(qual, cheaters, revealed)


def finish(
    group: Group[E],
    n: int,
    t: int,
    recipient: int,
    qualification: Qualification,
    dealings: Mapping[int, Dealing[E]],
    shares: Mapping[int, int],
) -> KeyShare[E]:
    """Server ``recipient``'s share of the joint key, from the shares of the QUAL dealers.

    Checks the sum of the shares against the sum of the commitments (one evaluation
    instead of one per dealer); only if that fails are shares checked one by one, to
    name the dealer at fault.
    """
    q = group.order
    values: dict[int, int] = {}
    for d in sorted(qualification.qual):
        s = qualification.revealed.get((d, recipient), shares.get(d))
        if s is None:
            raise NotEnoughSharesError(f"no share from qualified dealer {d}")
        if not 0 <= s < q:
            raise CheatingError(d, f"share for server {recipient} is not a reduced scalar")
        values[d] = s
    total = sum(values.values()) % q
    commitment = sum_commitments(group, [dealings[d].commitment for d in sorted(qualification.qual)])
    if group.mul_base(total) != commitment.evaluate(group, recipient):
        for d, s in values.items():
            if not check_share(group, dealings[d], recipient, s):
                raise CheatingError(d, f"share for server {recipient} fails the commitments")
    return KeyShare(recipient, SecretScalar(total, q), PublicSharing(n, t, commitment))


def bad_dealers(
    group: Group[E], dealings: Mapping[int, Dealing[E]], recipient: int, shares: Mapping[int, int]
) -> list[int]:
    """Dealers whose share for ``recipient`` fails its commitments (batch-checked first)."""
    q = group.order
    if all(0 <= s < q for s in shares.values()):
        total = sum(shares.values()) % q
        combined = sum_commitments(group, [dealings[d].commitment for d in sorted(shares)])
        if group.mul_base(total) == combined.evaluate(group, recipient):
            return []
    return [d for d in sorted(shares) if not check_share(group, dealings[d], recipient, shares[d])]
