"""Per-application DSS keys (issue 12 §1): keys derived from one threshold DSS secret of C.

An application's key ``(app, name)`` is the base secret x of C (P-256 or DSA 2048/256,
Feldman-shared, refreshed and recovered by every refresh like the group key) shifted by a public
tweak::

    d = hash_to_scalar(DOMAIN, group, encode(Y), app, name)      Y = xG, the base public key
    key = x + d,  public key  Y' = Y + dG

Every server's share of the application key is its share of x plus d (the Lagrange coefficients of
any t+1 ids sum to 1), so nothing about the application key is ever dealt or stored: the refresh of
x refreshes it, the recovery of x recovers it, and shares of two periods never combine because
those of x do not.

Signing needs no presignature of its own either. A DSS signature under x + d on h is::

    s = kappa (h + r (x + d)) = kappa (h + r d) + r (kappa x)

which is the base key's online step on the scalar h' = h + r d, r being fixed by the
presignature. So :func:`sign_share`, :func:`verify_signature_share` and :func:`combine` are those of
:mod:`appliance.crypto.dss` with h' in place of h, and the signature checks under Y' with h
(plain ECDSA/DSA that openssl verifies). Why the tweaks are safe (related keys) is in
docs/design.md, "Per-application DSS keys".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from appliance.crypto import dss
from appliance.crypto.errors import CheatingError, ParameterError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import PublicSharing
from appliance.crypto.vss import pedersen_generator

E = TypeVar("E")

DOMAIN = b"pst/dss-app-key/v1"
#: Application and key names are short printable strings (checked by :func:`check_name`).
MAX_NAME = 128


def check_name(what: str, value: str) -> None:
    """Raise ParameterError unless ``value`` is 1..MAX_NAME printable ASCII characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME:
        raise ParameterError(f"{what} must have 1 to {MAX_NAME} characters")
    if not value.isascii() or not value.isprintable():
        raise ParameterError(f"{what} must be printable ASCII")


def tweak(group: Group[E], base_public: E, app: str, name: str) -> int:
    """d for key ``name`` of application ``app`` under the base key ``base_public``."""
    check_name("the application name", app)
    check_name("the key name", name)
    return group.hash_to_scalar(
        DOMAIN, group.name.encode(), group.encode(base_public), app.encode(), name.encode()
    )


def derived_public(group: Group[E], base_public: E, d: int) -> E:
    """Y' = Y + dG (ParameterError in the negligible case that it is the identity)."""
    y = group.add(base_public, group.mul_base(d % group.order))
    if group.is_identity(y):
        raise ParameterError("the derived public key is the identity")
    return y


def app_public_key(group: Group[E], base_public: E, app: str, name: str) -> E:
    return derived_public(group, base_public, tweak(group, base_public, app, name))


def _scalar(group: Group[Any], message: bytes, r: int, d: int) -> int:
    return (dss.message_scalar(group, message) + r * d) % group.order


def sign_share(
    group: Group[E], presig: dss.Presignature[E], message: bytes, key: PublicSharing[E], d: int
) -> dss.SignatureShare:
    """The online round for the key x + d; consumes ``presig`` (a presignature of x's current
    sharing ``key``; one of another period's sharing is refused)."""
    if presig.public.sharing != dss.sharing_digest(group, key):
        raise dss.StalePresignatureError(
            f"presignature {presig.public.sid.hex()} belongs to another period's key sharing; discard it"
        )
    q = group.order
    r = presig.public.r
    h = _scalar(group, message, r, d)
    kappa, rho, w, sigma = presig.consume()
    return dss.SignatureShare(
        presig.public.sid, presig.index, (kappa * h + r * w) % q, (rho * h + r * sigma) % q
    )


def verify_signature_share(
    group: Group[E], public: dss.PresignPublic[E], message: bytes, share: dss.SignatureShare, d: int
) -> None:
    """Raise CheatingError(signer) unless s_j G + tau_j H == h' Ck(j) + r Cw(j)."""
    j = share.signer
    q = group.order
    if share.sid != public.sid:
        raise CheatingError(j, "signature share for another presignature")
    if not 1 <= j <= public.n:
        raise CheatingError(j, f"signer id outside 1..{public.n}")
    if not (0 <= share.s < q and 0 <= share.tau < q):
        raise CheatingError(j, "signature share is not a pair of reduced scalars")
    h = _scalar(group, message, public.r, d)
    ck, cw = public.commitments_of(group, j)
    lhs = group.add(group.mul_base(share.s), group.mul(share.tau, pedersen_generator(group)))
    if lhs != group.add(group.mul(h, ck), group.mul(public.r, cw)):
        raise CheatingError(j, "signature share fails the presignature commitments")


def combine(
    group: Group[E],
    public: dss.PresignPublic[E],
    message: bytes,
    shares: Iterable[dss.SignatureShare],
    d: int,
) -> dss.DSSSignature:
    """The signature under Y + dG from t+1 shares: :func:`appliance.crypto.dss.combine` with the
    derived key and this module's share check (and its errors)."""
    return dss.combine(
        group,
        public,
        message,
        shares,
        public_key=derived_public(group, public.public_key, d),
        check_share=lambda share: verify_signature_share(group, public, message, share, d),
    )
