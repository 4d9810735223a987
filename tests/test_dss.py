"""Robust threshold DSS with presignatures: standard signatures, named cheaters, one-time use."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.crypto import dss, local
from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError, ParameterError
from appliance.crypto.groups import Group
from appliance.crypto.groups.dsa import DSA2048
from appliance.crypto.groups.p256 import P256
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource
from appliance.crypto.vss import Complaint, ShareMessage

GROUPS = [pytest.param(DSA2048, id="dsa2048"), pytest.param(P256, id="p256")]
SIZES = [pytest.param(5, 1, id="n5t1"), pytest.param(7, 2, id="n7t2")]

_KEYS: dict[tuple[str, int, int], dict[int, KeyShare[Any]]] = {}


def dkg_keys(group: Group[Any], n: int, t: int) -> dict[int, KeyShare[Any]]:
    """A fresh DKG per (group, n, t), cached: DKGs are the slow part of these tests."""
    cache_key = (group.name, n, t)
    if cache_key not in _KEYS:
        _KEYS[cache_key] = local.run_dkg(group, n, t, DeterministicSource(b"dss-dkg", group.order)).keys
    return _KEYS[cache_key]


def presign(
    group: Group[Any], n: int, t: int, seed: str = "p", cheat: dss.Cheat | None = None
) -> dss.PresignResult[Any]:
    keys = dkg_keys(group, n, t)
    rand = DeterministicSource(seed.encode(), group.order)
    return dss.run_presign(group, keys, rand, sid=f"test/{seed}".encode(), cheat=cheat)


@pytest.mark.parametrize(("n", "t"), SIZES)
@pytest.mark.parametrize("group", GROUPS)
def test_threshold_signature_verifies_with_cryptography(group: Group[Any], n: int, t: int) -> None:
    keys = dkg_keys(group, n, t)
    result = presign(group, n, t)
    assert result.cheaters == {}
    assert sorted(result.presignatures) == list(range(1, n + 1))
    message = b"log entry 1"
    sig = dss.run_sign(group, result.presignatures, message, keys[1].public, signers=range(1, t + 2))
    assert sig.cheaters == {}
    y = keys[1].public_key
    assert dss.verify_dss(group, y, message, sig.r, sig.s)
    assert dss.verify_with_cryptography(group, y, message, sig.der)
    assert not dss.verify_with_cryptography(group, y, b"log entry 2", sig.der)


@pytest.mark.parametrize("group", GROUPS)
def test_any_t_plus_1_servers_sign(group: Group[Any]) -> None:
    keys = dkg_keys(group, 5, 1)
    result = presign(group, 5, 1, seed="subset")
    sig = dss.run_sign(group, result.presignatures, b"m", keys[1].public, signers=[3, 5])
    assert dss.verify_with_cryptography(group, keys[1].public_key, b"m", sig.der)


@pytest.mark.parametrize("group", GROUPS)
def test_message_scalar_is_the_fips_leftmost_bits(group: Group[Any]) -> None:
    for message in (b"", b"abc", bytes(range(200))):
        digest = hashlib.sha256(message).digest()
        assert dss.message_scalar(group, message) == group.digest_to_scalar(digest)  # type: ignore[attr-defined]


@pytest.mark.interop
@pytest.mark.parametrize("group", GROUPS)
def test_openssl_command_line_verifies_the_signature(group: Group[Any], tmp_path: Path) -> None:
    keys = dkg_keys(group, 5, 1)
    result = presign(group, 5, 1, seed="openssl")
    message = b"timestamped by the appliance\n"
    sig = dss.run_sign(group, result.presignatures, message, keys[1].public)
    (tmp_path / "pub.pem").write_bytes(dss.public_key_pem(group, keys[1].public_key))
    (tmp_path / "sig.der").write_bytes(sig.der)
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "other").write_bytes(message + b"!")
    cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der"]
    ok = subprocess.run([*cmd, "msg"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "Verified OK" in ok.stdout
    bad = subprocess.run([*cmd, "other"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert bad.returncode != 0


@pytest.mark.parametrize("group", GROUPS)
def test_signatures_verify_under_the_same_key_after_refresh(group: Group[Any]) -> None:
    old = local.run_dkg(group, 5, 1, DeterministicSource(b"refresh", group.order)).keys
    y = old[1].public_key
    before = dss.run_presign(group, old, DeterministicSource(b"pre-old", group.order), sid=b"old")
    new = local.run_refresh(group, old, DeterministicSource(b"refresh-deal", group.order))
    assert new[1].public_key == y
    after = dss.run_presign(group, new, DeterministicSource(b"pre-new", group.order), sid=b"new")
    sig = dss.run_sign(group, after.presignatures, b"after refresh", new[1].public)
    assert dss.verify_with_cryptography(group, y, b"after refresh", sig.der)
    # Presignatures are per period: the old ones are refused under the new sharing.
    with pytest.raises(dss.StalePresignatureError):
        dss.sign_share(group, before.presignatures[1], b"m", new[1].public)


@pytest.mark.parametrize("group", GROUPS)
def test_a_presignature_cannot_be_used_twice(group: Group[Any]) -> None:
    keys = dkg_keys(group, 5, 1)
    result = presign(group, 5, 1, seed="reuse")
    dss.run_sign(group, result.presignatures, b"first", keys[1].public)
    for presig in result.presignatures.values():
        assert presig.used
        assert presig.kappa.wiped and presig.w.wiped
        with pytest.raises(dss.PresignatureUsedError):
            dss.sign_share(group, presig, b"second", keys[1].public)


def test_presignature_secrets_are_hidden_from_repr() -> None:
    result = presign(P256, 5, 1, seed="repr")
    presig = result.presignatures[1]
    text = repr(presig)
    assert "hidden" in text
    assert str(presig.kappa.value) not in text
    assert str(presig.w.value) not in text


# Cheaters --------------------------------------------------------------------------


CHEATS = [
    pytest.param("bad_z", "product opening", id="bad-z"),
    pytest.param("bad_product_proof", "product opening", id="bad-product-proof"),
    pytest.param("bad_w_dealing", "w dealing", id="bad-w-dealing"),
    pytest.param("bad_w_share", "fails the commitments", id="bad-w-share"),
    pytest.param("bad_nonce_share", "fails the commitments", id="bad-nonce-share"),
]


@pytest.mark.parametrize(("how", "reason"), CHEATS)
@pytest.mark.parametrize(("n", "t"), SIZES)
@pytest.mark.parametrize("group", GROUPS)
def test_presign_names_the_cheater_and_honest_servers_finish(
    group: Group[Any], n: int, t: int, how: str, reason: str
) -> None:
    keys = dkg_keys(group, n, t)
    culprits = frozenset(range(2, 2 + t))  # t cheaters
    result = presign(group, n, t, seed=f"cheat-{how}", cheat=dss.Cheat(**{how: culprits}))
    assert set(result.cheaters) == set(culprits)
    assert all(reason in r for r in result.cheaters.values())
    assert set(result.presignatures) == set(range(1, n + 1)) - culprits
    sig = dss.run_sign(group, result.presignatures, b"honest", keys[1].public)
    assert dss.verify_with_cryptography(group, keys[1].public_key, b"honest", sig.der)


@pytest.mark.parametrize("group", GROUPS)
def test_product_opening_check_raises_cheating_error_naming_the_sender(group: Group[Any]) -> None:
    keys = dkg_keys(group, 5, 1)
    rand = DeterministicSource(b"opening", group.order)
    dealt = {d: dss.deal_nonce(group, b"s", d, 5, 1, rand) for d in keys}
    dealings = {d: dealing for d, (dealing, _) in dealt.items()}
    public = dss.nonce_public(group, b"s", 5, 1, dealings.keys(), dealings)
    state = dss.nonce_finish(group, public, 3, dealings, {d: shares[3] for d, (_, shares) in dealt.items()})
    opening = dss.open_product(group, public, state, rand)
    dss.check_product_opening(group, public, opening)
    forged = dss.ProductOpening(3, (opening.z + 1) % group.order, opening.proof)
    with pytest.raises(CheatingError) as err:
        dss.check_product_opening(group, public, forged)
    assert err.value.party == 3
    # The proof is bound to the server: replaying it under another id fails too.
    with pytest.raises(CheatingError) as err:
        dss.check_product_opening(group, public, dss.ProductOpening(4, opening.z, opening.proof))
    assert err.value.party == 4


@pytest.mark.parametrize("group", GROUPS)
def test_w_dealing_of_another_value_raises_cheating_error_naming_the_dealer(group: Group[Any]) -> None:
    keys = dkg_keys(group, 5, 1)
    rand = DeterministicSource(b"w-direct", group.order)
    dealt = {d: dss.deal_nonce(group, b"w", d, 5, 1, rand) for d in keys}
    dealings = {d: dealing for d, (dealing, _) in dealt.items()}
    public = dss.nonce_public(group, b"w", 5, 1, dealings.keys(), dealings)
    states = {
        j: dss.nonce_finish(group, public, j, dealings, {d: shares[j] for d, (_, shares) in dealt.items()})
        for j in keys
    }
    nonce, bad = dss.open_nonce(
        group, public, {j: dss.open_product(group, public, states[j], rand) for j in keys}
    )
    assert bad == {}
    good, _ = dss.deal_w(group, public, nonce, states[4], keys[4], rand)
    dss.check_w_dealing(group, public, nonce, keys[4].public, good)
    wrong, _ = dss.deal_w(group, public, nonce, states[4], keys[4], rand, _w_offset=1)
    with pytest.raises(CheatingError) as err:
        dss.check_w_dealing(group, public, nonce, keys[4].public, wrong)
    assert err.value.party == 4
    # Server 4's valid proof does not pass for server 3's statement.
    with pytest.raises(CheatingError) as err:
        dss.check_w_dealing(
            group, public, nonce, keys[4].public, dss.WDealing(3, good.commitment, good.proof)
        )
    assert err.value.party == 3


def test_a_replayed_signed_share_from_another_dealing_convicts_the_accuser() -> None:
    group, n, t = P256, 5, 1
    rand = DeterministicSource(b"replay", group.order)
    pk = local.PeriodKeys(n, b"local")
    dealings = {d: dss.deal_nonce(group, b"same-sid", d, n, t, rand)[0] for d in range(1, n + 1)}
    earlier, earlier_shares = dss.deal_nonce(group, b"same-sid", 2, n, t, rand)  # same dealer, same sid
    msg = ShareMessage(dss.nonce_session(group, b"same-sid", earlier), 2, 3, earlier_shares[3])
    sig = pk.sign(2, msg.payload(local.SIGNING_CONTEXT, 0))
    qual = dss.qualify_nonce(
        group, b"same-sid", n, t, dealings, [Complaint(3, msg, sig)], pk.verify,
        signing_context=local.SIGNING_CONTEXT, period=0,
    )  # fmt: skip
    assert set(qual.cheaters) == {3}
    assert 2 in qual.qual


@pytest.mark.parametrize("group", GROUPS)
def test_presign_and_sign_with_a_server_offline(group: Group[Any]) -> None:
    keys = dkg_keys(group, 5, 1)
    online = {j: k for j, k in keys.items() if j != 2}
    result = dss.run_presign(group, online, DeterministicSource(b"offline", group.order), sid=b"offline")
    assert set(result.presignatures) == {1, 3, 4, 5}
    sig = dss.run_sign(group, result.presignatures, b"m", keys[1].public, signers=[4, 5])
    assert dss.verify_with_cryptography(group, keys[1].public_key, b"m", sig.der)


@pytest.mark.parametrize(("n", "t"), SIZES)
@pytest.mark.parametrize("group", GROUPS)
def test_bad_signature_share_is_named_and_excluded(group: Group[Any], n: int, t: int) -> None:
    keys = dkg_keys(group, n, t)
    result = presign(group, n, t, seed="bad-share")
    culprits = frozenset(range(1, 1 + t))  # among the first t+1: the fast path fails
    sig = dss.run_sign(
        group, result.presignatures, b"m", keys[1].public, cheat=dss.Cheat(bad_sign_share=culprits)
    )
    assert set(sig.cheaters) == set(culprits)
    assert dss.verify_with_cryptography(group, keys[1].public_key, b"m", sig.der)


def test_single_bad_signature_share_raises_cheating_error() -> None:
    keys = dkg_keys(P256, 5, 1)
    result = presign(P256, 5, 1, seed="one-share")
    share = dss.sign_share(P256, result.presignatures[2], b"m", keys[2].public)
    dss.verify_signature_share(P256, result.public, b"m", share)
    with pytest.raises(CheatingError) as err:
        dss.verify_signature_share(P256, result.public, b"other", share)
    assert err.value.party == 2
    bad = dss.SignatureShare(share.sid, 2, share.s, (share.tau + 1) % P256.order)
    with pytest.raises(CheatingError):
        dss.verify_signature_share(P256, result.public, b"m", bad)


def test_too_many_bad_signature_shares_fail_cleanly_naming_them() -> None:
    keys = dkg_keys(P256, 5, 1)
    result = presign(P256, 5, 1, seed="too-many")
    with pytest.raises(NotEnoughSharesError, match="cheaters"):
        dss.run_sign(
            P256,
            result.presignatures,
            b"m",
            keys[1].public,
            signers=[1, 2],
            cheat=dss.Cheat(bad_sign_share=frozenset({2})),
        )


@pytest.mark.parametrize(("n", "t"), [(4, 2), (2, 1), (3, 0)])
def test_parameters_below_2t_plus_1_are_refused(n: int, t: int) -> None:
    with pytest.raises(ParameterError):
        dss.check_dss_parameters(n, t)


def test_robustness_needs_3t_plus_1() -> None:
    assert dss.is_robust(4, 1) and dss.is_robust(7, 2)
    assert not dss.is_robust(3, 1) and not dss.is_robust(6, 2)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 2).flatmap(lambda t: st.tuples(st.integers(2 * t + 1, 2 * t + 2), st.just(t))), st.binary()
)
def test_random_small_committees_sign_on_p256(params: tuple[int, int], message: bytes) -> None:
    n, t = params
    keys = local.run_dkg(P256, n, t, DeterministicSource(b"hyp", P256.order)).keys
    result = dss.run_presign(P256, keys, DeterministicSource(message, P256.order), sid=b"hyp")
    sig = dss.run_sign(P256, result.presignatures, message, keys[1].public, signers=range(n - t, n + 1))
    assert dss.verify_with_cryptography(P256, keys[1].public_key, message, sig.der)


# Wire objects ----------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_wire_objects_round_trip(group: Group[Any]) -> None:
    rand = DeterministicSource(b"wire", group.order)
    share = dss.SignatureShare(b"sid", 3, rand(), rand())
    assert dss.SignatureShare.decode(group, share.encode(group), 5) == share
    dealing, _ = dss.deal_nonce(group, b"sid", 2, 5, 1, rand)
    assert dss.NonceDealing.decode(group, dealing.encode(group), 5, 1) == dealing
    proof = dss.LinkProof(rand(), rand(), rand(), rand())
    opening = dss.ProductOpening(4, rand(), proof)
    assert dss.ProductOpening.decode(group, opening.encode(group), 5) == opening
    wd = dss.WDealing(1, dealing.kappa, proof)
    assert dss.WDealing.decode(group, wd.encode(group), 5, 1) == wd
    with pytest.raises(DecodeError):
        dss.SignatureShare.decode(group, share.encode(group), 2)  # signer outside 1..n


def _only_decode_error(decode: Any, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_signature_share_decoder_raises_only_decode_error(data: bytes) -> None:
    for group in (P256, DSA2048):
        _only_decode_error(lambda d: dss.SignatureShare.decode(group, d, 5), data)  # noqa: B023


_SCALARS = st.binary(min_size=32, max_size=32) | st.binary(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"sid": st.binary(max_size=8), "signer": st.integers(-2, 9), "s": _SCALARS, "tau": _SCALARS}
    )
)
def test_signature_share_decoder_on_near_valid_maps(obj: dict[str, Any]) -> None:
    from appliance.crypto import encoding

    _only_decode_error(lambda d: dss.SignatureShare.decode(P256, d, 5), encoding.encode(obj))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_other_dss_decoders_raise_only_decode_error(data: bytes) -> None:
    _only_decode_error(lambda d: dss.ProductOpening.decode(P256, d, 5), data)
    _only_decode_error(lambda d: dss.NonceDealing.decode(P256, d, 5, 1), data)
    _only_decode_error(lambda d: dss.WDealing.decode(P256, d, 5, 1), data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3), st.integers(0, 400), st.binary(min_size=1, max_size=3))
def test_mutated_wire_objects_decode_or_raise_decode_error(which: int, pos: int, patch: bytes) -> None:
    rand = DeterministicSource(b"mut", P256.order)
    dealing, _ = dss.deal_nonce(P256, b"sid", 2, 5, 1, rand)
    proof = dss.LinkProof(rand(), rand(), rand(), rand())
    encoded = [
        dss.SignatureShare(b"sid", 3, rand(), rand()).encode(P256),
        dealing.encode(P256),
        dss.ProductOpening(4, rand(), proof).encode(P256),
        dss.WDealing(1, dealing.kappa, proof).encode(P256),
    ][which]
    decoders = [
        lambda d: dss.SignatureShare.decode(P256, d, 5),
        lambda d: dss.NonceDealing.decode(P256, d, 5, 1),
        lambda d: dss.ProductOpening.decode(P256, d, 5),
        lambda d: dss.WDealing.decode(P256, d, 5, 1),
    ]
    pos %= len(encoded)
    _only_decode_error(decoders[which], encoded[:pos] + patch + encoded[pos + len(patch) :])


def test_finish_steps_skip_the_share_check_only_when_told_it_was_done() -> None:
    """nonce_finish and finish_presign check shares again unless the caller says it checked them."""
    group = P256
    rand = DeterministicSource(b"pst/test/checked", group.order)
    sid = b"pst/test/checked"
    dealings, shares = {}, {}
    for d in (1, 2, 3):
        dealing, values = dss.deal_nonce(group, sid, d, 4, 1, rand)
        dealings[d], shares[d] = dealing, values[1]
    public = dss.nonce_public(group, sid, 4, 1, (1, 2, 3), dealings)
    bad = dict(shares)
    bad[2] = ((shares[2][0] + 1) % group.order, *shares[2][1:])
    with pytest.raises(CheatingError) as exc:
        dss.nonce_finish(group, public, 1, dealings, bad)
    assert exc.value.party == 2
    state = dss.nonce_finish(group, public, 1, dealings, bad, checked=True)  # trusted: not re-checked
    assert state.index == 1


# The presigning fast path: batched share checks, openings without proofs, w proofs on blame


def _nonce_round(group: Group[Any], n: int, t: int, seed: bytes, count: int) -> Any:
    """``count`` presignatures' round 1 among n dealers: ([dealings per k], [shares per k])."""
    rand = DeterministicSource(seed, group.order)
    per_k = [
        {d: dss.deal_nonce(group, b"%d" % k, d, n, t, rand) for d in range(1, n + 1)} for k in range(count)
    ]
    return per_k


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(1, 4),
    bad=st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(1, 2**64))),
    seed=st.binary(min_size=1, max_size=8),
)
def test_batched_nonce_share_check_catches_and_places_a_single_bad_share(
    count: int, bad: tuple[int, int, int] | None, seed: bytes
) -> None:
    """Any single wrong component of any share is caught, at its position, and only it."""
    group, n, t, j, dealer = P256, 4, 1, 3, 2
    rounds = _nonce_round(group, n, t, seed, count)
    dealings = [r[dealer][0] for r in rounds]
    shares = [list(r[dealer][1][j]) for r in rounds]
    expected: list[int] = []
    if bad is not None:
        k, component, offset = bad[0] % count, bad[1], bad[2]
        shares[k][component] = (shares[k][component] + offset) % group.order
        expected = [k]
    assert dss.batch_check_nonce_shares(group, dealings, j, shares) == expected
    for k in range(count):  # the unbatched check agrees
        assert dss.check_nonce_share(group, dealings[k], j, shares[k]) == (k not in expected)


def test_batched_nonce_share_check_names_every_bad_position_and_malformed_shares() -> None:
    group = P256
    rounds = _nonce_round(group, 4, 1, b"many", 5)
    dealings = [r[1][0] for r in rounds]
    shares: list[list[int]] = [list(r[1][1][2]) for r in rounds]
    shares[1][4] = (shares[1][4] + 1) % group.order  # beta
    shares[3] = shares[3][:4]  # malformed: four values
    shares[4][0] = group.order  # not reduced
    assert dss.batch_check_nonce_shares(group, dealings, 2, shares) == [1, 3, 4]
    with pytest.raises(ParameterError):
        dss.batch_check_nonce_shares(group, dealings, 2, shares[:2])


def _w_dealings(group: Group[Any], n: int, t: int, count: int, seed: bytes) -> Any:
    """Pedersen dealings of random w values, shaped like WDealing (the proof is not looked at)."""
    rand = DeterministicSource(seed, group.order)
    hgen = dss._hgen(group)
    out = []
    for _ in range(count):
        fw = dss.random_polynomial(rand(), t, group.order, rand)
        fs = dss.random_polynomial(rand(), t, group.order, rand)
        commitment = dss.Commitment(
            tuple(dss._pedersen(group, hgen, a, b) for a, b in zip(fw, fs, strict=True))
        )
        shares = {
            j: (dss.evaluate(fw, j, group.order), dss.evaluate(fs, j, group.order)) for j in range(1, n + 1)
        }
        out.append((dss.WDealing(1, commitment, dss.LinkProof(0, 0, 0, 0)), shares))
    return out


@settings(max_examples=15, deadline=None)
@given(
    count=st.integers(1, 6),
    bad=st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(0, 1), st.integers(1, 2**200))),
    j=st.integers(1, 7),
)
def test_batched_w_share_check_catches_and_places_a_single_bad_share(
    count: int, bad: tuple[int, int, int] | None, j: int
) -> None:
    group = P256
    dealt = _w_dealings(group, 7, 2, count, b"w%d" % count)
    dealings = [d for d, _ in dealt]
    shares = [list(s[j]) for _, s in dealt]
    expected: list[int] = []
    if bad is not None:
        k = bad[0] % count
        shares[k][bad[1]] = (shares[k][bad[1]] + bad[2]) % group.order
        expected = [k]
    assert dss.batch_check_w_shares(group, dealings, j, shares) == expected


def test_batch_weights_come_from_the_operating_system_not_the_inputs() -> None:
    """Two batches of the same inputs draw different weights (a dealer cannot predict them)."""
    seen = {dss._weight() for _ in range(50)}
    assert len(seen) == 50 and all(1 <= w <= 2**dss.BATCH_WEIGHT_BITS for w in seen)


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(0, 3),
    extra=st.integers(0, 3),
    coefficients=st.lists(st.integers(0, P256.order - 1), min_size=7, max_size=7),
    bad=st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(1, P256.order - 1))),
)
def test_consistent_points_accepts_exactly_the_points_of_one_low_degree_polynomial(
    t: int, extra: int, coefficients: list[int], bad: tuple[int, int] | None
) -> None:
    q = P256.order
    degree = 2 * t
    ids = list(range(1, degree + 3 + extra))  # at least one point beyond the degree+1 that fix it
    poly = coefficients[: degree + 1]
    points = {i: dss.evaluate(poly, i, q) for i in ids}
    assert dss.consistent_points(q, degree, points)
    if bad is not None:
        i = ids[bad[0] % len(ids)]
        points[i] = (points[i] + bad[1]) % q
        assert not dss.consistent_points(q, degree, points)


@pytest.mark.parametrize(("n", "t"), [pytest.param(4, 1, id="n4t1"), pytest.param(7, 2, id="n7t2")])
def test_optimistic_nonce_agrees_with_the_proof_checked_one_and_refuses_what_is_unsafe(
    n: int, t: int
) -> None:
    group = P256
    keys = dkg_keys(group, n, t)
    rand = DeterministicSource(b"optimistic", group.order)
    dealt = {d: dss.deal_nonce(group, b"o", d, n, t, rand) for d in keys}
    dealings = {d: dealing for d, (dealing, _) in dealt.items()}
    public = dss.nonce_public(group, b"o", n, t, dealings.keys(), dealings)
    states = {
        j: dss.nonce_finish(group, public, j, dealings, {d: shares[j] for d, (_, shares) in dealt.items()})
        for j in keys
    }
    values = {j: dss.product_value(group, states[j]) for j in keys}
    checked, bad = dss.open_nonce(
        group, public, {j: dss.open_product(group, public, states[j], rand) for j in keys}
    )
    assert bad == {}
    fast = dss.optimistic_nonce(group, public, values)
    assert fast is not None and (fast.R, fast.r) == (checked.R, checked.r)
    # One wrong z_i: no nonce without proofs.
    assert dss.optimistic_nonce(group, public, {**values, 2: (values[2] + 1) % group.order}) is None
    # Fewer than 3t+1 openings: a cheater's consistent-looking value would not be pinned down.
    fewer = dict(sorted(values.items())[: 3 * t])
    assert dss.optimistic_nonce(group, public, fewer) is None
    # Out-of-range ids or values are refused, not trusted.
    assert dss.optimistic_nonce(group, public, {**values, 1: group.order}) is None


def test_blame_w_dealings_names_the_dealer_of_a_bad_w_and_only_it() -> None:
    group, n, t = P256, 4, 1
    result = presign(group, n, t, seed="blame")
    public = result.public
    keys = dkg_keys(group, n, t)
    key = next(iter(keys.values())).public
    assert dss.blame_w_dealings(group, public, key) == {}
    forged = list(public.w_dealings)
    victim = forged[1]
    p = victim.proof
    forged[1] = dss.WDealing(
        victim.dealer, victim.commitment, dss.LinkProof(p.c, (p.e_k + 1) % group.order, p.e_u, p.e_v)
    )
    tampered = dataclasses.replace(public, w_dealings=tuple(forged), _cache={})
    assert set(dss.blame_w_dealings(group, tampered, key)) == {victim.dealer}


def test_presignature_w_commitment_is_the_lagrange_combination_of_the_reduction_set() -> None:
    group = P256
    public = presign(group, 4, 1, seed="wcommit").public
    lam = dss.lagrange_coefficients([d.dealer for d in public.w_dealings], group.order)
    expected = [
        group.sum(group.mul(lam[d.dealer], d.commitment.points[k]) for d in public.w_dealings)
        for k in range(2)
    ]
    assert list(public.w(group).points) == expected
    for j in range(1, 5):
        assert public.commitments_of(group, j)[1] == public.w(group).evaluate(group, j)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(1, 3),
    bad=st.one_of(
        st.none(), st.tuples(st.integers(1, 4), st.integers(0, 2), st.integers(0, 4), st.integers(1, 2**64))
    ),
)
def test_share_sums_check_catches_any_single_bad_dealer(
    count: int, bad: tuple[int, int, int, int] | None
) -> None:
    """One bad share of one dealer makes the sums over all dealers fail (2^-128 aside)."""
    group, n, t, j = P256, 4, 1, 1
    rounds = _nonce_round(group, n, t, b"sums", count)
    dealings = {d: [r[d][0] for r in rounds] for d in range(1, n + 1)}
    shares = {d: [list(r[d][1][j]) for r in rounds] for d in range(1, n + 1)}
    if bad is not None:
        d, k, component, offset = bad[0], bad[1] % count, bad[2], bad[3]
        shares[d][k][component] = (shares[d][k][component] + offset) % group.order
    assert dss.batch_check_nonce_share_sums(group, dealings, j, shares) == (bad is None)


def test_share_sums_check_is_about_sums_and_refuses_malformed_input() -> None:
    """Two dealers' errors that cancel pass the sum check (the protocol checks again if a
    qualified set keeps one of them only); the per-dealer check names both."""
    group, j = P256, 2
    rounds = _nonce_round(group, 4, 1, b"cancel", 2)
    dealings = {d: [r[d][0] for r in rounds] for d in range(1, 5)}
    shares = {d: [list(r[d][1][j]) for r in rounds] for d in range(1, 5)}
    shares[1][0][0] = (shares[1][0][0] + 5) % group.order
    shares[3][0][0] = (shares[3][0][0] - 5) % group.order
    assert dss.batch_check_nonce_share_sums(group, dealings, j, shares)
    assert dss.batch_check_nonce_shares(group, dealings[1], j, shares[1]) == [0]
    assert dss.batch_check_nonce_shares(group, dealings[3], j, shares[3]) == [0]
    kept = {d: dealings[d] for d in (1, 2, 4)}
    assert not dss.batch_check_nonce_share_sums(group, kept, j, {d: shares[d] for d in kept})
    # malformed: a short share, a dealer without shares, nothing at all
    short = {**shares, 2: [shares[2][0][:4], shares[2][1]]}
    assert not dss.batch_check_nonce_share_sums(group, dealings, j, short)
    assert not dss.batch_check_nonce_share_sums(group, dealings, j, {d: shares[d] for d in (1, 2, 3)})
    assert not dss.batch_check_nonce_share_sums(group, {}, j, {})
