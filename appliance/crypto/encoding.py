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


def encode_in_order(obj: Any) -> bytes:
    """Canonical CBOR bytes of ``obj`` whose maps the caller built in canonical key order
    (shorter keys first, then bytewise: RFC 7049 §3.9), at a quarter of :func:`encode`'s cost,
    which sorts every map. For hot paths only; a test of each caller checks that
    ``encode_in_order(x) == encode(x)``, and :func:`decode` refuses anything not canonical."""
    return bytes(cbor2.dumps(obj))


def check_plain(obj: Any) -> None:
    """Raise DecodeError unless ``obj`` is plain data (no floats, tags or foreign types)."""
    _check(obj, 0)


#: Tags the encoding uses: 258 (sets) and 2/3 (integers beyond 64 bits), nothing else.
SET_TAG = 258
#: Largest magnitude of a big integer, in bytes (8192 bits: any group element or scalar here).
MAX_BIGNUM_BYTES = 1024


def _prescan(data: bytes) -> None:
    """Walk the CBOR item headers before cbor2 sees the bytes (linear in the input, no allocation).

    cbor2 decodes some tags natively before any hook runs (a tag-30 rational of two big integers
    costs a quadratic gcd: seconds for a few hundred kilobytes), so the tags and sizes are checked
    here first: only sets (258) and bounded big integers (2, 3); no floats, no undefined, no
    indefinite lengths, no declared length beyond the input.
    """
    n = len(data)
    pos = 0
    pending = 1  # items still to read
    bignum_next = False
    while pending:
        if pos >= n:
            raise DecodeError("cbor: truncated")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 31
        if info < 24:
            arg = info
        elif info <= 27:
            size = 1 << (info - 24)
            if pos + size > n:
                raise DecodeError("cbor: truncated")
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        else:
            raise DecodeError("cbor: indefinite length or reserved value not allowed")
        if bignum_next and major != 2:
            raise DecodeError("cbor: a big integer must be a byte string")
        pending -= 1
        if major in (2, 3):
            if bignum_next and arg > MAX_BIGNUM_BYTES:
                raise DecodeError(f"cbor: integer of {arg} bytes exceeds {MAX_BIGNUM_BYTES}")
            if arg > n - pos:
                raise DecodeError("cbor: string longer than the input")
            pos += arg
        elif major == 4:
            if arg > n - pos:
                raise DecodeError("cbor: array longer than the input")
            pending += arg
        elif major == 5:
            if 2 * arg > n - pos:
                raise DecodeError("cbor: map longer than the input")
            pending += 2 * arg
        elif major == 6:
            if arg not in (SET_TAG, 2, 3):
                raise DecodeError(f"cbor: tag {arg} not allowed")
            pending += 1
            bignum_next = arg in (2, 3)
            continue
        elif major == 7 and info not in (20, 21, 22):
            raise DecodeError("cbor: floats and simple values other than false, true, null not allowed")
        bignum_next = False


def _tag_hook(decoder: Any, tag: Any) -> Any:
    # Only tag 258 (sets) is decoded, natively by cbor2; any other tag is refused.
    raise DecodeError(f"cbor: tag {tag.tag} not allowed")


#: Inputs that passed every check of :func:`decode` (the same bytes reach a process many times: a
#: broadcast is decoded by each recipient, and in the simulation every server runs in one
#: process). A hit skips the checks, which are a function of the bytes alone, never the size
#: limit of the call; the objects are decoded afresh each time. Bounded in entries and bytes;
#: only successes are kept, and only inputs up to _CANONICAL_ITEM bytes (a simulated run
#: decodes about 150 KB of distinct inputs; a key-holder keeps at most 1 MiB here).
_CANONICAL: dict[bytes, None] = {}
_CANONICAL_MAX = 2048
_CANONICAL_ITEM = 64 * 1024
_CANONICAL_BYTES = 1024 * 1024
_canonical_size = 0


def _loads(data: bytes) -> Any:
    return cbor2.loads(
        data, tag_hook=_tag_hook, max_depth=MAX_DEPTH, allow_indefinite=False, allow_duplicate_keys=False
    )


def _remember_canonical(data: bytes) -> None:
    global _canonical_size
    if len(data) > _CANONICAL_ITEM:
        return
    if len(_CANONICAL) >= _CANONICAL_MAX or _canonical_size + len(data) > _CANONICAL_BYTES:
        _CANONICAL.clear()  # crude but thread-safe; a miss only costs the checks
        _canonical_size = 0
    _CANONICAL[data] = None
    _canonical_size += len(data)


def decode(data: bytes, *, max_size: int = MAX_ENCODED_SIZE, what: str = "object") -> Any:
    """Decode canonical CBOR; ``what`` names the object in error messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise DecodeError(f"{what}: empty input")
    if data in _CANONICAL:
        return _loads(data)
    try:
        _prescan(data)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None
    try:
        obj = _loads(data)
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
    _remember_canonical(data)
    return obj


def decode_lenient(data: bytes, *, max_size: int = MAX_ENCODED_SIZE, what: str = "object") -> Any:
    """Decode CBOR with :func:`decode`'s safety checks (tags, sizes, depth) but without the
    canonical-encoding check, at about a third of its cost. Only for data whose meaning is
    re-checked with :func:`decode` before anything relies on it (a search index, say)."""
    if len(data) > max_size or not data:
        raise DecodeError(f"{what}: empty or over {max_size} bytes")
    try:
        _prescan(data)
        return _loads(data)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc}") from None
    except Exception as exc:  # cbor2 raises several types; callers get exactly one.
        raise DecodeError(f"{what}: malformed CBOR ({type(exc).__name__}: {exc})") from None


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
