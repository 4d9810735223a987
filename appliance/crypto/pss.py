"""Proactive secret sharing: share refresh and share recovery (Herzberg, Jarecki,
Krawczyk, Yung, CRYPTO '95), on Feldman commitments.

Theory of operation
-------------------
Refresh. Every server j deals a random degree-t polynomial delta_j with
delta_j(0) = 0: a :class:`ZeroDealing` commits to its coefficients a_1..a_t only, so
the constant term is the identity by construction and cannot be cheated on. After
complaints (the same signed evidence as in :mod:`appliance.crypto.vss`) and a
qualified set, server i's new share is x_i + sum_j delta_j(i), and the new public
commitment is the old one plus the sum of the zero commitments. The secret, hence the
public key, is unchanged; every share changes, so t shares of period p together
with shares of period p+1 are random unrelated values.

Recovery. To rebuild the lost share x_r of server r, each helper j (t+1 or more
operational servers) deals g_j(x) = (x - r) * u_j(x) with u_j random of degree t-1,
committing to u_j (:class:`RecoveryDealing`): g_j(r) = 0 by construction and helpers
check their sub-shares g_j(i) against (i - r) * U_j(i). Helper i sends r the blinded
value y_i = x_i + sum_j g_j(i), which r checks against Y_i + sum_j (i - r) U_j(i)
(bad values name their sender). h = f + sum_j g_j is a random degree-t polynomial
with h(r) = x_r, so r learns its share and nothing else, and no helper learns x_r.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from appliance.crypto import encoding
from appliance.crypto.errors import CheatingError, CryptoError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import ScalarSource, SecretScalar
from appliance.crypto.shamir import check_parameters, evaluate, interpolate
from appliance.crypto.vss import Commitment, sum_commitments

E = TypeVar("E")


class CorruptShareError(CryptoError):
    """Our own share does not match the public sharing: the server must be recovered."""


# Refresh ---------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroDealing(Generic[E]):
    """Commitments A_1..A_t to a sharing of zero by ``dealer`` (A_0 is the identity)."""

    dealer: int
    points: tuple[E, ...]

    def full_commitment(self, group: Group[E]) -> Commitment[E]:
        return Commitment((group.identity(), *self.points))

    def check_subshare(self, group: Group[E], i: int, value: int) -> bool:
        if not 0 <= value < group.order:
            return False
        return group.mul_base(value) == self.full_commitment(group).evaluate(group, i)

    def to_obj(self, group: Group[E]) -> dict[str, Any]:
        return {"dealer": self.dealer, "points": [group.encode(p) for p in self.points]}

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(self.to_obj(group))

    @classmethod
    def decode(cls, group: Group[E], data: bytes, n: int, t: int) -> ZeroDealing[E]:
        obj = encoding.expect_map(
            encoding.decode(data, what="refresh dealing"), {"dealer": int, "points": list}, "refresh dealing"
        )
        dealer = obj["dealer"]
        if not 1 <= dealer <= n:
            raise DecodeError(f"refresh dealing: dealer {dealer} outside 1..{n}")
        commitment = Commitment.decode(
            group, obj["points"], t - 1, what=f"refresh dealing of server {dealer}"
        )
        return cls(dealer, commitment.points)


def refresh_deal(
    group: Group[E], dealer: int, n: int, t: int, rand: ScalarSource
) -> tuple[ZeroDealing[E], dict[int, int]]:
    """Server ``dealer``'s contribution to a refresh: a committed sharing of zero."""
    check_parameters(n, t)
    q = group.order
    coefficients = [0] + [rand() % q for _ in range(t)]
    points = tuple(group.mul_base(a) for a in coefficients[1:])
    return ZeroDealing(dealer, points), {i: evaluate(coefficients, i, q) for i in range(1, n + 1)}


def check_zero_dealing(group: Group[E], dealing: ZeroDealing[E], n: int, t: int) -> None:
    if not 1 <= dealing.dealer <= n:
        raise CheatingError(dealing.dealer, f"dealer id outside 1..{n}")
    if len(dealing.points) != t:
        raise CheatingError(
            dealing.dealer, f"refresh dealing has {len(dealing.points)} commitments, expected {t}"
        )


def refresh_public(
    group: Group[E], public: PublicSharing[E], dealings: Mapping[int, ZeroDealing[E]]
) -> PublicSharing[E]:
    """The new public sharing after adding the qualified zero sharings."""
    if not dealings:
        raise NotEnoughSharesError("a refresh needs at least one qualified dealing")
    delta = sum_commitments(group, [dealings[d].full_commitment(group) for d in sorted(dealings)])
    return PublicSharing(public.n, public.t, public.commitment.add(group, delta))


def refresh_share(
    group: Group[E],
    key: KeyShare[E],
    dealings: Mapping[int, ZeroDealing[E]],
    subshares: Mapping[int, int],
) -> KeyShare[E]:
    """Server ``key.index``'s share for the next period. The old share is left to the caller to wipe.

    The new share is checked once against the new public sharing; only on failure are
    sub-shares checked one by one to name the dealer. If every sub-share is right, it is
    our own old share that was corrupt (:class:`CorruptShareError`: we must be recovered).
    """
    q = group.order
    total = key.share.value
    for d in sorted(dealings):
        if d not in subshares:
            raise NotEnoughSharesError(f"no refresh sub-share from qualified dealer {d}")
        if not 0 <= subshares[d] < q:
            raise CheatingError(d, f"refresh sub-share for server {key.index} is not a reduced scalar")
        total = (total + subshares[d]) % q
    public = refresh_public(group, key.public, dealings)
    if group.mul_base(total) != public.verification_share(group, key.index):
        for d in sorted(dealings):
            if not dealings[d].check_subshare(group, key.index, subshares[d]):
                raise CheatingError(d, f"refresh sub-share for server {key.index} fails the commitments")
        raise CorruptShareError(f"server {key.index}: own share does not match its verification share")
    new = KeyShare(key.index, SecretScalar(total, q), public)
    if new.public_key != key.public_key:  # pragma: no cover - guaranteed by construction
        raise AssertionError("refresh changed the public key")
    return new


# Recovery ----------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryDealing(Generic[E]):
    """Helper ``dealer``'s commitments U_0..U_{t-1} to u, for g(x) = (x - lost) u(x)."""

    dealer: int
    lost: int
    points: tuple[E, ...]

    def commitment_at(self, group: Group[E], i: int) -> E:
        """Commitment to g(i) = (i - lost) * u(i)."""
        return group.mul((i - self.lost) % group.order, Commitment(self.points).evaluate(group, i))

    def check_subshare(self, group: Group[E], i: int, value: int) -> bool:
        if not 0 <= value < group.order:
            return False
        return group.mul_base(value) == self.commitment_at(group, i)

    def to_obj(self, group: Group[E]) -> dict[str, Any]:
        return {"dealer": self.dealer, "lost": self.lost, "points": [group.encode(p) for p in self.points]}

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(self.to_obj(group))

    @classmethod
    def decode(cls, group: Group[E], data: bytes, n: int, t: int) -> RecoveryDealing[E]:
        obj = encoding.expect_map(
            encoding.decode(data, what="recovery dealing"),
            {"dealer": int, "lost": int, "points": list},
            "recovery dealing",
        )
        dealer, lost = obj["dealer"], obj["lost"]
        if not (1 <= dealer <= n and 1 <= lost <= n) or dealer == lost:
            raise DecodeError(f"recovery dealing: bad dealer {dealer} or lost server {lost} for n={n}")
        commitment = Commitment.decode(
            group, obj["points"], t - 1, what=f"recovery dealing of server {dealer}"
        )
        return cls(dealer, lost, commitment.points)


def recovery_deal(
    group: Group[E], dealer: int, lost: int, helpers: list[int], t: int, rand: ScalarSource
) -> tuple[RecoveryDealing[E], dict[int, int]]:
    """Helper ``dealer``'s blinding polynomial for rebuilding server ``lost``'s share."""
    if lost in helpers:
        raise ValueError("the server being recovered cannot be a helper")
    q = group.order
    u = [rand() % q for _ in range(t)]
    points = tuple(group.mul_base(a) for a in u)
    subshares = {i: (i - lost) * evaluate(u, i, q) % q for i in helpers}
    return RecoveryDealing(dealer, lost, points), subshares


def check_recovery_dealing(group: Group[E], dealing: RecoveryDealing[E], lost: int, n: int, t: int) -> None:
    if dealing.lost != lost:
        raise CheatingError(dealing.dealer, f"recovery dealing for server {dealing.lost}, expected {lost}")
    if not 1 <= dealing.dealer <= n or dealing.dealer == lost:
        raise CheatingError(dealing.dealer, "recovery dealer id invalid")
    if len(dealing.points) != t:
        raise CheatingError(
            dealing.dealer, f"recovery dealing has {len(dealing.points)} commitments, expected {t}"
        )


def recovery_contribution(
    group: Group[E],
    key: KeyShare[E],
    dealings: Mapping[int, RecoveryDealing[E]],
    subshares: Mapping[int, int],
) -> int:
    """Helper ``key.index``'s blinded value y_i = x_i + sum_j g_j(i), sent to the lost server only.

    The sum of the sub-shares is checked once against the summed commitments; only on
    failure is each sub-share checked, to name the dealer.
    """
    q = group.order
    blind = 0
    for d in sorted(dealings):
        if d not in subshares:
            raise NotEnoughSharesError(f"no recovery sub-share from qualified dealer {d}")
        if not 0 <= subshares[d] < q:
            raise CheatingError(d, f"recovery sub-share for server {key.index} is not a reduced scalar")
        blind = (blind + subshares[d]) % q
    if dealings and group.mul_base(blind) != blinding_commitment(group, dealings, key.index):
        for d in sorted(dealings):
            if not dealings[d].check_subshare(group, key.index, subshares[d]):
                raise CheatingError(d, f"recovery sub-share for server {key.index} fails the commitments")
    return (key.share.value + blind) % q


def blinding_commitment(group: Group[E], dealings: Mapping[int, RecoveryDealing[E]], i: int) -> E:
    """Commitment to sum_j g_j(i): the dealings' commitments are added first, then evaluated once."""
    first = dealings[min(dealings)]
    summed = Commitment(first.points)
    for d in sorted(dealings):
        if dealings[d].lost != first.lost or len(dealings[d].points) != len(first.points):
            raise CheatingError(
                d, f"recovery dealing for another server or of another degree than {first.dealer}'s"
            )
        if d != min(dealings):
            summed = summed.add(group, Commitment(dealings[d].points))
    return group.mul((i - first.lost) % group.order, summed.evaluate(group, i))


@dataclass(frozen=True)
class Recovered(Generic[E]):
    key: KeyShare[E]
    cheaters: dict[int, str]


def recover_share(
    group: Group[E],
    public: PublicSharing[E],
    lost: int,
    dealings: Mapping[int, RecoveryDealing[E]],
    contributions: Mapping[int, int],
) -> Recovered[E]:
    """Rebuild server ``lost``'s share from helpers' blinded values; bad values name their sender."""
    check_parameters(public.n, public.t)
    q = group.order
    good: dict[int, int] = {}
    cheaters: dict[int, str] = {}
    for i in sorted(contributions):
        y = contributions[i]
        expected = public.verification_share(group, i)
        if dealings:
            expected = group.add(expected, blinding_commitment(group, dealings, i))
        if 0 <= y < q and group.mul_base(y) == expected:
            good[i] = y
        else:
            cheaters[i] = f"recovery value for server {lost} fails the commitments"
    if len(good) < public.t + 1:
        raise NotEnoughSharesError(
            f"only {len(good)} valid recovery values for server {lost}, need {public.t + 1}"
        )
    share = interpolate(good, q, x=lost)
    key = KeyShare(lost, SecretScalar(share, q), public)
    if not key.check(group):  # pragma: no cover - guaranteed when t+1 values verify
        raise AssertionError("recovered share does not match its verification share")
    return Recovered(key, cheaters)
