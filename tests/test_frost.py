"""FROST(Ed25519, SHA-512): RFC 9591 vectors, interop, properties, cheating, decoder fuzzing."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.crypto import frost, shamir
from appliance.crypto.errors import CheatingError, DecodeError, ParameterError
from appliance.crypto.frost import (
    KeyPackage,
    NoncePool,
    NonceReuseError,
    PublicKeyPackage,
    SignatureShare,
    SigningCommitment,
    SigningNonces,
)
from appliance.crypto.groups.ed25519 import ED25519 as G
from appliance.crypto.groups.ed25519 import L

VECTORS = json.loads((Path(__file__).parent / "vectors" / "frost_ed25519_sha512.json").read_text())


def _scalar(hex_: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_), "little")


def _le(k: int) -> str:
    return k.to_bytes(32, "little").hex()


class _Stream:
    """Deterministic 'randomness' from a seed, so that hypothesis can shrink and replay."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.counter = 0

    def read(self, n: int) -> bytes:
        self.counter += 1
        return hashlib.shake_256(self.seed + self.counter.to_bytes(8, "big")).digest(n)

    def scalar(self) -> int:
        return G.random_scalar(self.read(48))


def _dealer(n: int, min_signers: int, rng: _Stream) -> tuple[dict[int, KeyPackage], PublicKeyPackage, int]:
    """RFC 9591 Appendix C trusted dealer (tests only; real keys come from the DKG)."""
    secret = rng.scalar()
    coefficients = shamir.random_polynomial(secret, min_signers - 1, L, rng.scalar)
    pk = G.mul_base(secret)
    keys = {i: KeyPackage(i, shamir.evaluate(coefficients, i, L), pk, min_signers) for i in range(1, n + 1)}
    public = PublicKeyPackage(pk, {i: k.verification_share() for i, k in keys.items()}, min_signers)
    return keys, public, secret


def _run(
    keys: dict[int, KeyPackage], signers: list[int], msg: bytes, rng: _Stream
) -> tuple[list[SigningCommitment], list[SignatureShare]]:
    nonces = {i: frost.commit(keys[i], rng.read(64)) for i in signers}
    commitments = [nonces[i].commitment for i in signers]
    shares = [frost.sign(keys[i], nonces[i], msg, commitments) for i in signers]
    return commitments, shares


def _cryptography_verifies(pk: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg)
    except InvalidSignature:
        return False
    return True


# ---------------------------------------------------------------------------
# (1) RFC 9591 Appendix E.1 test vectors


def test_vector_file_is_the_ed25519_suite() -> None:
    assert VECTORS["config"]["name"] == "FROST(Ed25519, SHA-512)"
    assert frost.CONTEXT_STRING == b"FROST-ED25519-SHA512-v1"


def test_rfc9591_vectors_keys() -> None:
    inputs = VECTORS["inputs"]
    secret = _scalar(inputs["group_secret_key"])
    assert G.mul_base(secret).hex() == inputs["group_public_key"]
    # Trusted dealer (Appendix C): f(x) = s + a_1 x, shares f(i).
    coefficients = [secret] + [_scalar(c) for c in inputs["share_polynomial_coefficients"]]
    assert len(coefficients) == VECTORS["config"]["MIN_PARTICIPANTS"]
    for entry in inputs["participant_shares"]:
        assert _le(shamir.evaluate(coefficients, entry["identifier"], L)) == entry["participant_share"]


def test_rfc9591_vectors_signing() -> None:
    inputs = VECTORS["inputs"]
    min_signers = VECTORS["config"]["MIN_PARTICIPANTS"]
    pk = bytes.fromhex(inputs["group_public_key"])
    msg = bytes.fromhex(inputs["message"])
    keys = {
        e["identifier"]: KeyPackage(e["identifier"], _scalar(e["participant_share"]), pk, min_signers)
        for e in inputs["participant_shares"]
    }
    round_one = VECTORS["round_one_outputs"]["outputs"]
    assert [o["identifier"] for o in round_one] == inputs["participant_list"]

    nonces: dict[int, SigningNonces] = {}
    for o in round_one:
        i = o["identifier"]
        hiding_rand = bytes.fromhex(o["hiding_nonce_randomness"])
        binding_rand = bytes.fromhex(o["binding_nonce_randomness"])
        assert _le(frost.nonce_generate(keys[i].secret_share, hiding_rand)) == o["hiding_nonce"]
        assert _le(frost.nonce_generate(keys[i].secret_share, binding_rand)) == o["binding_nonce"]
        nonces[i] = frost.commit(keys[i], hiding_rand + binding_rand)
        assert nonces[i].commitment.hiding.hex() == o["hiding_nonce_commitment"]
        assert nonces[i].commitment.binding.hex() == o["binding_nonce_commitment"]
    # Reverse the list: the implementation sorts by identifier as RFC 9591 §4.3 requires.
    commitments = [nonces[i].commitment for i in reversed(inputs["participant_list"])]

    encoded = frost.encode_group_commitment_list(commitments)
    prefix = pk + frost.h4(msg) + frost.h5(encoded)
    binding_factors = frost.compute_binding_factors(pk, commitments, msg)
    for o in round_one:
        i = o["identifier"]
        assert (prefix + bytes.fromhex(_le(i))).hex() == o["binding_factor_input"]
        assert frost.h1(bytes.fromhex(o["binding_factor_input"])) == binding_factors[i]
        assert _le(binding_factors[i]) == o["binding_factor"]

    shares = [frost.sign(keys[i], nonces[i], msg, commitments) for i in inputs["participant_list"]]
    for share, o in zip(shares, VECTORS["round_two_outputs"]["outputs"], strict=True):
        assert share.identifier == o["identifier"]
        assert _le(share.share) == o["sig_share"]
        frost.verify_signature_share(share, keys[share.identifier].verification_share(), commitments, pk, msg)

    sig = frost.aggregate(commitments, msg, pk, shares)
    assert sig.hex() == VECTORS["final_output"]["sig"]
    r = frost.compute_group_commitment(commitments, binding_factors)
    assert sig[:32] == r
    assert frost.compute_challenge(r, pk, msg) == frost.h2(r + pk + msg)
    assert frost.verify_signature(pk, msg, sig)
    assert _cryptography_verifies(pk, msg, sig)

    public = PublicKeyPackage(
        pk, {i: k.verification_share() for i, k in keys.items()}, VECTORS["config"]["MIN_PARTICIPANTS"]
    )
    assert frost.aggregate_and_identify(public, commitments, msg, shares) == sig
    assert frost.decode_group_commitment_list(encoded) == sorted(commitments, key=lambda c: c.identifier)


# ---------------------------------------------------------------------------
# (2) Interop: the signature is a plain Ed25519 signature


def _interop_signature(msg: bytes) -> tuple[bytes, bytes]:
    rng = _Stream(b"interop")
    keys, public, _ = _dealer(5, 3, rng)
    commitments, shares = _run(keys, [1, 3, 5], msg, rng)
    return public.group_public_key, frost.aggregate_and_identify(public, commitments, msg, shares)


@pytest.mark.interop
def test_interop_cryptography() -> None:
    msg = b"threshold-signed log head"
    pk, sig = _interop_signature(msg)
    Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg)
    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg + b"!")


@pytest.mark.interop
def test_interop_openssl_cli(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    msg = b"threshold-signed log head\n"
    pk, sig = _interop_signature(msg)
    pem = Ed25519PublicKey.from_public_bytes(pk).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    (tmp_path / "msg").write_bytes(msg)
    (tmp_path / "sig").write_bytes(sig)
    bad = bytearray(sig)
    bad[40] ^= 1
    (tmp_path / "bad").write_bytes(bytes(bad))

    def verify(sigfile: str) -> subprocess.CompletedProcess[str]:
        cmd = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "msg"]
        return subprocess.run(
            [*cmd, "-sigfile", sigfile], cwd=tmp_path, capture_output=True, text=True, check=False, timeout=30
        )

    ok = verify("sig")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Signature Verified Successfully" in ok.stdout
    assert verify("bad").returncode != 0


# ---------------------------------------------------------------------------
# (3) Properties: any signer set of at least min_signers = t+1 servers signs


@st.composite
def _setups(draw: st.DrawFn) -> tuple[int, int, list[int], bytes, bytes]:
    n = draw(st.integers(2, 16))
    t = draw(st.integers(1, n - 1))  # repo convention: t corruptible, t+1 sign
    k = draw(st.integers(t + 1, n))
    signers = sorted(draw(st.permutations(range(1, n + 1)))[:k])
    return n, t + 1, signers, draw(st.binary(max_size=64)), draw(st.binary(min_size=16, max_size=16))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_setups())
def test_property_any_qualified_subset_signs(setup: tuple[int, int, list[int], bytes, bytes]) -> None:
    n, min_signers, signers, msg, seed = setup
    rng = _Stream(seed)
    keys, public, secret = _dealer(n, min_signers, rng)
    assert shamir.interpolate({i: keys[i].secret_share for i in signers}, L) == secret
    commitments, shares = _run(keys, signers, msg, rng)
    sig = frost.aggregate(commitments, msg, public.group_public_key, shares)
    assert frost.verify_signature(public.group_public_key, msg, sig)
    assert _cryptography_verifies(public.group_public_key, msg, sig)
    assert frost.aggregate_and_identify(public, commitments, msg, shares) == sig
    frost.verify_signature_shares(public, commitments, msg, shares)
    r, z = frost.decode_signature(sig)
    assert r + z.to_bytes(32, "little") == sig


def test_too_few_signers_refused() -> None:
    rng = _Stream(b"few")
    keys, public, _ = _dealer(5, 3, rng)
    nonces = {i: frost.commit(keys[i], rng.read(64)) for i in (1, 2)}
    commitments = [n.commitment for n in nonces.values()]
    with pytest.raises(ParameterError, match="at least 3"):
        frost.sign(keys[1], nonces[1], b"m", commitments)
    assert not nonces[1].used
    shares = [SignatureShare(1, 5), SignatureShare(2, 7)]
    with pytest.raises(ParameterError, match="at least 3"):
        frost.aggregate_and_identify(public, commitments, b"m", shares)


# ---------------------------------------------------------------------------
# (4) Cheating signers are identified


@settings(max_examples=15, deadline=None)
@given(_setups(), st.data())
def test_corrupted_share_is_identified(
    setup: tuple[int, int, list[int], bytes, bytes], data: st.DataObject
) -> None:
    n, min_signers, signers, msg, seed = setup
    rng = _Stream(seed)
    keys, public, _ = _dealer(n, min_signers, rng)
    commitments, shares = _run(keys, signers, msg, rng)
    culprit_pos = data.draw(st.integers(0, len(signers) - 1))
    delta = data.draw(st.integers(1, L - 1))
    culprit = shares[culprit_pos].identifier
    shares[culprit_pos] = SignatureShare(culprit, (shares[culprit_pos].share + delta) % L)

    with pytest.raises(CheatingError) as info:
        frost.verify_signature_share(
            shares[culprit_pos],
            public.verification_shares[culprit],
            commitments,
            public.group_public_key,
            msg,
        )
    assert info.value.party == culprit
    for s in shares:
        if s.identifier != culprit:
            frost.verify_signature_share(
                s, public.verification_shares[s.identifier], commitments, public.group_public_key, msg
            )

    bad_sig = frost.aggregate(commitments, msg, public.group_public_key, shares)
    assert not frost.verify_signature(public.group_public_key, msg, bad_sig)
    assert not _cryptography_verifies(public.group_public_key, msg, bad_sig)
    with pytest.raises(CheatingError) as info:
        frost.aggregate_and_identify(public, commitments, msg, shares)
    assert info.value.party == culprit
    with pytest.raises(CheatingError) as info:
        frost.verify_signature_shares(public, commitments, msg, shares)
    assert info.value.party == culprit


def test_several_cheaters_all_named() -> None:
    rng = _Stream(b"several")
    keys, public, _ = _dealer(7, 3, rng)
    signers = [2, 3, 5, 7]
    commitments, shares = _run(keys, signers, b"msg", rng)
    shares = [
        SignatureShare(s.identifier, (s.share + 1) % L) if s.identifier in (3, 7) else s for s in shares
    ]
    with pytest.raises(CheatingError) as info:
        frost.aggregate_and_identify(public, commitments, b"msg", shares)
    assert info.value.party == 3
    assert "7" in info.value.reason


def test_share_computed_with_wrong_key_share_is_identified() -> None:
    rng = _Stream(b"wrong key")
    keys, public, _ = _dealer(4, 2, rng)
    nonces = {i: frost.commit(keys[i], rng.read(64)) for i in (1, 4)}
    commitments = [n.commitment for n in nonces.values()]
    liar = KeyPackage(4, (keys[4].secret_share + 1) % L, public.group_public_key, 2)
    shares = [
        frost.sign(keys[1], nonces[1], b"m", commitments),
        frost.sign(liar, nonces[4], b"m", commitments),
    ]
    with pytest.raises(CheatingError) as info:
        frost.aggregate_and_identify(public, commitments, b"m", shares)
    assert info.value.party == 4


def test_share_set_must_match_commitments() -> None:
    rng = _Stream(b"match")
    keys, public, _ = _dealer(4, 2, rng)
    commitments, shares = _run(keys, [1, 2, 3], b"m", rng)
    with pytest.raises(ParameterError, match="missing"):
        frost.aggregate(commitments, b"m", public.group_public_key, shares[:2])
    with pytest.raises(ParameterError, match="two signature shares"):
        frost.aggregate(commitments, b"m", public.group_public_key, [*shares, shares[0]])
    with pytest.raises(ParameterError, match="twice"):
        frost.aggregate([*commitments, commitments[0]], b"m", public.group_public_key, shares)


# ---------------------------------------------------------------------------
# Nonces: one use only, never printed


def test_nonces_are_single_use() -> None:
    rng = _Stream(b"reuse")
    keys, _, _ = _dealer(3, 2, rng)
    nonces = {i: frost.commit(keys[i], rng.read(64)) for i in (1, 2)}
    commitments = [n.commitment for n in nonces.values()]
    frost.sign(keys[1], nonces[1], b"one", commitments)
    assert nonces[1].used
    with pytest.raises(NonceReuseError):
        frost.sign(keys[1], nonces[1], b"two", commitments)
    with pytest.raises(TypeError):
        copy.copy(nonces[2])
    with pytest.raises(TypeError):
        copy.deepcopy(nonces[2])
    with pytest.raises(TypeError):
        pickle.dumps(nonces[2])


def test_sign_refuses_foreign_commitment_without_consuming() -> None:
    rng = _Stream(b"foreign")
    keys, _, _ = _dealer(3, 2, rng)
    mine = frost.commit(keys[1], rng.read(64))
    other = frost.commit(keys[1], rng.read(64))
    peer = frost.commit(keys[2], rng.read(64))
    with pytest.raises(ParameterError, match="does not hold our commitment"):
        frost.sign(keys[1], mine, b"m", [other.commitment, peer.commitment])
    with pytest.raises(ParameterError, match="not in the commitment list"):
        frost.sign(keys[3], frost.commit(keys[3], rng.read(64)), b"m", [mine.commitment, peer.commitment])
    with pytest.raises(ParameterError, match="belong to signer"):
        frost.sign(keys[2], mine, b"m", [mine.commitment, peer.commitment])
    assert not mine.used
    frost.sign(keys[1], mine, b"m", [mine.commitment, peer.commitment])


def test_nonce_pool_preprocessing() -> None:
    rng = _Stream(b"pool")
    keys, public, _ = _dealer(5, 3, rng)
    signers = [1, 2, 4]
    pools = {i: NoncePool.generate(keys[i], rng.read(64 * 4)) for i in signers}
    published = {i: pools[i].commitments() for i in signers}
    assert all(len(p) == 4 for p in pools.values())
    for session in range(4):
        msg = b"message %d" % session
        commitments = [published[i][session] for i in signers]
        shares = []
        for i in signers:
            nonces = pools[i].take(published[i][session])
            shares.append(frost.sign(keys[i], nonces, msg, commitments))
            with pytest.raises(NonceReuseError):
                pools[i].take(published[i][session])
        sig = frost.aggregate_and_identify(public, commitments, msg, shares)
        assert _cryptography_verifies(public.group_public_key, msg, sig)
    assert all(len(p) == 0 for p in pools.values())
    with pytest.raises(NonceReuseError):
        pools[1].pop()
    pool = NoncePool.generate(keys[1], rng.read(128))
    first = pool.commitments()[0]
    assert pool.pop().commitment == first
    assert len(pool) == 1
    pool.wipe()
    assert len(pool) == 0
    with pytest.raises(ParameterError):
        NoncePool.generate(keys[1], rng.read(65))
    with pytest.raises(ParameterError):
        NoncePool(2, [frost.commit(keys[1], rng.read(64))])


def test_secrets_not_in_repr() -> None:
    rng = _Stream(b"repr")
    keys, public, _ = _dealer(3, 2, rng)
    key = keys[1]
    nonces = frost.commit(key, rng.read(64))
    pool = NoncePool.generate(key, rng.read(128))
    secrets = [key.secret_share, *nonces._consume()]
    nonces2 = frost.commit(key, rng.read(64))
    secrets += [nonces2._hiding, nonces2._binding]
    for obj in (key, nonces2, pool, public):
        text = repr(obj) + str(obj)
        for s in secrets:
            for form in (
                str(s),
                hex(s),
                _le(s),
                s.to_bytes(32, "little").hex(),
                repr(s.to_bytes(32, "little")),
            ):
                assert form not in text


# ---------------------------------------------------------------------------
# (5) Serialization and decoder fuzzing


def _sample_objects() -> tuple[SigningCommitment, SignatureShare, bytes, list[SigningCommitment]]:
    rng = _Stream(b"serial")
    keys, public, _ = _dealer(3, 2, rng)
    commitments, shares = _run(keys, [1, 3], b"m", rng)
    sig = frost.aggregate(commitments, b"m", public.group_public_key, shares)
    return commitments[0], shares[1], sig, commitments


def test_roundtrips() -> None:
    commitment, share, sig, commitments = _sample_objects()
    assert SigningCommitment.from_bytes(commitment.to_bytes()) == commitment
    assert len(commitment.to_bytes()) == frost.COMMITMENT_SIZE
    assert SignatureShare.from_bytes(share.to_bytes()) == share
    assert len(share.to_bytes()) == frost.SIGNATURE_SHARE_SIZE
    assert len(sig) == frost.SIGNATURE_SIZE
    r, z = frost.decode_signature(sig)
    assert sig == r + z.to_bytes(32, "little")
    encoded = frost.encode_group_commitment_list(commitments)
    assert frost.decode_group_commitment_list(encoded) == commitments


_L_BYTES = L.to_bytes(32, "little")
_IDENTITY = G.identity()
_SMALL_ORDER = bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")  # order 2
_NON_CANONICAL_Y = (2**255 - 19 + 1).to_bytes(32, "little")  # y = p + 1
_MIXED_ORDER: bytes = G.add(
    G.mul_base(7), bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "expected 96 bytes"),
        (lambda b: b + b"\x00", "expected 96 bytes"),
        (lambda b: bytes(32) + b[32:], "zero is not a valid identifier"),
        (lambda b: _L_BYTES + b[32:], "not reduced"),
        (lambda b: b[:32] + _IDENTITY + b[64:], "hiding commitment"),
        (lambda b: b[:64] + _IDENTITY, "binding commitment"),
        (lambda b: b[:32] + _SMALL_ORDER + b[64:], "hiding commitment"),
        (lambda b: b[:32] + _NON_CANONICAL_Y + b[64:], "hiding commitment"),
        (lambda b: b[:64] + _MIXED_ORDER, "binding commitment"),
    ],
)
def test_commitment_decode_errors(mutate: Any, message: str) -> None:
    commitment, _, _, _ = _sample_objects()
    with pytest.raises(DecodeError, match=message):
        SigningCommitment.from_bytes(mutate(commitment.to_bytes()))


def test_other_decode_errors() -> None:
    _, share, sig, commitments = _sample_objects()
    raw = share.to_bytes()
    with pytest.raises(DecodeError, match="expected 64 bytes"):
        SignatureShare.from_bytes(raw[:63])
    with pytest.raises(DecodeError, match=r"value.*not reduced"):
        SignatureShare.from_bytes(raw[:32] + _L_BYTES)
    with pytest.raises(DecodeError, match="identifier"):
        SignatureShare.from_bytes(bytes(32) + raw[32:])
    with pytest.raises(DecodeError, match="expected 64 bytes"):
        frost.decode_signature(sig + b"\x00")
    with pytest.raises(DecodeError, match="signature R"):
        frost.decode_signature(_IDENTITY + sig[32:])
    with pytest.raises(DecodeError, match="signature R"):
        frost.decode_signature(_MIXED_ORDER + sig[32:])
    with pytest.raises(DecodeError, match=r"signature z.*not reduced"):
        frost.decode_signature(sig[:32] + _L_BYTES)
    encoded = frost.encode_group_commitment_list(commitments)
    with pytest.raises(DecodeError, match="not a positive multiple"):
        frost.decode_group_commitment_list(encoded[:-1])
    with pytest.raises(DecodeError, match="not a positive multiple"):
        frost.decode_group_commitment_list(b"")
    with pytest.raises(DecodeError, match="ascending"):
        frost.decode_group_commitment_list(encoded[96:] + encoded[:96])
    with pytest.raises(DecodeError, match="entry 1"):
        frost.decode_group_commitment_list(encoded[:96] + encoded[96:128] + _IDENTITY + encoded[160:])
    with pytest.raises(DecodeError, match="expected bytes"):
        SigningCommitment.from_bytes("not bytes")  # type: ignore[arg-type]


_DECODERS = [
    SigningCommitment.from_bytes,
    SignatureShare.from_bytes,
    frost.decode_signature,
    frost.decode_group_commitment_list,
]


def _fuzz_inputs() -> st.SearchStrategy[bytes]:
    commitment, share, sig, commitments = _sample_objects()
    valid = [commitment.to_bytes(), share.to_bytes(), sig, frost.encode_group_commitment_list(commitments)]

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(valid)))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        return bytes(data)

    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from([32, 64, 96, 192]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
        mutated(),
    )


@settings(max_examples=400, deadline=None)
@given(_fuzz_inputs(), st.sampled_from(_DECODERS))
def test_fuzz_decoders_only_raise_decode_error(data: bytes, decoder: Any) -> None:
    with contextlib.suppress(DecodeError):
        decoder(data)
