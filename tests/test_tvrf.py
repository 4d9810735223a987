"""Threshold VRF: any t+1 servers give the same output; a bad partial names its server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import local, shamir, tvrf
from appliance.crypto.errors import CheatingError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import ED25519 as G
from appliance.crypto.secret import DeterministicSource


@settings(max_examples=10, deadline=None)
@given(
    st.integers(3, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))),
    st.binary(max_size=40),
    st.integers(0, 2**32),
)
def test_every_t_plus_1_subset_gives_the_same_unbiasable_output(
    params: tuple[int, int], msg: bytes, seed: int
) -> None:
    n, t = params
    rand = DeterministicSource(seed, G.order)
    keys = local.run_dkg(G, n, t, rand).keys
    public = keys[1].public
    shares = {i: public.verification_share(G, i) for i in keys}
    parts = {i: tvrf.partial(G, i, keys[i].share.value, msg, rand) for i in keys}
    first = tvrf.combine(G, t, msg, {i: parts[i] for i in range(1, t + 2)}, shares)
    last = tvrf.combine(G, t, msg, {i: parts[i] for i in range(n - t, n + 1)}, shares)
    secret = shamir.interpolate({i: keys[i].share.value for i in range(1, t + 2)}, G.order)
    assert first == last == tvrf.evaluate_directly(G, secret, msg)
    assert (
        tvrf.combine(
            G,
            t,
            msg + b"x",
            {i: tvrf.partial(G, i, keys[i].share.value, msg + b"x", rand) for i in range(1, t + 2)},
            shares,
        )
        != first
    )


def test_a_wrong_partial_names_its_server_and_too_few_are_refused() -> None:
    rand = DeterministicSource(1, G.order)
    keys = local.run_dkg(G, 4, 1, rand).keys
    shares = {i: keys[1].public.verification_share(G, i) for i in keys}
    good = tvrf.partial(G, 2, keys[2].share.value, b"m", rand)
    bad = tvrf.Partial(2, G.mul(5, good.y), good.c, good.z)
    with pytest.raises(CheatingError) as info:
        tvrf.combine(G, 1, b"m", {2: bad, 3: tvrf.partial(G, 3, keys[3].share.value, b"m", rand)}, shares)
    assert info.value.party == 2
    with pytest.raises(NotEnoughSharesError):
        tvrf.combine(G, 1, b"m", {2: good}, shares)
    assert tvrf.Partial.from_bytes(G, good.to_bytes(G)) == good


@given(st.binary(max_size=200))
def test_partial_decoder_raises_only_decode_error(data: bytes) -> None:
    try:
        part = tvrf.Partial.from_bytes(G, data)
    except DecodeError:
        return
    assert part.to_bytes(G) == data
