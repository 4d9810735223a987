"""Proactive refresh and share recovery (Herzberg-Jarecki-Krawczyk-Yung)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import local, pss, shamir
from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups.ed25519 import ED25519 as G
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource, SecretScalar

Q = G.order


def nt(max_n: int) -> st.SearchStrategy[tuple[int, int]]:
    return st.integers(2, max_n).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1)))


@settings(max_examples=10, deadline=None)
@given(nt(10), st.integers(0, 2**32))
def test_refresh_changes_every_share_and_never_the_public_key(params: tuple[int, int], seed: int) -> None:
    n, t = params
    rand = DeterministicSource(seed, Q)
    keys = local.run_dkg(G, n, t, rand).keys
    before = {i: k.share.value for i, k in keys.items()}
    public_key = keys[1].public_key
    secret = shamir.interpolate({i: before[i] for i in range(1, t + 2)}, Q)
    new = local.run_refresh(G, keys, rand)
    assert all(k.share.wiped for k in keys.values()), "old shares must be wiped"
    assert all(new[i].share.value != before[i] for i in new)
    assert all(k.public_key == public_key and k.check(G) for k in new.values())
    assert shamir.interpolate({i: new[i].share.value for i in range(n - t, n + 1)}, Q) == secret


@settings(max_examples=10, deadline=None)
@given(nt(8), st.integers(0, 2**32))
def test_refresh_makes_stolen_shares_useless(params: tuple[int, int], seed: int) -> None:
    """Scenario A: t shares of period p plus one share of period p+1 never give the secret."""
    n, t = params
    rand = DeterministicSource(seed, Q)
    keys = local.run_dkg(G, n, t, rand).keys
    old = {i: k.share.value for i, k in keys.items()}
    public_key = keys[1].public_key
    new = {i: k.share.value for i, k in local.run_refresh(G, keys, rand).items()}
    for stolen in itertools.combinations(sorted(old), t):
        for later in sorted(set(new) - set(stolen)):
            mixed = {i: old[i] for i in stolen} | {later: new[later]}
            assert G.mul_base(shamir.interpolate(mixed, Q)) != public_key
    assert G.mul_base(shamir.interpolate({i: new[i] for i in range(1, t + 2)}, Q)) == public_key
    assert G.mul_base(shamir.interpolate({i: old[i] for i in range(1, t + 2)}, Q)) == public_key


def test_refresh_rejects_a_bad_subshare_and_names_its_dealer() -> None:
    rand = DeterministicSource(1, Q)
    keys = local.run_dkg(G, 4, 1, rand).keys
    dealing, shares = pss.refresh_deal(G, 2, 4, 1, rand)
    with pytest.raises(CheatingError) as info:
        pss.refresh_share(G, keys[3], {2: dealing}, {2: (shares[3] + 1) % Q})
    assert info.value.party == 2


def test_refresh_dealing_cannot_shift_the_secret() -> None:
    """The constant term of a refresh dealing is the identity by construction: it is not even sent."""
    rand = DeterministicSource(2, Q)
    dealing, _ = pss.refresh_deal(G, 1, 4, 2, rand)
    assert len(dealing.points) == 2
    decoded = pss.ZeroDealing.decode(G, dealing.encode(G), 4, 2)
    assert decoded == dealing
    with pytest.raises(DecodeError):
        pss.ZeroDealing.decode(G, dealing.encode(G), 4, 3)


@settings(max_examples=10, deadline=None)
@given(nt(10), st.integers(0, 2**32), st.data())
def test_recovery_rebuilds_exactly_the_lost_share(
    params: tuple[int, int], seed: int, data: st.DataObject
) -> None:
    n, t = params
    if n < t + 2:
        return
    rand = DeterministicSource(seed, Q)
    keys = local.run_dkg(G, n, t, rand).keys
    lost = data.draw(st.integers(1, n))
    expected = keys[lost].share.value
    helpers = {i: k for i, k in keys.items() if i != lost}
    recovered = local.run_recovery(G, helpers, lost, rand)
    assert recovered.key.share.value == expected and recovered.cheaters == {}
    assert recovered.key.public == keys[lost].public


def test_recovery_values_reveal_nothing_about_helper_shares() -> None:
    """What the lost server receives is x_i blinded by a random polynomial vanishing at its id."""
    rand = DeterministicSource(3, Q)
    keys = local.run_dkg(G, 5, 2, rand).keys
    helpers = [1, 2, 3, 4]
    dealings, subshares = {}, {i: {} for i in helpers}
    for d in helpers:
        dealing, shares = pss.recovery_deal(G, d, 5, helpers, 2, rand)
        dealings[d] = dealing
        for i in helpers:
            subshares[i][d] = shares[i]
    values = {i: pss.recovery_contribution(G, keys[i], dealings, subshares[i]) for i in helpers}
    assert all(values[i] != keys[i].share.value for i in helpers)
    # The blinding polynomial vanishes at the lost id: h(5) = f(5).
    assert shamir.interpolate({i: values[i] for i in helpers[:3]}, Q, x=5) == keys[5].share.value


def test_recovery_names_a_helper_that_sends_a_bad_value_and_still_succeeds() -> None:
    rand = DeterministicSource(4, Q)
    keys = local.run_dkg(G, 5, 1, rand).keys
    helpers = [1, 2, 3, 4]
    dealings, subshares = {}, {i: {} for i in helpers}
    for d in helpers:
        dealing, shares = pss.recovery_deal(G, d, 5, helpers, 1, rand)
        dealings[d] = dealing
        for i in helpers:
            subshares[i][d] = shares[i]
    values = {i: pss.recovery_contribution(G, keys[i], dealings, subshares[i]) for i in helpers}
    values[2] = (values[2] + 1) % Q
    result = pss.recover_share(G, keys[1].public, 5, dealings, values)
    assert result.key.share.value == keys[5].share.value
    assert set(result.cheaters) == {2}


def test_recovery_fails_cleanly_without_enough_valid_values() -> None:
    rand = DeterministicSource(5, Q)
    keys = local.run_dkg(G, 4, 1, rand).keys
    with pytest.raises(NotEnoughSharesError):
        pss.recover_share(G, keys[1].public, 4, {}, {1: 5})


def test_recovery_subshare_from_a_dealing_not_vanishing_at_the_lost_id_is_caught() -> None:
    rand = DeterministicSource(6, Q)
    dealing, shares = pss.recovery_deal(G, 1, 5, [1, 2, 3, 4], 2, rand)
    assert all(dealing.check_subshare(G, i, s) for i, s in shares.items())
    assert not dealing.check_subshare(G, 2, (shares[2] + 1) % Q)
    with pytest.raises(CheatingError):
        pss.check_recovery_dealing(G, dealing, 4, 5, 2)


@given(st.binary(max_size=160))
def test_refresh_and_recovery_decoders_raise_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        pss.ZeroDealing.decode(G, data, 5, 2)
    with pytest.raises(DecodeError):
        pss.RecoveryDealing.decode(G, data, 5, 2)


def test_refresh_of_a_corrupted_own_share_says_the_server_needs_recovery() -> None:
    rand = DeterministicSource(7, Q)
    keys = local.run_dkg(G, 4, 1, rand).keys
    corrupt = KeyShare(3, SecretScalar(keys[3].share.value + 1, Q), keys[3].public)
    dealing, shares = pss.refresh_deal(G, 1, 4, 1, rand)
    with pytest.raises(pss.CorruptShareError, match="server 3"):
        pss.refresh_share(G, corrupt, {1: dealing}, {1: shares[3]})
