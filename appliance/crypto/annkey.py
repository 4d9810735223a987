"""Announcement keys: ECDSA P-256 keys that a server's TPM holds and never lets out (issue 8).

A server whose ROM is a TPM 2.0 has an *announcement key*: a P-256 signing key derived in
the TPM (:mod:`appliance.boot.tpmkey`). Its public key is fixed in M at initialization, so a
server that lost everything but its ROM (and its TPM) can still prove, with a signature only
its TPM can make, that a clear key announcement is its own.

This module is the pure part, used by the protocols and the simulation alike:

* public keys are SEC1 uncompressed points (65 bytes: 0x04 || x || y) on P-256;
* signatures are DER-encoded ECDSA-SHA256 (what ``cryptography`` and OpenSSL produce);
* :class:`SoftAnnouncementKey` is a software P-256 key, the simulation's stand-in for a TPM
  (a key that survives the server's wipe); the node never uses it.

All the cryptography is the ``cryptography`` package's.
"""

from __future__ import annotations

from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from appliance.crypto.errors import DecodeError

#: Length of a SEC1 uncompressed P-256 point.
PUBLIC_SIZE = 65
#: Longest DER ECDSA P-256 signature (two 33-byte INTEGERs and their headers).
MAX_SIGNATURE = 72

#: The order of the P-256 group (SEC 2).
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class SigningUnavailable(Exception):
    """The announcement key cannot sign now (the TPM is unreachable or refused); says why."""


class AnnouncementSigner(Protocol):
    """What the holder of an announcement key hands the protocol: its public key and ``sign``
    (DER ECDSA-SHA256 of the data; raises SigningUnavailable if the key cannot be used)."""

    @property
    def public(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def load_public(public: bytes, what: str = "announcement key") -> ec.EllipticCurvePublicKey:
    """The P-256 public key from its SEC1 uncompressed encoding (DecodeError naming ``what``)."""
    if not isinstance(public, bytes) or len(public) != PUBLIC_SIZE or public[0] != 4:
        raise DecodeError(f"{what}: not a SEC1 uncompressed P-256 point ({PUBLIC_SIZE} bytes, 0x04 first)")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
    except ValueError:
        raise DecodeError(f"{what}: not a point on P-256") from None


def encode_public(key: ec.EllipticCurvePublicKey) -> bytes:
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"announcement keys are P-256 keys, not {key.curve.name}")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def public_from_xy(x: bytes, y: bytes) -> bytes:
    """SEC1 encoding of the point (x, y) as a TPM reports it (checked to be on the curve)."""
    if len(x) > 32 or len(y) > 32:
        raise DecodeError("announcement key: coordinates longer than 32 bytes")
    return encode_public(load_public(b"\x04" + x.rjust(32, b"\0") + y.rjust(32, b"\0")))


def der_signature(r: int, s: int) -> bytes:
    """The DER form of an ECDSA signature (r, s) as a TPM reports it."""
    return encode_dss_signature(r, s)


def verify(public: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid ECDSA-SHA256 signature of ``data`` under ``public``."""
    if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE:
        return False
    try:
        key = load_public(public)
    except DecodeError:
        return False
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class SoftAnnouncementKey:
    """A software P-256 key: the simulation's stand-in for a server's TPM announcement key."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) < 32:
            raise ValueError("an announcement key seed needs at least 32 bytes")
        scalar = int.from_bytes(seed, "big") % (_ORDER - 1) + 1
        self._key = ec.derive_private_key(scalar, ec.SECP256R1())
        self.public = encode_public(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        # RFC 6979 nonces: a simulated run is a function of its seed, to the byte (with random
        # nonces the tpm-impostor family sent other bytes at each replay of a seed).
        return self._key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))

    def __repr__(self) -> str:
        return f"SoftAnnouncementKey(public={self.public.hex()[:16]}..., <hidden>)"
