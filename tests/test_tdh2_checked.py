"""TDH2's one-step decode and check (``tdh2.decode_checked``, ``Group.decode_mul``): the same
verdict as decoding then checking, whatever the bytes; and the reader's early stop at t+1 shares."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from appliance.crypto import encoding, local, tdh2
from appliance.crypto.errors import DecodeError, NotEnoughSharesError
from appliance.crypto.groups import ED25519, P256, Group
from appliance.crypto.groups.ed25519 import _VALID, L
from appliance.crypto.secret import DeterministicSource

P = 2**255 - 19
#: Encodings of the eight points of small order (the identity, order 2, 4 and 8) and their
#: non-canonical forms: what libsodium's checks refuse.
SMALL_ORDER = [
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
]


def _torsioned(point: bytes, small: bytes) -> bytes:
    """A point of the curve outside the prime-order subgroup: a subgroup point plus a small one."""
    return bytes(sodium.crypto_core_ed25519_add(point, small))


@st.composite
def ed25519_encodings(draw: st.DrawFn) -> bytes:
    """32 bytes that are, or nearly are, Ed25519 points of every kind."""
    scalar = draw(st.integers(1, L - 1))
    point = ED25519.mul_base(scalar)
    kind = draw(st.sampled_from(["valid", "small", "torsioned", "non-canonical", "flipped", "random"]))
    if kind == "valid":
        return point
    if kind == "small":
        return draw(st.sampled_from(SMALL_ORDER))
    if kind == "torsioned":
        return _torsioned(point, draw(st.sampled_from(SMALL_ORDER[1:8])))
    if kind == "non-canonical":  # y + p for the few y that allow it, sign bit either way
        y = draw(st.integers(0, 2**255 - 1 - P))
        return ((y + P) | (draw(st.integers(0, 1)) << 255)).to_bytes(32, "little")
    if kind == "flipped":  # one bit of a valid point changed
        bit = draw(st.integers(0, 255))
        return (int.from_bytes(point, "little") ^ (1 << bit)).to_bytes(32, "little")
    return draw(st.binary(min_size=32, max_size=32))


def _verdict(group: Group[Any], fn: Any) -> Any:
    try:
        return ("ok", fn())
    except DecodeError:
        return ("refused", None)


@settings(max_examples=400, deadline=None)
@given(
    data=ed25519_encodings(), k=st.one_of(st.sampled_from([0, 1, 2, L - 1, L, L + 1]), st.integers(0, 2**256))
)
def test_ed25519_decode_mul_refuses_exactly_what_decode_refuses(data: bytes, k: int) -> None:
    _VALID.clear()  # decode's cache of valid points would hide the fused path
    fused = _verdict(ED25519, lambda: ED25519.decode_mul(data, k))
    _VALID.clear()
    apart = _verdict(ED25519, lambda: (ED25519.decode(data), ED25519.mul(k, ED25519.decode(data))))
    assert fused == apart


def test_ed25519_decode_mul_names_the_problem_like_decode() -> None:
    point = ED25519.mul_base(5)
    for bad in [*SMALL_ORDER, _torsioned(point, SMALL_ORDER[4])]:
        _VALID.clear()
        with pytest.raises(DecodeError, match="prime-order subgroup"):
            ED25519.decode_mul(bad, 12345)
    with pytest.raises(DecodeError, match="expected 32 bytes"):
        ED25519.decode_mul(point[:31], 7)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 2**256), scalar=st.integers(1, 2**200), junk=st.binary(min_size=33, max_size=33))
def test_p256_decode_mul_is_decode_then_mul(k: int, scalar: int, junk: bytes) -> None:
    point = P256.encode(P256.mul_base(scalar))
    assert P256.decode_mul(point, k) == (P256.decode(point), P256.mul(k, P256.decode(point)))
    assert _verdict(P256, lambda: P256.decode_mul(junk, k)) == _verdict(
        P256, lambda: (P256.decode(junk), P256.mul(k, P256.decode(junk)))
    )


def _two_steps(group: Group[Any], data: bytes, label: bytes | None) -> tdh2.Sealed[Any]:
    sealed = tdh2.Sealed.decode(group, data)
    tdh2.check_ciphertext(group, sealed.kem, label)
    return sealed


def _outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except (DecodeError, tdh2.InvalidCiphertext) as exc:
        return (type(exc).__name__, None)


def _with_kem(group: Group[Any], sealed: tdh2.Sealed[Any], **fields: bytes) -> bytes:
    obj = sealed.to_obj(group)
    obj["kem"].update(fields)
    return encoding.encode(obj)


@pytest.mark.parametrize("group", [ED25519, P256], ids=lambda g: g.name)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), label=st.binary(max_size=40), data=st.data())
def test_decode_checked_gives_the_verdict_of_decode_then_check(
    group: Group[Any], seed: int, label: bytes, data: st.DataObject
) -> None:
    rand = DeterministicSource(seed, group.order)
    public = local.run_dkg(group, 4, 1, rand).keys[1].public
    sealed = tdh2.seal(group, public.public_key, label, b"value", rand)
    ct = sealed.kem
    valid = sealed.encode(group)
    assert tdh2.decode_checked(group, valid, label) == _two_steps(group, valid, label) == sealed
    variants = [
        _with_kem(group, sealed, u=group.encode(group.mul(2, ct.u))),
        _with_kem(group, sealed, ubar=group.encode(group.mul(3, ct.ubar))),
        _with_kem(group, sealed, u=group.encode(ct.ubar), ubar=group.encode(ct.u)),
        _with_kem(group, sealed, e=group.encode_scalar(ct.e + 1)),
        _with_kem(group, sealed, f=group.encode_scalar(ct.f + 1)),
        _with_kem(group, sealed, label=label + b"x"),
    ]
    if group is ED25519:
        small = data.draw(st.sampled_from(SMALL_ORDER))
        variants += [
            _with_kem(group, sealed, u=_torsioned(ct.u, SMALL_ORDER[4])),
            _with_kem(group, sealed, ubar=_torsioned(ct.ubar, SMALL_ORDER[6])),
            _with_kem(group, sealed, u=small),
            _with_kem(group, sealed, ubar=small),
        ]
    for variant in variants:
        for lbl in (label, None, label + b"!"):
            _VALID.clear()
            new = _outcome(lambda v=variant, lb=lbl: tdh2.decode_checked(group, v, lb))
            _VALID.clear()
            assert new == _outcome(lambda v=variant, lb=lbl: _two_steps(group, v, lb))
            assert new[0] != "ok"
    with pytest.raises(tdh2.InvalidCiphertext, match="another label"):
        tdh2.decode_checked(group, valid, label + b"!")


def test_a_plaintext_over_the_callers_limit_is_refused_before_any_group_operation() -> None:
    rand = DeterministicSource(1, ED25519.order)
    public = local.run_dkg(ED25519, 4, 1, rand).keys[1].public
    sealed = tdh2.seal(ED25519, public.public_key, b"L", bytes(100), rand)
    assert tdh2.decode_checked(ED25519, sealed.encode(ED25519), b"L", max_plaintext=100) == sealed
    # the points are garbage: refused for its size all the same, before they are looked at
    garbage = _with_kem(ED25519, sealed, u=SMALL_ORDER[0])
    with pytest.raises(tdh2.TooLarge, match="100 bytes exceeds 99"):
        tdh2.decode_checked(ED25519, garbage, b"L", max_plaintext=99)


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_fuzz_decode_checked_mutated(pos: int, value: int, cut: int) -> None:
    rand = DeterministicSource(2, ED25519.order)
    sealed = tdh2.seal(ED25519, ED25519.mul_base(77), b"L", b"v", rand).encode(ED25519)
    mutated = bytearray(sealed)
    mutated[pos % len(mutated)] = value
    for candidate in (bytes(mutated), sealed[: cut % len(sealed)]):
        with contextlib.suppress(DecodeError, tdh2.InvalidCiphertext):
            tdh2.decode_checked(ED25519, candidate, b"L")


def test_a_reader_checks_shares_only_until_t_plus_1_are_valid() -> None:
    rand = DeterministicSource(4, ED25519.order)
    keys = local.run_dkg(ED25519, 4, 1, rand).keys
    public = keys[1].public
    sealed = tdh2.seal(ED25519, public.public_key, b"L", b"secret", rand)
    ct = sealed.kem
    shares = {i: tdh2.decryption_share(ED25519, keys[i], ct, rand) for i in keys}
    s1 = shares[1]
    bad = {**shares, 1: tdh2.DecryptionShare(1, s1.ui, s1.e, (s1.f + 1) % ED25519.order)}
    good, wrong = tdh2.sort_shares(ED25519, public, ct, bad, enough=2)
    assert sorted(good) == [2, 3] and list(wrong) == [1]  # server 4's share is not looked at
    assert tdh2.open_sealed(sealed, tdh2.interpolate(ED25519, public, ct, good)) == b"secret"
    good, wrong = tdh2.sort_shares(ED25519, public, ct, {1: bad[1], 2: shares[2]}, enough=2)
    assert list(good) == [2] and list(wrong) == [1]
    with pytest.raises(NotEnoughSharesError):
        tdh2.interpolate(ED25519, public, ct, good)
