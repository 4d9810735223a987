"""Ed25519's prime-order subgroup on libsodium's core operations (through pynacl).

Elements are their 32-byte canonical encodings (RFC 8032 §5.1.2), which is what
libsodium operates on; scalars are ints modulo L and are serialized little-endian
as in RFC 8032. ``decode`` uses ``crypto_core_ed25519_is_valid_point``, which
rejects non-canonical encodings, points off the curve, small-order points (the
identity among them) and points outside the prime-order subgroup.
"""

from __future__ import annotations

import hashlib

from nacl import bindings as _sodium

from appliance.crypto.errors import DecodeError
from appliance.crypto.groups._base import Group

L = 2**252 + 27742317777372353535851937790883648493
_IDENTITY = bytes([1]) + bytes(31)
_BASE = _sodium.crypto_scalarmult_ed25519_base_noclamp((1).to_bytes(32, "little"))


#: Encodings that passed the point check (commitments and public keys are decoded again with every
#: message that carries them). Bounded; only valid points are kept.
_VALID: dict[bytes, None] = {}
_VALID_MAX = 8192


class Ed25519Group(Group[bytes]):
    name = "ed25519"
    order = L
    element_size = 32
    scalar_size = 32

    def generator(self) -> bytes:
        return _BASE

    def identity(self) -> bytes:
        return _IDENTITY

    def add(self, a: bytes, b: bytes) -> bytes:
        if a == _IDENTITY:
            return b
        if b == _IDENTITY:
            return a
        return bytes(_sodium.crypto_core_ed25519_add(a, b))

    def sub(self, a: bytes, b: bytes) -> bytes:
        if b == _IDENTITY:
            return a
        if a == _IDENTITY:
            return self.neg(b)
        return bytes(_sodium.crypto_core_ed25519_sub(a, b))

    def neg(self, a: bytes) -> bytes:
        if a == _IDENTITY:
            return a
        return bytes(_sodium.crypto_core_ed25519_sub(_IDENTITY, a))

    def mul(self, k: int, a: bytes) -> bytes:
        k %= L
        if k == 0 or a == _IDENTITY:
            return _IDENTITY
        if k == 1:
            return a
        if a == _BASE:
            return self.mul_base(k)
        return bytes(_sodium.crypto_scalarmult_ed25519_noclamp(k.to_bytes(32, "little"), a))

    def mul_base(self, k: int) -> bytes:
        k %= L
        if k == 0:
            return _IDENTITY
        return bytes(_sodium.crypto_scalarmult_ed25519_base_noclamp(k.to_bytes(32, "little")))

    def encode(self, a: bytes) -> bytes:
        return a

    def decode(self, data: bytes) -> bytes:
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError("ed25519 element: expected bytes")
        if len(data) != 32:
            raise DecodeError(f"ed25519 element: expected 32 bytes, got {len(data)}")
        data = bytes(data)
        if data in _VALID:
            return data
        if not _sodium.crypto_core_ed25519_is_valid_point(data):
            raise DecodeError(
                "ed25519 element: not a canonical encoding of a prime-order subgroup point "
                "other than the identity"
            )
        if len(_VALID) >= _VALID_MAX:
            _VALID.clear()  # crude but thread-safe; a miss only costs a check
        _VALID[data] = None
        return data

    def decode_mul(self, data: bytes, k: int) -> tuple[bytes, bytes]:
        """decode, then mul, in one libsodium call: ``crypto_scalarmult_ed25519_noclamp`` refuses
        a point that is not canonical, of small order (the identity among them), off the curve or
        outside the prime-order subgroup, the very checks of ``is_valid_point`` in :meth:`decode`,
        which would cost as much again. On a refusal, :meth:`decode` names what is wrong."""
        k %= L
        if k <= 1 or not isinstance(data, bytes) or len(data) != 32 or data in _VALID:
            return super().decode_mul(data, k)
        try:
            product = bytes(_sodium.crypto_scalarmult_ed25519_noclamp(k.to_bytes(32, "little"), data))
        except RuntimeError:
            self.decode(data)  # raises DecodeError, saying why
            raise  # pragma: no cover - a valid point times k (not 0 mod L) is never the identity
        return data, product

    def encode_scalar(self, k: int) -> bytes:
        return (k % L).to_bytes(32, "little")

    def _scalar_from_bytes(self, data: bytes) -> int:
        return int.from_bytes(data, "little")

    def hash_to_element(self, dst: bytes, msg: bytes) -> bytes:
        # libsodium's Elligator 2 map (crypto_core_ed25519_from_uniform) clears the
        # cofactor, so the result lies in the prime-order subgroup.
        digest = hashlib.sha512(len(dst).to_bytes(8, "big") + dst + msg).digest()[:32]
        point = bytes(_sodium.crypto_core_ed25519_from_uniform(digest))
        if point == _IDENTITY:  # pragma: no cover - probability ~2^-252
            raise ValueError("hash_to_element hit the identity")
        return point

    def is_identity(self, a: bytes) -> bool:
        return a == _IDENTITY


ED25519 = Ed25519Group()
