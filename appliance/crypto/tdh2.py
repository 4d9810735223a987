"""TDH2: a threshold key encapsulation secure against chosen-ciphertext attacks, and data sealed with it.

Shoup and Gennaro, "Securing threshold cryptosystems against chosen ciphertext attack"
(EUROCRYPT '98, J. Cryptology 2002), scheme TDH2, used as a KEM over any :class:`Group`.
It is how the store of issue 14 keeps secrets: one long-lived secret x of the network
(Feldman-shared like every secret of C, refreshed and recovered with them), public key
H = x G; every stored secret is a ciphertext under H, replicated at every server.

Theory of operation
-------------------
Generators G and Gbar (:func:`second_generator`: ``hash_to_element``, nobody knows its log).

Encapsulation under H with label L (the store puts application, data id, version and the
authorized reader in L): random r, s;

    U = r G,  W = s G,  Ubar = r Gbar,  Wbar = s Gbar,
    e = Hash(L, U, W, Ubar, Wbar),  f = s + r e,

ciphertext (L, U, Ubar, e, f); the shared group element is K = r H, and the key is
HKDF-SHA256(K, info = domain || group || SHA-256(ciphertext)).
(e, f) is a Schnorr proof that log_G U = log_Gbar Ubar, with L inside its challenge.

:func:`check_ciphertext` recomputes W = f G - e U and Wbar = f Gbar - e Ubar and checks
e = Hash(L, U, W, Ubar, Wbar): a ciphertext whose label or any part was changed fails,
and every server runs it before it contributes (this check is what makes TDH2 CCA-secure:
the proof shows that the encryptor knew r, so a decryption oracle is useless to an
adversary, who could only submit ciphertexts whose K it already knows).

Decryption share of server i (share x_i, verification share Y_i = x_i G): U_i = x_i U with a
Chaum-Pedersen proof that log_U U_i = log_G Y_i, whose challenge also binds the ciphertext's
digest and i, so a share is useless for any other ciphertext and names its server when wrong.
Any t+1 valid shares give K = sum lambda_i U_i (Lagrange in the exponent).

Refresh changes the x_i and Y_i but neither x nor H: ciphertexts made before a refresh decrypt
with shares made after it, and a share of an earlier period fails the proof against the current
Y_i (so shares of different periods never combine).

Data: the key of one encapsulation encrypts exactly one message with ChaCha20-Poly1305
(``cryptography``), nonce zero (the key is fresh for every encapsulation), associated data L.
Shares go to one reader only: :func:`share_for_reader` encrypts a share to the reader's X25519
key with a NaCl sealed box, so a server or network that relays it learns nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import nacl.exceptions
import nacl.public
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.crypto import encoding
from appliance.crypto.errors import CheatingError, CryptoError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import KeyShare, PublicSharing
from appliance.crypto.secret import ScalarSource
from appliance.crypto.shamir import lagrange_coefficients

E = TypeVar("E")

GBAR_DST: Final = b"pst/tdh2/gbar/v1"
CIPHERTEXT_DST: Final = b"pst/tdh2/ciphertext/v1"
SHARE_DST: Final = b"pst/tdh2/share/v1"
KDF_INFO: Final = b"pst/tdh2/kem/v1"
KEY_SIZE: Final = 32
#: Longest label: application, data id, version and reader fit many times over.
MAX_LABEL: Final = 4096
#: Largest sealed message (the store's quotas are smaller).
MAX_PLAINTEXT: Final = 1024 * 1024
READER_KEY_SIZE: Final = 32
_NONCE: Final = bytes(12)
_MAX_SERVER: Final = 2**16 - 1


class InvalidCiphertext(CryptoError):
    """A ciphertext whose proof does not verify (changed, or made under another label or group)."""


_GBAR: dict[str, Any] = {}


def second_generator(group: Group[E]) -> E:
    """Gbar: an element nobody knows the discrete log of (cached per group)."""
    if group.name not in _GBAR:
        _GBAR[group.name] = group.hash_to_element(GBAR_DST, group.name.encode())
    gbar: E = _GBAR[group.name]
    return gbar


# Ciphertexts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ciphertext(Generic[E]):
    """(L, U, Ubar, e, f): the encapsulation under label ``label``."""

    label: bytes
    u: E
    ubar: E
    e: int
    f: int

    def to_obj(self, group: Group[E]) -> dict[str, Any]:
        return {
            "g": group.name,
            "label": self.label,
            "u": group.encode(self.u),
            "ubar": group.encode(self.ubar),
            "e": group.encode_scalar(self.e),
            "f": group.encode_scalar(self.f),
        }

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(self.to_obj(group))

    def digest(self, group: Group[E]) -> bytes:
        """SHA-256 of the canonical encoding: what shares and keys are bound to."""
        return hashlib.sha256(self.encode(group)).digest()

    @classmethod
    def from_obj(cls, group: Group[E], obj: Any, what: str = "tdh2 ciphertext") -> Ciphertext[E]:
        f = _ciphertext_fields(group, obj, what)
        try:
            return cls(
                f["label"],
                group.decode(f["u"]),
                group.decode(f["ubar"]),
                group.decode_scalar(f["e"]),
                group.decode_scalar(f["f"]),
            )
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from None

    @classmethod
    def decode(cls, group: Group[E], data: bytes) -> Ciphertext[E]:
        what = "tdh2 ciphertext"
        return cls.from_obj(group, encoding.decode(data, max_size=MAX_LABEL + 1024, what=what), what)


def _ciphertext_fields(group: Group[E], obj: Any, what: str) -> dict[str, Any]:
    """The fields of an encoded ciphertext, checked for shape (its points and scalars not decoded)."""
    f = encoding.expect_map(
        obj, {"g": str, "label": bytes, "u": bytes, "ubar": bytes, "e": bytes, "f": bytes}, what
    )
    if f["g"] != group.name:
        raise DecodeError(f"{what}: made on group {f['g']!r}, expected {group.name!r}")
    if len(f["label"]) > MAX_LABEL:
        raise DecodeError(f"{what}: label of {len(f['label'])} bytes exceeds {MAX_LABEL}")
    return f


def _challenge(group: Group[E], label: bytes, u: E, w: E, ubar: E, wbar: E) -> int:
    return group.hash_to_scalar(
        CIPHERTEXT_DST,
        group.name.encode(),
        label,
        group.encode(u),
        group.encode(w),
        group.encode(ubar),
        group.encode(wbar),
    )


def _derive_key(group: Group[E], ct: Ciphertext[E], k: E) -> bytes:
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=KDF_INFO + b"\x00" + group.name.encode() + b"\x00" + ct.digest(group),
    )
    return hkdf.derive(group.encode(k))


def encapsulate(
    group: Group[E], public_key: E, label: bytes, rand: ScalarSource
) -> tuple[bytes, Ciphertext[E]]:
    """A fresh key of KEY_SIZE bytes and its ciphertext under ``public_key``, bound to ``label``."""
    if len(label) > MAX_LABEL:
        raise ValueError(f"tdh2: label of {len(label)} bytes exceeds {MAX_LABEL}")
    if group.is_identity(public_key):
        raise ValueError("tdh2: the public key is the identity")
    gbar = second_generator(group)
    r, s = rand() % group.order, rand() % group.order
    if r == 0 or s == 0:
        raise ValueError("tdh2: the randomness source gave zero")
    u, ubar = group.mul_base(r), group.mul(r, gbar)
    w, wbar = group.mul_base(s), group.mul(s, gbar)
    e = _challenge(group, label, u, w, ubar, wbar)
    ct = Ciphertext(label, u, ubar, e, (s + r * e) % group.order)
    return _derive_key(group, ct, group.mul(r, public_key)), ct


def check_ciphertext(group: Group[E], ct: Ciphertext[E], label: bytes | None = None) -> None:
    """Raise InvalidCiphertext unless the proof verifies (and the label is ``label``, if given)."""
    if label is not None and ct.label != label:
        raise InvalidCiphertext("tdh2: the ciphertext was made under another label")
    if group.is_identity(ct.u) or group.is_identity(ct.ubar):
        raise InvalidCiphertext("tdh2: ciphertext with an identity element")
    if not (0 <= ct.e < group.order and 0 <= ct.f < group.order):
        raise InvalidCiphertext("tdh2: ciphertext scalars out of range")
    _check_proof(group, ct, group.mul(ct.e, ct.u), group.mul(ct.e, ct.ubar))


def _check_proof(group: Group[E], ct: Ciphertext[E], eu: E, eubar: E) -> None:
    """The proof's equations, given e U and e Ubar."""
    gbar = second_generator(group)
    w = group.sub(group.mul_base(ct.f), eu)
    wbar = group.sub(group.mul(ct.f, gbar), eubar)
    if _challenge(group, ct.label, ct.u, w, ct.ubar, wbar) != ct.e:
        raise InvalidCiphertext("tdh2: the ciphertext's proof does not verify (changed, or another label)")


# Decryption shares --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecryptionShare(Generic[E]):
    """Server ``server``'s U_i = x_i U with its Chaum-Pedersen proof (e, f)."""

    server: int
    ui: E
    e: int
    f: int

    def to_bytes(self, group: Group[E]) -> bytes:
        return (
            self.server.to_bytes(2, "big")
            + group.encode(self.ui)
            + group.encode_scalar(self.e)
            + group.encode_scalar(self.f)
        )

    @classmethod
    def from_bytes(cls, group: Group[E], data: bytes) -> DecryptionShare[E]:
        size = 2 + group.element_size + 2 * group.scalar_size
        if not isinstance(data, bytes) or len(data) != size:
            raise DecodeError(f"tdh2 decryption share: expected {size} bytes")
        server = int.from_bytes(data[:2], "big")
        if server == 0:
            raise DecodeError("tdh2 decryption share: server id 0")
        el, sc = group.element_size, group.scalar_size
        try:
            ui = group.decode(data[2 : 2 + el])
            e = group.decode_scalar(data[2 + el : 2 + el + sc])
            f = group.decode_scalar(data[2 + el + sc :])
        except DecodeError as exc:
            raise DecodeError(f"tdh2 decryption share of server {server}: {exc}") from None
        return cls(server, ui, e, f)


def _share_challenge(group: Group[E], digest: bytes, server: int, yi: E, u: E, ui: E, a: E, b: E) -> int:
    return group.hash_to_scalar(
        SHARE_DST,
        group.name.encode(),
        digest,
        server.to_bytes(2, "big"),
        group.encode(yi),
        group.encode(u),
        group.encode(ui),
        group.encode(a),
        group.encode(b),
    )


def decryption_share(
    group: Group[E], key: KeyShare[E], ct: Ciphertext[E], rand: ScalarSource, label: bytes | None = None
) -> DecryptionShare[E]:
    """Server ``key.index``'s share for ``ct``; InvalidCiphertext for a ciphertext that fails the check."""
    check_ciphertext(group, ct, label)
    if not 1 <= key.index <= _MAX_SERVER:
        raise ValueError(f"tdh2: server id {key.index} out of range")
    x = key.share.value
    yi = group.mul_base(x)
    ui = group.mul(x, ct.u)
    k = rand() % group.order
    a, b = group.mul(k, ct.u), group.mul_base(k)
    e = _share_challenge(group, ct.digest(group), key.index, yi, ct.u, ui, a, b)
    return DecryptionShare(key.index, ui, e, (k + e * x) % group.order)


def verify_share(
    group: Group[E], verification_share: E, ct: Ciphertext[E], share: DecryptionShare[E]
) -> bool:
    """Does ``share`` prove log_U U_i = log_G Y_i for this ciphertext?"""
    if not (0 <= share.e < group.order and 0 <= share.f < group.order) or group.is_identity(share.ui):
        return False
    a = group.sub(group.mul(share.f, ct.u), group.mul(share.e, share.ui))
    b = group.sub(group.mul_base(share.f), group.mul(share.e, verification_share))
    digest = ct.digest(group)
    return share.e == _share_challenge(group, digest, share.server, verification_share, ct.u, share.ui, a, b)


def sort_shares(
    group: Group[E],
    public: PublicSharing[E],
    ct: Ciphertext[E],
    shares: Mapping[int, DecryptionShare[E]],
    enough: int | None = None,
) -> tuple[dict[int, DecryptionShare[E]], dict[int, str]]:
    """(valid shares, {server: reason} for the others): what a reader does before combining.

    With ``enough``, the shares are checked in server order only until that many are valid
    (the others are in neither result): a reader needs t+1."""
    good: dict[int, DecryptionShare[E]] = {}
    bad: dict[int, str] = {}
    for i, share in sorted(shares.items()):
        if enough is not None and len(good) >= enough:
            break
        if share.server != i or not 1 <= i <= public.n:
            bad[i] = f"decryption share under the id of server {share.server}"
        elif not verify_share(group, public.verification_share(group, i), ct, share):
            bad[i] = "decryption share whose proof does not verify against its verification share"
        else:
            good[i] = share
    return good, bad


def combine(
    group: Group[E], public: PublicSharing[E], ct: Ciphertext[E], shares: Mapping[int, DecryptionShare[E]]
) -> bytes:
    """The key from t+1 valid shares.

    Raises InvalidCiphertext for a bad ciphertext, CheatingError naming the first server whose share
    is wrong (drop it with :func:`sort_shares` and retry), NotEnoughSharesError for fewer than t+1.
    """
    check_ciphertext(group, ct)
    good, bad = sort_shares(group, public, ct, shares)
    if bad:
        first = min(bad)
        raise CheatingError(first, bad[first])
    return interpolate(group, public, ct, good)


def interpolate(
    group: Group[E], public: PublicSharing[E], ct: Ciphertext[E], good: Mapping[int, DecryptionShare[E]]
) -> bytes:
    """The key from t+1 shares that :func:`sort_shares` found valid, of a ciphertext that was
    checked (:func:`decode_checked`): :func:`combine` without checking them again.
    NotEnoughSharesError for fewer than t+1."""
    if len(good) < public.t + 1:
        raise NotEnoughSharesError(f"tdh2: {len(good)} valid decryption shares, need {public.t + 1}")
    ids = sorted(good)[: public.t + 1]
    lam = lagrange_coefficients(ids, group.order)
    k = group.multi_mul([lam[i] for i in ids], [good[i].ui for i in ids])
    return _derive_key(group, ct, k)


def decapsulate_directly(group: Group[E], secret: int, ct: Ciphertext[E]) -> bytes:
    """The key from the whole secret x: for tests only (no server ever holds x)."""
    check_ciphertext(group, ct)
    return _derive_key(group, ct, group.mul(secret, ct.u))


# Shares for one reader ----------------------------------------------------------------------------


def share_for_reader(group: Group[E], share: DecryptionShare[E], reader_key: bytes) -> bytes:
    """``share`` encrypted to the reader's X25519 public key (NaCl sealed box)."""
    if len(reader_key) != READER_KEY_SIZE:
        raise ValueError(f"tdh2: a reader key has {READER_KEY_SIZE} bytes, got {len(reader_key)}")
    box = nacl.public.SealedBox(nacl.public.PublicKey(reader_key))
    return bytes(box.encrypt(share.to_bytes(group)))


def open_share(group: Group[E], reader: nacl.public.PrivateKey, data: bytes) -> DecryptionShare[E]:
    """The share in a sealed box for ``reader``; DecodeError if it is not one (or not for this reader)."""
    if not isinstance(data, bytes) or len(data) > 1024:
        raise DecodeError("tdh2 sealed share: expected at most 1024 bytes")
    try:
        plain = bytes(nacl.public.SealedBox(reader).decrypt(data))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise DecodeError("tdh2 sealed share: cannot be opened with this reader's key") from None
    return DecryptionShare.from_bytes(group, plain)


# Sealed data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed(Generic[E]):
    """A message encrypted under a TDH2 key: the encapsulation and the AEAD ciphertext."""

    kem: Ciphertext[E]
    body: bytes

    def to_obj(self, group: Group[E]) -> dict[str, Any]:
        return {"kem": self.kem.to_obj(group), "body": self.body}

    def encode(self, group: Group[E]) -> bytes:
        return encoding.encode(self.to_obj(group))

    @classmethod
    def from_obj(cls, group: Group[E], obj: Any, what: str = "tdh2 sealed data") -> Sealed[E]:
        f = _sealed_fields(obj, what)
        return cls(Ciphertext.from_obj(group, f["kem"], f"{what}: kem"), f["body"])

    @classmethod
    def decode(cls, group: Group[E], data: bytes) -> Sealed[E]:
        what = "tdh2 sealed data"
        return cls.from_obj(group, _decode_sealed(data, what), what)


class TooLarge(DecodeError):
    """Sealed data whose plaintext is larger than the caller allows (:func:`decode_checked`)."""


def _sealed_fields(obj: Any, what: str) -> dict[str, Any]:
    f = encoding.expect_map(obj, {"kem": dict, "body": bytes}, what)
    if not 16 <= len(f["body"]) <= MAX_PLAINTEXT + 16:
        raise DecodeError(f"{what}: body of {len(f['body'])} bytes (16 to {MAX_PLAINTEXT + 16})")
    return f


def _decode_sealed(data: bytes, what: str) -> Any:
    return encoding.decode(data, max_size=MAX_PLAINTEXT + MAX_LABEL + 2048, what=what)


def decode_checked(
    group: Group[E], data: bytes, label: bytes | None = None, max_plaintext: int = MAX_PLAINTEXT
) -> Sealed[E]:
    """:meth:`Sealed.decode` then :func:`check_ciphertext` (with ``label``), in one step and at
    less cost: the two points of the encapsulation are checked (canonical, in the prime-order
    subgroup, not the identity) by the multiplications e U and e Ubar of the check itself
    (:meth:`Group.decode_mul`; libsodium's multiplication checks its point), not once more
    before them. What every server runs on every secret write, and before every share.

    Raises DecodeError for bytes that are not sealed data on ``group`` (a point that is not an
    element included), TooLarge (a DecodeError) for a plaintext over ``max_plaintext`` bytes
    before any group operation, InvalidCiphertext for a proof that does not verify or a label
    other than ``label``."""
    what = "tdh2 sealed data"
    f = _sealed_fields(_decode_sealed(data, what), what)
    if len(f["body"]) - 16 > max_plaintext:
        raise TooLarge(f"{what}: a plaintext of {len(f['body']) - 16} bytes exceeds {max_plaintext}")
    k = _ciphertext_fields(group, f["kem"], f"{what}: kem")
    try:
        e, s = group.decode_scalar(k["e"]), group.decode_scalar(k["f"])
        u, eu = group.decode_mul(k["u"], e)
        ubar, eubar = group.decode_mul(k["ubar"], e)
    except DecodeError as exc:
        raise DecodeError(f"{what}: kem: {exc}") from None
    ct = Ciphertext(k["label"], u, ubar, e, s)
    if label is not None and ct.label != label:
        raise InvalidCiphertext("tdh2: the ciphertext was made under another label")
    _check_proof(group, ct, eu, eubar)
    return Sealed(ct, f["body"])


def seal(group: Group[E], public_key: E, label: bytes, plaintext: bytes, rand: ScalarSource) -> Sealed[E]:
    """``plaintext`` encrypted under the network's key, bound to ``label``."""
    if len(plaintext) > MAX_PLAINTEXT:
        raise ValueError(f"tdh2: {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
    key, kem = encapsulate(group, public_key, label, rand)
    return Sealed(kem, ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, label))


def open_sealed(sealed: Sealed[E], key: bytes) -> bytes:
    """The plaintext, with the key from :func:`combine`; InvalidCiphertext if the body was changed."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, sealed.body, sealed.kem.label)
    except InvalidTag:
        raise InvalidCiphertext("tdh2: the sealed body does not authenticate under this key") from None
