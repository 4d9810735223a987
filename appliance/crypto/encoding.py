"""Canonical CBOR (RFC 8949 §4.2.1 deterministic encoding) for every agreed object.

Two servers that build the same object get the same bytes, whatever the insertion
order of its maps or sets: cbor2's canonical mode sorts map keys and set members
by their encoding. Only plain data is allowed (ints, byte and text strings, bools,
None, lists, maps, sets); floats and foreign tags are refused, so that nothing with
two encodings can reach a signature.

:func:`decode` is strict: it refuses non-canonical input (it must re-encode to the
very same bytes), indefinite lengths, duplicate keys, oversized input and deep
nesting, and raises :class:`DecodeError` naming the problem, never anything else.

:func:`signing_payload` is the only way to turn an object into bytes to sign: it
binds the object's type, version, context string and period (domain separation),
so that no signature can be replayed in another protocol, role or period.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2

from appliance.crypto.errors import DecodeError

#: Upper bound on any encoded object; frames and messages are far smaller.
MAX_ENCODED_SIZE = 16 * 1024 * 1024
MAX_DEPTH = 32
#: Prefix of every signed payload: versioned, so a future format can never collide.
SIGNING_DOMAIN = "pst/signed/v1"


_SCALARS = frozenset({type(None), bool, int, bytes, str})
_KEYS = frozenset({int, str, bytes})


def _check(obj: Any, depth: int) -> None:
    """Plain data only (no floats, no foreign types), nested at most MAX_DEPTH deep."""
    tp = type(obj)
    if tp in _SCALARS:
        return
    if depth > MAX_DEPTH:
        raise DecodeError(f"cbor: nested deeper than {MAX_DEPTH}")
    if tp is dict or isinstance(obj, Mapping):
        for key, value in obj.items():
            if type(key) not in _KEYS:
                raise DecodeError(f"cbor: map key of type {type(key).__name__} not allowed")
            if type(value) not in _SCALARS:
                _check(value, depth + 1)
    elif tp is list or tp is tuple or tp is set or tp is frozenset:
        for value in obj:
            if type(value) not in _SCALARS:
                _check(value, depth + 1)
    elif not (isinstance(obj, (int, bytes, str)) and not isinstance(obj, bool)):
        raise DecodeError(f"cbor: value of type {tp.__name__} not allowed")


def encode(obj: Any) -> bytes:
    """Canonical CBOR bytes of ``obj``.

    Our own objects are plain data by construction (tests check it); untrusted data
    only ever arrives through :func:`decode`, which checks every value.
    """
    return bytes(cbor2.dumps(obj, canonical=True))


def check_plain(obj: Any) -> None:
    """Raise DecodeError unless ``obj`` is plain data (no floats, tags or foreign types)."""
    _check(obj, 0)


def _tag_hook(decoder: Any, tag: Any) -> Any:
    # Only tag 258 (sets) is decoded, natively by cbor2; any other tag is refused.
    raise DecodeError(f"cbor: tag {tag.tag} not allowed")


def decode(data: bytes, *, max_size: int = MAX_ENCODED_SIZE, what: str = "object") -> Any:
    """Decode canonical CBOR; ``what`` names the object in error messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise DecodeError(f"{what}: empty input")
    try:
        obj = cbor2.loads(
            data,
            tag_hook=_tag_hook,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None
    except Exception as exc:  # cbor2 raises several types; callers get exactly one.
        raise DecodeError(f"{what}: malformed CBOR ({type(exc).__name__}: {exc})") from None
    try:
        _check(obj, 0)
        again = encode(obj)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None
    if again != data:
        raise DecodeError(f"{what}: not in canonical CBOR encoding (or trailing bytes)")
    return obj


def signing_payload(type_: str, version: int, context: str, period: int, body: Any) -> bytes:
    """The bytes a signature covers: body bound to its type, version, context and period."""
    if not type_ or not context:
        raise ValueError("signing_payload: type and context must be non-empty")
    if period < 0 or version < 0:
        raise ValueError("signing_payload: period and version must be non-negative")
    return encode(
        {
            "dom": SIGNING_DOMAIN,
            "type": type_,
            "v": version,
            "ctx": context,
            "period": period,
            "body": body,
        }
    )


def expect_map(obj: Any, keys: Mapping[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    """Check that ``obj`` is a map with exactly ``keys`` of the given types."""
    if not isinstance(obj, dict):
        raise DecodeError(f"{what}: expected a map, got {type(obj).__name__}")
    if set(obj) != set(keys):
        missing = sorted(set(keys) - set(obj))
        extra = sorted(str(k) for k in set(obj) - set(keys))
        raise DecodeError(f"{what}: wrong fields (missing {missing}, unexpected {extra})")
    for key, typ in keys.items():
        value = obj[key]
        if isinstance(value, bool) and typ is int:
            raise DecodeError(f"{what}: field {key!r} must be an int, not a bool")
        if not isinstance(value, typ):
            raise DecodeError(f"{what}: field {key!r} has type {type(value).__name__}")
    return obj
