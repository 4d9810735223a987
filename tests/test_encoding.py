"""Canonical CBOR: one object, one encoding; every bad input is a DecodeError."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 100), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), st.integers(), max_size=8), st.randoms())
def test_same_map_same_bytes_whatever_the_insertion_order(mapping: dict[str, int], rnd: Any) -> None:
    items = list(mapping.items())
    rnd.shuffle(items)
    assert encoding.encode(dict(items)) == encoding.encode(mapping)


@given(st.frozensets(st.integers(-1000, 1000), max_size=10))
def test_sets_encode_independently_of_order(members: frozenset[int]) -> None:
    assert encoding.encode(set(sorted(members, reverse=True))) == encoding.encode(set(sorted(members)))


@given(plain)
def test_roundtrip(obj: Any) -> None:
    data = encoding.encode(obj)
    assert encoding.encode(encoding.decode(data)) == data


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        obj = encoding.decode(data)
    except DecodeError:
        return
    assert encoding.encode(obj) == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (bytes.fromhex("1801"), "canonical"),  # 1 encoded in two bytes
        (bytes.fromhex("a2616201616101"), "canonical"),  # keys out of order
        (bytes.fromhex("a26161016161 02".replace(" ", "")), "malformed"),  # duplicate key
        (bytes.fromhex("f93c00"), "float"),
        (bytes.fromhex("c11a00000000"), "not allowed"),  # datetime tag
        (bytes.fromhex("9fff"), "indefinite length"),
        (bytes.fromhex("0101"), "canonical"),  # trailing bytes
        (bytes.fromhex("5a0000ffff"), "longer than the input"),  # truncated
        (bytes.fromhex("d81e820103"), "tag 30 not allowed"),  # a rational: cbor2 would gcd it
        (bytes.fromhex("d8248101"), "tag 36 not allowed"),  # a MIME message
        (bytes.fromhex("c2820101"), "big integer must be a byte string"),
        (bytes.fromhex("c25904010000"), "exceeds 1024"),  # a 1025-byte integer
        (bytes.fromhex("9b00000000ffffffff"), "array longer than the input"),
        (bytes.fromhex("f7"), "simple values"),  # undefined
    ],
)
def test_bad_input_names_the_problem(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        encoding.decode(data, what="frame")


def test_oversized_input_is_refused() -> None:
    with pytest.raises(DecodeError, match="exceeds the limit"):
        encoding.decode(encoding.encode(b"x" * 100), max_size=50)


def test_deep_nesting_is_refused() -> None:
    obj: Any = 1
    for _ in range(40):
        obj = [obj]
    data = bytes.fromhex("81") * 40 + b"\x01"
    with pytest.raises(DecodeError):
        encoding.decode(data)
    with pytest.raises(DecodeError, match="nested deeper"):
        encoding.check_plain(obj)


@pytest.mark.parametrize("value", [1.5, {"a": [object()]}, {1.5: 1}])
def test_non_plain_values_are_refused(value: Any) -> None:
    with pytest.raises(DecodeError, match="not allowed"):
        encoding.check_plain(value)


def test_signing_payload_binds_type_context_period() -> None:
    base = encoding.signing_payload("keytable", 1, "pst/refresh", 7, {"a": 1})
    assert base != encoding.signing_payload("keytable", 1, "pst/refresh", 8, {"a": 1})
    assert base != encoding.signing_payload("keytable", 1, "pst/init", 7, {"a": 1})
    assert base != encoding.signing_payload("keytable", 2, "pst/refresh", 7, {"a": 1})
    assert base != encoding.signing_payload("M", 1, "pst/refresh", 7, {"a": 1})
    decoded = encoding.decode(base)
    assert decoded["type"] == "keytable" and decoded["period"] == 7 and decoded["ctx"] == "pst/refresh"


@given(st.integers(-(2**8000), 2**8000))
def test_big_integers_within_the_bound_roundtrip(value: int) -> None:
    assert encoding.decode(encoding.encode(value)) == value


def test_a_large_rational_is_refused_before_cbor2_reads_it() -> None:
    """Issue 9 item 4: cbor2 reduces a tag-30 rational natively (a gcd quadratic in its size)."""
    import cbor2

    data = cbor2.dumps(cbor2.CBORTag(30, [3**200_000, 7**150_000]))
    with pytest.raises(DecodeError, match="tag 30 not allowed"):
        encoding.decode(data, what="frame")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_lenient_decoding_raises_only_decode_errors_and_agrees_with_strict(data: bytes) -> None:
    from appliance.crypto.encoding import decode, decode_lenient
    from appliance.crypto.errors import DecodeError

    try:
        lenient = decode_lenient(data)
    except DecodeError:
        lenient = DecodeError
    try:
        strict = decode(data)
    except DecodeError:
        return
    assert lenient == strict
