"""Verifiable encryption of sub-shares in a refresh dealing, with publicly judgeable complaints.

Setting
-------
A dealer sends each of n recipients a private plaintext (the CBOR bytes of its
sub-shares) inside one public, signed dealing. Recipient k has a period encryption
key pair on the Ed25519 group: secret scalar e_k, public E_k = e_k * G, derived from
the 32-byte ``encryption_seed`` of the period (:func:`secret_from_seed`,
:func:`public_from_seed`).

The dealer draws one fresh ephemeral scalar r and publishes the *ephemeral*
R = r * G together with a Schnorr proof of knowledge of r bound to the context
(96 bytes: R || c || z). For recipient k it computes K_k = r * E_k (= e_k * R), derives
a one-time key with HKDF-SHA256 over (K_k, R, E_k, k, context) and encrypts with
XChaCha20-Poly1305, the recipient id and the context in the associated data.

A recipient whose ciphertext does not decrypt (or decrypts to sub-shares that fail
the dealing's public commitments) complains with a :class:`Reveal`: K_k = e_k * R and a
Chaum-Pedersen proof that log_G(E_k) = log_R(K_k), Fiat-Shamir over a domain string,
E_k, R, K_k, k and the context. Anyone can then check the proof, re-derive the key and
decrypt (:func:`open_revealed`). Revealing K_k publishes this one plaintext (the one
in dispute) and nothing else: K_k is a Diffie-Hellman value the dealer knows anyway,
and the proof is zero-knowledge about e_k.

Verdict table (the judge first runs :func:`check_ephemeral` on the dealing)
--------------------------------------------------------------------------
=======================================================  ===========================
what the judge sees                                      who is at fault
=======================================================  ===========================
ephemeral malformed or its proof of knowledge fails      dealer (public: no complaint
(:func:`check_ephemeral` raises DecodeError)             is needed to see it)
reveal does not decode (``Reveal.from_bytes`` raises     accuser
DecodeError) or its proof is invalid
(:func:`open_revealed` raises :class:`InvalidRevealError`)
proof valid, decrypts, and the plaintext checks against  accuser (false complaint;
the dealing's public commitments                         the *caller* checks the value)
proof valid and the ciphertext does not decrypt          dealer
(:func:`open_revealed` returns None)
proof valid, decrypts to a value that does not check     dealer
=======================================================  ===========================

Why the dealer proves knowledge of r
------------------------------------
Without it, a reveal is a Diffie-Hellman oracle: a cheating dealer could copy the R
of an honest dealer's dealing (or 2R, or R + G: any point related to it) into its own
dealing, send recipient k garbage, and wait for k's complaint to publish e_k * R,
which decrypts the *honest* dealer's sub-share to k. With a proof of knowledge of
log_G(R) bound to the context (which the caller makes unique per period, dealer and
session), the dealer can only use points whose discrete log it knows, for which
e_k * R = r * E_k tells it nothing new. Recipients must never reveal for an ephemeral
that does not verify under the dealing's context; :func:`reveal` refuses to.

Everything here is pure: no I/O, no clock; randomness comes in as an argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings as _sodium
from nacl import exceptions as _sodium_errors

from appliance.crypto.errors import CryptoError, DecodeError, ParameterError
from appliance.crypto.groups import ED25519, Group
from appliance.crypto.secret import ScalarSource

Elt = TypeVar("Elt")

SEED_DOMAIN = b"pst/vdec/encryption-key/v1"
EPHEMERAL_POK_DST = b"pst/vdec/ephemeral-pok/v1"
EPHEMERAL_NONCE_DST = b"pst/vdec/ephemeral-nonce/v1"
REVEAL_DLEQ_DST = b"pst/vdec/reveal-dleq/v1"
REVEAL_NONCE_DST = b"pst/vdec/reveal-nonce/v1"
KDF_SALT = b"pst/vdec/kdf/v1"
AAD_DOMAIN = b"pst/vdec/aad/v1"

SEED_SIZE = 32
POINT_SIZE = ED25519.element_size
SCALAR_SIZE = ED25519.scalar_size
PROOF_SIZE = 2 * SCALAR_SIZE
#: R || c || z: the dealer's ephemeral point with its proof of knowledge of r.
EPHEMERAL_SIZE = POINT_SIZE + PROOF_SIZE
#: K || c || z.
REVEAL_SIZE = POINT_SIZE + PROOF_SIZE
#: Recipient ids are server ids, encoded on 2 bytes as in the other protocols.
MAX_RECIPIENT = 0xFFFF
TAG_SIZE = _sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
# Each derived key encrypts exactly one message: it is a function of K = r * E_k with r
# fresh for every dealing, and of the recipient and context. A fixed all-zero nonce is
# therefore safe, and only because of that one-time use.
_ZERO_NONCE = bytes(_sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)

_G = ED25519.generator()


class DecryptionError(CryptoError):
    """A ciphertext does not decrypt under the recipient's key: grounds for a complaint."""


class InvalidRevealError(CryptoError):
    """A complaint's reveal is malformed or its proof does not verify: the accuser is at fault."""


# Generic proof of equal discrete logs ----------------------------------------------


def _challenge(
    group: Group[Elt],
    dst: bytes,
    bases: Sequence[Elt],
    images: Sequence[Elt],
    commits: Sequence[Elt],
    bind: Sequence[bytes],
) -> int:
    parts: list[bytes] = []
    for g, h in zip(bases, images, strict=True):
        parts += (group.encode(g), group.encode(h))
    parts += (group.encode(a) for a in commits)
    return group.hash_to_scalar(dst, *parts, *bind)


def prove_same_log(
    group: Group[Elt],
    dst: bytes,
    secret: int,
    bases: Sequence[Elt],
    images: Sequence[Elt],
    nonce: int,
    bind: Sequence[bytes] = (),
) -> tuple[int, int]:
    """Fiat-Shamir proof (c, z) that images[i] = secret * bases[i] for every i.

    One base is a Schnorr proof of knowledge, two are a Chaum-Pedersen DLEQ proof.
    The challenge hashes, under ``dst``, g_1, h_1, ..., g_n, h_n, the commitments
    a_i = nonce * g_i and then the ``bind`` parts; with two bases and no ``bind`` this
    is exactly the transcript of :mod:`appliance.crypto.tvrf`'s partial proofs.
    ``nonce`` must be secret and never reused with another challenge.
    """
    if not bases or len(bases) != len(images):
        raise ParameterError("same-log proof: need as many images as bases, at least one")
    commits = [group.mul(nonce, g) for g in bases]
    c = _challenge(group, dst, bases, images, commits, bind)
    return c, (nonce + c * secret) % group.order


def verify_same_log(
    group: Group[Elt],
    dst: bytes,
    bases: Sequence[Elt],
    images: Sequence[Elt],
    c: int,
    z: int,
    bind: Sequence[bytes] = (),
) -> bool:
    """Check a :func:`prove_same_log` proof; the elements must come from ``group.decode``."""
    if not bases or len(bases) != len(images):
        return False
    if not (0 <= c < group.order and 0 <= z < group.order):
        return False
    commits = [group.sub(group.mul(z, g), group.mul(c, h)) for g, h in zip(bases, images, strict=True)]
    return c == _challenge(group, dst, bases, images, commits, bind)


# Keys --------------------------------------------------------------------------------


def secret_from_seed(seed: bytes) -> int:
    """The period's secret encryption scalar e: SHA-512(domain || seed) reduced to [1, L)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_SIZE:
        raise ParameterError(f"vdec: the encryption seed must be {SEED_SIZE} bytes")
    digest = hashlib.sha512(SEED_DOMAIN + bytes(seed)).digest()
    return int.from_bytes(digest, "little") % (ED25519.order - 1) + 1


def public_key(e: int) -> bytes:
    """E = e * G (encoded); e must be nonzero modulo the group order."""
    if e % ED25519.order == 0:
        raise ParameterError("vdec: the secret encryption scalar is zero")
    return ED25519.mul_base(e)


def public_from_seed(seed: bytes) -> bytes:
    """The period's public encryption key E = e * G for the seed."""
    return public_key(secret_from_seed(seed))


def decode_public_key(data: bytes) -> bytes:
    """A recipient's public key E, strictly decoded (DecodeError on anything else)."""
    return _point(data, "public encryption key")


# Dealing -----------------------------------------------------------------------------


def encrypt_to(
    recipients: Mapping[int, bytes], plaintexts: Mapping[int, bytes], r: int, context: bytes
) -> tuple[bytes, dict[int, bytes]]:
    """Encrypt ``plaintexts[k]`` to ``recipients[k]`` (E_k) for each k: (ephemeral, ciphertexts).

    ``r`` must be a fresh uniform scalar for every dealing (from the caller's
    ScalarSource): each derived key is used once with a zero nonce, so reusing r with
    the same context would reuse a key and nonce. ``context`` must bind the period,
    the dealer and the session. Raises DecodeError for a recipient key that is not a
    valid point and ParameterError for bad arguments.
    """
    _check_context(context)
    if set(recipients) != set(plaintexts):
        raise ParameterError("vdec: recipients and plaintexts name different ids")
    r %= ED25519.order
    if r == 0:
        raise ParameterError("vdec: the ephemeral scalar is zero")
    big_r = ED25519.mul_base(r)
    nonce = ED25519.hash_to_scalar(EPHEMERAL_NONCE_DST, ED25519.encode_scalar(r), big_r, context)
    c, z = prove_same_log(ED25519, EPHEMERAL_POK_DST, r, [_G], [big_r], nonce, (context,))
    ephemeral = big_r + ED25519.encode_scalar(c) + ED25519.encode_scalar(z)
    ciphertexts: dict[int, bytes] = {}
    for k in sorted(recipients):
        _check_recipient(k)
        e_k = _point(recipients[k], f"public encryption key of recipient {k}")
        plaintext = plaintexts[k]
        if not isinstance(plaintext, (bytes, bytearray)):
            raise ParameterError(f"vdec: the plaintext for recipient {k} must be bytes")
        key = _derive_key(ED25519.mul(r, e_k), big_r, e_k, k, context)
        ciphertexts[k] = bytes(
            _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
                bytes(plaintext), _aad(k, context), _ZERO_NONCE, key
            )
        )
    return ephemeral, ciphertexts


#: (ephemeral, context) pairs whose proof verified: every recipient of a dealing checks the same
#: ephemeral, once when it opens the dealing and again when it decrypts (and in the simulation
#: every server runs in one process). Bounded; only successes are kept.
_EPHEMERALS: dict[tuple[bytes, bytes], None] = {}
_EPHEMERALS_MAX = 1024


def check_ephemeral(ephemeral: bytes, context: bytes) -> bytes:
    """The dealer's R, after checking its encoding and its proof of knowledge under ``context``.

    DecodeError means the dealing is publicly invalid: the dealer is at fault.
    """
    _check_context(context)
    if not isinstance(ephemeral, (bytes, bytearray)) or len(ephemeral) != EPHEMERAL_SIZE:
        raise DecodeError(f"vdec ephemeral: expected {EPHEMERAL_SIZE} bytes")
    ephemeral = bytes(ephemeral)
    key = (ephemeral, bytes(context))
    if key in _EPHEMERALS:
        return ephemeral[:POINT_SIZE]
    big_r = _point(ephemeral[:POINT_SIZE], "ephemeral R")
    c, z = _proof(ephemeral[POINT_SIZE:], "ephemeral")
    if not verify_same_log(ED25519, EPHEMERAL_POK_DST, [_G], [big_r], c, z, (context,)):
        raise DecodeError("vdec ephemeral: the proof of knowledge of r does not verify")
    if len(_EPHEMERALS) >= _EPHEMERALS_MAX:
        _EPHEMERALS.clear()  # crude but thread-safe; a miss only costs a check
    _EPHEMERALS[key] = None
    return big_r


def decrypt(e: int, E: bytes, recipient: int, ephemeral: bytes, ciphertext: bytes, context: bytes) -> bytes:
    """Recipient ``recipient`` (key pair e, E) decrypts its ciphertext of a dealing.

    Raises :class:`DecryptionError` when it does not decrypt (complain with
    :func:`reveal`), DecodeError when the ephemeral or E is invalid, ParameterError
    when E is not e * G.
    """
    big_r = check_ephemeral(ephemeral, context)
    big_e = _own_key(e, E, recipient)
    key = _derive_key(ED25519.mul(e, big_r), big_r, big_e, recipient, context)
    plaintext = _open(key, recipient, ciphertext, context)
    if plaintext is None:
        raise DecryptionError(f"vdec: the ciphertext to recipient {recipient} does not decrypt")
    return plaintext


# Complaints --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reveal:
    """A complaint's material: K = e * R (32 bytes) and the DLEQ proof c || z (64 bytes)."""

    K: bytes
    proof: bytes

    def to_bytes(self) -> bytes:
        return bytes(self.K) + bytes(self.proof)

    @classmethod
    def from_bytes(cls, data: bytes) -> Reveal:
        """Strict decoding: DecodeError on a wrong length, an invalid K or unreduced scalars."""
        if not isinstance(data, (bytes, bytearray)) or len(data) != REVEAL_SIZE:
            raise DecodeError(f"vdec reveal: expected {REVEAL_SIZE} bytes")
        data = bytes(data)
        k = _point(data[:POINT_SIZE], "reveal K")
        _proof(data[POINT_SIZE:], "reveal")
        return cls(k, data[POINT_SIZE:])


def reveal(e: int, E: bytes, recipient: int, ephemeral: bytes, context: bytes, rand: ScalarSource) -> Reveal:
    """The recipient's complaint material for the dealing with ``ephemeral`` under ``context``.

    Refuses (DecodeError) an ephemeral whose proof of knowledge fails: revealing
    e * R for an R the dealer cannot open would make the recipient a Diffie-Hellman
    oracle. ``rand`` supplies the proof's nonce, hedged with the secret and the inputs.
    """
    big_r = check_ephemeral(ephemeral, context)
    big_e = _own_key(e, E, recipient)
    big_k = ED25519.mul(e, big_r)
    bind = _reveal_bind(recipient, context)
    nonce = ED25519.hash_to_scalar(
        REVEAL_NONCE_DST, ED25519.encode_scalar(rand()), ED25519.encode_scalar(e), big_e, big_r, *bind
    )
    c, z = prove_same_log(ED25519, REVEAL_DLEQ_DST, e, [_G, big_r], [big_e, big_k], nonce, bind)
    return Reveal(big_k, ED25519.encode_scalar(c) + ED25519.encode_scalar(z))


def open_revealed(
    E: bytes, recipient: int, ephemeral: bytes, rev: Reveal, ciphertext: bytes, context: bytes
) -> bytes | None:
    """Judge a complaint: the plaintext, or None when the ciphertext does not decrypt.

    Raises :class:`InvalidRevealError` when the reveal is malformed or its proof does
    not verify (the accuser is at fault), DecodeError when the ephemeral or E is
    invalid (check the ephemeral first: a bad one is the dealer's fault). A returned
    plaintext must still be checked against the dealing's public commitments; see the
    verdict table in the module docstring.
    """
    big_r = check_ephemeral(ephemeral, context)
    big_e = _point(E, "public encryption key")
    _check_recipient(recipient)
    if not isinstance(rev, Reveal):
        raise InvalidRevealError("vdec reveal: not a Reveal")
    try:
        big_k = _point(rev.K, "reveal K")
        c, z = _proof(rev.proof, "reveal")
    except DecodeError as exc:
        raise InvalidRevealError(str(exc)) from None
    bind = _reveal_bind(recipient, context)
    if not verify_same_log(ED25519, REVEAL_DLEQ_DST, [_G, big_r], [big_e, big_k], c, z, bind):
        raise InvalidRevealError(f"vdec reveal: the proof of recipient {recipient} does not verify")
    return _open(_derive_key(big_k, big_r, big_e, recipient, context), recipient, ciphertext, context)


# Internals ---------------------------------------------------------------------------


def _lp(item: bytes) -> bytes:
    return len(item).to_bytes(8, "big") + item


def _point(data: bytes, what: str) -> bytes:
    try:
        return ED25519.decode(data)
    except DecodeError as exc:
        raise DecodeError(f"vdec {what}: {exc}") from None


def _proof(data: bytes, what: str) -> tuple[int, int]:
    if not isinstance(data, (bytes, bytearray)) or len(data) != PROOF_SIZE:
        raise DecodeError(f"vdec {what}: the proof must be {PROOF_SIZE} bytes")
    try:
        data = bytes(data)
        return ED25519.decode_scalar(data[:SCALAR_SIZE]), ED25519.decode_scalar(data[SCALAR_SIZE:])
    except DecodeError as exc:
        raise DecodeError(f"vdec {what} proof: {exc}") from None


def _check_recipient(recipient: int) -> None:
    if type(recipient) is not int or not 1 <= recipient <= MAX_RECIPIENT:
        raise ParameterError(f"vdec: recipient id must be an int in 1..{MAX_RECIPIENT}")


def _check_context(context: bytes) -> None:
    if not isinstance(context, bytes):
        raise ParameterError("vdec: the context must be bytes")


def _own_key(e: int, E: bytes, recipient: int) -> bytes:
    _check_recipient(recipient)
    big_e = _point(E, "public encryption key")
    if e % ED25519.order == 0 or ED25519.mul_base(e) != big_e:
        raise ParameterError("vdec: the secret encryption scalar does not match E")
    return big_e


def _reveal_bind(recipient: int, context: bytes) -> tuple[bytes, bytes]:
    return recipient.to_bytes(2, "big"), context


def _aad(recipient: int, context: bytes) -> bytes:
    return AAD_DOMAIN + _lp(recipient.to_bytes(2, "big")) + _lp(context)


def _derive_key(big_k: bytes, big_r: bytes, big_e: bytes, recipient: int, context: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869): IKM = K, info = R, E, recipient and context, length-prefixed."""
    info = _lp(big_r) + _lp(big_e) + _lp(recipient.to_bytes(2, "big")) + _lp(context)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=KDF_SALT, info=info).derive(big_k)


def _open(key: bytes, recipient: int, ciphertext: bytes, context: bytes) -> bytes | None:
    if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) < TAG_SIZE:
        return None
    try:
        return bytes(
            _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(ciphertext), _aad(recipient, context), _ZERO_NONCE, key
            )
        )
    except _sodium_errors.CryptoError:
        return None
