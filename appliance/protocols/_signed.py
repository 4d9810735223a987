"""Signed objects of the refresh: ``{"body": ..., "sig": ...}`` with the signature over
:func:`~appliance.crypto.encoding.signing_payload` (kind, version, context, period, body).

Every object a server must be able to show to a third party (an announcement, a dealing,
a complaint, a FROST request or share, a recovery value) travels as such a signed object,
so that a dispute is settled by anyone from the bytes alone and never by a claim of
"I did not receive it". :func:`open_signed` decodes untrusted bytes once, with a size
cap checked before decoding, and raises :class:`~appliance.crypto.errors.DecodeError`
on anything malformed and :class:`BadSignature` when the signature does not verify.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import Signer, ed25519_verify

CONTEXT = "pst/refresh"


class BadSignature(Exception):
    """A signed object whose signature does not verify with the key it must carry."""


#: (key, SHA-256 of the raw object) of signed objects that verified: a broadcast or relayed object
#: is opened by every recipient and again by each handler that sees it (in the simulation every
#: server runs in one process). ``raw`` is the canonical encoding the other fields were decoded
#: from, so it fixes the payload and the signature. Bounded; only successes are kept.
_OPENED: dict[tuple[bytes, bytes], None] = {}
_OPENED_MAX = 4096


@dataclass(frozen=True)
class Signed:
    """A signed object as decoded by :func:`decode_signed` (the only maker: ``raw`` is its input)."""

    kind: str
    period: int
    body: Any
    sig: bytes
    raw: bytes

    def verify(self, key: bytes) -> bool:
        memo = (bytes(key), hashlib.sha256(self.raw).digest())
        if memo in _OPENED:
            return True
        if not ed25519_verify(key, payload(self.kind, self.period, self.body), self.sig):
            return False
        if len(_OPENED) >= _OPENED_MAX:
            _OPENED.clear()  # crude but thread-safe; a miss only costs a verification
        _OPENED[memo] = None
        return True


def payload(kind: str, period: int, body: Any) -> bytes:
    return encoding.signing_payload(kind, 1, CONTEXT, period, body)


def sign(kind: str, period: int, body: Any, signer: Signer) -> bytes:
    return encoding.encode(
        {"kind": kind, "period": period, "body": body, "sig": signer.sign(payload(kind, period, body))}
    )


def decode_signed(data: Any, kind: str, period: int, *, max_size: int) -> Signed:
    """Decode (not verify) a signed object of ``kind`` for ``period``."""
    if not isinstance(data, bytes):
        raise DecodeError(f"{kind}: expected bytes")
    if len(data) > max_size:
        raise DecodeError(f"{kind}: {len(data)} bytes exceeds the limit of {max_size}")
    obj = encoding.expect_map(
        encoding.decode(data, max_size=max_size, what=kind),
        {"kind": str, "period": int, "body": object, "sig": bytes},
        kind,
    )
    if obj["kind"] != kind:
        raise DecodeError(f"{kind}: got a {obj['kind']!r} object")
    if obj["period"] != period:
        raise DecodeError(f"{kind}: for period {obj['period']}, expected {period} (replayed?)")
    if len(obj["sig"]) != 64:
        raise DecodeError(f"{kind}: signature must be 64 bytes")
    return Signed(kind, period, obj["body"], obj["sig"], data)


def open_signed(data: Any, kind: str, period: int, key: bytes, *, max_size: int) -> Signed:
    s = decode_signed(data, kind, period, max_size=max_size)
    if not s.verify(key):
        raise BadSignature(f"{kind}: signature does not verify")
    return s
