"""TDH2 threshold KEM: t+1 shares decrypt, changed ciphertexts are refused, bad shares name their server."""

from __future__ import annotations

import contextlib
from typing import Any

import nacl.public
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.crypto import local, shamir, tdh2
from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import DSA2048, ED25519, P256, Group
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource

GROUPS = [ED25519, P256]


def keys_for(
    group: Group[Any], n: int, t: int, seed: int
) -> tuple[dict[int, KeyShare[Any]], DeterministicSource]:
    rand = DeterministicSource(seed, group.order)
    return local.run_dkg(group, n, t, rand).keys, rand


def secret_of(group: Group[Any], keys: dict[int, KeyShare[Any]], t: int) -> int:
    return shamir.interpolate({i: keys[i].share.value for i in sorted(keys)[: t + 1]}, group.order)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.integers(2, 5).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))),
    label=st.binary(max_size=64),
    plaintext=st.binary(max_size=200),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_any_t_plus_1_valid_shares_give_the_plaintext(
    group: Group[Any], params: tuple[int, int], label: bytes, plaintext: bytes, seed: int, data: st.DataObject
) -> None:
    n, t = params
    keys, rand = keys_for(group, n, t, seed)
    public = keys[1].public
    sealed = tdh2.seal(group, public.public_key, label, plaintext, rand)
    sealed = tdh2.Sealed.decode(group, sealed.encode(group))
    chosen = data.draw(st.lists(st.sampled_from(sorted(keys)), min_size=t + 1, max_size=t + 1, unique=True))
    shares = {i: tdh2.decryption_share(group, keys[i], sealed.kem, rand, label) for i in chosen}
    shares = {i: tdh2.DecryptionShare.from_bytes(group, s.to_bytes(group)) for i, s in shares.items()}
    key = tdh2.combine(group, public, sealed.kem, shares)
    assert key == tdh2.decapsulate_directly(group, secret_of(group, keys, t), sealed.kem)
    assert tdh2.open_sealed(sealed, key) == plaintext
    # t shares are not enough
    fewer = dict(list(shares.items())[:t])
    with pytest.raises(NotEnoughSharesError):
        tdh2.combine(group, public, sealed.kem, fewer)


def _tampered(group: Group[Any], ct: tdh2.Ciphertext[Any]) -> list[tuple[str, tdh2.Ciphertext[Any]]]:
    two = group.mul(2, ct.u)
    return [
        ("label", tdh2.Ciphertext(ct.label + b"x", ct.u, ct.ubar, ct.e, ct.f)),
        ("u", tdh2.Ciphertext(ct.label, two, ct.ubar, ct.e, ct.f)),
        ("ubar", tdh2.Ciphertext(ct.label, ct.u, group.mul(2, ct.ubar), ct.e, ct.f)),
        ("e", tdh2.Ciphertext(ct.label, ct.u, ct.ubar, (ct.e + 1) % group.order, ct.f)),
        ("f", tdh2.Ciphertext(ct.label, ct.u, ct.ubar, ct.e, (ct.f + 1) % group.order)),
        ("swap", tdh2.Ciphertext(ct.label, ct.ubar, ct.u, ct.e, ct.f)),
    ]


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label=st.binary(max_size=40), seed=st.integers(0, 2**32))
def test_a_changed_ciphertext_or_label_is_refused_before_any_share(
    group: Group[Any], label: bytes, seed: int
) -> None:
    keys, rand = keys_for(group, 4, 1, seed)
    _, ct = tdh2.encapsulate(group, keys[1].public_key, label, rand)
    tdh2.check_ciphertext(group, ct, label)
    with pytest.raises(tdh2.InvalidCiphertext, match="another label"):
        tdh2.check_ciphertext(group, ct, label + b"!")
    for what, bad in _tampered(group, ct):
        with pytest.raises(tdh2.InvalidCiphertext):
            tdh2.check_ciphertext(group, bad)
        with pytest.raises(tdh2.InvalidCiphertext):
            tdh2.decryption_share(group, keys[2], bad, rand)
        with pytest.raises(tdh2.InvalidCiphertext):
            tdh2.combine(group, keys[1].public, bad, {})
        assert what


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
def test_a_bad_share_names_its_server_and_the_good_ones_still_combine(group: Group[Any]) -> None:
    keys, rand = keys_for(group, 4, 1, 7)
    public = keys[1].public
    sealed = tdh2.seal(group, public.public_key, b"L", b"secret", rand)
    ct = sealed.kem
    shares = {i: tdh2.decryption_share(group, keys[i], ct, rand) for i in keys}
    s2 = shares[2]
    wrong_value = tdh2.DecryptionShare(2, group.mul(3, s2.ui), s2.e, s2.f)
    wrong_proof = tdh2.DecryptionShare(2, s2.ui, s2.e, (s2.f + 1) % group.order)
    for bad in (wrong_value, wrong_proof):
        with pytest.raises(CheatingError) as info:
            tdh2.combine(group, public, ct, {1: shares[1], 2: bad})
        assert info.value.party == 2
        good, rejected = tdh2.sort_shares(group, public, ct, {1: shares[1], 2: bad, 3: shares[3]})
        assert sorted(good) == [1, 3] and list(rejected) == [2]
        assert tdh2.open_sealed(sealed, tdh2.combine(group, public, ct, good)) == b"secret"
    # server 3's valid share passed off as server 4's
    with pytest.raises(CheatingError) as info:
        tdh2.combine(group, public, ct, {1: shares[1], 4: shares[3]})
    assert info.value.party == 4
    # a share made for another ciphertext is worthless for this one
    other = tdh2.seal(group, public.public_key, b"L", b"secret", rand).kem
    foreign = tdh2.decryption_share(group, keys[2], other, rand)
    with pytest.raises(CheatingError) as info:
        tdh2.combine(group, public, ct, {1: shares[1], 2: foreign})
    assert info.value.party == 2


def test_a_changed_body_does_not_open() -> None:
    keys, rand = keys_for(ED25519, 4, 1, 3)
    public = keys[1].public
    sealed = tdh2.seal(ED25519, public.public_key, b"L", b"payload", rand)
    key = tdh2.combine(
        ED25519,
        public,
        sealed.kem,
        {i: tdh2.decryption_share(ED25519, keys[i], sealed.kem, rand) for i in (1, 2)},
    )
    body = bytearray(sealed.body)
    body[0] ^= 1
    with pytest.raises(tdh2.InvalidCiphertext):
        tdh2.open_sealed(tdh2.Sealed(sealed.kem, bytes(body)), key)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
def test_a_ciphertext_survives_refresh_and_recovery_and_periods_never_mix(group: Group[Any]) -> None:
    """The store key is refreshed like every secret of C: same public key, new shares, old ciphertexts."""
    keys, rand = keys_for(group, 4, 1, 11)
    public_key = keys[1].public_key
    sealed = tdh2.seal(group, public_key, b"app/id/1", b"kept across periods", rand)
    old_shares = {i: tdh2.decryption_share(group, keys[i], sealed.kem, rand) for i in keys}
    for _ in range(3):
        keys = local.run_refresh(group, keys, rand)
    assert keys[1].public_key == public_key
    recovered = local.run_recovery(group, {i: k for i, k in keys.items() if i != 4}, 4, rand)
    assert not recovered.cheaters
    keys[4] = recovered.key
    public = keys[1].public
    new_shares = {i: tdh2.decryption_share(group, keys[i], sealed.kem, rand) for i in keys}
    for pair in ((1, 2), (3, 4), (2, 4)):
        key = tdh2.combine(group, public, sealed.kem, {i: new_shares[i] for i in pair})
        assert tdh2.open_sealed(sealed, key) == b"kept across periods"
    # Scenario A: a share of an earlier period fails against this period's verification share.
    with pytest.raises(CheatingError) as info:
        tdh2.combine(group, public, sealed.kem, {1: old_shares[1], 2: new_shares[2]})
    assert info.value.party == 1


def test_dsa_group_one_example() -> None:
    keys, rand = keys_for(DSA2048, 4, 1, 5)
    public = keys[1].public
    sealed = tdh2.seal(DSA2048, public.public_key, b"dsa", b"on the DSA subgroup", rand)
    shares = {i: tdh2.decryption_share(DSA2048, keys[i], sealed.kem, rand) for i in (2, 4)}
    assert (
        tdh2.open_sealed(sealed, tdh2.combine(DSA2048, public, sealed.kem, shares)) == b"on the DSA subgroup"
    )
    with pytest.raises(tdh2.InvalidCiphertext):
        tdh2.check_ciphertext(DSA2048, sealed.kem, b"other")


def test_shares_are_readable_by_their_reader_only() -> None:
    keys, rand = keys_for(ED25519, 4, 1, 9)
    ct = tdh2.encapsulate(ED25519, keys[1].public_key, b"L", rand)[1]
    share = tdh2.decryption_share(ED25519, keys[3], ct, rand)
    reader, other = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    boxed = tdh2.share_for_reader(ED25519, share, bytes(reader.public_key))
    assert share.to_bytes(ED25519) not in boxed
    assert tdh2.open_share(ED25519, reader, boxed) == share
    with pytest.raises(DecodeError, match="reader"):
        tdh2.open_share(ED25519, other, boxed)
    with pytest.raises(ValueError):
        tdh2.share_for_reader(ED25519, share, b"short")


def test_encoding_refuses_another_group_and_long_labels() -> None:
    keys, rand = keys_for(ED25519, 4, 1, 4)
    ct = tdh2.encapsulate(ED25519, keys[1].public_key, b"L", rand)[1]
    with pytest.raises(DecodeError, match="group"):
        tdh2.Ciphertext.decode(P256, ct.encode(ED25519))
    with pytest.raises(ValueError, match="label"):
        tdh2.encapsulate(ED25519, keys[1].public_key, bytes(tdh2.MAX_LABEL + 1), rand)
    assert tdh2.Ciphertext.decode(ED25519, ct.encode(ED25519)) == ct


# Fuzzing: every decoder raises DecodeError and nothing else -----------------------------------------

_KEYS, _RAND = keys_for(ED25519, 4, 1, 1)
_SEALED = tdh2.seal(ED25519, _KEYS[1].public_key, b"label", b"x" * 20, _RAND)
_SHARE = tdh2.decryption_share(ED25519, _KEYS[1], _SEALED.kem, _RAND)
_READER = nacl.public.PrivateKey(bytes(range(32)))
_VALID = {
    "ciphertext": _SEALED.kem.encode(ED25519),
    "sealed": _SEALED.encode(ED25519),
    "share": _SHARE.to_bytes(ED25519),
    "boxed": tdh2.share_for_reader(ED25519, _SHARE, bytes(_READER.public_key)),
}


def _decode(kind: str, data: bytes) -> object:
    if kind == "ciphertext":
        return tdh2.Ciphertext.decode(ED25519, data)
    if kind == "sealed":
        return tdh2.Sealed.decode(ED25519, data)
    if kind == "share":
        return tdh2.DecryptionShare.from_bytes(ED25519, data)
    return tdh2.open_share(ED25519, _READER, data)


@pytest.mark.parametrize("kind", sorted(_VALID))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(kind: str, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        _decode(kind, data)


@pytest.mark.parametrize("kind", sorted(_VALID))
@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_fuzz_mutated_encodings(kind: str, pos: int, value: int, cut: int) -> None:
    valid = _VALID[kind]
    assert _decode(kind, valid) is not None
    mutated = bytearray(valid)
    mutated[pos % len(mutated)] = value
    for candidate in (bytes(mutated), valid[: cut % len(valid)]):
        with contextlib.suppress(DecodeError):
            _decode(kind, candidate)
