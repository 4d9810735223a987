"""Robust threshold DSS (DSA and ECDSA) with presignatures: an offline presigning
protocol whose every contribution is verifiable, and a one-round online signature.

Theory of operation
-------------------
A DSS signature on m under the key y = x*G is (r, s) with R = k*G, r = F(R) (the
group's ``dss_conversion``), h = the leftmost N bits of SHA-256(m) (FIPS 186-4
§4.6, N the bit length of q) and s = k^-1 (h + x r) mod q. We write kappa = k^-1:
s = kappa h + r (kappa x). The key x is an ordinary Feldman-shared
:class:`~appliance.crypto.keyshare.KeyShare` from :mod:`appliance.crypto.dkg`
(public key y = A_0, verification shares X_i = x_i G). H is the Pedersen generator
of :mod:`appliance.crypto.vss`. Shares are points of polynomials over Z_q,
server ids 1..n.

Presign (offline; one presignature per signature; in the manner of Gennaro,
Jarecki, Krawczyk and Rabin, "Robust threshold DSS signatures", EUROCRYPT '96):

1. Nonce dealings (:func:`deal_nonce`). Every server i deals, in one broadcast
   :class:`NonceDealing` plus signed private shares:
   a Pedersen sharing of a random kappa^(i) (degree t, commitments kappa*G + rho*H
   that hide kappa, so G*kappa = G/k is never public); a Feldman sharing of a
   random a^(i) (degree t, A-commitments public); and a Pedersen sharing of ZERO
   of degree 2t (b, beta with b(0) = beta(0) = 0; the constant commitment is the
   identity by construction and is not sent). A share that fails its commitments
   is answered with a :class:`~appliance.crypto.vss.Complaint` carrying the
   dealer's signed message, judged by anyone (:func:`qualify_nonce`); QUAL1 is the
   set of well-formed dealings with no upheld complaint, and kappa, a, b are the
   sums over QUAL1 (:func:`nonce_finish`).
2. Product opening (:func:`open_product`). Server i broadcasts
   z_i = kappa_i a_i + b_i with a Fiat-Shamir sigma proof of (kappa_i, rho_i, beta_i)
   such that Ck(i) = kappa_i G + rho_i H and z_i G - Cb(i) = kappa_i A_i - beta_i H.
   The z_i are points of a degree-2t polynomial with constant mu = kappa a;
   :func:`open_nonce` interpolates 2t+1 of them whose proofs verify (bad ones name
   their sender), then R = mu^-1 A_0 = (a / (kappa a)) G = k G and r = F(R).
3. Key-times-nonce (:func:`deal_w`). Server i deals a Pedersen sharing (degree t)
   of w_i = kappa_i x_i and proves, for the constant commitment
   D_i0 = w_i G + sigma_i H, knowledge of (kappa_i, rho_i, sigma_i) with
   Ck(i) = kappa_i G + rho_i H and D_i0 = kappa_i X_i + sigma_i H: the same kappa_i
   that is committed in step 1 multiplies the key share. After complaints
   (:func:`qualify_w`), a fixed set S of 2t+1 valid dealers (the smallest ids) is
   used for degree reduction: (kappa x)_j = sum_{i in S} lambda_i^S w_{i->j}, and
   the blindings and commitments are combined the same way (:func:`finish_presign`).

A :class:`Presignature` (per server) holds r, R, the server's kappa_j, rho_j,
(kappa x)_j and sigma_j in :class:`~appliance.crypto.secret.SecretScalar` buffers,
and the public Pedersen commitments to kappa and kappa x. It can be used once:
signing consumes and wipes it, a second use raises :class:`PresignatureUsedError`.

Online sign, one round (:func:`sign_share`): server j sends
s_j = kappa_j h + r (kappa x)_j and tau_j = rho_j h + r sigma_j. Anyone can check
s_j G + tau_j H == h Ck(j) + r Cw(j) (:func:`verify_signature_share`), so a bad share
names its sender (identifiable abort). :func:`combine` takes the optimistic path
first: it interpolates the first t+1 shares and verifies the resulting DSS signature
with the public key (two exponentiations); only if that fails are the shares
checked one by one, the culprits named and excluded. s = 0 (or r = 0 at presign
time) raises :class:`DSSRetryError`: sign again with a fresh presignature.

Why the randomizing zero sharing b
----------------------------------
Opening z_i = kappa_i a_i alone publishes every point of the polynomial
kappa(X) a(X). That product can be factored over F_q in polynomial time, and the
corrupted servers' t shares of kappa then fix the scale of the factor kappa(X):
kappa, hence k, hence x from any signature, would leak. GJKR add a random
degree-2t sharing of zero for exactly this reason; with it the opened polynomial
is uniformly random of degree 2t with constant mu, so the z_i reveal mu and nothing
else, and mu = kappa a reveals nothing about kappa because a is random and only
A_0 = a G is public. b is Pedersen-committed (not Feldman) so that b_i G, hence
kappa_i a_i G, is never public either.

Parameters and security
-----------------------
Secrecy holds against t < n/2 corrupted servers. Completing a presignature needs
2t+1 servers that contribute correctly (degree 2t), so n >= 2t+1 is the minimum
(:func:`check_dss_parameters`) and n >= 3t+1 is needed for robustness against t
actively malicious servers (:func:`is_robust`); an online signature needs t+1
valid shares. Soundness of the proofs and binding of the Pedersen commitments rest
on nobody knowing log_G H. Presignatures publish R before the message is known;
Groth and Shoup (EUROCRYPT 2022) analyse ECDSA with presignatures and find it
secure (in the generic group model, with a mild loss) as long as presignatures
are not combined with additive key derivation, which we never do.

Refresh: the key x is a KeyShare like any other, so :mod:`appliance.crypto.pss`
refreshes it. Presignatures are per period and MUST be discarded at refresh: the
kappa x shares of a presignature made in period p, together with those of period
p+1, would give a mobile adversary 2t shares of one degree-t polynomial. Each
presignature records a digest of the key sharing it was made for, and
:func:`sign_share` refuses it once the sharing has changed (:class:`StalePresignatureError`).

Session ids and wire objects: ``sid`` must be fresh for every presignature (e.g.
period || counter); every proof is bound to it, to the round-1 transcript digest
and to the prover's id, and every signed private share message to the very dealing
it belongs to, so that nothing is replayable across runs. :class:`NonceDealing`,
:class:`ProductOpening`, :class:`WDealing` and :class:`SignatureShare` encode to
canonical CBOR, and their decoders raise only DecodeError. A server must record a
presignature as used in durable storage before it releases its signature share.

Fast path (used by :mod:`appliance.protocols.dss_signing`; the in-process runner
:func:`run_presign` keeps every check). Checks are cut, never the values the protocol
computes, and each cut has a robust fallback that names the culprit as before:

* share checks in batches (:func:`batch_check_nonce_shares`, :func:`batch_check_w_shares`,
  :func:`batch_check_nonce_share_sums`): one random linear combination with 128-bit
  weights from ``secrets``, drawn after the values are fixed; one check per share only if
  the combination fails;
* openings without proofs (:func:`product_value`, :func:`optimistic_nonce`) when at least
  3t+1 z_i lie on one degree-2t polynomial; else the proofs (:func:`open_product`,
  :func:`open_nonce`);
* w dealings' proofs checked only when a signature fails (:func:`blame_w_dealings`); the
  final signature is always verified before it is released (:func:`combine`).

Not constant time (Python ints, gmpy2); see docs/security.md.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from math import lcm
from typing import Any, Generic, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa as crypto_dsa
from cryptography.hazmat.primitives.asymmetric import ec as crypto_ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from appliance.crypto import encoding
from appliance.crypto.dkg import Qualification
from appliance.crypto.errors import (
    CheatingError,
    CryptoError,
    DecodeError,
    NotEnoughSharesError,
    ParameterError,
)
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.local import SIGNING_CONTEXT, PeriodKeys
from appliance.crypto.secret import ScalarSource, SecretScalar
from appliance.crypto.shamir import check_parameters, evaluate, lagrange_coefficients, random_polynomial
from appliance.crypto.vss import Commitment, Complaint, ShareMessage, Verdict, Verifier, pedersen_generator

E = TypeVar("E")

PRODUCT_PROOF_DST = b"pst/dss/product-proof/v1"
W_PROOF_DST = b"pst/dss/w-proof/v1"
TRANSCRIPT_DST = b"pst/dss/nonce-transcript/v1"
SHARING_DST = b"pst/dss/key-sharing/v1"
NONCE_SESSION_SUFFIX = b"/dss-nonce"
W_SESSION_SUFFIX = b"/dss-w"

PublicKey = crypto_dsa.DSAPublicKey | crypto_ec.EllipticCurvePublicKey


class DSSRetryError(CryptoError):
    """A degenerate value (mu = 0, r = 0 or s = 0): start again with a fresh presignature."""


class PresignatureUsedError(CryptoError):
    """A presignature was used a second time (that would reveal the key)."""


class StalePresignatureError(CryptoError):
    """A presignature from another period (key sharing); discard it."""


def check_dss_parameters(n: int, t: int) -> None:
    """n >= 2t+1: a presignature opens a degree-2t product (robust against t cheaters needs 3t+1)."""
    check_parameters(n, t, min_n=lambda t: 2 * t + 1)


def is_robust(n: int, t: int) -> bool:
    """Can presigning complete with t actively malicious servers? (n >= 3t+1)"""
    return n >= 3 * t + 1


def message_scalar(group: Group[Any], message: bytes) -> int:
    """h: the leftmost min(N, 256) bits of SHA-256(message) mod q (FIPS 186-4 §4.6, SEC1 4.1.3)."""
    digest = hashlib.sha256(message).digest()
    z = int.from_bytes(digest, "big")
    n_bits = group.order.bit_length()
    if 8 * len(digest) > n_bits:
        z >>= 8 * len(digest) - n_bits
    return z % group.order


def sharing_digest(group: Group[E], sharing: PublicSharing[E]) -> bytes:
    """Identifies one period's key sharing (refresh changes it, the public key stays)."""
    h = hashlib.sha256(SHARING_DST + group.name.encode())
    for p in sharing.commitment.points:
        h.update(group.encode(p))
    return h.digest()


_H_CACHE: dict[tuple[str, int], Any] = {}


def _hgen(group: Group[E]) -> E:
    """H of :func:`~appliance.crypto.vss.pedersen_generator`, derived once per group."""
    key = (group.name, id(group))
    if key not in _H_CACHE:
        _H_CACHE[key] = pedersen_generator(group)
    h: E = _H_CACHE[key]
    group.precompute(h, heavy=True)  # (cheap when the table exists; keeps it among the recent ones)
    return h


_VSHARE_CACHE: dict[tuple[int, int], tuple[PublicSharing[Any], Any]] = {}


def _verification_share(group: Group[E], key: PublicSharing[E], i: int) -> E:
    """X_i = x_i G of ``key`` (one period's sharing), evaluated once per sharing and server."""
    hit = _VSHARE_CACHE.get((id(key), i))
    if hit is not None and hit[0] is key:
        x: E = hit[1]
        return x
    if len(_VSHARE_CACHE) > 256:
        _VSHARE_CACHE.clear()
    x = key.verification_share(group, i)
    _VSHARE_CACHE[(id(key), i)] = (key, x)
    return x


def _pedersen(group: Group[E], hgen: E, a: int, b: int) -> E:
    return group.multi_mul([a, b], [group.generator(), hgen])


def _check_scalar(group: Group[Any], k: int) -> bool:
    return 0 <= k < group.order


def _ids(n: int) -> range:
    return range(1, n + 1)


# Batch and consistency checks -------------------------------------------------------
#
# The fast path of presigning. A server checks many equations of the form
# sum(scalar * point) == identity (a share against its dealing's commitments). It checks
# one random linear combination of all of them instead: random 128-bit weights drawn
# here, from the operating system (``secrets``), after the values are fixed, so that
# no dealer can choose values that cancel (a batch holding a false equation passes with
# probability at most 2^-128). Only if the combination fails is each equation checked
# alone, which names the culprit exactly as the unbatched check does.

#: Bits of the random weights of a batch check.
BATCH_WEIGHT_BITS = 128


def _weight() -> int:
    return 1 + secrets.randbits(BATCH_WEIGHT_BITS)


class _Batch(Generic[E]):
    """Accumulates weighted equations w (a G + b H - C(j)) == 0 for commitments C.

    Each C(j) is evaluated first (small scalars j^k: cheap), then one multi-scalar
    multiplication with the weights checks the sum: G and H get one summed scalar each.
    """

    def __init__(self, group: Group[E], j: int) -> None:
        self.group = group
        self.j = j
        self.g = 0
        self.h = 0
        self.weights: list[int] = []
        self.jobs: list[tuple[list[int], list[E]]] = []

    def add(self, weight: int, a: int, b: int, *commitments: Commitment[E]) -> None:
        """weight (a G + b H - sum of the commitments at j)."""
        q = self.group.order
        self.g = (self.g + weight * a) % q
        self.h = (self.h + weight * b) % q
        self.weights.append(weight)
        scalars = [self.j**k for c in commitments for k in range(len(c.points))]
        self.jobs.append((scalars, [p for c in commitments for p in c.points]))

    def holds(self) -> bool:
        group = self.group
        evaluated = group.small_multi_mul_many(self.jobs)
        total = group.multi_mul(
            [self.g, self.h, *self.weights],
            [group.generator(), _hgen(group), *(group.neg(e) for e in evaluated)],
        )
        return group.is_identity(total)


def _nonce_share_shape(group: Group[E], values: Sequence[int]) -> bool:
    return len(values) == 5 and all(_check_scalar(group, v) for v in values)


def batch_check_nonce_shares(
    group: Group[E], dealings: Sequence[NonceDealing[E]], j: int, shares: Sequence[Sequence[int]]
) -> list[int]:
    """The positions k whose share ``shares[k]`` for server j fails ``dealings[k]``.

    Same answer as :func:`check_nonce_share` for each k (up to the 2^-128 chance of the
    batch); one multi-scalar multiplication when all are good.
    """
    if len(dealings) != len(shares):
        raise ParameterError("batch_check_nonce_shares: as many dealings as shares")
    batch: _Batch[E] = _Batch(group, j)
    shaped = 0
    for dealing, values in zip(dealings, shares, strict=True):
        if not _nonce_share_shape(group, values):
            continue
        shaped += 1
        kap, rho, a, b, beta = values
        batch.add(_weight(), kap, rho, dealing.kappa)
        batch.add(_weight(), a, 0, dealing.a)
        batch.add(_weight(), b, beta, dealing.zero_commitment(group))
    if shaped == len(dealings) and batch.holds():
        return []
    return [k for k in range(len(dealings)) if not check_nonce_share(group, dealings[k], j, shares[k])]


def batch_check_nonce_share_sums(
    group: Group[E],
    dealings: Mapping[int, Sequence[NonceDealing[E]]],
    j: int,
    shares: Mapping[int, Sequence[Sequence[int]]],
) -> bool:
    """Do server j's shares summed over the dealers match their summed commitments, for every k?

    ``dealings[d][k]``, ``shares[d][k]``: dealer d's dealing and j's share for presignature k.
    The cheapest check of all: one random linear combination over the presignatures and the
    three sharings, but none over the dealers, so its cost hardly grows with their number.
    True means the sums over these dealers are right: one corrupted dealer's error cannot
    cancel out; two corrupted dealers' errors can, which only matters if a qualified set
    later keeps one of them without the other, and the caller then checks that set again
    (or each dealer alone: :func:`batch_check_nonce_shares`). False: check each dealer alone.
    """
    dealers = sorted(dealings)
    if not dealers or sorted(shares) != dealers:
        return False
    count = len(dealings[dealers[0]])
    if any(len(dealings[d]) != count or len(shares[d]) != count for d in dealers):
        return False
    q = group.order
    batch: _Batch[E] = _Batch(group, j)
    for k in range(count):
        sums = [0, 0, 0, 0, 0]
        for d in dealers:
            values = shares[d][k]
            if not _nonce_share_shape(group, values):
                return False
            sums = [(acc + v) % q for acc, v in zip(sums, values, strict=True)]
        kap, rho, a, b, beta = sums
        batch.add(_weight(), kap, rho, *(dealings[d][k].kappa for d in dealers))
        batch.add(_weight(), a, 0, *(dealings[d][k].a for d in dealers))
        batch.add(_weight(), b, beta, *(dealings[d][k].zero_commitment(group) for d in dealers))
    return batch.holds()


def batch_check_w_shares(
    group: Group[E], dealings: Sequence[WDealing[E]], j: int, shares: Sequence[Sequence[int]]
) -> list[int]:
    """The positions k whose share fails ``dealings[k]`` (as :func:`check_w_share`), batched."""
    if len(dealings) != len(shares):
        raise ParameterError("batch_check_w_shares: as many dealings as shares")
    batch: _Batch[E] = _Batch(group, j)
    shaped = 0
    for dealing, values in zip(dealings, shares, strict=True):
        if len(values) != 2 or not all(_check_scalar(group, v) for v in values):
            continue
        shaped += 1
        batch.add(_weight(), values[0], values[1], dealing.commitment)
    if shaped == len(dealings) and batch.holds():
        return []
    return [k for k in range(len(dealings)) if not check_w_share(group, dealings[k], j, shares[k])]


@functools.lru_cache(maxsize=256)
def _relations(ids: tuple[int, ...], degree: int) -> list[dict[int, int]]:
    """Integer vectors c with sum_i c_i f(i) = 0 for every polynomial f of degree <= ``degree``.

    One for each id beyond the first degree+1: the divided difference over the first
    degree+1 ids and that one, scaled to integers (small for small ids).
    """
    base = list(ids[: degree + 1])
    out: list[dict[int, int]] = []
    for extra in ids[degree + 1 :]:
        group_ids = [*base, extra]
        fracs = {}
        for i in group_ids:
            den = 1
            for m in group_ids:
                if m != i:
                    den *= i - m
            fracs[i] = Fraction(1, den)
        scale = lcm(*(f.denominator for f in fracs.values()))
        out.append({i: int(f * scale) for i, f in fracs.items()})
    return out


def consistent_points(q: int, degree: int, points: Mapping[int, int]) -> bool:
    """Do the values {i: f(i)} lie on one polynomial of degree <= ``degree`` (mod q)?"""
    ids = tuple(sorted(points))
    return all(sum(c * points[i] for i, c in rel.items()) % q == 0 for rel in _relations(ids, degree))


def optimistic_nonce(group: Group[E], public: NoncePublic[E], values: Mapping[int, int]) -> Nonce[E] | None:
    """R and r without any product proof, when that is safe; else None.

    ``values``: {i: z_i} as opened (:func:`product_value`, no proofs). Safe when at least
    3t+1 servers opened and all z_i lie on one polynomial of degree
    2t: at most t of them are corrupted, so at least 2t+1 honest points fix the
    polynomial kappa(X) a(X) + b(X), and every other z_i on it is the correct value.
    Otherwise (fewer openings, or any inconsistency) the caller uses :func:`open_nonce`,
    which checks the proofs and names the culprits. Raises DSSRetryError like it.
    """
    q, t = group.order, public.t
    if len(values) < 3 * t + 1:
        return None
    if any(not 1 <= i <= public.n or not _check_scalar(group, z) for i, z in values.items()):
        return None
    if not consistent_points(q, 2 * t, values):
        return None
    return _nonce_from(group, public, dict(sorted(values.items())[: 2 * t + 1]))


# Linking proof ---------------------------------------------------------------------


@dataclass(frozen=True)
class LinkProof:
    """Sigma proof of (k, u, v) with P1 = k G + u H and P2 = k B + v H, in (c, e_k, e_u, e_v) form."""

    c: int
    e_k: int
    e_u: int
    e_v: int

    def to_obj(self, group: Group[Any]) -> list[bytes]:
        return [group.encode_scalar(x) for x in (self.c, self.e_k, self.e_u, self.e_v)]

    @classmethod
    def from_obj(cls, group: Group[Any], obj: Any, what: str) -> LinkProof:
        if not isinstance(obj, list) or len(obj) != 4 or not all(isinstance(x, bytes) for x in obj):
            raise DecodeError(f"{what}: proof must be a list of 4 scalars")
        c, e_k, e_u, e_v = (group.decode_scalar(x) for x in obj)
        return cls(c, e_k, e_u, e_v)


def _link_challenge(
    group: Group[E], dst: bytes, context: Sequence[bytes], party: int, points: Sequence[E]
) -> int:
    return group.hash_to_scalar(
        dst,
        group.name.encode(),
        *context,
        party.to_bytes(4, "big"),
        *(group.encode(p) for p in points),
    )


def _link_prove(
    group: Group[E],
    dst: bytes,
    context: Sequence[bytes],
    party: int,
    base: E,
    p1: E,
    p2: E,
    witness: tuple[int, int, int],
    rand: ScalarSource,
) -> LinkProof:
    q = group.order
    hgen = _hgen(group)
    k, u, v = witness
    rk, ru, rv = rand(), rand(), rand()
    t1 = _pedersen(group, hgen, rk, ru)
    t2 = group.add(group.mul(rk, base), group.mul(rv, hgen))
    c = _link_challenge(group, dst, context, party, (base, p1, p2, t1, t2))
    return LinkProof(c, (rk + c * k) % q, (ru + c * u) % q, (rv + c * v) % q)


def _link_verify(
    group: Group[E], dst: bytes, context: Sequence[bytes], party: int, base: E, p1: E, p2: E, proof: LinkProof
) -> bool:
    if not all(_check_scalar(group, x) for x in (proof.c, proof.e_k, proof.e_u, proof.e_v)):
        return False
    hgen = _hgen(group)
    minus_c = (-proof.c) % group.order
    t1 = group.add(_pedersen(group, hgen, proof.e_k, proof.e_u), group.mul(minus_c, p1))
    t2 = group.add(group.add(group.mul(proof.e_k, base), group.mul(proof.e_v, hgen)), group.mul(minus_c, p2))
    return _link_challenge(group, dst, context, party, (base, p1, p2, t1, t2)) == proof.c


# Complaints -------------------------------------------------------------------------


def _judge(
    complaint: Complaint,
    session: bytes,
    nvalues: int,
    check: Callable[[int, tuple[int, ...]], bool],
    verify: Verifier,
    *,
    context: str,
    period: int,
) -> Verdict:
    """Who cheated: the dealer (signed a bad share) or the accuser (false or malformed complaint)."""
    msg = complaint.message
    if msg.recipient != complaint.accuser or msg.session != session:
        return Verdict(complaint.accuser, "complaint about a share of another server or session")
    if not verify(msg.dealer, msg.payload(context, period), complaint.signature):
        return Verdict(complaint.accuser, "complaint evidence does not carry the dealer's signature")
    if len(msg.values) != nvalues:
        return Verdict(msg.dealer, "signed share message has the wrong number of values")
    if check(msg.recipient, msg.values):
        return Verdict(complaint.accuser, "false complaint: the signed share matches the commitments")
    return Verdict(msg.dealer, f"signed a share for server {msg.recipient} that fails the commitments")


def _qualify(
    n: int,
    need: int,
    what: str,
    structural: Mapping[int, str | None],
    complaints: Iterable[Complaint],
    judge: Callable[[Complaint], Verdict],
) -> Qualification:
    cheaters: dict[int, str] = {d: reason for d, reason in structural.items() if reason is not None}
    for complaint in complaints:
        if complaint.message.dealer not in structural:
            cheaters.setdefault(complaint.accuser, "complaint against a server that dealt nothing")
            continue
        verdict = judge(complaint)
        cheaters.setdefault(verdict.guilty, verdict.reason)
    qual = frozenset(d for d in structural if d not in cheaters)
    if len(qual) < need:
        raise NotEnoughSharesError(f"{what}: only {len(qual)} qualified dealers, need at least {need}")
    return Qualification(qual, cheaters)


# Round 1: nonce dealings -----------------------------------------------------------


@dataclass(frozen=True)
class NonceDealing(Generic[E]):
    """Server ``dealer``'s round-1 broadcast: Pedersen kappa, Feldman a, Pedersen zero (b, beta)."""

    dealer: int
    kappa: Commitment[E]
    a: Commitment[E]
    zero: tuple[E, ...]  # commitments to coefficients 1..2t; the constant one is the identity

    def zero_commitment(self, group: Group[E]) -> Commitment[E]:
        return Commitment((group.identity(), *self.zero))

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(
            {
                "dealer": self.dealer,
                "kappa": self.kappa.encode(group, wide=True),
                "a": self.a.encode(group, wide=True),
                "zero": [group.encode_wide(p) for p in self.zero],
            }
        )

    @classmethod
    def decode(cls, group: Group[E], data: bytes, n: int, t: int) -> NonceDealing[E]:
        what = "dss nonce dealing"
        obj = encoding.expect_map(
            encoding.decode(data, what=what), {"dealer": int, "kappa": list, "a": list, "zero": list}, what
        )
        dealer = obj["dealer"]
        if not 1 <= dealer <= n:
            raise DecodeError(f"{what}: dealer {dealer} outside 1..{n}")
        kappa = Commitment.decode(
            group, obj["kappa"], t, what=f"{what} of server {dealer} (kappa)", wide=True
        )
        a = Commitment.decode(group, obj["a"], t, what=f"{what} of server {dealer} (a)", wide=True)
        zero = Commitment.decode(
            group, obj["zero"], 2 * t - 1, what=f"{what} of server {dealer} (zero)", wide=True
        )
        return cls(dealer, kappa, a, zero.points)


def deal_nonce(
    group: Group[E], sid: bytes, dealer: int, n: int, t: int, rand: ScalarSource
) -> tuple[NonceDealing[E], dict[int, tuple[int, int, int, int, int]]]:
    """Round 1 for ``dealer``: the broadcast and the private shares {j: (kappa, rho, a, b, beta)}."""
    check_dss_parameters(n, t)
    q = group.order
    hgen = _hgen(group)
    fk = random_polynomial(rand(), t, q, rand)
    fr = random_polynomial(rand(), t, q, rand)
    fa = random_polynomial(rand(), t, q, rand)
    fb = random_polynomial(0, 2 * t, q, rand)
    fbeta = random_polynomial(0, 2 * t, q, rand)
    kappa = Commitment(tuple(_pedersen(group, hgen, k, r) for k, r in zip(fk, fr, strict=True)))
    a = Commitment(tuple(group.mul_base(c) for c in fa))
    zero = tuple(_pedersen(group, hgen, b, bb) for b, bb in zip(fb[1:], fbeta[1:], strict=True))
    shares = {
        j: (
            evaluate(fk, j, q),
            evaluate(fr, j, q),
            evaluate(fa, j, q),
            evaluate(fb, j, q),
            evaluate(fbeta, j, q),
        )
        for j in _ids(n)
    }
    return NonceDealing(dealer, kappa, a, zero), shares


def check_nonce_dealing(group: Group[E], dealing: NonceDealing[E], n: int, t: int) -> None:
    """Raise CheatingError(dealer) if the dealing has the wrong shape."""
    d = dealing.dealer
    if not 1 <= d <= n:
        raise CheatingError(d, f"dealer id outside 1..{n}")
    if dealing.kappa.degree != t or dealing.a.degree != t or len(dealing.zero) != 2 * t:
        raise CheatingError(d, "nonce dealing commitments have the wrong degree")


def check_nonce_share(group: Group[E], dealing: NonceDealing[E], j: int, values: Sequence[int]) -> bool:
    """Does server j's share (kappa, rho, a, b, beta) match the dealing's three commitments?"""
    if len(values) != 5 or not all(_check_scalar(group, v) for v in values):
        return False
    k, r, a, b, beta = values
    hgen = _hgen(group)
    return (
        _pedersen(group, hgen, k, r) == dealing.kappa.evaluate(group, j)
        and group.mul_base(a) == dealing.a.evaluate(group, j)
        and _pedersen(group, hgen, b, beta) == dealing.zero_commitment(group).evaluate(group, j)
    )


def _bound_session(sid: bytes, suffix: bytes, dealing_bytes: bytes) -> bytes:
    return sid + suffix + b"/" + hashlib.sha256(dealing_bytes).digest()


def nonce_session(group: Group[E], sid: bytes, dealing: NonceDealing[E]) -> bytes:
    """The ``session`` of the dealer's round-1 :class:`~appliance.crypto.vss.ShareMessage` s.

    It binds the signed shares to this very dealing, so that a signed share of an
    earlier run (even one with the same ``sid``) cannot convict the dealer now.
    """
    return _bound_session(sid, NONCE_SESSION_SUFFIX, dealing.encode(group))


def qualify_nonce(
    group: Group[E],
    sid: bytes,
    n: int,
    t: int,
    dealings: Mapping[int, NonceDealing[E]],
    complaints: Iterable[Complaint],
    verify: Verifier,
    *,
    signing_context: str,
    period: int,
) -> Qualification:
    """QUAL1 from broadcast data only: well-formed dealings without an upheld complaint (>= t+1)."""
    structural: dict[int, str | None] = {}
    for d, dealing in dealings.items():
        if dealing.dealer != d:
            structural[d] = "dealing carries another dealer's id"
            continue
        try:
            check_nonce_dealing(group, dealing, n, t)
            structural[d] = None
        except CheatingError as exc:
            structural[d] = exc.reason

    def judge(c: Complaint) -> Verdict:
        dealing = dealings[c.message.dealer]
        return _judge(
            c,
            nonce_session(group, sid, dealing),
            5,
            lambda j, v: check_nonce_share(group, dealing, j, v),
            verify,
            context=signing_context,
            period=period,
        )

    return _qualify(n, t + 1, "dss nonce", structural, complaints, judge)


@dataclass(frozen=True)
class NoncePublic(Generic[E]):
    """The agreed outcome of round 1: summed commitments over QUAL1 and a transcript digest."""

    sid: bytes
    n: int
    t: int
    qual: frozenset[int]
    kappa: Commitment[E]
    a: Commitment[E]
    zero: Commitment[E]
    digest: bytes

    def context(self) -> tuple[bytes, bytes]:
        return (self.sid, self.digest)


def nonce_public(
    group: Group[E], sid: bytes, n: int, t: int, qual: Iterable[int], dealings: Mapping[int, NonceDealing[E]]
) -> NoncePublic[E]:
    members = sorted(qual)
    if not members:
        raise NotEnoughSharesError("dss nonce: empty qualified set")

    def total(pick: Callable[[NonceDealing[E]], Commitment[E]]) -> Commitment[E]:
        acc = pick(dealings[members[0]])
        for d in members[1:]:
            acc = acc.add(group, pick(dealings[d]))
        return acc

    kappa = total(lambda d: d.kappa)
    a = total(lambda d: d.a)
    zero = total(lambda d: d.zero_commitment(group))
    h = hashlib.sha256(TRANSCRIPT_DST + group.name.encode() + len(sid).to_bytes(8, "big") + sid)
    h.update(bytes(encoding.encode(members)))
    for c in (kappa, a, zero):
        for p in c.points:
            h.update(group.encode(p))
    return NoncePublic(sid, n, t, frozenset(members), kappa, a, zero, h.digest())


@dataclass(repr=False)
class NonceState:
    """Server ``index``'s secret shares of kappa (with rho), a and the zero sharing (b, beta)."""

    index: int
    kappa: SecretScalar
    rho: SecretScalar
    a: SecretScalar
    b: SecretScalar
    beta: SecretScalar

    def wipe(self) -> None:
        for s in (self.kappa, self.rho, self.a, self.b, self.beta):
            s.wipe()

    def __repr__(self) -> str:
        return f"NonceState(index={self.index}, <hidden>)"


def nonce_finish(
    group: Group[E],
    public: NoncePublic[E],
    index: int,
    dealings: Mapping[int, NonceDealing[E]],
    shares: Mapping[int, Sequence[int]],
    *,
    checked: bool = False,
) -> NonceState:
    """Server ``index``'s shares: sums of the QUAL1 dealers' shares (each checked again, unless
    ``checked``: the caller already checked these very values against these very dealings)."""
    q = group.order
    sums = [0, 0, 0, 0, 0]
    for d in sorted(public.qual):
        values = shares.get(d)
        if values is None:
            raise NotEnoughSharesError(f"no nonce share from qualified dealer {d}")
        if not checked and not check_nonce_share(group, dealings[d], index, values):
            raise CheatingError(d, f"nonce share for server {index} fails the commitments")
        sums = [(acc + v) % q for acc, v in zip(sums, values, strict=True)]
    k, r, a, b, beta = (SecretScalar(v, q) for v in sums)
    return NonceState(index, k, r, a, b, beta)


# Round 2: product opening -----------------------------------------------------------


@dataclass(frozen=True)
class ProductOpening:
    """Server ``party``'s z = kappa_i a_i + b_i with the proof that it is formed correctly."""

    party: int
    z: int
    proof: LinkProof

    def encode(self, group: Group[Any]) -> bytes:
        return encoding.encode(
            {"party": self.party, "z": group.encode_scalar(self.z), "proof": self.proof.to_obj(group)}
        )

    @classmethod
    def decode(cls, group: Group[Any], data: bytes, n: int) -> ProductOpening:
        what = "dss product opening"
        obj = encoding.expect_map(
            encoding.decode(data, what=what), {"party": int, "z": bytes, "proof": list}, what
        )
        party = obj["party"]
        if not 1 <= party <= n:
            raise DecodeError(f"{what}: party {party} outside 1..{n}")
        return cls(party, group.decode_scalar(obj["z"]), LinkProof.from_obj(group, obj["proof"], what))


def _product_statement(group: Group[E], public: NoncePublic[E], i: int, z: int) -> tuple[E, E, E]:
    """(base A_i, P1 = Ck(i), P2 = z G - Cb(i)); the witness is (kappa_i, rho_i, -beta_i)."""
    a_i = public.a.evaluate(group, i)
    ck_i = public.kappa.evaluate(group, i)
    p2 = group.sub(group.mul_base(z), public.zero.evaluate(group, i))
    return a_i, ck_i, p2


def product_value(group: Group[E], state: NonceState, *, _z_offset: int = 0) -> int:
    """z_i = kappa_i a_i + b_i alone (the fast path opens it without its proof)."""
    return (state.kappa.value * state.a.value + state.b.value + _z_offset) % group.order


def open_product(
    group: Group[E], public: NoncePublic[E], state: NonceState, rand: ScalarSource, *, _z_offset: int = 0
) -> ProductOpening:
    """Round 2 for server ``state.index``: z_i with its proof."""
    q = group.order
    i = state.index
    z = product_value(group, state, _z_offset=_z_offset)
    base, p1, p2 = _product_statement(group, public, i, z)
    witness = (state.kappa.value, state.rho.value, (-state.beta.value) % q)
    proof = _link_prove(group, PRODUCT_PROOF_DST, public.context(), i, base, p1, p2, witness, rand)
    return ProductOpening(i, z, proof)


def check_product_opening(group: Group[E], public: NoncePublic[E], opening: ProductOpening) -> None:
    """Raise CheatingError(party) unless the opening's proof verifies."""
    i = opening.party
    if not 1 <= i <= public.n:
        raise CheatingError(i, "product opening from an unknown server")
    if not _check_scalar(group, opening.z):
        raise CheatingError(i, "product opening is not a reduced scalar")
    base, p1, p2 = _product_statement(group, public, i, opening.z)
    if not _link_verify(group, PRODUCT_PROOF_DST, public.context(), i, base, p1, p2, opening.proof):
        raise CheatingError(i, "product opening z_i = kappa_i a_i + b_i: proof does not verify")


@dataclass(frozen=True)
class Nonce(Generic[E]):
    """The public nonce of a presignature: R = k G and r = F(R)."""

    R: E
    r: int


def open_nonce(
    group: Group[E], public: NoncePublic[E], openings: Mapping[int, ProductOpening]
) -> tuple[Nonce[E], dict[int, str]]:
    """R and r from 2t+1 verified openings; returns the nonce and the senders of bad openings."""
    t = public.t
    cheaters: dict[int, str] = {}
    valid: dict[int, int] = {}
    for i in sorted(openings):
        opening = openings[i]
        if opening.party != i:
            cheaters[i] = "product opening carries another server's id"
            continue
        try:
            check_product_opening(group, public, opening)
        except CheatingError as exc:
            cheaters[i] = exc.reason
            continue
        valid[i] = opening.z
        if len(valid) == 2 * t + 1:
            break
    if len(valid) < 2 * t + 1:
        raise NotEnoughSharesError(
            f"dss nonce: {len(valid)} valid product openings, need {2 * t + 1} (cheaters: {cheaters})"
        )
    return _nonce_from(group, public, valid), cheaters


def _nonce_from(group: Group[E], public: NoncePublic[E], valid: Mapping[int, int]) -> Nonce[E]:
    """R = mu^-1 A_0 from 2t+1 correct openings {i: z_i}."""
    q = group.order
    lam = lagrange_coefficients(sorted(valid), q)
    mu = sum(lam[i] * z for i, z in valid.items()) % q
    if mu == 0:
        raise DSSRetryError("dss nonce: mu = 0; run presign again")
    R = group.mul(pow(mu, -1, q), public.a.points[0])
    if group.is_identity(R):
        raise DSSRetryError("dss nonce: R is the identity; run presign again")
    r = group.dss_conversion(R) % q
    if r == 0:
        raise DSSRetryError("dss nonce: r = 0; run presign again")
    return Nonce(R, r)


# Round 3: w = kappa_i x_i dealings ----------------------------------------------------


@dataclass(frozen=True)
class WDealing(Generic[E]):
    """Server ``dealer``'s Pedersen dealing of w_i = kappa_i x_i with its linking proof."""

    dealer: int
    commitment: Commitment[E]
    proof: LinkProof

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(
            {
                "dealer": self.dealer,
                "commitment": self.commitment.encode(group, wide=True),
                "proof": self.proof.to_obj(group),
            }
        )

    @classmethod
    def decode(cls, group: Group[E], data: bytes, n: int, t: int) -> WDealing[E]:
        what = "dss w dealing"
        obj = encoding.expect_map(
            encoding.decode(data, what=what), {"dealer": int, "commitment": list, "proof": list}, what
        )
        dealer = obj["dealer"]
        if not 1 <= dealer <= n:
            raise DecodeError(f"{what}: dealer {dealer} outside 1..{n}")
        commitment = Commitment.decode(
            group, obj["commitment"], t, what=f"{what} of server {dealer}", wide=True
        )
        return cls(dealer, commitment, LinkProof.from_obj(group, obj["proof"], what))


def w_session(group: Group[E], sid: bytes, dealing: WDealing[E]) -> bytes:
    """The ``session`` of round-3 share messages, bound to the dealing like :func:`nonce_session`."""
    return _bound_session(sid, W_SESSION_SUFFIX, dealing.encode(group))


def _w_context(group: Group[E], public: NoncePublic[E], nonce: Nonce[E]) -> tuple[bytes, bytes, bytes]:
    return (public.sid, public.digest, group.encode(nonce.R))


def deal_w(
    group: Group[E],
    public: NoncePublic[E],
    nonce: Nonce[E],
    state: NonceState,
    key: KeyShare[E],
    rand: ScalarSource,
    *,
    _w_offset: int = 0,
) -> tuple[WDealing[E], dict[int, tuple[int, int]]]:
    """Round 3 for server ``state.index``: the dealing and the private shares {j: (w, sigma)}."""
    q = group.order
    i = state.index
    if key.index != i:
        raise ParameterError(f"key share of server {key.index} used for server {i}")
    hgen = _hgen(group)
    kappa = state.kappa.value
    w = (kappa * key.share.value + _w_offset) % q
    fw = random_polynomial(w, public.t, q, rand)
    fs = random_polynomial(rand(), public.t, q, rand)
    commitment = Commitment(tuple(_pedersen(group, hgen, a, b) for a, b in zip(fw, fs, strict=True)))
    x_i = _verification_share(group, key.public, i)
    group.precompute(x_i)  # our own base in every w proof of the period: a fixed-base table pays
    proof = _link_prove(
        group,
        W_PROOF_DST,
        _w_context(group, public, nonce),
        i,
        x_i,
        public.kappa.evaluate(group, i),
        commitment.points[0],
        (kappa, state.rho.value, fs[0]),
        rand,
    )
    shares = {j: (evaluate(fw, j, q), evaluate(fs, j, q)) for j in _ids(public.n)}
    return WDealing(i, commitment, proof), shares


def check_w_dealing(
    group: Group[E], public: NoncePublic[E], nonce: Nonce[E], key: PublicSharing[E], dealing: WDealing[E]
) -> None:
    """Raise CheatingError(dealer) unless the dealing has degree t and its proof verifies."""
    _check_w_dealing(group, public.n, public.t, _w_context(group, public, nonce), public.kappa, key, dealing)


def _check_w_dealing(
    group: Group[E],
    n: int,
    t: int,
    context: Sequence[bytes],
    kappa: Commitment[E],
    key: PublicSharing[E],
    dealing: WDealing[E],
) -> None:
    i = dealing.dealer
    if not 1 <= i <= n:
        raise CheatingError(i, f"dealer id outside 1..{n}")
    if dealing.commitment.degree != t:
        raise CheatingError(i, f"w dealing of degree {dealing.commitment.degree}, expected {t}")
    ok = _link_verify(
        group,
        W_PROOF_DST,
        context,
        i,
        _verification_share(group, key, i),
        kappa.evaluate(group, i),
        dealing.commitment.points[0],
        dealing.proof,
    )
    if not ok:
        raise CheatingError(i, "w dealing: proof that it shares kappa_i x_i does not verify")


def check_w_share(group: Group[E], dealing: WDealing[E], j: int, values: Sequence[int]) -> bool:
    if len(values) != 2 or not all(_check_scalar(group, v) for v in values):
        return False
    return _pedersen(group, _hgen(group), values[0], values[1]) == dealing.commitment.evaluate(group, j)


def qualify_w(
    group: Group[E],
    public: NoncePublic[E],
    nonce: Nonce[E],
    key: PublicSharing[E],
    dealings: Mapping[int, WDealing[E]],
    complaints: Iterable[Complaint],
    verify: Verifier,
    *,
    signing_context: str,
    period: int,
) -> Qualification:
    """Valid w dealings without an upheld complaint (at least 2t+1 are needed)."""
    structural: dict[int, str | None] = {}
    for d, dealing in dealings.items():
        if dealing.dealer != d:
            structural[d] = "dealing carries another dealer's id"
            continue
        try:
            check_w_dealing(group, public, nonce, key, dealing)
            structural[d] = None
        except CheatingError as exc:
            structural[d] = exc.reason

    def judge(c: Complaint) -> Verdict:
        dealing = dealings[c.message.dealer]
        return _judge(
            c,
            w_session(group, public.sid, dealing),
            2,
            lambda j, v: check_w_share(group, dealing, j, v),
            verify,
            context=signing_context,
            period=period,
        )

    return _qualify(public.n, 2 * public.t + 1, "dss w", structural, complaints, judge)


def judge_nonce_complaint(
    group: Group[E],
    sid: bytes,
    dealing: NonceDealing[E],
    complaint: Complaint,
    verify: Verifier,
    *,
    signing_context: str,
    period: int,
) -> Verdict:
    """One round-1 complaint against ``dealing``, judged from public data: dealer or accuser guilty."""
    return _judge(
        complaint,
        nonce_session(group, sid, dealing),
        5,
        lambda j, v: check_nonce_share(group, dealing, j, v),
        verify,
        context=signing_context,
        period=period,
    )


def judge_w_complaint(
    group: Group[E],
    sid: bytes,
    dealing: WDealing[E],
    complaint: Complaint,
    verify: Verifier,
    *,
    signing_context: str,
    period: int,
) -> Verdict:
    """One round-3 complaint against ``dealing`` (see :func:`judge_nonce_complaint`)."""
    return _judge(
        complaint,
        w_session(group, sid, dealing),
        2,
        lambda j, v: check_w_share(group, dealing, j, v),
        verify,
        context=signing_context,
        period=period,
    )


def reduction_set(qual: Iterable[int], t: int) -> tuple[int, ...]:
    """The fixed set S of 2t+1 dealers used for degree reduction: the smallest qualified ids."""
    members = sorted(qual)
    if len(members) < 2 * t + 1:
        raise NotEnoughSharesError(f"dss w: {len(members)} valid dealings, need {2 * t + 1}")
    return tuple(members[: 2 * t + 1])


# Presignatures -------------------------------------------------------------------


@dataclass(frozen=True)
class PresignPublic(Generic[E]):
    """Public part of a presignature, identical at every server."""

    sid: bytes
    n: int
    t: int
    R: E
    r: int
    kappa: Commitment[E]
    #: The w dealings of the reduction set S, in order: the commitment to kappa x is
    #: sum_{i in S} lambda_i D_i. It is only needed to check signature shares one by one,
    #: and the dealings' proofs only to find who cheated when a signature fails (the robust
    #: path), so both are computed on demand.
    w_dealings: tuple[WDealing[E], ...]
    public_key: E
    sharing: bytes  # digest of the key sharing (period) it was made for
    transcript: bytes  # the nonce round's transcript digest (the w proofs are bound to it)
    _cache: dict[int, tuple[E, E]] = field(default_factory=dict, compare=False, repr=False)

    def _w_parts(self, group: Group[E]) -> list[tuple[int, Commitment[E]]]:
        lam = lagrange_coefficients([d.dealer for d in self.w_dealings], group.order)
        return [(lam[d.dealer], d.commitment) for d in self.w_dealings]

    def w(self, group: Group[E]) -> Commitment[E]:
        """The Pedersen commitment to the kappa x sharing."""
        parts = self._w_parts(group)
        lams = [lam for lam, _ in parts]
        return Commitment(
            tuple(group.multi_mul(lams, [c.points[k] for _, c in parts]) for k in range(self.t + 1))
        )

    def commitments_of(self, group: Group[E], j: int) -> tuple[E, E]:
        """(Ck(j), Cw(j)): server j's commitments to its kappa and kappa x shares."""
        if j not in self._cache:
            q = group.order
            parts = self._w_parts(group)
            scalars = [lam * pow(j, k, q) % q for lam, c in parts for k in range(len(c.points))]
            points = [p for _, c in parts for p in c.points]
            self._cache[j] = (self.kappa.evaluate(group, j), group.multi_mul(scalars, points))
        return self._cache[j]


@dataclass(repr=False, eq=False)
class Presignature(Generic[E]):
    """Server ``index``'s one-time presignature: shares of kappa = k^-1 and of kappa x."""

    index: int
    public: PresignPublic[E]
    kappa: SecretScalar
    rho: SecretScalar
    w: SecretScalar
    sigma: SecretScalar
    used: bool = False

    @property
    def r(self) -> int:
        return self.public.r

    def consume(self) -> tuple[int, int, int, int]:
        """(kappa, rho, w, sigma), once: the buffers are wiped and a second call raises."""
        if self.used:
            raise PresignatureUsedError(
                f"presignature {self.public.sid.hex()} of server {self.index} was used"
            )
        values = (self.kappa.value, self.rho.value, self.w.value, self.sigma.value)
        self.wipe()
        return values

    def wipe(self) -> None:
        self.used = True
        for s in (self.kappa, self.rho, self.w, self.sigma):
            s.wipe()

    def __repr__(self) -> str:
        state = "used" if self.used else "fresh"
        return f"Presignature(index={self.index}, sid={self.public.sid.hex()}, {state}, <hidden>)"


def finish_presign(
    group: Group[E],
    public: NoncePublic[E],
    nonce: Nonce[E],
    state: NonceState,
    key: PublicSharing[E],
    reduction: Sequence[int],
    dealings: Mapping[int, WDealing[E]],
    shares: Mapping[int, Sequence[int]],
    *,
    checked: bool = False,
) -> Presignature[E]:
    """Degree reduction over S: (kappa x)_j = sum lambda_i^S w_{i->j}; wipes the round-1 state.
    ``checked``: the caller already checked these shares against these dealings (see nonce_finish)."""
    q = group.order
    j = state.index
    if len(set(reduction)) != 2 * public.t + 1:
        raise ParameterError(f"reduction set must hold {2 * public.t + 1} distinct dealers")
    lam = lagrange_coefficients(list(reduction), q)
    w_total, s_total = 0, 0
    for i in reduction:
        values = shares.get(i)
        if values is None:
            raise NotEnoughSharesError(f"no w share from dealer {i}")
        if not checked and not check_w_share(group, dealings[i], j, values):
            raise CheatingError(i, f"w share for server {j} fails the commitments")
        w_total = (w_total + lam[i] * values[0]) % q
        s_total = (s_total + lam[i] * values[1]) % q
    pre_public = PresignPublic(
        public.sid,
        public.n,
        public.t,
        nonce.R,
        nonce.r,
        public.kappa,
        tuple(dealings[i] for i in reduction),
        key.public_key,
        sharing_digest(group, key),
        public.digest,
    )
    presig = Presignature(
        j,
        pre_public,
        SecretScalar(state.kappa.value, q),
        SecretScalar(state.rho.value, q),
        SecretScalar(w_total, q),
        SecretScalar(s_total, q),
    )
    state.wipe()
    return presig


# Online signing ------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureShare:
    """Server ``signer``'s signature share for presignature ``sid``: s_j and its blinding tau_j."""

    sid: bytes
    signer: int
    s: int
    tau: int

    def encode(self, group: Group[Any]) -> bytes:
        return encoding.encode(
            {
                "sid": self.sid,
                "signer": self.signer,
                "s": group.encode_scalar(self.s),
                "tau": group.encode_scalar(self.tau),
            }
        )

    @classmethod
    def decode(cls, group: Group[Any], data: bytes, n: int) -> SignatureShare:
        what = "dss signature share"
        obj = encoding.expect_map(
            encoding.decode(data, what=what, max_size=4096),
            {"sid": bytes, "signer": int, "s": bytes, "tau": bytes},
            what,
        )
        signer = obj["signer"]
        if not 1 <= signer <= n:
            raise DecodeError(f"{what}: signer {signer} outside 1..{n}")
        return cls(obj["sid"], signer, group.decode_scalar(obj["s"]), group.decode_scalar(obj["tau"]))


def sign_share(
    group: Group[E], presig: Presignature[E], message: bytes, key: PublicSharing[E]
) -> SignatureShare:
    """The one online round; consumes ``presig``. ``key``: this period's sharing (stale ones refused)."""
    if presig.public.sharing != sharing_digest(group, key):
        raise StalePresignatureError(
            f"presignature {presig.public.sid.hex()} belongs to another period's key sharing; discard it"
        )
    q = group.order
    h = message_scalar(group, message)
    r = presig.public.r
    kappa, rho, w, sigma = presig.consume()
    return SignatureShare(presig.public.sid, presig.index, (kappa * h + r * w) % q, (rho * h + r * sigma) % q)


def verify_signature_share(
    group: Group[E], public: PresignPublic[E], message: bytes, share: SignatureShare
) -> None:
    """Raise CheatingError(signer) unless s_j G + tau_j H == h Ck(j) + r Cw(j)."""
    j = share.signer
    if share.sid != public.sid:
        raise CheatingError(j, "signature share for another presignature")
    if not 1 <= j <= public.n:
        raise CheatingError(j, f"signer id outside 1..{public.n}")
    if not (_check_scalar(group, share.s) and _check_scalar(group, share.tau)):
        raise CheatingError(j, "signature share is not a pair of reduced scalars")
    h = message_scalar(group, message)
    ck, cw = public.commitments_of(group, j)
    lhs = _pedersen(group, _hgen(group), share.s, share.tau)
    if lhs != group.add(group.mul(h, ck), group.mul(public.r, cw)):
        raise CheatingError(j, "signature share fails the presignature commitments")


def blame_w_dealings(group: Group[E], public: PresignPublic[E], key: PublicSharing[E]) -> dict[int, str]:
    """Who dealt a bad w into this presignature: {dealer: reason} over the reduction set.

    Presigning does not check the w dealings' linking proofs (the fast path); this is the
    robust path's check, for a presignature whose valid signature shares combined to a
    signature that does not verify. ``key``: the period's key sharing it was made for.
    """
    context = (public.sid, public.transcript, group.encode(public.R))
    guilty: dict[int, str] = {}
    for dealing in public.w_dealings:
        try:
            _check_w_dealing(group, public.n, public.t, context, public.kappa, key, dealing)
        except CheatingError as exc:
            guilty[exc.party] = exc.reason
    return guilty


def verify_dss(group: Group[E], public_key: E, message: bytes, r: int, s: int) -> bool:
    """Plain DSS verification (FIPS 186-4 §4.7) with the group's own arithmetic."""
    q = group.order
    if not (0 < r < q and 0 < s < q):
        return False
    h = message_scalar(group, message)
    w = pow(s, -1, q)
    point = group.add(group.mul_base(h * w % q), group.mul(r * w % q, public_key))
    if group.is_identity(point):
        return False
    return group.dss_conversion(point) % q == r


@dataclass(frozen=True)
class DSSSignature:
    """A DSS signature (r, s); ``cheaters`` names servers whose shares were excluded."""

    r: int
    s: int
    cheaters: dict[int, str] = field(default_factory=dict, compare=False)

    @property
    def der(self) -> bytes:
        """The DER SEQUENCE {r, s} that OpenSSL and ``cryptography`` verify."""
        return encode_dss_signature(self.r, self.s)


def _interpolate_s(q: int, shares: Sequence[SignatureShare]) -> int:
    lam = lagrange_coefficients([sh.signer for sh in shares], q)
    return sum(lam[sh.signer] * sh.s for sh in shares) % q


def combine(
    group: Group[E],
    public: PresignPublic[E],
    message: bytes,
    shares: Iterable[SignatureShare],
    *,
    public_key: E | None = None,
    check_share: Callable[[SignatureShare], None] | None = None,
) -> DSSSignature:
    """The signature from t+1 shares: optimistic first, then identify and exclude bad shares.

    ``public_key`` and ``check_share`` default to the presignature's key and
    :func:`verify_signature_share` (a derived key passes its own: crypto/appkeys.py).
    Raises NotEnoughSharesError if fewer than t+1 shares are valid (the message
    names the cheaters), DSSRetryError if s = 0.
    """
    q, t = group.order, public.t
    y = public.public_key if public_key is None else public_key
    if check_share is None:

        def check_share(share: SignatureShare) -> None:
            verify_signature_share(group, public, message, share)

    by_signer: dict[int, SignatureShare] = {}
    for share in shares:
        by_signer.setdefault(share.signer, share)
    ordered = [by_signer[j] for j in sorted(by_signer)]
    first = ordered[: t + 1]
    if len(first) == t + 1 and all(sh.sid == public.sid and 1 <= sh.signer <= public.n for sh in first):
        s = _interpolate_s(q, first)
        if verify_dss(group, y, message, public.r, s):
            return DSSSignature(public.r, s)
    cheaters: dict[int, str] = {}
    valid: list[SignatureShare] = []
    for share in ordered:
        try:
            check_share(share)
        except CheatingError as exc:
            cheaters[exc.party] = exc.reason
            continue
        valid.append(share)
        if len(valid) == t + 1:
            break
    if len(valid) < t + 1:
        raise NotEnoughSharesError(
            f"dss: {len(valid)} valid signature shares, need {t + 1} (cheaters: {cheaters})"
        )
    s = _interpolate_s(q, valid)
    if s == 0:
        raise DSSRetryError("dss: s = 0; sign again with a fresh presignature")
    if not verify_dss(group, y, message, public.r, s):
        raise CryptoError("dss: valid shares combine to an invalid signature (inconsistent presignature)")
    return DSSSignature(public.r, s, cheaters)


# Interop ------------------------------------------------------------------------------


def cryptography_public_key(group: Group[E], y: E) -> PublicKey:
    """A ``cryptography`` DSA or EC public key for y (from the group's ``public_key`` helper)."""
    make = getattr(group, "public_key", None)
    if make is None:
        raise ParameterError(f"{group.name} has no cryptography public key helper")
    key = make(y)
    if not isinstance(key, crypto_dsa.DSAPublicKey | crypto_ec.EllipticCurvePublicKey):
        raise ParameterError(f"{group.name}: public_key returned {type(key).__name__}")
    return key


def public_key_pem(group: Group[E], y: E) -> bytes:
    """SubjectPublicKeyInfo PEM of y, e.g. for ``openssl dgst -verify``."""
    return cryptography_public_key(group, y).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_with_cryptography(group: Group[E], y: E, message: bytes, der: bytes) -> bool:
    """Verify a DER signature over SHA-256(message) with OpenSSL through ``cryptography``."""
    key = cryptography_public_key(group, y)
    try:
        if isinstance(key, crypto_dsa.DSAPublicKey):
            key.verify(der, message, hashes.SHA256())
        else:
            key.verify(der, message, crypto_ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# In-process runner ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cheat:
    """Which parties misbehave, and how, in :func:`run_presign` / :func:`run_sign`."""

    bad_nonce_share: frozenset[int] = frozenset()  # a wrong round-1 share to one recipient
    bad_z: frozenset[int] = frozenset()  # opens a wrong z_i
    bad_product_proof: frozenset[int] = frozenset()  # right z_i, forged proof
    bad_w_dealing: frozenset[int] = frozenset()  # deals kappa_i x_i + 1
    bad_w_share: frozenset[int] = frozenset()  # a wrong w share to one recipient
    bad_sign_share: frozenset[int] = frozenset()  # a wrong s_j


@dataclass
class PresignResult(Generic[E]):
    presignatures: dict[int, Presignature[E]]
    cheaters: dict[int, str]

    @property
    def public(self) -> PresignPublic[E]:
        return next(iter(self.presignatures.values())).public


def _victim(dealer: int, parties: Sequence[int]) -> int:
    """The recipient a cheating dealer sends its bad share to: the next party."""
    others = [j for j in parties if j != dealer]
    return next((j for j in others if j > dealer), others[0])


def run_presign(
    group: Group[E],
    keys: Mapping[int, KeyShare[E]],
    rand: ScalarSource,
    *,
    sid: bytes = b"pst/local/dss/0",
    cheat: Cheat | None = None,
    period: int = 0,
    period_keys: PeriodKeys | None = None,
) -> PresignResult[E]:
    """One presignature among the parties of ``keys`` (absent parties deal nothing)."""
    cheat = cheat or Cheat()
    any_key = next(iter(keys.values()))
    n, t = any_key.n, any_key.t
    check_dss_parameters(n, t)
    key_public = any_key.public
    pk = period_keys or PeriodKeys(n, b"local")
    q = group.order
    parties = sorted(keys)
    cheaters: dict[int, str] = {}

    # Round 1
    dealings: dict[int, NonceDealing[E]] = {}
    inbox: dict[int, dict[int, tuple[tuple[int, ...], bytes]]] = {j: {} for j in parties}
    for d in parties:
        dealing, shares = deal_nonce(group, sid, d, n, t, rand)
        dealings[d] = dealing
        session = nonce_session(group, sid, dealing)
        for j in parties:
            values: tuple[int, ...] = shares[j]
            if d in cheat.bad_nonce_share and j == _victim(d, parties):
                values = ((values[0] + 1) % q, *values[1:])
            msg = ShareMessage(session, d, j, values)
            inbox[j][d] = (values, pk.sign(d, msg.payload(SIGNING_CONTEXT, period)))
    complaints: list[Complaint] = []
    for j in parties:
        for d, dealing in dealings.items():
            values, sig = inbox[j][d]
            if not check_nonce_share(group, dealing, j, values):
                msg = ShareMessage(nonce_session(group, sid, dealing), d, j, values)
                complaints.append(Complaint(j, msg, sig))
    qual1 = qualify_nonce(
        group, sid, n, t, dealings, complaints, pk.verify, signing_context=SIGNING_CONTEXT, period=period
    )
    cheaters.update(qual1.cheaters)
    public = nonce_public(group, sid, n, t, qual1.qual, dealings)
    active = [j for j in parties if j not in cheaters]
    states = {
        j: nonce_finish(group, public, j, dealings, {d: inbox[j][d][0] for d in public.qual}) for j in active
    }

    # Round 2
    openings: dict[int, ProductOpening] = {}
    for j in active:
        opening = open_product(group, public, states[j], rand, _z_offset=1 if j in cheat.bad_z else 0)
        if j in cheat.bad_product_proof:
            p = opening.proof
            opening = ProductOpening(j, opening.z, LinkProof(p.c, (p.e_k + 1) % q, p.e_u, p.e_v))
        openings[j] = opening
    nonce, bad = open_nonce(group, public, openings)
    # open_nonce stops after 2t+1 valid openings; check the rest too so that every cheater is named.
    for j in active:
        if j in bad:
            continue
        try:
            check_product_opening(group, public, openings[j])
        except CheatingError as exc:
            bad[j] = exc.reason
    cheaters.update(bad)
    active = [j for j in active if j not in cheaters]

    # Round 3
    w_dealings: dict[int, WDealing[E]] = {}
    w_inbox: dict[int, dict[int, tuple[tuple[int, ...], bytes]]] = {j: {} for j in active}
    for d in active:
        wd, wshares = deal_w(
            group, public, nonce, states[d], keys[d], rand, _w_offset=1 if d in cheat.bad_w_dealing else 0
        )
        w_dealings[d] = wd
        wsession = w_session(group, sid, wd)
        for j in active:
            values = wshares[j]
            if d in cheat.bad_w_share and j == _victim(d, active):
                values = ((values[0] + 1) % q, values[1])
            msg = ShareMessage(wsession, d, j, values)
            w_inbox[j][d] = (values, pk.sign(d, msg.payload(SIGNING_CONTEXT, period)))
    w_complaints: list[Complaint] = []
    for j in active:
        for d, wd in w_dealings.items():
            values, sig = w_inbox[j][d]
            if not check_w_share(group, wd, j, values):
                msg = ShareMessage(w_session(group, sid, wd), d, j, values)
                w_complaints.append(Complaint(j, msg, sig))
    qual_w = qualify_w(
        group,
        public,
        nonce,
        key_public,
        w_dealings,
        w_complaints,
        pk.verify,
        signing_context=SIGNING_CONTEXT,
        period=period,
    )
    cheaters.update(qual_w.cheaters)
    reduction = reduction_set(qual_w.qual, t)
    presigs: dict[int, Presignature[E]] = {}
    for j in active:
        if j in cheaters:
            states[j].wipe()
            continue
        presigs[j] = finish_presign(
            group,
            public,
            nonce,
            states[j],
            key_public,
            reduction,
            w_dealings,
            {i: w_inbox[j][i][0] for i in reduction},
        )
    return PresignResult(presigs, cheaters)


def run_sign(
    group: Group[E],
    presigs: Mapping[int, Presignature[E]],
    message: bytes,
    key: PublicSharing[E],
    *,
    signers: Iterable[int] | None = None,
    cheat: Cheat | None = None,
) -> DSSSignature:
    """The online round: every signer sends its share, anyone combines."""
    cheat = cheat or Cheat()
    q = group.order
    chosen = sorted(presigs) if signers is None else sorted(signers)
    if not chosen:
        raise NotEnoughSharesError("dss: no signers")
    shares: list[SignatureShare] = []
    for j in chosen:
        share = sign_share(group, presigs[j], message, key)
        if j in cheat.bad_sign_share:
            share = SignatureShare(share.sid, j, (share.s + j) % q, share.tau)
        shares.append(share)
    return combine(group, presigs[chosen[0]].public, message, shares)
