"""Threshold verifiable random function: unbiasable joint randomness from the shared group key.

Theory of operation
-------------------
For an input m, let P = H(m) be a group element nobody knows the discrete log of
(``hash_to_element``). The output is SHA-512(domain || m || Y) with Y = x * P, where x
is the network's shared secret (the group key's share polynomial at 0). Server i
contributes the *partial evaluation* y_i = x_i * P with a Chaum-Pedersen proof that
log_G X_i = log_P y_i (X_i its public verification share), so a wrong partial names
its sender. Any t+1 valid partials give Y = sum lambda_i y_i by Lagrange interpolation
in the exponent.

Why this answers the paper's complaint about XOR randomness: Y is a deterministic
function of m and x. No server, and no coalition of t servers, can bias it (there is
nothing to choose once m is fixed), or predict it before t+1 servers have answered
(computing x * H(m) from fewer than t+1 partials is the computational Diffie-Hellman
problem). Whoever fixes m must not be able to try many m: the client supplies a nonce
that is part of m.

Using the group key x here does not weaken its Schnorr signatures: in the random
oracle model a simulator that programs H(m) = r G answers x * H(m) = r X without x.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.secret import ScalarSource
from appliance.crypto.shamir import lagrange_coefficients

E = TypeVar("E")

POINT_DST = b"pst/tvrf/point/v1"
PROOF_DST = b"pst/tvrf/dleq/v1"
OUTPUT_DOMAIN = b"pst/tvrf/output/v1"


@dataclass(frozen=True)
class Partial(Generic[E]):
    """Server ``server``'s partial evaluation y = x_i * H(m) with its DLEQ proof (c, z)."""

    server: int
    y: E
    c: int
    z: int

    def to_bytes(self, group: Group[E]) -> bytes:
        return (
            self.server.to_bytes(2, "big")
            + group.encode(self.y)
            + group.encode_scalar(self.c)
            + group.encode_scalar(self.z)
        )

    @classmethod
    def from_bytes(cls, group: Group[E], data: bytes) -> Partial[E]:
        size = 2 + group.element_size + 2 * group.scalar_size
        if not isinstance(data, bytes) or len(data) != size:
            raise DecodeError(f"tvrf partial: expected {size} bytes")
        server = int.from_bytes(data[:2], "big")
        if server == 0:
            raise DecodeError("tvrf partial: server id 0")
        e, s = group.element_size, group.scalar_size
        y = group.decode(data[2 : 2 + e])
        c = group.decode_scalar(data[2 + e : 2 + e + s])
        z = group.decode_scalar(data[2 + e + s :])
        return cls(server, y, c, z)


def point(group: Group[E], message: bytes) -> E:
    return group.hash_to_element(POINT_DST, message)


def _challenge(group: Group[E], x_i: E, p: E, y: E, a: E, b: E) -> int:
    return group.hash_to_scalar(
        PROOF_DST,
        group.encode(group.generator()),
        group.encode(x_i),
        group.encode(p),
        group.encode(y),
        group.encode(a),
        group.encode(b),
    )


def partial(group: Group[E], server: int, share: int, message: bytes, rand: ScalarSource) -> Partial[E]:
    """Server ``server``'s contribution for ``message``, made with its share x_i."""
    p = point(group, message)
    y = group.mul(share, p)
    k = rand()
    a, b = group.mul_base(k), group.mul(k, p)
    c = _challenge(group, group.mul_base(share), p, y, a, b)
    return Partial(server, y, c, (k + c * share) % group.order)


def verify_partial(group: Group[E], verification_share: E, message: bytes, part: Partial[E]) -> bool:
    p = point(group, message)
    a = group.sub(group.mul_base(part.z), group.mul(part.c, verification_share))
    b = group.sub(group.mul(part.z, p), group.mul(part.c, part.y))
    return part.c == _challenge(group, verification_share, p, part.y, a, b)


def combine(
    group: Group[E],
    t: int,
    message: bytes,
    parts: Mapping[int, Partial[E]],
    verification_shares: Mapping[int, E],
) -> bytes:
    """The output from t+1 or more partials; bad ones raise CheatingError naming the server."""
    good: dict[int, E] = {}
    for i, part in sorted(parts.items()):
        if part.server != i or i not in verification_shares:
            raise CheatingError(i, "partial evaluation under another server's id")
        if not verify_partial(group, verification_shares[i], message, part):
            raise CheatingError(i, "partial evaluation with a proof that does not verify")
        good[i] = part.y
        if len(good) == t + 1:
            break
    if len(good) < t + 1:
        raise NotEnoughSharesError(f"{len(good)} partial evaluations, need {t + 1}")
    lam = lagrange_coefficients(sorted(good), group.order)
    y = group.multi_mul([lam[i] for i in sorted(good)], [good[i] for i in sorted(good)])
    return hashlib.sha512(
        OUTPUT_DOMAIN + len(message).to_bytes(8, "big") + message + group.encode(y)
    ).digest()


def evaluate_directly(group: Group[E], secret: int, message: bytes) -> bytes:
    """The output computed from the whole secret: for tests only."""
    y = group.mul(secret, point(group, message))
    return hashlib.sha512(
        OUTPUT_DOMAIN + len(message).to_bytes(8, "big") + message + group.encode(y)
    ).digest()
