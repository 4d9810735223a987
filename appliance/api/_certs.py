"""Period certificates for applications (issue 13 §1): what the ``certificate`` operation reads.

Two ways, as the paper's §5.4 and today's practice have it:

* the client sends a certificate signing request (PKCS #10, PEM or DER, at most
  :data:`MAX_CSR` bytes) for a P-256 or Ed25519 key; its signature (the proof of possession)
  must verify with the key it carries. Only the key is taken from it: the names come from the
  request's ``names`` field (or the application's profile), and the extensions the CSR asks for
  are ignored (the group's leaves carry what the policy says). The private key never leaves
  the client;
* or the server makes a P-256 key pair (:func:`generate_key`) and returns the private key
  (PKCS #8 PEM, unencrypted) over the socket, next to the certificate.

The application's names are checked against ``[ca.apps.NAME]`` here first (a clear refusal),
and again by every signer from the leaf itself (appliance.apps.ca.policy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from appliance.apps.ca.policy import PolicyError, check_pattern, name_allowed

__all__ = [
    "MAX_CSR",
    "MAX_NAMES",
    "CsrError",
    "NamesRefused",
    "certificate_answer",
    "check_pattern",
    "choose_names",
    "csr_public_key",
    "generate_key",
    "names_outside",
    "spki_of",
]

#: Largest CSR the operation reads; names one leaf carries at most.
MAX_CSR = 16 * 1024
MAX_NAMES = 16


class CsrError(ValueError):
    """The CSR is unreadable, of another key type, or its signature does not verify."""


def csr_public_key(data: bytes) -> Any:
    """The public key of the CSR ``data`` (PEM or DER) once its signature verifies."""
    if len(data) > MAX_CSR:
        raise CsrError(f"a CSR of {len(data)} bytes (at most {MAX_CSR})")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise CsrError(f"not a PKCS #10 certificate request ({str(exc)[:120]})") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and the like
        raise CsrError(f"the CSR cannot be read ({type(exc).__name__})") from None
    if not (
        isinstance(key, ed25519.Ed25519PublicKey)
        or (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1))
    ):
        raise CsrError("the CSR's key is neither P-256 nor Ed25519")
    if not valid:
        raise CsrError("the CSR's signature does not verify with its key (no proof of possession)")
    return key


def spki_of(key: Any) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a cryptography public key."""
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def generate_key() -> tuple[bytes, bytes]:
    """A fresh P-256 key pair: (its SubjectPublicKeyInfo DER, its private key as PKCS #8 PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return spki_of(key.public_key()), pem


def names_outside(names: Sequence[str], profile: Sequence[str]) -> list[str]:
    """The requested ``names`` (lower-case) that the application's ``profile`` does not allow."""
    patterns = frozenset(profile)
    out = []
    for name in names:
        try:
            canonical = check_pattern(name)
        except PolicyError:
            out.append(name)
            continue
        if not name_allowed(canonical, patterns):
            out.append(name)
    return out


class NamesRefused(ValueError):
    """The requested names are malformed (``outside`` empty) or outside the application's
    profile (``outside`` lists them); the message is safe to show the client."""

    def __init__(self, message: str, outside: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.outside = list(outside)


def choose_names(app: str, names: Sequence[Any] | None, profile: Sequence[str]) -> list[str]:
    """The leaf's names (canonical) for application ``app``: ``names`` once each is well formed
    and allowed by ``profile``, or by default the profile's names without wildcards. The one
    check of the local API's ``certificate`` operation and of the HTTP enrollment endpoint."""
    if names is None:
        names = [n for n in profile if not n.startswith("*.")] or list(profile)
    if not 0 < len(names) <= MAX_NAMES or not all(isinstance(n, str) and 0 < len(n) <= 253 for n in names):
        raise NamesRefused(f"must be a list of 1 to {MAX_NAMES} names (DNS names or IP addresses)")
    outside = names_outside(names, profile)
    if outside:
        raise NamesRefused(
            f"names {outside[:8]} are outside the profile of application {app!r} "
            f"({', '.join(profile)}); every signer would refuse them",
            outside,
        )
    return [check_pattern(n) for n in names]


def certificate_answer(leaf: bytes, root: bytes, next_period: float, key_pem: bytes | None) -> dict[str, Any]:
    """What a client gets with its period certificate: the leaf and bundle (PEM), its validity
    and when to renew it (at half-life, but not before the next period: an earlier leaf would be
    the same), and the private key when the server made it."""
    cert = x509.load_pem_x509_certificate(leaf)
    not_before = int(cert.not_valid_before_utc.timestamp())
    not_after = int(cert.not_valid_after_utc.timestamp())
    half_life = not_before + (not_after - not_before) // 2
    result: dict[str, Any] = {
        "certificate": leaf,
        "bundle": leaf + root,
        "not_before": not_before,
        "not_after": not_after,
        "renew_after": min(not_after, max(half_life, math.ceil(next_period))),
        "serial": cert.serial_number,
    }
    if key_pem is not None:
        result["key"] = key_pem
    return result
