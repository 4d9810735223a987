"""The caches of successful checks (protocols/_core.ed25519_verify, the Ed25519 group's point
decoding) only ever save a repeated check: they never accept what the check would refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import ED25519
from appliance.protocols import _core


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200), st.integers(0, 63))
def test_a_cached_signature_is_accepted_for_its_own_payload_only(
    payload: bytes, other: bytes, flip: int
) -> None:
    key = SigningKey(bytes(32))
    signature = key.sign(payload).signature
    public = bytes(key.verify_key)
    assert _core.ed25519_verify(public, payload, signature)
    assert _core.ed25519_verify(public, payload, signature)  # now from the cache
    assert _core.ed25519_verify(public, other, signature) == (other == payload)
    bad = bytearray(signature)
    bad[flip] ^= 1
    assert not _core.ed25519_verify(public, payload, bytes(bad))
    assert not _core.ed25519_verify(bytes(SigningKey(bytes([1]) * 32).verify_key), payload, signature)


def test_the_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_core, "_VERIFIED_MAX", 8)
    key = SigningKey(bytes(32))
    for i in range(50):
        message = i.to_bytes(2, "big")
        assert _core.ed25519_verify(bytes(key.verify_key), message, key.sign(message).signature)
        assert len(_core._VERIFIED) <= 8


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_a_point_is_decoded_from_the_cache_only_if_it_is_valid(data: bytes) -> None:
    try:
        first = ED25519.decode(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            ED25519.decode(data)  # an invalid encoding is never cached
        return
    assert ED25519.decode(data) == first == data


def test_valid_and_invalid_points_after_each_other() -> None:
    good = ED25519.encode(ED25519.mul_base(ED25519.hash_to_scalar(b"t", b"x")))
    identity = bytes([1]) + bytes(31)
    assert ED25519.decode(good) == good
    with pytest.raises(DecodeError):
        ED25519.decode(identity)
    assert ED25519.decode(good) == good
