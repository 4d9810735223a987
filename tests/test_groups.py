"""The three Group instances: group laws, encodings, decoders' rejections, DSA domain
parameters, and interop of textbook DSA/ECDSA signatures with cryptography and OpenSSL."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmpy2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa as crypto_dsa
from cryptography.hazmat.primitives.asymmetric import ec as crypto_ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from appliance.crypto.errors import DecodeError, ParameterError
from appliance.crypto.groups import DSA2048, ED25519, P256, Group
from appliance.crypto.groups import dsa as dsa_mod
from appliance.crypto.groups import p256 as p256_mod
from appliance.crypto.groups.dsa import DSADomainParameters, DSAGroup
from appliance.crypto.groups.p256 import P256Point

GROUPS: list[Group[Any]] = [ED25519, DSA2048, P256]
DSS_GROUPS: list[DSAGroup | p256_mod.P256Group] = [DSA2048, P256]
ids = [g.name for g in GROUPS]

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def scalars(group: Group[Any], min_value: int = 0) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(min_value, group.order - 1),
        st.sampled_from([v for v in (0, 1, 2, group.order - 1, group.order - 2) if v >= min_value]),
    )


def _seeded_rand(tag: bytes) -> Callable[[int], bytes]:
    counter = [0]

    def rand(nbytes: int) -> bytes:
        out = hashlib.sha256(tag + counter[0].to_bytes(4, "big")).digest()[:nbytes]
        counter[0] += 1
        return out

    return rand


@pytest.fixture(scope="module")
def small_dsa_params() -> DSADomainParameters:
    """FIPS 186-4 (1024, 160) parameters, generated reproducibly (fast)."""
    return dsa_mod.generate_domain_parameters(1024, 160, index=7, rand=_seeded_rand(b"pst test dsa 1024"))


@pytest.fixture(scope="module")
def dsa1024(small_dsa_params: DSADomainParameters) -> DSAGroup:
    return DSAGroup(small_dsa_params)


# Group laws -------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS, ids=ids)
@SETTINGS
@given(data=st.data())
def test_group_laws(group: Group[Any], data: st.DataObject) -> None:
    k1, k2, k3 = (data.draw(scalars(group)) for _ in range(3))
    a, b, c = group.mul_base(k1), group.mul_base(k2), group.mul_base(k3)
    e = group.identity()
    assert group.add(group.add(a, b), c) == group.add(a, group.add(b, c))
    assert group.add(a, b) == group.add(b, a)
    assert group.add(a, e) == a and group.add(e, a) == a
    assert group.is_identity(group.add(a, group.neg(a)))
    assert group.sub(a, b) == group.add(a, group.neg(b))
    assert group.add(a, b) == group.mul_base((k1 + k2) % group.order)
    k = data.draw(scalars(group))
    assert group.mul(k, group.add(a, b)) == group.add(group.mul(k, a), group.mul(k, b))
    assert group.mul((k1 + k2) % group.order, c) == group.add(group.mul(k1, c), group.mul(k2, c))
    assert group.mul(k1, group.mul(k2, c)) == group.mul(k1 * k2 % group.order, c)
    assert group.mul_base(k) == group.mul(k, group.generator())
    assert group.mul(k + group.order, a) == group.mul(k, a)


@pytest.mark.parametrize("group", GROUPS, ids=ids)
def test_order_and_identity(group: Group[Any]) -> None:
    g, e = group.generator(), group.identity()
    assert group.is_identity(group.mul(group.order, g))
    assert group.is_identity(group.mul_base(group.order))
    assert group.is_identity(group.mul_base(0))
    assert group.mul(group.order - 1, g) == group.neg(g)
    assert group.mul(1, g) == g and group.mul_base(1) == g
    assert not group.is_identity(g)
    assert group.neg(e) == e
    assert group.is_identity(group.mul(5, e))
    h = group.hash_to_element(b"test", b"order")
    assert group.is_identity(group.mul(group.order, h))
    assert group.mul(group.order - 1, h) == group.neg(h)


@pytest.mark.parametrize("group", GROUPS, ids=ids)
@SETTINGS
@given(data=st.data())
def test_multi_mul(group: Group[Any], data: st.DataObject) -> None:
    m = data.draw(st.integers(0, 5))
    ks = [data.draw(scalars(group)) for _ in range(m)]
    points = [
        data.draw(st.sampled_from([group.generator(), group.identity(), group.mul_base(k + 3)])) for k in ks
    ]
    naive = group.sum(group.mul(k, p) for k, p in zip(ks, points, strict=True))
    assert group.multi_mul(ks, points) == naive


@pytest.mark.parametrize("group", GROUPS, ids=ids)
def test_multi_mul_length_mismatch(group: Group[Any]) -> None:
    with pytest.raises(ValueError):
        group.multi_mul([1, 2], [group.generator()])


# Encodings --------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS, ids=ids)
@SETTINGS
@given(data=st.data())
def test_encode_decode_roundtrip(group: Group[Any], data: st.DataObject) -> None:
    a = group.mul_base(data.draw(scalars(group, 1)))
    enc = group.encode(a)
    assert len(enc) == group.element_size
    assert group.decode(enc) == a
    assert group.encode(group.decode(enc)) == enc
    k = data.draw(scalars(group))
    assert group.decode_scalar(group.encode_scalar(k)) == k
    assert len(group.encode_scalar(k)) == group.scalar_size


@pytest.mark.parametrize("group", GROUPS, ids=ids)
def test_decode_rejects_identity_and_lengths(group: Group[Any]) -> None:
    enc = group.encode(group.generator())
    with pytest.raises(DecodeError):
        group.decode(group.encode(group.identity()))
    for bad in (b"", enc[:-1], enc + b"\x00", b"\x00" + enc, enc * 2):
        with pytest.raises(DecodeError):
            group.decode(bad)
    with pytest.raises(DecodeError):
        group.decode_scalar(group.encode_scalar(5)[:-1])
    with pytest.raises(DecodeError):
        group.decode_scalar(group.encode_scalar(5) + b"\x00")


@pytest.mark.parametrize("group", GROUPS, ids=ids)
def test_decode_scalar_rejects_unreduced(group: Group[Any]) -> None:
    order = group.order
    for v in (order, order + 1, 2 ** (8 * group.scalar_size) - 1):
        data = v.to_bytes(group.scalar_size, "little" if group is ED25519 else "big")
        with pytest.raises(DecodeError):
            group.decode_scalar(data)


@pytest.mark.parametrize("group", GROUPS, ids=ids)
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_decoders_raise_only_decode_error(group: Group[Any], data: bytes) -> None:
    for decoder in (group.decode, group.decode_scalar):
        with contextlib.suppress(DecodeError):
            decoder(data)


@pytest.mark.parametrize("group", GROUPS, ids=ids)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_right_length(group: Group[Any], data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=group.element_size, max_size=group.element_size))
    try:
        a = group.decode(raw)
    except DecodeError:
        return
    assert group.encode(a) == raw  # whatever decodes is canonical
    assert not group.is_identity(a)
    assert group.is_identity(group.mul(group.order, a))


@pytest.mark.parametrize("group", GROUPS, ids=ids)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_encodings(group: Group[Any], data: st.DataObject) -> None:
    """Flip bits of a valid encoding: the result is rejected or is itself canonical."""
    enc = bytearray(group.encode(group.mul_base(data.draw(scalars(group, 1)))))
    pos = data.draw(st.integers(0, group.element_size - 1))
    enc[pos] ^= data.draw(st.integers(1, 255))
    try:
        a = group.decode(bytes(enc))
    except DecodeError:
        return
    assert group.encode(a) == bytes(enc)
    assert group.is_identity(group.mul(group.order, a))


# hash_to_element / dss_conversion --------------------------------------------


@pytest.mark.parametrize("group", GROUPS, ids=ids)
def test_hash_to_element(group: Group[Any]) -> None:
    h1 = group.hash_to_element(b"dst", b"msg")
    assert group.hash_to_element(b"dst", b"msg") == h1
    assert group.hash_to_element(b"dst2", b"msg") != h1
    assert group.hash_to_element(b"dst", b"msg2") != h1
    assert group.hash_to_element(b"ds", b"tmsg") != h1  # dst is length-prefixed
    assert group.decode(group.encode(h1)) == h1
    assert h1 != group.generator()


def test_dss_conversion() -> None:
    with pytest.raises(NotImplementedError):
        ED25519.dss_conversion(ED25519.generator())
    y = DSA2048.mul_base(12345)
    assert DSA2048.dss_conversion(y) == int(y) % DSA2048.order
    pt = P256.mul_base(12345)
    assert P256.dss_conversion(pt) == int(pt.x) % P256.order
    with pytest.raises(ValueError):
        P256.dss_conversion(P256.identity())


def test_digest_to_scalar(dsa1024: DSAGroup) -> None:
    digest = hashlib.sha256(b"m").digest()
    z = int.from_bytes(digest, "big")
    assert DSA2048.digest_to_scalar(digest) == z % DSA2048.order
    assert P256.digest_to_scalar(digest) == z % P256.order
    # N = 160 < outlen = 256: the leftmost 160 bits
    assert dsa1024.digest_to_scalar(digest) == (z >> 96) % dsa1024.order
    short = hashlib.sha1(b"m").digest()
    assert dsa1024.digest_to_scalar(short) == int.from_bytes(short, "big") % dsa1024.order
    big = hashlib.sha512(b"m").digest()
    assert P256.digest_to_scalar(big) == (int.from_bytes(big, "big") >> 256) % P256.order


# Ed25519 specifics ------------------------------------------------------------

ED_P = 2**255 - 19
ED_TORSION = [
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # identity
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    )
]


def test_ed25519_torsion_points_rejected() -> None:
    assert len(set(ED_TORSION)) == 8
    for t in ED_TORSION:
        acc = t
        for _ in range(7):
            acc = bytes(sodium.crypto_core_ed25519_add(acc, t))
        assert acc == ED25519.identity()  # 8 T = 0: T is a small-order point
        with pytest.raises(DecodeError):
            ED25519.decode(t)


def test_ed25519_mixed_order_points_rejected() -> None:
    for k in (1, 2, 0xDEADBEEF):
        p = ED25519.mul_base(k)
        for t in ED_TORSION[1:]:
            mixed = bytes(sodium.crypto_core_ed25519_add(p, t))
            assert mixed != p
            with pytest.raises(DecodeError):
                ED25519.decode(mixed)


def test_ed25519_non_canonical_rejected() -> None:
    for y0 in range(19):  # y = p + y0 < 2^255: a non-reduced y coordinate
        for sign in (0, 1):
            enc = ((ED_P + y0) | (sign << 255)).to_bytes(32, "little")
            with pytest.raises(DecodeError):
                ED25519.decode(enc)
    # x = 0 with the sign bit set (the identity, non-canonically)
    with pytest.raises(DecodeError):
        ED25519.decode((1 | (1 << 255)).to_bytes(32, "little"))


# DSA specifics -----------------------------------------------------------------


def test_dsa_default_parameters_validate() -> None:
    """A.1.1.3 + A.2.4 on the stored parameters (regenerates p from the seed: ~2 s)."""
    params = DSA2048.params
    assert (params.L, params.N) == (2048, 256)
    assert DSA2048.element_size == 256 and DSA2048.scalar_size == 32
    dsa_mod.validate_domain_parameters(params)


def test_dsa_generation_small(small_dsa_params: DSADomainParameters) -> None:
    params = small_dsa_params
    assert params.p.bit_length() == 1024 and params.q.bit_length() == 160
    assert (params.p - 1) % params.q == 0
    assert gmpy2.is_prime(params.p, 40) and gmpy2.is_prime(params.q, 40)
    assert pow(params.g, params.q, params.p) == 1 and params.g > 1
    assert params.index == 7 and params.domain_parameter_seed is not None
    assert len(params.domain_parameter_seed) == 20
    dsa_mod.validate_domain_parameters(params)
    # reproducible from the same seed source
    again = dsa_mod.generate_domain_parameters(1024, 160, index=7, rand=_seeded_rand(b"pst test dsa 1024"))
    assert again == params
    # g for another index differs and validates for that index only
    g2 = dsa_mod.generate_g(params.p, params.q, params.domain_parameter_seed, 8)
    assert g2 != params.g
    dsa_mod.validate_g(params.p, params.q, g2, params.domain_parameter_seed, 8)
    with pytest.raises(ParameterError):
        dsa_mod.validate_g(params.p, params.q, g2, params.domain_parameter_seed, 7)


def test_dsa_validation_rejects_tampering(small_dsa_params: DSADomainParameters) -> None:
    p, q, g = small_dsa_params.p, small_dsa_params.q, small_dsa_params.g
    seed, counter, index = (
        small_dsa_params.domain_parameter_seed,
        small_dsa_params.counter,
        small_dsa_params.index,
    )
    assert seed is not None and counter is not None and index is not None
    bad_seed = bytes([seed[0] ^ 1]) + seed[1:]
    g_squared = pow(g, 2, p)  # right order, but not the canonical generator
    tampered = [
        DSADomainParameters(p, q, g, seed, counter + 1, index),
        DSADomainParameters(p, q, g, seed, max(counter - 1, 0) if counter else 1, index),
        DSADomainParameters(p, q, g, bad_seed, counter, index),
        DSADomainParameters(p, q, g, seed, counter, (index + 1) % 256),
        DSADomainParameters(p, q, g_squared, seed, counter, index),
        DSADomainParameters(p, q, g, seed, 4 * 1024, index),
        DSADomainParameters(p, q, g, seed[:10], counter, index),
        DSADomainParameters(p, q, g, seed, counter, 256),
        DSADomainParameters(p, q, g),  # no generation record
    ]
    for params in tampered:
        with pytest.raises(ParameterError):
            dsa_mod.validate_domain_parameters(params)


def test_dsa_structural_checks(small_dsa_params: DSADomainParameters) -> None:
    p, q, g = small_dsa_params.p, small_dsa_params.q, small_dsa_params.g
    bad = [
        DSADomainParameters(p, q, 1),
        DSADomainParameters(p, q, p),
        DSADomainParameters(p, q, p - 1),  # order 2
        DSADomainParameters(p, q + 2, g),  # q does not divide p - 1
        DSADomainParameters(p >> 1, q, g),  # not a FIPS size
    ]
    for params in bad:
        with pytest.raises(ParameterError):
            DSAGroup(params)
    with pytest.raises(ParameterError):
        dsa_mod.generate_pq(1024, 256)
    with pytest.raises(ParameterError):
        dsa_mod.generate_pq(1024, 160, seedlen=152)


def test_dsa_decode_rejections() -> None:
    grp = DSA2048
    p, q = grp.params.p, grp.params.q
    size = grp.element_size

    def enc(v: int) -> bytes:
        return v.to_bytes(size, "big")

    two_is_outside = pow(2, q, p) != 1
    assert two_is_outside
    for v in (0, 1, p, p + 1, p - 1, 2, 2**2048 - 1):
        with pytest.raises(DecodeError):
            grp.decode(enc(v))
    # x + p for a subgroup element x: a non-canonical encoding of x
    k = 1
    while int(grp.mul_base(k)) >= 2**2048 - p:
        k += 1
    x = int(grp.mul_base(k))
    assert grp.decode(enc(x)) == x
    with pytest.raises(DecodeError):
        grp.decode(enc(x + p))
    # x * (element of order 2) is outside the subgroup
    with pytest.raises(DecodeError):
        grp.decode(enc(x * (p - 1) % p))


def test_dsa_hash_to_element_in_subgroup(dsa1024: DSAGroup) -> None:
    for grp in (DSA2048, dsa1024):
        h = grp.hash_to_element(b"pedersen", b"h")
        assert 1 < int(h) < grp.params.p
        assert pow(int(h), grp.params.q, grp.params.p) == 1


# P-256 specifics ------------------------------------------------------------


def test_p256_matches_cryptography() -> None:
    for k in (1, 2, 3, 0xFFFF, P256.order - 1, int.from_bytes(os.urandom(32), "big") % (P256.order - 1) + 1):
        nums = crypto_ec.derive_private_key(k, crypto_ec.SECP256R1()).public_key().public_numbers()
        pt = P256.mul_base(k)
        assert (int(pt.x), int(pt.y)) == (nums.x, nums.y)
        assert P256.mul(k, P256.generator()) == pt
        assert P256.is_on_curve(pt)
    g = P256.generator()
    assert (int(g.x), int(g.y)) == (int(p256_mod.GX), int(p256_mod.GY))


def test_p256_encoding_is_sec1_compressed() -> None:
    pt = P256.mul_base(987654321)
    key = P256.public_key(pt)
    compressed = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    assert P256.encode(pt) == compressed
    uncompressed = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert P256.encode_uncompressed(pt) == uncompressed


def test_p256_decode_rejections() -> None:
    p = int(p256_mod.P)
    pt = P256.mul_base(424242)
    enc = P256.encode(pt)
    # uncompressed (65 bytes) and hybrid forms: valid SEC1 but not our canonical form
    with pytest.raises(DecodeError):
        P256.decode(P256.encode_uncompressed(pt))
    hybrid = bytes([6 | (int(pt.y) & 1)]) + P256.encode_uncompressed(pt)[1:]
    with pytest.raises(DecodeError):
        P256.decode(hybrid)
    # wrong prefix with the right length
    for prefix in (0, 1, 4, 5, 6, 7, 0xFF):
        with pytest.raises(DecodeError):
            P256.decode(bytes([prefix]) + enc[1:])
    # x >= p
    for x in (p, p + 1, p + 3, 2**256 - 1):
        for prefix in (2, 3):
            with pytest.raises(DecodeError):
                P256.decode(bytes([prefix]) + x.to_bytes(32, "big"))
    # x with no curve point
    x = 0
    while True:
        rhs = (x**3 - 3 * x + int(p256_mod.B)) % p
        if pow(rhs, (p - 1) // 2, p) == p - 1:
            break
        x += 1
    for prefix in (2, 3):
        with pytest.raises(DecodeError):
            P256.decode(bytes([prefix]) + x.to_bytes(32, "big"))
    # identity, in both internal and SEC1 forms
    for ident in (bytes(33), b"\x00"):
        with pytest.raises(DecodeError):
            P256.decode(ident)
    # x < p with p added is the same length only if x + p < 2^256: take x = 0..
    assert P256.decode(enc) == pt
    assert P256.decode(bytes([enc[0] ^ 1]) + enc[1:]) == P256.neg(pt)


def test_p256_off_curve_points_not_representable() -> None:
    off = P256Point(gmpy2.mpz(1), gmpy2.mpz(1))
    assert not P256.is_on_curve(off)
    assert not P256.is_on_curve(P256.identity())
    assert P256.encode(P256.identity()) == bytes(33)


def test_p256_hash_to_element_even_y() -> None:
    for i in range(10):
        h = P256.hash_to_element(b"dst", i.to_bytes(2, "big"))
        assert int(h.y) % 2 == 0 and P256.is_on_curve(h)


# Interop: textbook DSA / ECDSA with the group operations ----------------------


def _textbook_sign(group: DSAGroup | p256_mod.P256Group, x: int, msg: bytes) -> tuple[int, int]:
    q = group.order
    z = group.digest_to_scalar(hashlib.sha256(msg).digest())
    while True:
        k = group.random_scalar(os.urandom(group.random_bytes))
        r = group.dss_conversion(group.mul_base(k))
        s = pow(k, -1, q) * (z + x * r) % q
        if r and s:
            return r, s


def _textbook_verify(group: DSAGroup | p256_mod.P256Group, y: Any, msg: bytes, r: int, s: int) -> bool:
    q = group.order
    if not (0 < r < q and 0 < s < q):
        return False
    z = group.digest_to_scalar(hashlib.sha256(msg).digest())
    w = pow(s, -1, q)
    big_r = group.multi_mul([z * w % q, r * w % q], [group.generator(), y])
    return not group.is_identity(big_r) and group.dss_conversion(big_r) == r


def _crypto_verify(
    key: crypto_dsa.DSAPublicKey | crypto_ec.EllipticCurvePublicKey, sig: bytes, msg: bytes
) -> None:
    if isinstance(key, crypto_ec.EllipticCurvePublicKey):
        key.verify(sig, msg, crypto_ec.ECDSA(hashes.SHA256()))
    else:
        key.verify(sig, msg, hashes.SHA256())


def _dss_groups(dsa1024: DSAGroup) -> list[DSAGroup | p256_mod.P256Group]:
    return [DSA2048, P256, dsa1024]


def _openssl_verify(tmp_path: Path, pub_pem: bytes, sig: bytes, msg: bytes) -> bool:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    (tmp_path / "pub.pem").write_bytes(pub_pem)
    (tmp_path / "sig.der").write_bytes(sig)
    (tmp_path / "msg").write_bytes(msg)
    proc = subprocess.run(
        [openssl, "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "msg"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0 and b"Verified OK" in proc.stdout


@pytest.mark.interop
def test_textbook_signatures_verify_with_cryptography_and_openssl(dsa1024: DSAGroup, tmp_path: Path) -> None:
    msg = b"Proactive Security Toolkit: log entry 1"
    for group in _dss_groups(dsa1024):
        x = group.random_scalar(os.urandom(group.random_bytes))
        y = group.mul_base(x)
        r, s = _textbook_sign(group, x, msg)
        sig = encode_dss_signature(r, s)
        key = group.public_key(y)
        _crypto_verify(key, sig, msg)
        with pytest.raises(InvalidSignature):
            _crypto_verify(key, sig, msg + b"!")
        assert _textbook_verify(group, y, msg, r, s)
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        sub = tmp_path / group.name
        sub.mkdir()
        assert _openssl_verify(sub, pem, sig, msg), group.name
        assert not _openssl_verify(sub, pem, sig, msg + b"!"), group.name


@pytest.mark.interop
def test_cryptography_signatures_verify_with_group_ops() -> None:
    msg = b"signed by OpenSSL, verified with the group operations"
    ec_key = crypto_ec.generate_private_key(crypto_ec.SECP256R1())
    nums = ec_key.public_key().public_numbers()
    y_ec = P256.decode(
        ec_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    )
    assert (int(y_ec.x), int(y_ec.y)) == (nums.x, nums.y)
    r, s = decode_dss_signature(ec_key.sign(msg, crypto_ec.ECDSA(hashes.SHA256())))
    assert _textbook_verify(P256, y_ec, msg, r, s)
    assert not _textbook_verify(P256, y_ec, msg + b"!", r, s)

    x = DSA2048.random_scalar(os.urandom(DSA2048.random_bytes))
    dsa_key = crypto_dsa.DSAPrivateNumbers(
        x, crypto_dsa.DSAPublicNumbers(int(DSA2048.mul_base(x)), DSA2048.parameter_numbers())
    ).private_key()
    r, s = decode_dss_signature(dsa_key.sign(msg, hashes.SHA256()))
    y = DSA2048.decode(DSA2048.encode(DSA2048.mul_base(x)))
    assert _textbook_verify(DSA2048, y, msg, r, s)
    assert not _textbook_verify(DSA2048, y, msg + b"!", r, s)


_FIXED_POINT = p256_mod.P256Group().mul(0xC0FFEE, p256_mod.G)


@SETTINGS
@given(data=st.data())
def test_p256_fixed_base_table_agrees_with_generic_multiplication(data: st.DataObject) -> None:
    """precompute(H): mul and multi_mul by H then take the table path; results must not change."""
    plain = p256_mod.P256Group()
    fixed = p256_mod.P256Group()
    fixed.precompute(_FIXED_POINT)
    fixed.precompute(_FIXED_POINT)  # idempotent
    k = data.draw(scalars(P256))
    assert fixed.mul(k, _FIXED_POINT) == plain.mul(k, _FIXED_POINT)
    m = data.draw(st.integers(0, 4))
    ks = [data.draw(scalars(P256)) for _ in range(m)]
    pts = [
        data.draw(st.sampled_from([P256.generator(), _FIXED_POINT, P256.identity(), P256.mul_base(k + 7)]))
        for k in ks
    ]
    naive = plain.sum(plain.mul(k, p) for k, p in zip(ks, pts, strict=True))
    assert fixed.multi_mul(ks, pts) == naive
    # k H + (q - k) H cancels inside the fixed-base path
    assert fixed.multi_mul([k, P256.order - k], [_FIXED_POINT, _FIXED_POINT]) == P256.identity()


def test_p256_fixed_base_tables_are_bounded() -> None:
    g = p256_mod.P256Group()
    g.precompute(P256.identity())  # nothing to precompute
    g.precompute(P256.generator())  # G has its own table
    points = [P256.mul_base(k + 2) for k in range(p256_mod._MAX_FIXED + 1)]
    for p in points:
        g.precompute(p)
    assert len(g._fixed) == p256_mod._MAX_FIXED
    assert points[0] not in g._fixed and points[-1] in g._fixed  # the oldest went
    assert g.mul(5, points[0]) == P256.mul_base(10)  # and its multiples are still right


@SETTINGS
@given(data=st.data())
def test_small_multi_mul_many_agrees_with_multi_mul(data: st.DataObject) -> None:
    """Commitments evaluated at small ids in one chain: same points as multi_mul, per job."""
    jobs = []
    for _ in range(data.draw(st.integers(0, 4))):
        m = data.draw(st.integers(0, 4))
        ks = [data.draw(st.integers(0, 300)) for _ in range(m)]
        pts = [
            data.draw(st.sampled_from([P256.identity(), P256.mul_base(7), P256.mul_base(k + 2)])) for k in ks
        ]
        jobs.append((ks, pts))
    for group in (P256, DSA2048):
        typed = [(ks, [p if group is P256 else group.mul_base(7) for p in pts]) for ks, pts in jobs]
        assert group.small_multi_mul_many(typed) == [group.multi_mul(ks, pts) for ks, pts in typed]
    with pytest.raises(ValueError, match="negative"):
        P256.small_multi_mul_many([([-1], [P256.generator()])])


@SETTINGS
@given(k=st.integers(1, P256.order - 1), data=st.binary(max_size=70))
def test_p256_wide_form_round_trips_and_its_decoder_raises_only_decode_error(k: int, data: bytes) -> None:
    point = P256.mul_base(k)
    wide = P256.encode_wide(point)
    assert len(wide) == 65 and P256.decode_wide(wide) == point
    with pytest.raises(DecodeError):
        P256.decode_wide(P256.encode(point))  # the compressed form is not the wide one
    with pytest.raises(DecodeError):
        P256.decode(wide)  # nor the other way round
    off_curve = wide[:64] + bytes([wide[64] ^ 1])
    with pytest.raises(DecodeError):
        P256.decode_wide(off_curve)
    with contextlib.suppress(DecodeError):
        assert P256.is_on_curve(P256.decode_wide(data))
    assert DSA2048.decode_wide(DSA2048.encode_wide(DSA2048.mul_base(k))) == DSA2048.mul_base(k)
