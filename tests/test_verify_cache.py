"""The caches of successful checks (protocols/_core.ed25519_verify, the Ed25519 group's point
decoding, canonical CBOR decoding, vdec's ephemeral proofs) only ever save a repeated check:
they never accept what the check would refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.crypto import encoding, vdec
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


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 39))
def test_decoding_from_the_cache_accepts_only_what_the_checks_accept(data: bytes, flip: int) -> None:
    """Random bytes, and a valid encoding with one bit flipped, after the valid one is cached."""
    good = encoding.encode({"k": [1, b"x" * (flip % 5)], "p": 7})
    assert encoding.decode(good) == encoding.decode(good) == {"k": [1, b"x" * (flip % 5)], "p": 7}
    assert good in encoding._CANONICAL
    bad = bytearray(good)
    bad[flip % len(bad)] ^= 1 << (flip % 8)
    for candidate in (data, bytes(bad)):
        try:
            first = encoding.decode(candidate)
        except DecodeError:
            assert candidate not in encoding._CANONICAL
            with pytest.raises(DecodeError):
                encoding.decode(candidate)
            continue
        assert encoding.encode(first) == candidate and encoding.decode(candidate) == first


def test_a_cached_encoding_still_obeys_each_callers_size_limit_and_decodes_afresh() -> None:
    data = encoding.encode({"v": list(range(50))})
    first = encoding.decode(data)
    with pytest.raises(DecodeError, match="exceeds the limit"):
        encoding.decode(data, max_size=len(data) - 1)
    first["v"].append(99)  # a caller may change what it got: the next decode is unaffected
    assert encoding.decode(data) == {"v": list(range(50))}


def test_the_decoding_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoding, "_CANONICAL", {})
    monkeypatch.setattr(encoding, "_CANONICAL_MAX", 8)
    monkeypatch.setattr(encoding, "_CANONICAL_BYTES", 200)
    for i in range(50):
        encoding.decode(encoding.encode([i, b"y" * 30]))
        assert len(encoding._CANONICAL) <= 8 and encoding._canonical_size <= 200
    big = encoding.encode(b"z" * (encoding._CANONICAL_ITEM + 1))
    assert encoding.decode(big) == b"z" * (encoding._CANONICAL_ITEM + 1)
    assert big not in encoding._CANONICAL


def test_a_cached_ephemeral_is_accepted_in_its_own_context_only() -> None:
    public = ED25519.mul_base(77)
    ephemeral, _ = vdec.encrypt_to({1: public}, {1: b"x"}, 12345, b"ctx/a")
    assert vdec.check_ephemeral(ephemeral, b"ctx/a") == ED25519.mul_base(12345)
    assert vdec.check_ephemeral(ephemeral, b"ctx/a") == ED25519.mul_base(12345)  # from the cache
    with pytest.raises(DecodeError, match="proof of knowledge"):
        vdec.check_ephemeral(ephemeral, b"ctx/b")
    for i in range(len(ephemeral)):
        bad = bytearray(ephemeral)
        bad[i] ^= 1
        with pytest.raises(DecodeError):
            vdec.check_ephemeral(bytes(bad), b"ctx/a")
        assert (bytes(bad), b"ctx/a") not in vdec._EPHEMERALS


def test_a_signed_object_opens_from_the_cache_for_its_own_key_and_bytes_only() -> None:
    from appliance.protocols._core import Signer
    from appliance.protocols._signed import _OPENED, BadSignature, open_signed, sign

    signer, other = Signer(SigningKey(bytes([3]) * 32)), Signer(SigningKey(bytes([4]) * 32))
    raw = sign("attest", 5, {"server": 2, "ann": b"d" * 32}, signer)
    for _ in range(2):  # the second time from the cache
        assert open_signed(raw, "attest", 5, signer.public, max_size=1024).body["server"] == 2
    assert len(_OPENED) > 0
    with pytest.raises(BadSignature):
        open_signed(raw, "attest", 5, other.public, max_size=1024)
    forged = encoding.encode(
        {
            "kind": "attest",
            "period": 5,
            "body": {"server": 3, "ann": b"d" * 32},
            "sig": encoding.decode(raw)["sig"],
        }
    )
    with pytest.raises(BadSignature):
        open_signed(forged, "attest", 5, signer.public, max_size=1024)
