"""Shamir, Feldman/Pedersen VSS, complaints and the DKG: correct, robust, names cheaters."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import dkg, local, shamir, vss
from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError, ParameterError
from appliance.crypto.groups.ed25519 import ED25519 as G
from appliance.crypto.secret import DeterministicSource

Q = G.order


def nt(max_n: int = 16) -> st.SearchStrategy[tuple[int, int]]:
    return st.integers(2, max_n).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1)))


@given(nt(), st.integers(0, Q - 1), st.integers(0, 2**32))
def test_any_t_plus_1_shares_reconstruct_the_secret(params: tuple[int, int], secret: int, seed: int) -> None:
    n, t = params
    rand = DeterministicSource(seed, Q)
    shares = shamir.split(secret, n, t, Q, rand)
    ids = sorted(shares)
    for subset in (ids[: t + 1], ids[-(t + 1) :]):
        assert shamir.interpolate({i: shares[i] for i in subset}, Q, threshold=t) == secret


def test_t_shares_are_refused_for_reconstruction() -> None:
    shares = shamir.split(42, 5, 2, Q, DeterministicSource(1, Q))
    with pytest.raises(NotEnoughSharesError):
        shamir.interpolate({1: shares[1], 2: shares[2]}, Q, threshold=2)


@pytest.mark.parametrize(("n", "t"), [(1, 1), (3, 0), (3, 3), (2, 5)])
def test_bad_parameters_are_refused(n: int, t: int) -> None:
    with pytest.raises(ParameterError):
        shamir.check_parameters(n, t)


@settings(max_examples=20, deadline=None)
@given(nt(10), st.integers(0, 2**32))
def test_feldman_shares_verify_and_a_changed_share_does_not(params: tuple[int, int], seed: int) -> None:
    n, t = params
    rand = DeterministicSource(seed, Q)
    commitment, shares = vss.feldman_deal(G, rand(), n, t, rand)
    for i, s in shares.items():
        assert vss.feldman_verify(G, commitment, i, s)
        assert not vss.feldman_verify(G, commitment, i, (s + 1) % Q)


@settings(max_examples=10, deadline=None)
@given(nt(8), st.integers(0, 2**32))
def test_pedersen_shares_verify_and_a_changed_share_does_not(params: tuple[int, int], seed: int) -> None:
    n, t = params
    rand = DeterministicSource(seed, Q)
    commitment, shares = vss.pedersen_deal(G, rand(), n, t, rand)
    for i, (s, b) in shares.items():
        assert vss.pedersen_verify(G, commitment, i, (s, b))
        assert not vss.pedersen_verify(G, commitment, i, (s, (b + 1) % Q))


def _signed_complaint(keys: local.PeriodKeys, dealer: int, accuser: int, value: int) -> vss.Complaint:
    msg = vss.ShareMessage(b"session", dealer, accuser, (value,))
    return vss.Complaint(accuser, msg, keys.sign(dealer, msg.payload("ctx", 3)))


def test_complaint_with_signed_bad_share_convicts_the_dealer() -> None:
    keys = local.PeriodKeys(4, b"k")
    rand = DeterministicSource(2, Q)
    commitment, shares = vss.feldman_deal(G, 7, 4, 1, rand)
    complaint = _signed_complaint(keys, dealer=2, accuser=3, value=(shares[3] + 5) % Q)
    verdict = vss.judge_complaint(G, commitment, complaint, keys.verify, context="ctx", period=3)
    assert verdict.guilty == 2


def test_false_complaint_convicts_the_accuser() -> None:
    keys = local.PeriodKeys(4, b"k")
    rand = DeterministicSource(3, Q)
    commitment, shares = vss.feldman_deal(G, 7, 4, 1, rand)
    complaint = _signed_complaint(keys, dealer=2, accuser=3, value=shares[3])
    verdict = vss.judge_complaint(G, commitment, complaint, keys.verify, context="ctx", period=3)
    assert verdict.guilty == 3 and "false complaint" in verdict.reason


def test_complaint_with_forged_evidence_convicts_the_accuser() -> None:
    keys = local.PeriodKeys(4, b"k")
    rand = DeterministicSource(4, Q)
    commitment, shares = vss.feldman_deal(G, 7, 4, 1, rand)
    msg = vss.ShareMessage(b"session", 2, 3, ((shares[3] + 1) % Q,))
    forged = vss.Complaint(3, msg, keys.sign(3, msg.payload("ctx", 3)))  # signed by the accuser
    verdict = vss.judge_complaint(G, commitment, forged, keys.verify, context="ctx", period=3)
    assert verdict.guilty == 3


def test_complaint_evidence_from_another_period_is_rejected() -> None:
    keys = local.PeriodKeys(4, b"k")
    rand = DeterministicSource(5, Q)
    commitment, shares = vss.feldman_deal(G, 7, 4, 1, rand)
    msg = vss.ShareMessage(b"session", 2, 3, ((shares[3] + 1) % Q,))
    old = vss.Complaint(3, msg, keys.sign(2, msg.payload("ctx", 2)))
    verdict = vss.judge_complaint(G, commitment, old, keys.verify, context="ctx", period=3)
    assert verdict.guilty == 3


@settings(max_examples=8, deadline=None)
@given(nt(16), st.integers(0, 2**32))
def test_dkg_gives_a_consistent_key_that_t_plus_1_shares_reconstruct(
    params: tuple[int, int], seed: int
) -> None:
    n, t = params
    result = local.run_dkg(G, n, t, DeterministicSource(seed, Q))
    keys = result.keys
    assert set(keys) == set(range(1, n + 1)) and result.qualification.cheaters == {}
    public = keys[1].public
    assert all(k.public == public for k in keys.values())
    assert all(k.check(G) for k in keys.values())
    secret = shamir.interpolate({i: keys[i].share.value for i in list(keys)[: t + 1]}, Q)
    assert G.mul_base(secret) == public.public_key


def test_dkg_names_a_dealer_that_sends_a_bad_share_and_completes() -> None:
    def tamper(dealer: int, recipient: int, share: int) -> int:
        return (share + 1) % Q if (dealer, recipient) == (3, 1) else share

    result = local.run_dkg(G, 5, 1, DeterministicSource(6, Q), tamper=tamper)
    assert set(result.qualification.cheaters) == {3}
    assert result.qualification.qual == frozenset({1, 2, 4, 5})
    assert all(k.check(G) for k in result.keys.values())
    secret = shamir.interpolate({1: result.keys[1].share.value, 5: result.keys[5].share.value}, Q)
    assert G.mul_base(secret) == result.keys[1].public_key


def test_dkg_completes_without_a_silent_server() -> None:
    result = local.run_dkg(G, 5, 1, DeterministicSource(7, Q), silent=frozenset({4}))
    assert 4 not in result.qualification.qual and set(result.keys) == {1, 2, 3, 5}


def test_dkg_rejects_a_dealing_with_a_wrong_proof_of_knowledge() -> None:
    rand = DeterministicSource(8, Q)
    dealing, _ = dkg.deal(G, b"ctx", 2, 4, 1, rand)
    bad = dkg.Dealing(2, dealing.commitment, dealing.pop_r, (dealing.pop_z + 1) % Q)
    with pytest.raises(CheatingError) as info:
        dkg.check_dealing(G, b"ctx", bad, 4, 1)
    assert info.value.party == 2
    with pytest.raises(CheatingError):  # a proof is bound to its context: no replay into another DKG
        dkg.check_dealing(G, b"other", dealing, 4, 1)


def test_dkg_rejects_a_stolen_dealing_under_another_id() -> None:
    rand = DeterministicSource(9, Q)
    dealing, _ = dkg.deal(G, b"ctx", 2, 4, 1, rand)
    with pytest.raises(CheatingError):
        dkg.check_dealing(G, b"ctx", dkg.Dealing(3, dealing.commitment, dealing.pop_r, dealing.pop_z), 4, 1)


def test_missing_share_must_be_revealed_or_the_dealer_is_disqualified() -> None:
    rand = DeterministicSource(10, Q)
    keys = local.PeriodKeys(4, b"k")
    dealings = {d: dkg.deal(G, b"ctx", d, 4, 1, rand) for d in range(1, 5)}
    public = {d: v[0] for d, v in dealings.items()}
    missing = [dkg.MissingShare(accuser=1, dealer=2), dkg.MissingShare(accuser=1, dealer=3)]
    reveals = [dkg.Reveal(2, 1, dealings[2][1][1])]
    qual = dkg.qualify(
        G, b"ctx", 4, 1, public, [], missing, reveals, keys.verify, signing_context="c", period=0
    )
    assert qual.qual == frozenset({1, 2, 4}) and set(qual.cheaters) == {3}
    assert qual.revealed[(2, 1)] == dealings[2][1][1]


def test_dkg_fails_cleanly_without_enough_qualified_dealers() -> None:
    with pytest.raises(NotEnoughSharesError):
        local.run_dkg(G, 3, 2, DeterministicSource(11, Q), silent=frozenset({1}))


@given(st.binary(max_size=200))
def test_dealing_decoder_raises_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        dkg.Dealing.decode(G, data, 5, 1)


def test_dealing_roundtrip_and_decoder_rejects_mangled_fields() -> None:
    dealing, _ = dkg.deal(G, b"ctx", 2, 5, 2, DeterministicSource(12, Q))
    data = dealing.encode(G)
    assert dkg.Dealing.decode(G, data, 5, 2) == dealing
    with pytest.raises(DecodeError, match="expected 2 elements, got 3"):
        dkg.Dealing.decode(G, data, 5, 1)
    with pytest.raises(DecodeError, match="outside"):
        dkg.Dealing.decode(G, data, 1, 2)
    for i in range(len(data)):
        mangled = bytearray(data)
        mangled[i] ^= 0x40
        with contextlib.suppress(DecodeError):
            dkg.Dealing.decode(G, bytes(mangled), 5, 2)
